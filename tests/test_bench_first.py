"""benchmarks/papers/first.py runs at size tiny and returns the suite's rows (baseline beside FiRST and ULS)."""
from test_bench_uls import KEYS, load


def test_first_bench_tiny_rows():
    rows = load("first").run("tiny", 20, print)
    assert rows and all(KEYS <= set(r) for r in rows)
    for b in {r["batch"] for r in rows}:
        variants = {r["variant"]: r for r in rows if r["batch"] == b}
        assert "greedy" in variants and "FiRST per-row sets" in variants
        assert variants["FiRST per-row sets"]["layers_per_token"] == 4   # 2 of the 4 routable layers per row
        assert variants["FiRST per-row sets"]["layers_run_per_step"] <= 6
        assert variants["FiRST per-row sets"]["host_stops"] == variants["greedy"]["host_stops"] == 0
        assert variants["FiRST per-row sets, traced count"]["host_stops"] > 0
