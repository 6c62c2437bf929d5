"""Installs as a new user meets them, each in its own scratch venv on a copy of the source tree.

A scratch venv sees this environment's packages through a ``.pth`` line (torch, triton, … are not
reinstalled) and installs hypo_fast itself with ``pip`` exactly as the README says, build isolation
included. Each install then imports the package, prints ``hypo_fast.info()`` and checks the op against
a float64 computation on the backend ``impl="auto"`` picked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

OP_CHECK = r"""
import json, torch, hypo_fast
from hypo_fast.ops.backends import resolve_impl
facts = hypo_fast.info()
h = torch.randn(37, 16, dtype=torch.float64)
w = torch.randn(301, 16, dtype=torch.float64)
y = torch.randint(0, 301, (37,))
y[::5] = -100
expected = torch.log_softmax(h @ w.T, -1).gather(-1, y.clamp_min(0)[:, None]).squeeze(-1).masked_fill(y < 0, 0)
hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
logp = hypo_fast.linear_logprobs(hf, wf, y)
torch.testing.assert_close(logp.double(), expected, atol=1e-4, rtol=1e-4)
logp.sum().backward()
assert torch.isfinite(hf.grad).all() and torch.isfinite(wf.grad).all()
print("RESULT " + json.dumps({"impl": resolve_impl("auto", torch.device("cpu")), "package": facts["package"],
                              "native": facts["native_ops"]}))
"""


def _source_copy(dest: Path) -> Path:
    """The working tree as a fresh checkout of it would hold it (ignored build outputs left out)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return dest


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    site = next(path.glob("lib/python*/site-packages"))
    (site / "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, triton, …
    return path / "bin" / "python"


def _run(args, cwd, env, check=True):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-3000:]}")
    return out


def _pip_install(python: Path, source: Path, editable: bool, env: dict) -> str:
    args = [python, "-m", "pip", "install", "-v", "--no-deps", "--ignore-installed", "--no-cache-dir"]
    out = _run(args + (["-e", str(source)] if editable else [str(source)]), source.parent, env)
    return out.stdout + out.stderr


def _op_check(python: Path, cwd: Path, env: dict) -> dict:
    import json

    out = _run([python, "-c", OP_CHECK], cwd, env)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _clean_env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "HYPO_FAST_NATIVE")}
    env.update(changes)
    return env


def _path_without(tmp: Path, program: str) -> str:
    """PATH with every folder's executables except ``program`` (linked into one folder)."""
    shadow = tmp / f"bin-without-{program}"
    shadow.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = shadow / entry.name
            if entry.name != program and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(shadow)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("install")


@pytest.mark.slow
def test_plain_checkout_on_pythonpath_then_editable_without_native(workdir):
    source = _source_copy(workdir / "a" / "hypo_fast_src")
    python = _venv(workdir / "a" / "venv")
    # no install at all: the checkout on PYTHONPATH imports, kernels included
    result = _op_check(python, workdir, _clean_env(PYTHONPATH=str(source)))
    assert result["package"] == str(source / "hypo_fast")
    log = _pip_install(python, source, editable=True, env=_clean_env(HYPO_FAST_NATIVE="0"))
    assert "installing without the native CPU ops (HYPO_FAST_NATIVE=0)" in log
    result = _op_check(python, workdir, _clean_env())
    assert result == {"impl": "torch", "package": str(source / "hypo_fast"),
                      "native": "not built (HYPO_FAST_NATIVE=0)"}


@pytest.mark.slow
def test_non_editable_install_builds_native_and_runs_from_the_repo_root(workdir):
    if not (shutil.which("cmake") and shutil.which(os.environ.get("CXX", "c++"))):
        pytest.skip("no cmake or C++ compiler here")
    source = _source_copy(workdir / "b" / "hypo_fast_src")
    python = _venv(workdir / "b" / "venv")
    log = _pip_install(python, source, editable=False, env=_clean_env())
    assert "built the native CPU ops" in log
    installed = _op_check(python, workdir, _clean_env())
    assert installed["impl"] == "native" and "site-packages" in installed["package"], installed
    # from the repository root the source tree's package is imported; it finds the installed build
    from_root = _op_check(python, source, _clean_env())
    assert from_root["package"] == str(source / "hypo_fast") and from_root["impl"] == "native", from_root
    assert "site-packages" in from_root["native"]


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["cmake", "compiler"])
def test_without_a_toolchain_the_install_still_works(workdir, missing):
    source = _source_copy(workdir / missing / "hypo_fast_src")
    python = _venv(workdir / missing / "venv")
    if missing == "cmake":
        env, reason = _clean_env(PATH=_path_without(workdir / missing, "cmake")), "cmake not found"
    else:
        env, reason = _clean_env(CXX="/nonexistent/c++"), "no C++ compiler found"
    log = _pip_install(python, source, editable=missing == "cmake", env=env)
    assert f"installing without the native CPU ops ({reason})" in log
    result = _op_check(python, workdir, _clean_env())
    assert result["impl"] == "torch" and result["native"] == f"not built ({reason})", result
