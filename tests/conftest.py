"""Suite-wide settings: one torch thread (tiny tensors; CI has 2 shared cores) and seeded RNGs.

TRADY_TEST_THREADS=N runs the tests with N torch threads instead: scripts/test.sh runs the tests marked
`numerics` again with 2 threads and another CPU kernel set (ATEN_CPU_CAPABILITY), so that a tolerance
that holds only for one machine's kernels and one thread count fails at home (docs/reliability.md)."""

import os

import pytest
import torch

TEST_THREADS = int(os.environ.get("TRADY_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tests that drive the loop below finetune() (which sets --threads itself) use one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)
