"""The versions behind a green run: write them as pip constraints, or show how this environment differs.

    python .ci/versions.py freeze > constraints.txt   # after a green .ci/run, inside its .venv
    python .ci/versions.py drift                      # what differs from constraints.txt (CI prints it)

CI installs the newest releases, as a user does, so a release that breaks hypo_fast is seen at once;
``constraints.txt`` holds the exact versions of the last green run, so ``pip install -c constraints.txt``
reproduces the set behind the committed numbers. Local version labels (``+cpu``, ``+cu128``) are dropped:
the pins hold for CPU and CUDA builds of torch alike.
"""

import importlib.metadata
import platform
import sys
from datetime import date
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
SKIP = {"hypo_fast", "hypo-fast", "pip"}  # the project itself, and the installer


def installed() -> dict[str, str]:
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in SKIP:
            found[name.lower().replace("_", "-")] = dist.version.split("+")[0]
    return dict(sorted(found.items()))


def pinned(path: Path = CONSTRAINTS) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def freeze() -> str:
    header = (f"# The exact versions of the last green `.ci/run` ({date.today()}, Python {platform.python_version()}, "
              f"{platform.machine()}, CPU).\n# pip install -c constraints.txt ... reproduces them; "
              f"refresh with `python .ci/versions.py freeze > constraints.txt` inside that run's .venv.\n")
    return header + "".join(f"{name}=={version}\n" for name, version in installed().items())


def drift() -> str:
    now, pins = installed(), pinned()
    changed = [f"  {name} {pins[name]} -> {now[name]}" for name in pins if name in now and now[name] != pins[name]]
    added = [f"  {name} {now[name]} (new)" for name in now if name not in pins]
    if not changed and not added:
        return "versions: exactly constraints.txt"
    return "versions that differ from constraints.txt (the last green run):\n" + "\n".join(changed + added)


if __name__ == "__main__":
    sys.stdout.write(freeze() if sys.argv[1:] == ["freeze"] else drift() + "\n")
