"""Print one of README.md's set-up commands, exactly as written, for .ci/run to execute.

    python3 .ci/readme_command.py main     # the line under "# main job: ..."
    python3 .ci/readme_command.py tests    # the line under "# tests: ..."

Each command is the first line after its comment in a fenced bash block of the README's set-up section, so
CI runs what a new user copies, and a README edit cannot leave CI running something else.
"""

import sys
from pathlib import Path

LABELS = {"main": "# main job:", "tests": "# tests:"}


def readme_command(name: str, readme: Path = Path(__file__).resolve().parents[1] / "README.md") -> str:
    lines = readme.read_text().splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith(LABELS[name]) and lines[i - 1].strip() == "```bash":
            return lines[i + 1]
    raise SystemExit(f"README.md has no bash block starting with {LABELS[name]!r}")


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
