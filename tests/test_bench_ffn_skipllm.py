"""benchmarks/papers/ffn_skipllm.py runs at size tiny and returns rows with the contract's keys."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

REQUIRED = ("paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s")


def test_bench_ffn_skipllm_tiny():
    from papers import ffn_skipllm  # noqa: PLC0415
    rows = ffn_skipllm.run("tiny", 20, print)
    assert rows and all(k in r for r in rows for k in REQUIRED)
    assert {r["variant"] for r in rows} == {"greedy", "gate_never", "gate_never_cond", "table_per_row", "table_shared",
                                            "table_shared_where"}
    assert all(r["equals_greedy"] for r in rows if r["variant"].startswith("gate_never"))
    stops = {r["variant"]: r["host_stops"] for r in rows}
    # Predication adds no host stop over greedy; a cond around every MLP half stops once per layer and token.
    assert stops["greedy"] == stops["gate_never"] == stops["table_shared_where"] == 0
    assert stops["gate_never_cond"] == stops["table_shared"] > 0
    assert all(0 <= r["ffn_skipped"] <= 1 for r in rows if "ffn_skipped" in r)
