"""Core tests run tiny models: one intra-op thread is faster than two on the shared 2-core machine."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
