"""The README's commands from the repository root, beside Hugging Face's ``kernels`` package.

transformers >= 5.25 requires Hugging Face's ``kernels`` package and imports it. ``python -m ...`` and
``python -m pytest`` put the working directory first on ``sys.path``, so from the repository root our
top-level ``kernels/`` folder must never win over it. It has no ``__init__.py``: it is at most a PEP 420
namespace portion, and the import system passes over those for a regular package found later on
``sys.path``. Every check runs from the repository root twice: in this environment, where transformers
installed ``kernels``, and in a scratch venv that sees every package of this one except ``kernels``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])


def _without_hf_kernels(folder: Path) -> str:
    """A venv whose site-packages links every entry of this one except Hugging Face's ``kernels``."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next(folder.glob("lib/python*/site-packages"))
    for entry in SITE.iterdir():
        if entry.name != "kernels" and not (entry.name.startswith("kernels-") and entry.name.endswith(".dist-info")):
            (site / entry.name).symlink_to(entry)
    return str(folder / "bin" / "python")


@pytest.fixture(scope="module", params=["kernels installed", "kernels not installed"])
def python(request, tmp_path_factory) -> str:
    if request.param == "kernels installed":
        try:
            importlib.metadata.version("kernels")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("Hugging Face's kernels is not installed here (transformers >= 5.25 installs it)")
        return sys.executable
    return _without_hf_kernels(tmp_path_factory.mktemp("no-hf-kernels") / "venv")


# a new user's shell: none of ours, and no launcher's (trainer tests run in this process leave RANK set)
NOT_INHERITED = ("PYTHONPATH", "TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


def _from_root(python: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    out = subprocess.run([python, "-W", "error::UserWarning:__main__", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)} from the repository root failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_import_kernels_gives_hugging_faces_package_or_nothing(python):
    code = ("import importlib.metadata as m, kernels, hypo_fast\n"
            "try:\n    installed = m.version('kernels')\nexcept m.PackageNotFoundError:\n    installed = None\n"
            "print('FILE', kernels.__file__, installed)\nhypo_fast.info()")
    out = _from_root(python, "-c", code).stdout
    file, installed = out.split("FILE ", 1)[1].split("\n", 1)[0].rsplit(" ", 1)
    if installed == "None":  # only our folder, as a namespace portion: no module file, nothing shadowed
        assert file == "None"
        assert "`import kernels`: not installed" in out
    else:
        assert Path(file).resolve().is_relative_to(SITE.resolve()), file
        assert f"`import kernels`: Hugging Face kernels {installed} from " in out


def test_transformers_imports_its_models(python):
    _from_root(python, "-c", "from transformers import LlamaConfig, LlamaForCausalLM; LlamaConfig()")


@pytest.mark.slow
def test_the_demo_runs_from_the_repository_root(python, tmp_path):
    out = _from_root(python, "-m", "hypo_fast.demo", "--quick", "--out", str(tmp_path / "demo")).stdout
    assert "manipulation check:" in out and "quick mode:" in out
    assert (tmp_path / "demo" / "frontier.png").is_file()


@pytest.mark.slow
def test_pytest_collects_the_suite_from_the_repository_root(python):
    out = _from_root(python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider").stdout
    summary = out.strip().splitlines()[-1]
    assert " tests collected in " in summary and "error" not in summary, out[-2000:]


def test_info_warns_when_a_kernels_module_shadows_hugging_faces(tmp_path):
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed here")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's hypo_fast, from a folder with a shadow
    out = subprocess.run([sys.executable, "-c", "import hypo_fast; hypo_fast.info()"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    assert f"gives {tmp_path.resolve() / 'kernels' / '__init__.py'}: it shadows the installed package" in out.stdout
    assert "UserWarning: `import kernels`: Hugging Face kernels" in out.stderr


def _ci_versions():
    spec = importlib.util.spec_from_file_location("ci_versions", ROOT / ".ci" / "versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_every_package_behind_the_numbers():
    from packaging.requirements import Requirement

    pins = _ci_versions().pinned()
    for name in ("torch", "triton", "transformers", "kernels", "tokenizers", "trl", "accelerate", "peft", "deepspeed",
                 "datasets", "liger-kernel", "safetensors", "huggingface-hub", "numpy"):
        assert name in pins, f"constraints.txt does not pin {name}"
    for line in importlib.metadata.requires("hypo_fast"):  # every requirement the README's installs ask for
        requirement = Requirement(line)
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in ("test", "trl", "loggers")):
            continue
        name = requirement.name.lower().replace("_", "-")
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), (line, pins.get(name))
