"""hypo_fast packaging: the top-level ``kernels/`` folder installs as ``hypo_fast.kernels``."""

from setuptools import setup

setup(
    name="hypo_fast",
    version="0.1.0",
    description="Fused Triton kernels and a DeepSpeed trainer for HyPO (hybrid DPO + online KL)",
    python_requires=">=3.11",
    packages=["hypo_fast", "hypo_fast.ops", "hypo_fast.kernels", "hypo_fast.models", "hypo_fast.examples",
              "hypo_fast.train"],
    package_dir={"hypo_fast": "hypo_fast", "hypo_fast.kernels": "kernels"},
    package_data={"hypo_fast.examples": ["*.yaml"]},
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
        "test": ["pytest", "scipy"],
    },
)
