"""benchmarks/papers/uls.py runs at size tiny and returns the suite's rows (baseline beside ULS)."""
import importlib.util
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))   # first.py imports papers.uls

KEYS = {"paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s"}


def load(name):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "papers" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_papers_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_uls_bench_tiny_rows():
    rows = load("uls").run("tiny", 20, print)
    assert rows and all(KEYS <= set(r) for r in rows)
    for b in {r["batch"] for r in rows}:
        variants = {r["variant"]: r for r in rows if r["batch"] == b}
        assert "greedy" in variants and variants["greedy"]["layers_per_token"] == 6
        assert variants["ULS 1.5x"]["layers_per_token"] == 4          # k = round(6 (1 - 1/1.5)) = 2 skipped
        assert variants["ULS 1x"]["layers_per_token"] == 6
        # Static layer counts add no host stop over greedy; the traced count's layer loop stops every layer.
        assert variants["greedy"]["host_stops"] == variants["ULS 1x"]["host_stops"] == 0
        assert variants["ULS 1.5x"]["host_stops"] == 0 and variants["ULS 1.5x traced count"]["host_stops"] >= 4
    assert all(r["tokens_per_s"] > 0 for r in rows)
