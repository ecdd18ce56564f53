"""The SpecEE GPU-suite module runs at size "tiny" and returns rows with the contract's keys."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.papers import specee  # noqa: E402

KEYS = {"paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s"}


def test_run_tiny():
    rows = specee.run("tiny", 20, print)
    assert {r["variant"] for r in rows} == {"greedy", "specee_forced0", "specee_executed", "specee_estimate"}
    for r in rows:
        assert KEYS <= set(r) and r["paper"] == "specee" and r["tokens_per_s"] > 0
