"""The GPU-suite module of self-speculative decoding (benchmarks/papers/self_speculative.py) runs at the tiny size."""
from benchmarks.papers import self_speculative

KEYS = {"paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s"}


def test_rows():
    rows = self_speculative.run("tiny", 20, print)
    assert rows and all(KEYS <= set(r) for r in rows)
    papers = {r["paper"] for r in rows}
    assert {"greedy", "LayerSkip"} <= papers
    assert all(r["equals_greedy"] for r in rows if "equals_greedy" in r)
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 for r in rows)
