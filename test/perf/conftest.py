"""Performance-path tests: the official-style reference forward from the module benchmark; nothing is timed."""

import importlib.util
from pathlib import Path

import pytest

MODULE_BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_model_modules.py"


@pytest.fixture(scope="package")
def reference():
    """``bench/bench_model_modules.py``: the official-style reference forward written from the parameters."""
    spec = importlib.util.spec_from_file_location("bench_model_modules", MODULE_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
