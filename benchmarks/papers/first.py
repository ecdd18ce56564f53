"""FiRST (arXiv:2410.12513) in the GPU suite: decode tokens/s with per-sequence skip sets (one per row, fixed after
the prefill) against plain greedy decoding of the same model and batch, and against ULS at the same mean layers.

    run(size, budget_s, log) -> list[dict]      # size: "tiny" (tests, seconds) | "small" (CPU) | "gpu"

Model: as benchmarks/papers/uls.py (``gpu``: SmolLM2-135M-shaped, random weights, bfloat16). The skip sets are
data-dependent, so they are not made by routers on random weights: they are the per-sequence sets FiRST's routers
chose on the WikiText-2 prompts in the CPU run (``eval_keep_NxW`` of experiments/results/first-smollm2/first.json),
assigned to rows in order (cycled), when that file is present and its layer count matches; otherwise (and at
``tiny`` / ``small``) a stated default: every row skips ``DEFAULT_SKIP`` routable layers drawn at random per row
(seed 0). Each row records which. FiRST's decode runs the union of its rows' kept layers (``layer_skip.row_program``,
compacted), so the saving falls as rows disagree; ``layers_run_per_step`` says how many layers a step ran. The
union's size is read on the host once per batch after the prefill (FiRST decides once per sequence), so the decode
has a static layer count (``FiRST per-row sets``); ``FiRST per-row sets, traced count`` keeps it traced (one
compiled decode for any sets, a data-dependent layer loop). Every row carries its compiled program's host stops per
token and float32 dots.

Timing as in uls.py: prefill once (not timed; the routers' cost is a few dot products per layer on the prefill),
``new`` greedy decode steps, compile excluded, median of ``repeats``. Import only jax, numpy and eejax.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax.numpy as jnp
import numpy as np

from eejax.decoding import layer_skip as ls
from eejax.decoding import per_token
from papers import uls

PAPER = "FiRST (arXiv:2410.12513)"
RESULTS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "results" / "first-smollm2" / "first.json"
DEFAULT_SKIP = 6

# batches and lengths per size; the model of each size is ULS's (uls.SIZES), built by uls.build_model
SIZES = {
    "tiny": dict(batches=(1, 2), prompt=8, new=8, repeats=2, skip=2),
    "small": dict(batches=(1, 8), prompt=32, new=32, repeats=3, skip=3),
    "gpu": dict(batches=(1, 8, 32), prompt=128, new=128, repeats=5, skip=DEFAULT_SKIP),
}


def skip_sets(n: int, batch: int, skip: int) -> tuple[np.ndarray, str]:
    """``bool[N, B]`` kept layers per row: the CPU run's per-sequence sets when present, else random sets."""
    if RESULTS.exists():
        keep = np.asarray(json.loads(RESULTS.read_text()).get("eval_keep_NxW", []), bool)
        if keep.ndim == 2 and keep.shape[0] == n:
            cols = np.arange(batch) % keep.shape[1]
            return keep[:, cols], f"measured: FiRST's per-sequence sets on WikiText-2 prompts ({RESULTS.name})"
    rng = np.random.default_rng(0)
    keep = np.ones((n, batch), bool)
    for b in range(batch):
        keep[rng.choice(np.arange(1, n - 1), min(skip, n - 2), replace=False), b] = False
    return keep, f"default: {skip} random routable layers skipped per row (no CPU results for this depth)"



def run(size: str, budget_s: float, log=print) -> list[dict]:
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use one of {sorted(SIZES)}")
    s = SIZES[size]
    start = time.perf_counter()
    graphdef, params, cfg = uls.build_model(size)   # the same SmolLM2-shaped presets as ULS
    n = cfg.depth
    rows = []
    for b in s["batches"]:
        if rows and time.perf_counter() - start > budget_s:     # the first batch always runs whole
            log(f"first: budget spent, batches from {b} not run")
            break
        keep, source = skip_sets(n, b, s["skip"])
        pre = uls.prefill(graphdef, params, b, s["prompt"], s["new"], cfg.vocab_size, seed=b)
        k_uls = int(round(n - keep.sum(0).mean()))
        table, count = ls.layer_table(ls.uls_layers(n, skip=k_uls), n)
        union = ls.union_count(keep)    # read once per batch, after the prefill
        methods = [("greedy", per_token.full_depth_step, (), "plain greedy (per_token.full_depth_step)", 1),
                   ("FiRST per-row sets", lambda m, t, st, i, kp, u=union: ls.row_step(m, t, st, i, kp, count=u),
                    (jnp.asarray(keep),), source + "; static union count", 1),
                   ("FiRST per-row sets, traced count", lambda m, t, st, i, kp: ls.row_step(m, t, st, i, kp),
                    (jnp.asarray(keep),), source + "; traced union count", union),
                   (f"ULS skip {k_uls} (same mean layers)",
                    lambda m, t, st, i, tab, c=count: ls.table_step(m, t, st, i, tab, c), (jnp.asarray(table),),
                    "static evenly spread set, static layer count", 1)]
        base = None
        for name, step, args, detail, trips in methods:
            if rows and rows[-1]["batch"] != b and time.perf_counter() - start > budget_s:
                log(f"first: budget spent at batch {b}, {name}")
                break
            t = uls.time_decode(graphdef, params, pre, s["new"], step, args, s["repeats"], trips)
            tps = b * s["new"] / t["seconds"]
            base = tps if name == "greedy" else base
            rows.append({"paper": PAPER, "variant": name, "batch": b, "new_tokens": s["new"], "seconds": t["seconds"],
                         "tokens_per_s": tps, "speedup_vs_baseline": tps / base if base else None,
                         "layers_per_token": t["layers_per_token"], "layers_run_per_step": t["layers_run_per_step"],
                         "num_layers": n, "skipped_fraction": 1 - t["layers_per_token"] / n, "detail": detail,
                         "size": size, "dtype": uls.SIZES[size]["dtype"] or "float32", "weights": "random",
                         "host_stops": t["host_stops"], "unknown_whiles": t["unknown_whiles"],
                         "conditionals": t["conditionals"], "f32_dots": t["f32_dots"]})
            log(f"first {size} b={b} {name}: {tps:.1f} tok/s, {t['layers_run_per_step']:.1f} layers per step")
    return rows
