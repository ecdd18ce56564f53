"""SpecEE (arXiv:2504.08850) per-token early-exit decoding speed beside plain greedy decoding of the same model and
batch.

Contract (benchmarks/lm_papers.py imports every module here): ``run(size, budget_s, log) -> list[dict]``; ``size``
is "tiny" (a test, seconds), "small" (CPU) or "gpu" (a SmolLM2-135M-shaped model: 30 layers, D=576, 9/3 heads,
SwiGLU 1536, vocabulary 49152, bfloat16, batches 1/8/32). Weights are random (the GGUF file cannot travel): random
draft candidates almost never hold the target's argmax, so the executed policy rarely exits. The data-dependent
statistics (the static schedule, mean layers per token, predictor evaluations per token) come from the committed
CPU run (experiments/results/specee-smollm2/specee.json, the "SpecEE static" row) when present, else the stated
defaults (schedule of 6 layers, 80% of the layers, 4 predictor evaluations per token).

Rows per batch: ``greedy`` (plain full-depth greedy), ``specee_forced0`` (the SpecEE loop with every predictor
forced to 0, ``head_check="cond"`` as in the 2026-12-04 baseline: full depth + the drafter + every scheduled
predictor: the overhead), ``specee_forced0_head_always`` (the same with ``head_check="always"``: the full head at
every scheduled layer, one host stop per decision point instead of two); every SpecEE row names the mode the
library's default ``"auto"`` picks at its batch (``head_check_auto``, from the cost model), so the two rows say
whether that pick was right on this GPU; ``specee_executed`` (random predictors around 0.5: the loop as it
runs), and ``specee_estimate``: seconds per token composed from the measured times, ``t_draft + (mean_layers / N) * t_greedy + (preds_per_token / S) * t_predictors`` with ``t_predictors =
t_forced0 - t_greedy - t_draft`` (per token). Compile excluded (AOT, one warm-up call), blocked until ready.

Host stops per generated token (``eejax.exits.hlo``, from each executed row's compiled program): greedy 0; the
drafter's steps 0 (``draft_host_stops``); SpecEE's are its target step's on the decode executor (``kv.propagating``,
no data-dependent loop): per scheduled layer one exit decision and one full-head check, all evaluated when no row
exits (an upper bound otherwise).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.papers._spec_costs import time_profiled
from eejax.decoding import kangaroo as kg
from eejax.decoding import per_token, specee
from eejax.models import lm as lm_lib

PAPER = "specee"
RESULTS = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "results" / "specee-smollm2" / "specee.json"
SIZES = {
    "tiny": dict(cfg=dict(vocab_size=64, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64),
                 batches=(2,), prompt=8, new=8, dtype="float32", l=1, k=3, schedule=(1, 2)),
    "small": dict(cfg=dict(vocab_size=2048, d_model=128, depth=8, num_heads=4, num_kv_heads=2, mlp_dim=384),
                  batches=(1, 4), prompt=16, new=32, dtype="float32", l=2, k=4, schedule=(3, 4, 5, 6)),
    "gpu": dict(cfg=dict(vocab_size=49152, d_model=576, depth=30, num_heads=9, num_kv_heads=3, mlp_dim=1536),
                batches=(1, 8, 32), prompt=32, new=64, dtype="bfloat16", l=None, k=None, schedule=None),
}


def measured_stats(depth: int) -> dict:
    try:
        data = json.loads(RESULTS.read_text())
        row = next(r for r in data["rows"] if r["method"] == "SpecEE" and r["schedule"] == "static")
        cfg = data["config"]["drafter"]
        return {"schedule": tuple(data["schedules"]["static"]), "mean_layers": row["mean_layers"],
                "preds_per_token": row["preds_per_token"], "agreement": row["agreement"], "l": cfg["exit_layer"],
                "k": cfg["k"], "source": f"measured on CPU ({RESULTS.name}, static schedule)"}
    except (OSError, KeyError, StopIteration, ValueError):
        sched = tuple(range(depth - 8, depth - 2))
        return {"schedule": sched, "mean_layers": 0.8 * depth, "preds_per_token": 4.0, "agreement": None, "l": 2,
                "k": 4, "source": "stated default (no committed CPU results)"}


def run(size: str, budget_s: float, log) -> list[dict]:
    if size not in SIZES:
        raise ValueError(f"size {size!r}: use one of {sorted(SIZES)}")
    spec = SIZES[size]
    depth = spec["cfg"]["depth"]
    stats = measured_stats(depth)
    if spec["schedule"] is not None:                        # tiny / small: their own shapes
        stats = {**stats, "schedule": spec["schedule"], "l": spec["l"], "k": spec["k"],
                 "mean_layers": 0.8 * depth, "preds_per_token": len(spec["schedule"]) / 2,
                 "source": "stated default for this size"}
    sched, l, k = stats["schedule"], stats["l"], stats["k"]
    cfg = lm_lib.LMConfig(**spec["cfg"], mlp="swiglu", exits=[depth - 1])
    gd, params = lm_lib.build(cfg, 0)
    params = jax.tree.map(lambda a: a.astype(spec["dtype"]) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    adapter = kg.init_adapter(nnx.merge(gd, params), l)
    pred = specee.init_predictors(jax.random.key(0), len(sched), k)
    forced0 = pred._replace(b2_S=jnp.full_like(pred.b2_S, -1e9))
    start, rows = time.perf_counter(), []
    rng = np.random.default_rng(0)
    for b in spec["batches"]:
        if time.perf_counter() - start > budget_s:
            log(f"specee: budget spent, skipping batch {b}")
            break
        new = spec["new"]
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, spec["prompt"])), jnp.int32)
        lengths = jnp.full((b,), spec["prompt"], jnp.int32)
        base = {"paper": PAPER, "batch": b, "new_tokens": new, "size": size, "dtype": spec["dtype"], "l": l, "k": k,
                "schedule": list(sched), "head_check_auto": specee.resolve_head_check(
                    cfg, batch=b, dtype=spec["dtype"])}
        pg, pf = {}, {}
        _, t_greedy = time_profiled(per_token.decode_fn(gd, per_token.full_depth_step, new), params, prompt, lengths,
                            profile=pg)
        rows.append({**base, "variant": "greedy", "seconds": t_greedy, "tokens_per_s": b * new / t_greedy,
                     "host_stops": pg["prof"].host_stops(per=new)})
        f = specee.decode_fn(gd, new, exit_layer=l, schedule=sched, k=k, head_check="cond")
        out0, t_f0 = time_profiled(f, params, adapter, forced0, prompt, lengths, profile=pf)
        trips = (len(sched) + 1.0, depth / (len(sched) + 1.0))
        stops = pf["prof"].host_stops(trips=trips, per=new)
        rows.append({**base, "variant": "specee_forced0", "seconds": t_f0, "tokens_per_s": b * new / t_f0,
                     "mean_layers": float(np.mean(np.asarray(out0.exit_layer_BxG) + 1)), "host_stops": stops,
                     "host_stop_trips": list(trips)})
        # The same loop with the full head at every scheduled layer (one host stop per decision point, one head
        # read more): which of the two is faster on this GPU (specee.HEAD_CHECKS).
        pa = {}
        f_always = specee.decode_fn(gd, new, exit_layer=l, schedule=sched, k=k, head_check="always")
        _, t_fa = time_profiled(f_always, params, adapter, forced0, prompt, lengths, profile=pa)
        rows.append({**base, "variant": "specee_forced0_head_always", "seconds": t_fa, "tokens_per_s": b * new / t_fa,
                     "host_stops": pa["prof"].host_stops(trips=trips, per=new), "host_stop_trips": list(trips)})
        out, t_ex = time_profiled(f, params, adapter, pred, prompt, lengths)
        rows.append({**base, "variant": "specee_executed", "seconds": t_ex, "tokens_per_s": b * new / t_ex,
                     "mean_layers": float(np.mean(np.asarray(out.exit_layer_BxG)[:, 1:] + 1)), "host_stops": stops,
                     "host_stop_trips": list(trips), "note": "random weights and predictors"})

        def drafts(params, adapter, prompt, lengths):       # the drafter alone, one token per step
            m = nnx.merge(gd, params)
            d = kg.drafter(m, adapter, l)

            def body(tok_st, _):
                lg, st = d.propose(*tok_st)
                return (jnp.argmax(lg, -1).astype(jnp.int32), st), None
            st = d.init(m, prompt, lengths, spec["prompt"] + new)
            return jax.lax.scan(body, (prompt[:, -1], st), None, length=new - 1)[0][0]

        pdr = {}
        _, t_draft_all = time_profiled(drafts, params, adapter, prompt, lengths, profile=pdr)
        per_tok_greedy, per_tok_draft = t_greedy / new, t_draft_all / new
        t_pred = max(t_f0 / new - per_tok_greedy - per_tok_draft, 0.0)
        est = new * (per_tok_draft + stats["mean_layers"] / depth * per_tok_greedy
                     + stats["preds_per_token"] / len(sched) * t_pred)
        rows.append({**base, "variant": "specee_estimate", "seconds": est, "tokens_per_s": b * new / est,
                     "mean_layers": stats["mean_layers"], "preds_per_token": stats["preds_per_token"],
                     "agreement": stats["agreement"], "draft_s_per_token": per_tok_draft,
                     "draft_host_stops": pdr["prof"].host_stops(per=new),
                     "predictors_s_per_token": t_pred, "speedup_vs_greedy": t_greedy / est,
                     "stats_source": stats["source"]})
        log(f"specee {size} b={b}: greedy {rows[-4]['tokens_per_s']:.1f} tok/s, forced0 "
            f"{rows[-3]['tokens_per_s']:.1f}, estimate {rows[-1]['tokens_per_s']:.1f}")
    return rows
