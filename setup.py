"""hypo_fast packaging.

The Triton kernels live in the top-level ``kernels/`` folder and are the subpackage ``hypo_fast.kernels``
through one mechanism: the link ``hypo_fast/kernels -> ../kernels``. It serves a plain checkout on
``PYTHONPATH``, editable installs and wheels alike (a wheel holds the files the link points at).
``kernels/`` has no ``__init__.py`` on purpose: from the repository root it is at most a PEP 420 namespace
portion, which never wins over an installed regular package named ``kernels`` (Hugging Face's, which
transformers >= 5.25 requires). When cmake, a C++ compiler and torch are present, ``CMakeLists.txt`` builds
the native CPU ops (``kernels/csrc``) into ``hypo_fast/_C.so`` against the installed torch; otherwise the
package installs pure-Python (set ``HYPO_FAST_NATIVE=0`` to skip the build on purpose).
"""

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
TORCH_PREFIX_QUERY = "import torch.utils; print(torch.utils.cmake_prefix_path)"


@functools.cache
def torch_cmake_prefix() -> str | None:
    """``torch.utils.cmake_prefix_path`` of the torch the package will run with.

    pip builds in an isolated environment that hides the target's site-packages, and the extension must
    link the torch it will be loaded into, so when torch is not importable here ask the same interpreter
    without pip's overlay.
    """
    try:
        import torch.utils

        return torch.utils.cmake_prefix_path
    except ImportError:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
        found = subprocess.run([sys.executable, "-c", TORCH_PREFIX_QUERY], env=env, capture_output=True, text=True)
        if found.returncode != 0:
            return None
        return found.stdout.strip() or None


class CMakeBuild(build_ext):
    """Builds ``hypo_fast._C`` with CMake when it can; otherwise installs without it and says why.

    Whatever happens, ``hypo_fast/_build_info.json`` records it (``hypo_fast.info()`` prints it), and a
    skipped or failed build drops the extension from the build, so editable and regular installs both
    complete without it.
    """

    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")) + ".so"  # a torch op library, not a Python module

    def run(self):
        library = Path(self.get_ext_fullpath("hypo_fast._C"))  # in the source tree for editable installs
        reason = self._missing_prerequisite() or self._cmake_build()
        if reason is None:
            print("hypo_fast: built the native CPU ops (hypo_fast._C)", file=sys.stderr)
        else:
            print(f"hypo_fast: installing without the native CPU ops ({reason}); CPU ops use the PyTorch path",
                  file=sys.stderr)
            self.extensions = []  # nothing to copy or record
        self._build_info = library.with_name("_build_info.json")
        self._build_info.parent.mkdir(parents=True, exist_ok=True)
        self._build_info.write_text(json.dumps({"native_built": reason is None, "reason": reason}) + "\n")
        super().run()

    def get_outputs(self):
        info = getattr(self, "_build_info", None)
        return super().get_outputs() + ([str(info)] if info is not None else [])

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._cmake_dir / "_C.so", target)

    def _cmake_build(self) -> str | None:
        """Configure and build ``_C.so`` under ``build_temp``; returns None, or why it failed."""
        self._cmake_dir = Path(self.build_temp) / "cmake"
        configure = ["cmake", "-S", str(ROOT), "-B", str(self._cmake_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch_cmake_prefix()}"]
        try:
            subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["cmake", "--build", str(self._cmake_dir), f"-j{os.cpu_count() or 1}"], check=True,
                           stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as error:
            return f"the CMake build failed: {error}"
        return None

    @staticmethod
    def _missing_prerequisite() -> str | None:
        if os.environ.get("HYPO_FAST_NATIVE", "1") == "0":
            return "HYPO_FAST_NATIVE=0"
        if shutil.which("cmake") is None:
            return "cmake not found"
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            return "no C++ compiler found"
        if torch_cmake_prefix() is None:
            return "torch is not installed yet (install it first to build the native ops)"
        return None


setup(
    name="hypo_fast",
    version="0.1.0",
    description="Fused Triton kernels and a DeepSpeed trainer for HyPO (hybrid DPO + online KL)",
    python_requires=">=3.11",
    packages=["hypo_fast", "hypo_fast.ops", "hypo_fast.kernels", "hypo_fast.models", "hypo_fast.examples",
              "hypo_fast.train", "hypo_fast.integrations"],
    package_data={"hypo_fast.examples": ["*.yaml"]},
    ext_modules=[Extension("hypo_fast._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.0",
        "peft",
        "deepspeed",
        "safetensors",
        "liger-kernel",
        "datasets",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["hypo-fast = hypo_fast.cli:main"]},
    extras_require={
        "flash": ["flash-attn"],
        "trl": ["trl==1.16.*"],  # hypo_fast.integrations.trl and the TRL parity tests
        "loggers": ["wandb", "mlflow-skinny"],  # output.report_to: wandb, mlflow
        "test": ["pytest", "scipy"],
    },
)
