"""Performance-path tests run tiny models on one intra-op thread (the 2-core machine is shared); nothing is timed."""

import importlib.util
from pathlib import Path

import pytest
import torch

MODULE_BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_model_modules.py"


@pytest.fixture(autouse=True, scope="package")
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def reference():
    """``bench/bench_model_modules.py``: the official-style reference forward written from the parameters."""
    spec = importlib.util.spec_from_file_location("bench_model_modules", MODULE_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
