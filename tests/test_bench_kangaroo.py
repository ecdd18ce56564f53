"""The Kangaroo GPU-suite module runs at size "tiny" and returns rows with the contract's keys, host stops beside
the times (greedy none, the loop's per round, the draft step's none)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.papers import kangaroo  # noqa: E402

KEYS = {"paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s"}


def test_run_tiny():
    rows = kangaroo.run("tiny", 20, print)
    assert {r["variant"] for r in rows} == {"greedy", "kangaroo_executed", "kangaroo_estimate"}
    for r in rows:
        assert KEYS <= set(r) and r["paper"] == "kangaroo" and r["tokens_per_s"] > 0
    by = {r["variant"]: r for r in rows}
    assert by["greedy"]["host_stops"] == 0 < by["kangaroo_executed"]["host_stops"]
    assert by["kangaroo_estimate"]["draft_host_stops"] == 0
    assert 0 < by["kangaroo_estimate"]["draft_bytes_over_step"] < 1
