"""The papers' LM decoders side by side: every module in ``benchmarks/papers/`` in one call, one JSON.

    python3 benchmarks/lm_papers.py --sizes gpu --out $OUT/lm_papers.json        # on the GPU (part of run_all.py)
    python benchmarks/lm_papers.py --sizes tiny --out /tmp/p.json --budget-s 60  # the pipeline on tiny models

Contract of a module ``benchmarks/papers/<paper>.py``::

    def run(size: str, budget_s: float, log) -> list[dict]

``size`` is ``tiny`` (tests, seconds), ``small`` (CPU) or ``gpu`` (bfloat16, a SmolLM2-135M-shaped model with random
weights: the GGUF file does not travel to the device machine, so data-dependent statistics (acceptance, skip
patterns, exit layers) are the ones the CPU run measured, read from the committed results, as each row says). Each
row: ``paper``, ``variant``, ``batch``, ``new_tokens``, ``seconds``, ``tokens_per_s`` and the variant's statistics;
plain greedy decoding of the same model at the same batch is a row too, so the speed-up reads side by side. A
module stops starting new units once its ``budget_s`` is spent. Modules import only jax, numpy and eejax.

The budget is split evenly over the modules (time one leaves unused passes on); a module that raises costs only its
own rows (its error is recorded). The JSON is rewritten after every module, so a time limit keeps what finished.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run as a script from anywhere
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _util  # noqa: E402

SIZES = ("tiny", "small", "gpu")
HERE = pathlib.Path(__file__).resolve().parent
REQUIRED = ("paper", "variant", "batch", "new_tokens", "seconds", "tokens_per_s")


def modules() -> list[str]:
    return sorted(p.stem for p in (HERE / "papers").glob("*.py") if not p.stem.startswith("_"))


def with_speedups(rows: list[dict]) -> list[dict]:
    """Each row gets ``speedup_vs_greedy``: its tokens/s over the same paper's greedy row at the same batch."""
    base = {(r["paper"], r["batch"]): r["tokens_per_s"] for r in rows if r.get("variant") == "greedy"}
    for r in rows:
        b = base.get((r["paper"], r["batch"]))
        r["speedup_vs_greedy"] = r["tokens_per_s"] / b if b else None
    return rows


def markdown(out: dict) -> str:
    lines = [f"# Paper decoders: {out['meta'].get('device_kind', '?')} ({out['meta'].get('backend', '?')}), "
             f"size {out['meta']['sizes']}", "",
             "| paper | variant | batch | tokens/s | speed-up vs greedy | notes |", "|---|---|---:|---:|---:|---|"]
    for r in out["rows"]:
        extra = {k: v for k, v in r.items() if k not in REQUIRED + ("speedup_vs_greedy",)}
        note = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        sp = r.get("speedup_vs_greedy")
        lines.append(f"| {r['paper']} | {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.1f} | "
                     f"{'-' if sp is None else f'{sp:.2f}x'} | {note} |")
    for name, err in out["errors"].items():
        lines.append(f"| {name} | failed: {err.splitlines()[-1][:100]} | | | | |")
    for name in out["skipped"]:
        lines.append(f"| {name} | skipped: budget spent | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (a .md table beside it)")
    ap.add_argument("--sizes", choices=SIZES, default="small")
    ap.add_argument("--papers", help=f"comma list of modules (default: all of {modules()})")
    ap.add_argument("--budget-s", type=float, default=300.0, help="total seconds, split evenly over the modules")
    args = ap.parse_args(argv)
    names = modules() if not args.papers else [p for p in args.papers.split(",") if p]
    bad = [n for n in names if n not in modules()]
    if bad:
        ap.error(f"unknown paper modules {bad} (have {modules()})")
    out = {"meta": {**_util.provenance([sys.argv[0]] + argv), "sizes": args.sizes, "modules": names},
           "rows": [], "errors": {}, "skipped": [], "seconds": {}}
    t_start, log = time.perf_counter(), (lambda *a: print(*a, flush=True))
    for i, name in enumerate(names):
        left = args.budget_s - (time.perf_counter() - t_start)
        if left <= 0:
            out["skipped"].append(name)
            continue
        share = left / (len(names) - i)
        log(f"[lm_papers] {name}: budget {share:.0f}s")
        t0 = time.perf_counter()
        try:
            rows = importlib.import_module(f"papers.{name}").run(args.sizes, share, log)
            missing = [(r.get("variant"), k) for r in rows for k in REQUIRED if k not in r]
            if missing:
                raise ValueError(f"rows miss keys {missing[:4]}")
            out["rows"] += rows
        except Exception:   # one module's failure costs only its rows
            out["errors"][name] = traceback.format_exc(limit=4)
            log(f"[lm_papers] {name} failed:\n{out['errors'][name]}")
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
        with_speedups(out["rows"])
        _util.write_json(args.out, out)
        pathlib.Path(args.out).with_suffix(".md").write_text(markdown(out))
    _util.write_json(args.out, out)
    pathlib.Path(args.out).with_suffix(".md").write_text(markdown(out))
    log(f"[lm_papers] wrote {args.out}: {len(out['rows'])} rows, {len(out['errors'])} failed modules")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
