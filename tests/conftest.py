"""Suite-wide settings: one torch thread (tiny tensors; CI has 2 shared cores) and seeded RNGs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tests that drive the loop below finetune() (which sets --threads itself) use one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
