"""Void in Language Models (LAC, arXiv:2505.14467) decoding speed on the engine.

Variants (each beside plain greedy decoding of the same model and batch; every row carries the host stops per token
and float32 dots of its compiled program):

* ``lac_official``: ``eejax.decoding.void.lac_step`` (alpha 0.8, the released default): every layer runs, the
  head reads the last activated layer's output; the cost of tracing voids (no layer is saved: run-and-discard).
* ``pp_pattern_skip``: whole layers skipped for the generated tokens (``engine.row_skip``, K/V of a skipped layer
  from its input), each layer skipped with the per-layer rate the CPU run measured on SmolLM2 for the causal
  prompt-pattern rule (``experiments/results/void_lm-smollm2/void_lm.json``, alpha 0.8; default 0.5 on the middle
  layers when absent, as the row says). The masked engine still computes a skipped row's layer when another row
  runs it, so expect a gain only when the whole batch skips the layer.
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token, void
from eejax.exits import engine
from papers import _ffn_void_common as c

PAPER = "Void-LAC"
ALPHA = 0.8


def measured_rates(depth: int) -> tuple[np.ndarray, str]:
    res = c.results("void_lm-smollm2/void_lm.json")
    rates = (res or {}).get("pp_pattern_skip_fraction", {}).get(str(ALPHA))
    if rates is not None and len(rates) == depth:
        return np.asarray(rates), f"measured on SmolLM2 (PP pattern, alpha {ALPHA}, committed results JSON)"
    r = np.zeros(depth)
    r[2:depth - 2] = 0.5
    return r, "default: 0.5 on the middle layers (no committed results fit this depth)"


def run(size: str, budget_s: float, log) -> list[dict]:
    p = c.preset(size)
    t0 = time.perf_counter()
    graphdef, params = c.build(p)
    n, new = p["depth"], p["new"]
    rates, source = measured_rates(n)
    greedy = c.generate_fn(graphdef, per_token.full_depth_step, new)
    lac = c.generate_fn(graphdef, lambda m, t, s, i: void.lac_step(m, t, s, i, ALPHA), new)

    def skip_step(m, t, s, i, keep_NxB):
        out, s = kv_lib.forward(m, t[:, None], s, engine.row_skip(keep_NxB, [n - 1]), kv_lib.final_head(m))
        stats = per_token.StepStats(out.exit_layer_B, jnp.sum(keep_NxB, 0).astype(jnp.int32), out.score_B,
                                    out.layers_run, out.out.hidden_BxD)
        return out.logits_BxC, stats, s

    skip = c.generate_fn(graphdef, skip_step, new)
    rows = []
    for batch in p["batches"]:
        if rows and time.perf_counter() - t0 > budget_s:   # the first batch always runs
            log(f"[{PAPER}] budget spent before batch {batch}")
            break
        prompt = c.random_prompt(p, batch)
        sec, _, costs = c.run_variant(greedy, params, prompt, repeats=p["repeats"], new=new)
        rows.append(c.row(PAPER, "greedy", batch, new, sec, **costs))
        sec, (_, layers), costs = c.run_variant(lac, params, prompt, repeats=p["repeats"], new=new)
        rows.append(c.row(PAPER, "lac_official", batch, new, sec, alpha=ALPHA,
                          layers_active=float(np.asarray(layers)[:, 1:].mean() / n), layers_computed=1.0, **costs))
        keep = ~c.bernoulli_table(rates, batch, 1, seed=batch)[:, :, 0]
        keep[-1] = True
        sec, _, costs = c.run_variant(skip, params, prompt, jnp.asarray(keep), repeats=p["repeats"], new=new)
        rows.append(c.row(PAPER, "pp_pattern_skip", batch, new, sec, layers_kept=float(keep.mean()),
                          skip_pattern=source, **costs))
        log(f"[{PAPER}] batch {batch}: " + ", ".join(f"{r['variant']} {r['tokens_per_s']:.1f} tok/s "
                                                     f"({r['host_stops']:g} stops/tok)"
                                                     for r in rows if r["batch"] == batch))
    return rows
