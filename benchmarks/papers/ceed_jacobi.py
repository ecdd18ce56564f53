"""GPU-suite module for CEED-VLA's decoder (arXiv:2506.13725): Jacobi decoding of blocks of n tokens (full and with
early exit of the iterations) against plain greedy decoding of the same model and batch.

Contract (benchmarks/lm_papers.py): ``run(size, budget_s, log) -> list[dict]``; sizes "tiny" (a test, seconds),
"small" (CPU), "gpu" (bfloat16, batches 1/8/32). Each row: paper, variant, batch, new_tokens, seconds, tokens_per_s
and the statistics (block, iters_per_block, where that number came from). Compile excluded (one warm-up call),
``block_until_ready`` before the clock stops; median of ``repeats`` calls.

Model: random weights (the GGUF weights do not travel). "gpu" is SmolLM2-135M-shaped (30 layers, D=576, 9/3 heads,
SwiGLU 1536, vocabulary 49,152, RoPE base 1e5). With random weights the Jacobi iterations do not behave as on the
real model, so every Jacobi row REPLAYS an iteration count: ``jacobi_decode(tol=-1, max_iters=k)`` runs exactly k
iterations per block, k = the mean iterations per block measured on SmolLM2 (rounded up) by
experiments/ceed_jacobi.py, read from experiments/results/ceed_jacobi-smollm2/ceed_jacobi.json when present (the
row says so), else the stated default (full Jacobi: n, the vanilla-Jacobi worst case; early exit: ceil(n / 2)).
The tokens are then not meaningful; only the time is.

Each row carries ``host_stops`` per generated token, read from its compiled program (``eejax.exits.hlo``): greedy 0;
Jacobi one per iteration of a block plus one to leave (its iteration loop is data-dependent), counted at the
replayed iterations per block.
"""
from __future__ import annotations

import json
import math
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.papers._spec_costs import compile_profiled
from eejax.decoding import jacobi, per_token
from eejax.exits import costs
from eejax.models import lm as lm_lib

PAPER = "CEED-VLA (arXiv:2506.13725)"
RESULTS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "results" / "ceed_jacobi-smollm2" / \
    "ceed_jacobi.json"
SMOLLM2 = dict(vocab_size=49152, d_model=576, depth=30, num_heads=9, num_kv_heads=3, mlp_dim=1536, mlp="swiglu",
               rope_base=1e5, norm_eps=1e-5)
SIZES = {
    "tiny": dict(model=dict(vocab_size=97, d_model=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                            mlp="swiglu"), prompt=8, new=8, blocks=(4,), batches=(1, 2), repeats=1,
                 dtype="float32"),
    "small": dict(model=dict(SMOLLM2, depth=6, d_model=192, num_heads=3, num_kv_heads=1, mlp_dim=512,
                             vocab_size=8192), prompt=16, new=32, blocks=(4, 8), batches=(1, 8), repeats=2,
                  dtype="float32"),
    "gpu": dict(model=SMOLLM2, prompt=64, new=64, blocks=(4, 8, 16), batches=(1, 8, 32), repeats=5,
                dtype="bfloat16"),
}
EARLY_EXIT_ARM = "early exit r=1"   # the measured early-exit arm replayed here


def measured_iters(path=RESULTS) -> dict:
    """``{(n, arm): iters_per_block}`` from the committed CPU results (empty when absent)."""
    try:
        rows = json.loads(pathlib.Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    return {(r["block"], r["arm"]): r["iters_per_block"] for r in rows if r.get("block") and r.get("iters_per_block")}


def _time(fn, args, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of the AOT-compiled ``fn`` after a warm-up (compile excluded)."""
    return statistics.median(costs.measure(fn, *args, warmup=1, iters=repeats).times_s)


def run(size: str, budget_s: float, log) -> list[dict]:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {sorted(SIZES)}")
    p = SIZES[size]
    cfg = lm_lib.LMConfig(**p["model"], exits=(p["model"]["depth"] - 1,), dtype=p["dtype"])
    graphdef, params = lm_lib.build(cfg, 0)
    params = jax.tree.map(lambda x: x.astype(p["dtype"]) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    measured = measured_iters()
    start_all = time.perf_counter()
    rows: list[dict] = []
    g = p["new"]
    for b in p["batches"]:
        prompt = jax.random.randint(jax.random.PRNGKey(b), (b, p["prompt"]), 0, cfg.vocab_size, jnp.int32)
        lengths = jnp.full((b,), p["prompt"], jnp.int32)
        units = [("greedy", None, None, None)]
        for n in p["blocks"]:
            for arm, default in (("full Jacobi", n), (EARLY_EXIT_ARM, math.ceil(n / 2))):
                k = measured.get((n, arm))
                src = f"measured on SmolLM2 ({RESULTS.name})" if k else "default (no measurement for this n)"
                units.append((arm, n, min(n, math.ceil(k)) if k else default, src))
        for arm, n, k, src in units:
            if time.perf_counter() - start_all > budget_s:
                log(f"{PAPER}: budget of {budget_s:.0f} s spent; stopping before batch {b} {arm} n={n}")
                return rows
            if n is None:
                args = (params, prompt, lengths)
                fn, prof = compile_profiled(per_token.decode_fn(graphdef, per_token.full_depth_step, g), *args)
                sec = _time(fn, args, p["repeats"])
                row = {"variant": "greedy", "block": None, "iters_per_block": None,
                       "forwards_per_token": 1.0, "iters_source": None, "host_stops": prof.host_stops(per=g)}
            else:
                args = (params, prompt, lengths, jnp.int32(-1), jnp.int32(k))
                fn, prof = compile_profiled(lambda pr, t, l, tol, mi, n=n: jacobi.jacobi_decode(
                    nnx.merge(graphdef, pr), t, l, g, block=n, tol=tol, max_iters=mi), *args)
                sec = _time(fn, args, p["repeats"])
                row = {"variant": f"jacobi {arm} n={n}", "block": n, "iters_per_block": k,
                       "forwards_per_token": k / n, "iters_source": src,
                       "host_stops": prof.host_stops(trips=k, per=g)}
            rows.append({"paper": PAPER, "batch": b, "new_tokens": g, "seconds": sec, "tokens_per_s": b * g / sec,
                         **row, "dtype": p["dtype"], "size": size})
            log(f"{PAPER} batch {b} {row['variant']}: {sec * 1e3:.1f} ms, {b * g / sec:.0f} tok/s")
    return rows


__all__ = ["run", "SIZES", "measured_iters"]
