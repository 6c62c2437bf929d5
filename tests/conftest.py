"""Test setup: interpreted Triton on CPU-only machines, poisoned allocations everywhere."""

import os
import tempfile

# tokenized-data caches of the tests go to a scratch folder, never the user's `datasets` cache (set before
# anything imports `datasets`, which reads it once)
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hypo-fast-datasets-"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    # must precede the first `import triton`: kernels then run on CPU tensors, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """Every torch.empty is filled with NaN (ints with their max): unwritten outputs cannot pass."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.utils.deterministic.fill_uninitialized_memory = previous[2]


@pytest.fixture
def seed():
    """A fresh seed per test, printed on failure so a run can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value
