"""The SpecEE GPU-suite module runs at size "tiny" and returns rows with the contract's keys, host stops beside the
times (greedy and the drafter none)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.papers import specee  # noqa: E402

KEYS = {"paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s"}


def test_run_tiny():
    rows = specee.run("tiny", 20, print)
    assert {r["variant"] for r in rows} == {"greedy", "specee_forced0", "specee_forced0_head_always",
                                            "specee_executed", "specee_estimate"}
    for r in rows:
        assert KEYS <= set(r) and r["paper"] == "specee" and r["tokens_per_s"] > 0
    by = {r["variant"]: r for r in rows}
    assert by["greedy"]["host_stops"] == 0 and by["specee_estimate"]["draft_host_stops"] == 0
    assert by["specee_forced0"]["host_stops"] > 0
    assert by["specee_forced0_head_always"]["host_stops"] < by["specee_forced0"]["host_stops"]
