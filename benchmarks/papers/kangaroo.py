"""Kangaroo (arXiv:2404.18911) decoding speed beside plain greedy decoding of the same model and batch.

Contract (benchmarks/lm_papers.py imports every module here): ``run(size, budget_s, log) -> list[dict]``; ``size``
is "tiny" (a test, seconds), "small" (CPU) or "gpu" (a SmolLM2-135M-shaped model: 30 layers, D=576, 9/3 heads,
SwiGLU 1536, vocabulary 49152, bfloat16, batches 1/8/32). Weights are random (the GGUF file cannot travel), so a
random drafter accepts almost nothing; the data-dependent statistics come from the committed CPU run
(experiments/results/kangaroo-smollm2/kangaroo.json: the fitted l and eta, the adapter's mean draft length and
tokens per verify) when present, else the stated defaults (l = 2, eta = 0.6, 2 drafts and 1.5 tokens per verify).

Rows per batch: ``greedy`` (plain greedy, executed), ``kangaroo_executed`` (the whole loop with the random drafter,
executed: the machinery's cost at near-zero acceptance), and ``kangaroo_estimate``: tokens/s composed from the
measured time of one draft step and of one verify ``kv.extend`` of ``round(draft_len) + 1`` tokens, with the CPU
run's draft length and tokens per verify: ``CR / (draft_len * t_draft + t_verify)``. Compile is excluded (AOT
compile, one warm-up call), every call is blocked until ready.

Host stops (``eejax.exits.hlo``, per generated token, read from each executed row's compiled program): greedy 0;
Kangaroo is the speculative loop (one stop per round) with its keep-drafting decisions (``gamma - 1`` nested
conditionals, evaluated only while a row drafts: the figure counts them all, an upper bound) and the verify-length
switch; ``draft_steps_per_round`` says how many decisions a round really took. The estimate row carries the draft
step's own stops (0) and ``draft_bytes_over_step``: its matrix products' operand bytes over a greedy step's.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.papers._spec_costs import dot_cost, time_profiled
from eejax.decoding import kangaroo as kg
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.models import lm as lm_lib

PAPER = "kangaroo"
RESULTS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "results" / "kangaroo-smollm2" / "kangaroo.json"
DEFAULTS = {"l": 2, "eta": 0.6, "draft_len": 2.0, "CR": 1.5, "acceptance": None}
GAMMA = 6   # Kangaroo's most draft tokens per round (the paper's)
SIZES = {
    "tiny": dict(cfg=dict(vocab_size=64, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64),
                 batches=(2,), prompt=8, new=8, dtype="float32", l=1),
    "small": dict(cfg=dict(vocab_size=2048, d_model=128, depth=8, num_heads=4, num_kv_heads=2, mlp_dim=384),
                  batches=(1, 4), prompt=16, new=32, dtype="float32", l=2),
    "gpu": dict(cfg=dict(vocab_size=49152, d_model=576, depth=30, num_heads=9, num_kv_heads=3, mlp_dim=1536),
                batches=(1, 8, 32), prompt=32, new=64, dtype="bfloat16", l=None),
}


def measured_stats() -> dict:
    """The fitted drafter's statistics from the committed CPU run, or the defaults (``source`` says which)."""
    try:
        data = json.loads(RESULTS.read_text())
        best_l = data["best_l"]
        row = next(r for r in data["rows"] if r["drafter"] == "adapter" and r["l"] == best_l
                   and r.get("eta_from") == "fit on val")
        return {"l": best_l, "eta": row["eta"], "draft_len": row["mean_draft_len"], "CR": row["CR"],
                "acceptance": row["acceptance"], "source": f"measured on CPU ({RESULTS.name}, adapter l={best_l})"}
    except (OSError, KeyError, StopIteration, ValueError):
        return {**DEFAULTS, "source": "stated default (no committed CPU results)"}


def run(size: str, budget_s: float, log) -> list[dict]:
    if size not in SIZES:
        raise ValueError(f"size {size!r}: use one of {sorted(SIZES)}")
    spec = SIZES[size]
    stats = measured_stats()
    l = spec["l"] or stats["l"]
    cfg = lm_lib.LMConfig(**spec["cfg"], mlp="swiglu", exits=[spec["cfg"]["depth"] - 1])
    gd, params = lm_lib.build(cfg, 0)
    params = jax.tree.map(lambda a: a.astype(spec["dtype"]) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    model = nnx.merge(gd, params)
    adapter = kg.init_adapter(model, l)
    draft_len = max(1, int(round(stats["draft_len"])))
    start, rows = time.perf_counter(), []
    rng = np.random.default_rng(0)
    for b in spec["batches"]:
        if time.perf_counter() - start > budget_s:
            log(f"kangaroo: budget spent, skipping batch {b}")
            break
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, spec["prompt"])), jnp.int32)
        lengths = jnp.full((b,), spec["prompt"], jnp.int32)
        new = spec["new"]
        base = {"paper": PAPER, "batch": b, "new_tokens": new, "size": size, "dtype": spec["dtype"], "l": l}
        pg, pk = {}, {}
        _, t_greedy = time_profiled(per_token.decode_fn(gd, per_token.full_depth_step, new), params, prompt, lengths,
                            profile=pg)
        rows.append({**base, "variant": "greedy", "seconds": t_greedy, "tokens_per_s": b * new / t_greedy,
                     "host_stops": pg["prof"].host_stops(per=new)})
        out, t_kg = time_profiled(kg.kangaroo_fn(gd, new, exit_layer=l, gamma=GAMMA), params, adapter, prompt, lengths,
                          jnp.float32(stats["eta"]), profile=pk)
        rounds = float(out.batch_rounds)
        rows.append({**base, "variant": "kangaroo_executed", "seconds": t_kg, "tokens_per_s": b * new / t_kg,
                     "acceptance": float(out.acceptance_rate), "tokens_per_verify": float(out.tokens_per_verify),
                     "speedup_vs_greedy": t_greedy / t_kg, "host_stops": pk["prof"].host_stops(trips=rounds, per=new),
                     "draft_steps_per_round": float(out.draft_steps) / rounds, "gamma": GAMMA,
                     "note": "random drafter: near-zero acceptance; host_stops counts every keep decision"})
        # Components for the estimate: one draft step, one verify of draft_len + 1 tokens (from a prefilled cache).
        cache_len = spec["prompt"] + 2 * (draft_len + 1)

        def draft_step(params, adapter, prompt, lengths):
            m = nnx.merge(gd, params)
            d = kg.make_draft(m, adapter, l)
            _, st = kv_lib.forward(d, prompt, kv_lib.empty_state(d, b, cache_len), kg.draft_program(l),
                                   kv_lib.final_head(d))
            return kg.draft_forward(d, prompt[:, -1:], st, l)[0]

        def verify(params, prompt, lengths):
            m = nnx.merge(gd, params)
            _, st = kv_lib.prefill(m, prompt, lengths, cache_len)
            return kv_lib.extend(m, prompt[:, -(draft_len + 1):], st)[0]

        def prefill_draft(params, adapter, prompt, lengths):
            m = nnx.merge(gd, params)
            d = kg.make_draft(m, adapter, l)
            return kv_lib.forward(d, prompt, kv_lib.empty_state(d, b, cache_len), kg.draft_program(l),
                                  kv_lib.final_head(d))[0].logits_BxC

        def prefill(params, prompt, lengths):
            return kv_lib.prefill(nnx.merge(gd, params), prompt, lengths, cache_len)[0]

        def step(params, prompt, lengths):
            m = nnx.merge(gd, params)
            _, st = kv_lib.prefill(m, prompt, lengths, cache_len)
            return kv_lib.full_step(m, prompt[:, -1], st)[0]

        pd, pdp, pst, pp = {}, {}, {}, {}
        _, t_d = time_profiled(draft_step, params, adapter, prompt, lengths, profile=pd)
        _, t_dp = time_profiled(prefill_draft, params, adapter, prompt, lengths, profile=pdp)
        _, t_v = time_profiled(verify, params, prompt, lengths)
        _, t_p = time_profiled(prefill, params, prompt, lengths, profile=pp)
        _, t_st = time_profiled(step, params, prompt, lengths, profile=pst)
        draft_bytes = dot_cost(pd["prof"])["bytes"] - dot_cost(pdp["prof"])["bytes"]
        step_bytes = dot_cost(pst["prof"])["bytes"] - dot_cost(pp["prof"])["bytes"]
        t_draft, t_verify = max(t_d - t_dp, 1e-6), max(t_v - t_p, 1e-6)
        per_token_s = (stats["draft_len"] * t_draft + t_verify) / stats["CR"]
        rows.append({**base, "variant": "kangaroo_estimate", "seconds": new * per_token_s + t_p,
                     "tokens_per_s": b * new / (new * per_token_s + t_p), "draft_step_s": t_draft,
                     "verify_s": t_verify, "draft_len": stats["draft_len"], "tokens_per_verify": stats["CR"],
                     "acceptance": stats["acceptance"], "eta": stats["eta"],
                     "draft_host_stops": pd["prof"].host_stops() - pdp["prof"].host_stops(),
                     "draft_over_step_time": t_draft / max(t_st - t_p, 1e-6),
                     "draft_bytes_over_step": draft_bytes / step_bytes,
                     "speedup_vs_greedy": t_greedy / (new * per_token_s + t_p), "stats_source": stats["source"]})
        log(f"kangaroo {size} b={b}: greedy {rows[-3]['tokens_per_s']:.1f} tok/s, executed "
            f"{rows[-2]['tokens_per_s']:.1f}, estimate {rows[-1]['tokens_per_s']:.1f}")
    return rows
