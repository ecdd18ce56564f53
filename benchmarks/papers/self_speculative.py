"""GPU-suite module: LayerSkip-style static self-speculation and DEL (eejax.decoding.speculative) against plain greedy
decoding of the same model and batch, with the draft as a static truncated model beside the old masked-engine draft.

    rows = run("tiny" | "small" | "gpu", budget_s, log)

Weights are random (the GGUF file does not travel), so a random model's exits do not agree with its last layer and
the measured loop accepts almost nothing: those rows time the mechanism (draft steps, verify extends, shadow heads)
at the real shapes. The data-dependent statistic, tokens per verify at the fitted (E, k), is read from the committed
CPU results (experiments/results/self_speculative-smollm2/self_speculative.json) when present, else a stated
default, and combined with the component times measured HERE (one full step, one draft step at E, one verify extend
of k + 1 tokens) into "composed" rows: the speed-up this device would give at the acceptance measured on the real
model. Compile is excluded (AOT), every timing ends with block_until_ready.

Rows side by side (all ``paper="self_speculative"``, so ``speedup_vs_greedy`` reads off the greedy row):
``greedy``; ``LayerSkip E k, truncated drafts`` (the library's drafts: stored layers 0..E and one head, a loop with
a known trip count) and ``LayerSkip E k, masked-engine drafts`` (the previous drafts: the engine's exit loop with a
``fixed_exit`` policy and every exit's head on the way; a drafter written here on the public protocol); ``DEL``;
and a composed row per draft kind. Each executed row carries ``host_stops`` per generated token, read from its
compiled program (``eejax.exits.hlo``; data-dependent loops counted with the run's own trip counts: rounds, and for
the masked engine the exits it passes and its mean segment length); composed rows carry the draft step's
``draft_host_stops`` and ``draft_bytes_over_step`` (matrix-product operand bytes of a draft token over a greedy
step, from the compiled programs: ``_spec_costs.dot_cost``).

Sizes: tiny (a test runs it in seconds), small (CPU), gpu (SmolLM2-135M shape: 30 layers, D=576, 9/3 heads, SwiGLU
1536, vocabulary 49,152, bfloat16, batches 1/8/32).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.papers._spec_costs import compile_profiled, dot_cost, median_time
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token, speculative
from eejax.models import lm as lm_lib

PAPER = "self_speculative"
RESULTS = pathlib.Path(__file__).resolve().parents[2] / "experiments/results/self_speculative-smollm2/" \
    "self_speculative.json"
DEFAULT = {"E": 8, "k": 2, "tokens_per_verify": 1.5}   # used when no committed results exist (stated in each row)

SIZES = {
    "tiny": dict(cfg=dict(vocab_size=64, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64),
                 layers=(1, 2), batches=(2,), prompt=6, new=6, dtype=None, max_k=2),
    "small": dict(cfg=dict(vocab_size=4096, d_model=128, depth=8, num_heads=4, num_kv_heads=2, mlp_dim=512),
                  layers=(2, 4, 6), batches=(1, 8), prompt=32, new=32, dtype=None, max_k=4),
    "gpu": dict(cfg=dict(vocab_size=49152, d_model=576, depth=30, num_heads=9, num_kv_heads=3, mlp_dim=1536,
                         rope_base=1e5, norm_eps=1e-5),
                layers=(2, 4, 6, 8, 10, 12, 15, 18, 21, 24), batches=(1, 8, 32), prompt=64, new=128,
                dtype="bfloat16", max_k=6),
}


class MaskedStatic(speculative.Static):
    """The previous LayerSkip drafts, for the side-by-side rows: every draft token through the engine's masked
    exit loop (``speculative.masked_draft_step``). The same tokens, another cost."""
    __slots__ = ()

    def step(self, model, plan, j, tok_B, target, state):
        logits, target = speculative.masked_draft_step(model, tok_B, target, plan.exit)
        return logits, target, state


def measured_statistics(layers) -> dict:
    """(E, k, tokens per verify) of the fitted static drafter from the committed CPU results, else DEFAULT."""
    try:
        res = json.loads(RESULTS.read_text())
        arm, e, k = res["fit"]["best_cpu_cost"]
        row = next(r for r in res["measured"]["8"]["rows"] if r["drafter"] == f"static E={e} k={k} (fit)")
        src = {"E": int(e), "k": int(k), "tokens_per_verify": float(row["tokens_per_verify"]),
               "source": f"{RESULTS.name} (SmolLM2-135M, {arm} exits, batch 8, WikiText-2 test prompts)"}
    except (OSError, KeyError, ValueError, TypeError, StopIteration):
        src = dict(DEFAULT, source="default (no committed results)")
    if src["E"] not in layers:
        src["E"] = min(layers, key=lambda l: abs(l - src["E"]))
    return src


def _model(size):
    s = SIZES[size]
    d = s["cfg"]["depth"]
    layers = tuple(l for l in s["layers"] if l < d)
    cfg = lm_lib.LMConfig(**s["cfg"], mlp="swiglu", exits=tuple(l - 1 for l in layers) + (d - 1,), dtype=s["dtype"])
    gd, params = lm_lib.build(cfg, 0)
    if s["dtype"]:
        params = jax.tree.map(lambda x: x.astype(s["dtype"]), params)
    return gd, params, cfg, layers


def _masked_trips(layers, e_idx: int) -> tuple[float, float]:
    """The masked engine's data-dependent loops for a draft at exit ``e_idx``: the exits it passes, and its segment
    loop's mean length."""
    return float(e_idx + 1), layers[e_idx] / (e_idx + 1)


def run(size: str, budget_s: float, log) -> list[dict]:
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use one of {sorted(SIZES)}")
    s = SIZES[size]
    start = time.perf_counter()
    gd, params, cfg, layers = _model(size)
    idx = {l: i for i, l in enumerate(layers)}
    stats = measured_statistics(layers)
    e, k = stats["E"], stats["k"]
    rng = np.random.default_rng(0)
    rows = []
    spent = lambda: rows and time.perf_counter() - start > budget_s   # noqa: E731 (the first batch always runs)
    for b in s["batches"]:
        if spent():
            log(f"self_speculative: budget spent, skipping batch {b}")
            break
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, s["prompt"])), jnp.int32)
        lengths = jnp.full((b,), s["prompt"], jnp.int32)
        g = s["new"]
        base = dict(paper=PAPER, batch=b, new_tokens=g, size=size)

        def greedy(p, t, l):
            return per_token.generate(nnx.merge(gd, p), t, l, g, per_token.full_depth_step).tokens_BxG

        exe, prof = compile_profiled(greedy, params, prompt, lengths)
        sec, ref = median_time(exe, (params, prompt, lengths))
        rows.append(dict(variant="greedy", seconds=sec, tokens_per_s=b * g / sec,
                         host_stops=prof.host_stops(per=g), **base))
        masked_trips = _masked_trips(layers, idx[e])
        cands = [idx[l] for l in layers]
        units = [(f"LayerSkip E={e} k={k}, truncated drafts", speculative.static(idx[e], k), ()),
                 (f"LayerSkip E={e} k={k}, masked-engine drafts", MaskedStatic(idx[e], k), masked_trips),
                 (f"DEL over E in {layers}, d <= {s['max_k']}", speculative.dynamic(cfg, cands, s["max_k"]),
                  (len(cands) + 1.0, cfg.depth / (len(cands) + 1.0)))]
        for variant, drafter, inner_trips in units:
            if spent() and not variant.startswith("LayerSkip"):
                break

            def spec(p, t, l, drafter=drafter):
                return speculative.self_speculative(nnx.merge(gd, p), t, l, g, drafter=drafter)

            exe, prof = compile_profiled(spec, params, prompt, lengths)
            sec, out = median_time(exe, (params, prompt, lengths))
            trips = (float(out.batch_rounds),) + inner_trips
            rows.append(dict(variant=variant + " (random weights)", seconds=sec, tokens_per_s=b * g / sec,
                             host_stops=prof.host_stops(trips=trips, per=g), host_stop_trips=list(trips),
                             acceptance=float(out.acceptance_rate), tokens_per_verify=float(out.tokens_per_verify),
                             mean_draft_layers=float(jnp.sum(out.draft_layers_B) / jnp.maximum(
                                 jnp.sum(out.drafted_B), 1)),
                             equals_greedy=bool(jnp.all(out.tokens_BxG == ref)), **base))
            log(f"self_speculative {size} batch {b}: {rows[-1]}")
        # Composed: component times on this device x the tokens per verify measured on the real model (CPU run).
        _, st = jax.jit(lambda p, t, l: kv_lib.prefill(nnx.merge(gd, p), t, l, s["prompt"] + k + 2))(
            params, prompt, lengths)
        tok = prompt[:, -1]
        parts = {"step": (lambda p, t, s_: kv_lib.full_step(nnx.merge(gd, p), t, s_)[0], ()),
                 "truncated": (lambda p, t, s_: speculative.draft_step(nnx.merge(gd, p), t, s_, idx[e])[0], ()),
                 "masked": (lambda p, t, s_: speculative.masked_draft_step(nnx.merge(gd, p), t, s_, idx[e])[0],
                            masked_trips)}
        comp = {}
        for name, (fn, trips) in parts.items():
            exe, prof = compile_profiled(fn, params, tok, st)
            comp[name] = (median_time(exe, (params, tok, st))[0], prof.host_stops(trips=trips or 1),
                          dot_cost(prof, trips=trips or 1)["bytes"])
        exe, _ = compile_profiled(lambda p, t, s_: kv_lib.extend(nnx.merge(gd, p), t, s_)[0], params,
                                  jnp.tile(tok[:, None], (1, k + 1)), st)
        verify_s = median_time(exe, (params, jnp.tile(tok[:, None], (1, k + 1)), st))[0]
        tpv = stats["tokens_per_verify"]
        step_s = comp["step"][0]
        for name in ("truncated", "masked"):
            draft_s, draft_stops, draft_bytes = comp[name]
            per_token_s = (k * draft_s + verify_s) / tpv
            rows.append(dict(variant=f"composed: LayerSkip E={e} k={k}, {name} drafts, at the measured "
                                     "tokens/verify", seconds=per_token_s * g, tokens_per_s=b / per_token_s,
                             tokens_per_verify=tpv, step_s=step_s, draft_step_s=draft_s, verify_s=verify_s,
                             draft_over_step_time=draft_s / step_s, draft_host_stops=draft_stops,
                             draft_bytes_over_step=draft_bytes / comp["step"][2],
                             speedup_composed=step_s / per_token_s, statistics_source=stats["source"], **base))
            log(f"self_speculative {size} batch {b}: {rows[-1]}")
    return rows
