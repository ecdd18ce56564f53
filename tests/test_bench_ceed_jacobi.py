"""The CEED-VLA GPU-suite module runs at the tiny size and returns rows of the suite's schema (never timed)."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_run_tiny():
    path = ROOT / "benchmarks" / "papers" / "ceed_jacobi.py"
    spec = importlib.util.spec_from_file_location("bench_ceed_jacobi", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run("tiny", 20, print)
    assert rows and rows[0]["variant"] == "greedy"    # (a loaded machine may spend the budget early)
    for r in rows:
        assert {"paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s"} <= set(r)
        assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["new_tokens"] == 8
    assert all(1 <= r["iters_per_block"] <= r["block"] for r in rows if r["block"])
    # Host stops per token: none for greedy; a Jacobi block stops once per iteration and once to leave.
    assert rows[0]["host_stops"] == 0
    assert all(r["host_stops"] == pytest.approx((r["iters_per_block"] + 1) / r["block"]) for r in rows if r["block"])
