"""Test set-up: 8 fake CPU devices, a persistent compilation cache, numpy rank promotion raises.

``XLA_FLAGS`` from the environment are kept and the device count is added to them, so the suite runs under another
instruction set the way another CPU would compile it (issue 23):
``XLA_FLAGS=--xla_cpu_max_isa=AVX2 pytest tests/`` (or ``SSE4_2``).
"""
import gc
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/eejax-jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_DATA = pathlib.Path(
    os.environ.get("EEJAX_DATA_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def shared_data():
    """The shared offline data directory; tests that need it skip with a reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} not found (set EEJAX_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
    """Each module's compiled programs and cached models are dropped when it ends (jax's jit caches and the
    module's own ``functools.lru_cache``s, e.g. test_pretrained's SmolLM2 weights). Kept for the whole session, the
    suite's process grew past 10 GB by test_train_path (about 95% of the way), and there, in CI and in three runs
    here, XLA's CPU compiler died with SIGSEGV inside a compilation that passes in a fresh process."""
    yield
    for obj in list(vars(request.module).values()):
        if callable(getattr(obj, "cache_clear", None)) and hasattr(obj, "cache_info"):
            obj.cache_clear()
    jax.clear_caches()
    gc.collect()
