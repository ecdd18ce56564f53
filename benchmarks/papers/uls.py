"""Unified Layer Skipping (arXiv:2404.06954) in the GPU suite: decode tokens/s of a static, evenly spread skip set
against plain greedy decoding of the same model and batch.

    run(size, budget_s, log) -> list[dict]      # size: "tiny" (tests, seconds) | "small" (CPU) | "gpu"

Model: ``gpu`` is a SmolLM2-135M-shaped ``DecoderLM`` (30 layers, D=576, 9 query / 3 KV heads, SwiGLU 1536,
vocabulary 49152, tied embeddings) with *random* weights in bfloat16 (the GGUF weights cannot travel); ``small`` a
12-layer D=256 model, ``tiny`` a 6-layer D=32 one, float32. ULS's skip set is input-independent, so random weights
change nothing in what is timed; the quality of each set on the real model is in
experiments/results/uls-smollm2/uls.json (copied into the rows when present).

Each unit is one (batch, method): prompts of ``prompt`` random tokens are prefilled once (not timed), then ``new``
greedy tokens are decoded from that state (``per_token.decode``; compiled once ahead of time, one warm-up call,
``block_until_ready`` before the clock stops; median of ``repeats`` calls). Methods: ``greedy`` (plain greedy,
``per_token.full_depth_step``), ``ULS 1x`` (the layer table with nothing skipped: the mechanism's own cost), ULS at
target speed-ups 1.25x / 1.5x / 2x (``layer_skip.table_step`` over ``layer_skip.uls_layers`` with a static layer
count: one compiled decode per count, no host stop) and, for the largest, the same with the count traced (one
compiled decode for every count, a data-dependent layer loop: host stops). Every row carries the host stops per
token and float32 dots of its compiled program. Import only jax, numpy and eejax.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.decoding import layer_skip as ls
from eejax.decoding import per_token
from eejax.exits import costs
from eejax.models import lm as lm_lib
from papers import _ffn_void_common as common

PAPER = "ULS (arXiv:2404.06954)"
RESULTS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "results" / "uls-smollm2" / "uls.json"

SIZES = {
    "tiny": dict(model=dict(vocab_size=64, d_model=32, depth=6, num_heads=4, num_kv_heads=2, mlp_dim=64),
                 dtype=None, batches=(1, 2), prompt=8, new=8, repeats=2, speedups=(1.5,)),
    "small": dict(model=dict(vocab_size=4096, d_model=256, depth=12, num_heads=4, num_kv_heads=2, mlp_dim=768),
                  dtype=None, batches=(1, 8), prompt=32, new=32, repeats=3, speedups=(1.25, 1.5, 2.0)),
    "gpu": dict(model=dict(vocab_size=49152, d_model=576, depth=30, num_heads=9, num_kv_heads=3, mlp_dim=1536),
                dtype="bfloat16", batches=(1, 8, 32), prompt=128, new=128, repeats=5, speedups=(1.25, 1.5, 2.0)),
}


def build_model(size: str):
    """``(graphdef, params, LMConfig)``: a random SmolLM2-style model of the preset (bfloat16 at ``gpu``)."""
    s = SIZES[size]
    cfg = lm_lib.LMConfig(**s["model"], mlp="swiglu", exits=(s["model"]["depth"] - 1,), dtype=s["dtype"])
    graphdef, params = lm_lib.build(cfg, 0)
    if s["dtype"]:
        params = jax.tree.map(lambda a: a.astype(s["dtype"]) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    return graphdef, params, cfg


def prefill(graphdef, params, batch: int, prompt: int, new: int, vocab: int, seed: int = 0) -> ls.Prefilled:
    toks = jax.random.randint(jax.random.key(seed), (batch, prompt), 1, vocab, jnp.int32)
    fn = jax.jit(lambda p, x: ls.prefill_pooled(nnx.merge(graphdef, p), x, jnp.full((batch,), prompt, jnp.int32),
                                                prompt + new))
    return jax.block_until_ready(fn(params, toks))


def time_decode(graphdef, params, pre: ls.Prefilled, new: int, step_fn, args, repeats: int, trips=1) -> dict:
    """Median seconds of ``new`` greedy decode steps from ``pre`` (compiled once ahead of time, one warm-up call),
    the layers run, and the compiled program's costs (host stops per token at ``trips`` loop iterations)."""
    def f(p, logits, state, *a):
        return per_token.decode(nnx.merge(graphdef, p), logits, state, new,
                                step_fn if not a else (lambda m, t, s, i: step_fn(m, t, s, i, *a)))

    exe, prog = common.compiled(f, params, pre.logits_BxV, pre.state, *args, trips=trips, per=new)
    t = costs.measure(exe, params, pre.logits_BxV, pre.state, *args, warmup=1, iters=repeats)   # compile excluded
    dec = t.output
    return {"seconds": statistics.median(t.times_s), "min_seconds": t.min_s,
            "layers_per_token": float(np.mean(np.asarray(dec.layers_BxG[:, 1:]))),
            "layers_run_per_step": float(np.mean(np.asarray(dec.layers_run_G[1:]))), **prog}


def measured_quality() -> dict:
    """ppl / agreement per ULS target from the committed CPU results (empty when absent)."""
    if not RESULTS.exists():
        return {}
    rows = json.loads(RESULTS.read_text())["rows"]
    return {r["method"]: {"cpu_ppl": r["ppl"], "cpu_agreement": r["agreement"]} for r in rows}


def run(size: str, budget_s: float, log=print) -> list[dict]:
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use one of {sorted(SIZES)}")
    s = SIZES[size]
    start = time.perf_counter()
    graphdef, params, cfg = build_model(size)
    n = cfg.depth
    quality = measured_quality()
    methods = [("greedy", "plain greedy (per_token.full_depth_step)", per_token.full_depth_step, (), None, 1)]
    for r in (1.0,) + tuple(s["speedups"]):
        keep = ls.uls_layers(n, r)
        table, count = ls.layer_table(keep, n)
        detail = "skips " + (",".join(map(str, np.setdiff1d(np.arange(n), keep))) or "nothing")
        methods.append((f"ULS {r:g}x", detail + " (static layer count)",
                        lambda m, t, st, i, tab, c=count: ls.table_step(m, t, st, i, tab, c), (jnp.asarray(table),),
                        r, 1))
        if r == max(s["speedups"]):
            methods.append((f"ULS {r:g}x traced count", detail + " (layer count traced: one program for all)",
                            ls.table_step, (jnp.asarray(table), jnp.int32(count)), r, count))
    rows = []
    for b in s["batches"]:
        if rows and time.perf_counter() - start > budget_s:     # the first batch always runs whole
            log(f"uls: budget spent, batches from {b} not run")
            break
        pre = prefill(graphdef, params, b, s["prompt"], s["new"], cfg.vocab_size)
        base = None
        for name, detail, step, args, r, trips in methods:
            if rows and rows[-1]["batch"] != b and time.perf_counter() - start > budget_s:
                log(f"uls: budget spent at batch {b}, {name}")
                break
            t = time_decode(graphdef, params, pre, s["new"], step, args, s["repeats"], trips)
            tps = b * s["new"] / t["seconds"]
            base = tps if name == "greedy" else base
            row = {"paper": PAPER, "variant": name, "batch": b, "new_tokens": s["new"], "seconds": t["seconds"],
                   "tokens_per_s": tps, "speedup_vs_baseline": tps / base if base else None,
                   "target_speedup": r, "layers_per_token": t["layers_per_token"], "num_layers": n,
                   "skipped_fraction": 1 - t["layers_per_token"] / n, "detail": detail, "size": size,
                   "dtype": s["dtype"] or "float32", "weights": "random (skip set is input-independent)",
                   "host_stops": t["host_stops"], "unknown_whiles": t["unknown_whiles"],
                   "conditionals": t["conditionals"], "f32_dots": t["f32_dots"]}
            row |= quality.get(name, {})
            if name in quality:
                row["quality_source"] = str(RESULTS.relative_to(RESULTS.parents[3]))
            rows.append(row)
            log(f"uls {size} b={b} {name}: {tps:.1f} tok/s, {t['host_stops']:g} stops/tok")
    return rows
