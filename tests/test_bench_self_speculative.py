"""The GPU-suite module of self-speculative decoding (benchmarks/papers/self_speculative.py) runs at the tiny size:
truncated and masked-engine drafts side by side, each executed row with its host stops."""
from benchmarks.papers import self_speculative

KEYS = {"paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s"}


def test_rows():
    rows = self_speculative.run("tiny", 20, print)
    assert rows and all(KEYS <= set(r) for r in rows)
    by = {r["variant"].split(",")[0].split(" (")[0]: r for r in rows}
    assert rows[0]["variant"] == "greedy" and rows[0]["host_stops"] == 0
    executed = [r for r in rows if "equals_greedy" in r]
    assert all(r["equals_greedy"] for r in executed) and all(r["host_stops"] > 0 for r in executed)
    truncated = next(r for r in executed if "truncated" in r["variant"])
    masked = next(r for r in executed if "masked" in r["variant"])
    assert truncated["host_stops"] < masked["host_stops"]       # the round loop only vs the engine's exit loop too
    composed = {r["variant"]: r for r in rows if r["variant"].startswith("composed")}
    t = next(r for v, r in composed.items() if "truncated" in v)
    m = next(r for v, r in composed.items() if "masked" in v)
    assert t["draft_host_stops"] == 0 < m["draft_host_stops"]
    assert t["draft_bytes_over_step"] < min(1.0, m["draft_bytes_over_step"])
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 for r in rows) and by
