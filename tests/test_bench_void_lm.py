"""benchmarks/papers/void_lm.py runs at size tiny and returns rows with the contract's keys."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

REQUIRED = ("paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s")


def test_bench_void_lm_tiny():
    from papers import void_lm  # noqa: PLC0415
    rows = void_lm.run("tiny", 20, print)
    assert rows and all(k in r for r in rows for k in REQUIRED)
    assert {r["variant"] for r in rows} == {"greedy", "lac_official", "pp_pattern_skip"}
    assert all(r["host_stops"] == 0 for r in rows)        # LAC and static skip programs add no host stop
