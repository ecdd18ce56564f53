"""FFN-SkipLLM (arXiv:2404.03865) on SmolLM2-135M-Instruct: skipped-FFN fraction vs WikiText-2 perplexity, greedy
agreement with the full model, and CPU wall-clock of KV-cached decoding.

    python -m experiments.ffn_skipllm --config configs/ffn_skipllm.py:smoke [--outdir DIR]

The gate is ``eejax.decoding.ffn_skip.saturation`` inside the engine's one loop (see configs/ffn_skipllm.py for the
protocol, scale and wall-clock).
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from eejax.decoding import ffn_skip
from eejax.decoding import kv as kv_lib
from eejax.errors import ConfigError
from eejax.eval import report as report_lib
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "ffn_skipllm"


# the paper's headline numbers, written beside ours
PAPER = ('Paper (arXiv:2404.03865, abstract): skipping **25-30%** of FFN blocks "with marginal change in '
         'performance" on knowledge-intensive generation (LLaMa 7B/13B). Ours: the skipped fraction and the '
         'perplexity of this 135M model in the tables below; the README beside this file sets them side by '
         'side.')

def calibrate(cos_NxM: np.ndarray, targets, *, cold_first: int, cold_last: int, valid_M: np.ndarray) -> list[dict]:
    """One threshold per target fraction of skipped FFNs (of all N x tokens), from the full model's cosines on the
    validation split (``ffn_skip.first_crossing_skips``, bisection on the threshold)."""
    n = cos_NxM.shape[0]
    frac = lambda thr: float(ffn_skip.first_crossing_skips(cos_NxM, thr, cold_first=cold_first,   # noqa: E731
                                                           cold_last=cold_last)[:, valid_M].sum()
                             / (n * cos_NxM.shape[1]))
    out = []
    for target in targets:
        lo, hi = -1.0, 1.0 + 1e-6          # frac(lo) is the largest, frac(hi) = 0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if frac(mid) > target else (lo, mid)
        out.append({"target": float(target), "threshold": hi, "val_estimate": frac(hi)})
    return out


def plots(rows, drows, layer_skip, profile, out):
    """The result plots (also re-made from a results JSON: ``plots(d["ppl"], d["decode"], d["layer_skip_fraction"],
    d["cosine_profile_validation"], dir)``): one curve per max_skip, the full model as a line."""
    full_ppl = rows[0]["token_ppl"]
    curves, dcurves = {}, {}
    for k in sorted({r["max_skip"] for r in rows}):
        rr = [rows[0]] + [r for r in rows[1:] if r["max_skip"] == k]
        curves[f"max_skip={k}" + (" (greedy rule)" if k == 0 else "")] = ([r["ffn_skipped"] for r in rr],
                                                                          [r["token_ppl"] for r in rr])
        names = {r["setting"] for r in rr}
        dd = [r for r in drows if r["setting"] in names]
        dcurves[f"max_skip={k}"] = ([r["ffn_skipped"] for r in dd], [r["match"] for r in dd])
    common.plot_xy(curves, out / "ppl_vs_skipped.png", xlabel="fraction of FFN blocks skipped",
                   ylabel="WikiText-2 token perplexity (log)", title="FFN-SkipLLM on SmolLM2-135M", hline=full_ppl,
                   logy=True)
    common.plot_xy(dcurves, out / "agreement_vs_skipped.png", xlabel="fraction of FFN blocks skipped (decode)",
                   ylabel="token match with full greedy", title="FFN-SkipLLM: greedy agreement")
    names = list(layer_skip)
    common.plot_map(np.asarray([layer_skip[k] for k in names]), names, out / "layer_skip_map.png",
                    title="fraction of tokens skipping each layer's FFN (test)", cbar="skipped fraction")
    n = len(profile["mean"])
    common.plot_xy({"mean": (np.arange(n), profile["mean"]), "q10": (np.arange(n), profile["q10"]),
                    "q90": (np.arange(n), profile["q90"])}, out / "cosine_profile.png", xlabel="layer",
                   ylabel="cos(FFN input, FFN output)", title="full model, validation tokens")


class Gate(NamedTuple):
    """The model's FFN gate at a threshold and the teacher-forced window pass under it."""
    gate: Any          # (threshold, max_skip) -> ffn_skip.Gate
    window_fn: Any     # jit(params, x_BxT, y_BxT, threshold, max_skip) -> (nll_B, skip_NxBxT, cos_NxBxT)


def make_gate(s, g) -> Gate:
    n = s.cfg.depth

    def gate(thr, max_skip=g.max_skip):
        # max_skip may be traced (one compile for every setting); saturation() checked the static values.
        return ffn_skip.saturation(1.0, n, cold_first=g.cold_first, cold_last=g.cold_last, warmup=g.warmup,
                                   max_skip=g.max_skip)._replace(threshold=thr, max_skip=max_skip)

    @jax.jit
    def window_fn(params, x_BxT, y_BxT, thr, max_skip):
        m = nnx.merge(s.graphdef, params)
        b, t = x_BxT.shape
        r = ffn_skip.forward(m, x_BxT, kv_lib.empty_state(m, b, t), gate(thr, max_skip))
        return common.nll_sum(r.logits, y_BxT), r.skip.skip_NxBxT, r.skip.cos_NxBxT

    return Gate(gate, window_fn)


@experiment(NAME)
def main(run: Run) -> Report:
    cfg, args = run.cfg, run.args
    s = common.load_lm(cfg.model.name, depth=cfg.model.depth)
    n, g = s.cfg.depth, cfg.gate
    if g.cold_first + g.cold_last >= n:
        raise ConfigError(f"gate.cold_first + gate.cold_last = {g.cold_first + g.cold_last} leave no hot "
                          f"layer of the model's {n}")
    print(f"device: {run.prov.device}; model {cfg.model.name}: {n} layers, loaded in {s.load_seconds:.0f} s",
          flush=True)
    gt = make_gate(s, g)
    val, calib, profile, settings = calibration(cfg, args, s, gt)
    rows, layer_skip, fl = perplexities(cfg, args, s, gt, settings)
    drows, trows = decoding(cfg, s, gt, val, settings)
    return report(run, s, calib, profile, rows, layer_skip, fl, drows, trows)


def calibration(cfg, args, s, gt):
    """Calibration on validation: the full model's FFN in/out cosines -> thresholds for target skip fractions."""
    n, g, ev, window_fn = s.cfg.depth, cfg.gate, cfg.ppl, gt.window_fn
    val = common.wikitext_ids(args.data_dir, s.tokenizer, "validation", g.calib_tokens)
    cos = []
    for x, y in common.nll_windows(val, ev.context, ev.batch):
        _, _, c = window_fn(s.params, jnp.asarray(x), jnp.asarray(y), jnp.float32(np.inf), jnp.int32(0))
        cos.append(np.asarray(c).reshape(n, -1))
    cos_NxM = np.concatenate(cos, 1)
    valid_M = np.tile(np.arange(ev.context) >= g.warmup, cos_NxM.shape[1] // ev.context)
    calib = calibrate(cos_NxM, g.targets, cold_first=g.cold_first, cold_last=g.cold_last, valid_M=valid_M)
    profile = {"mean": cos_NxM.mean(1).tolist(), "q10": np.quantile(cos_NxM, 0.1, 1).tolist(),
               "q90": np.quantile(cos_NxM, 0.9, 1).tolist()}
    print("calibration (validation):", calib, flush=True)
    settings = [{"name": "full", "threshold": float("inf"), "max_skip": g.max_skip}] + [
        {"name": f"skip~{c['target']:.2f}", "threshold": c["threshold"], "max_skip": g.max_skip} for c in calib]
    # Variants that re-measure the cosine after `k` consecutive skips, at a calibrated threshold (its realised
    # fraction is lower than the target, which assumed max_skip 0).
    for target, k in g.max_skip_variants:
        c = min(calib, key=lambda c: abs(c["target"] - target))
        settings.append({"name": f"skip~{c['target']:.2f} max_skip={k}", "threshold": c["threshold"],
                         "max_skip": int(k)})

    return val, calib, profile, settings


def perplexities(cfg, args, s, gt, settings):
    """Perplexity on test, decisions per token, causal (one teacher-forced pass = token-by-token decoding)."""
    n, ev, window_fn = s.cfg.depth, cfg.ppl, gt.window_fn
    test = common.wikitext_ids(args.data_dir, s.tokenizer, "test", ev.max_tokens)
    wins = common.nll_windows(test, ev.context, ev.batch)
    fl = common.layer_flops(s.cfg)
    per_token_flops = n * (fl["attn"] + fl["ffn"]) + fl["head"]
    rows, layer_skip = [], {}
    for st in settings:
        start = time.perf_counter()
        nll, skip = 0.0, np.zeros(n)
        for x, y in wins:
            l, sk, _ = window_fn(s.params, jnp.asarray(x), jnp.asarray(y), jnp.float32(st["threshold"]),
                                 jnp.int32(st["max_skip"]))
            nll += float(np.sum(l))
            skip += np.asarray(sk).reshape(n, -1).sum(1)
        tokens = len(wins) * ev.batch * ev.context
        frac = float(skip.sum() / (n * tokens))
        layer_skip[st["name"]] = (skip / tokens).tolist()
        rows.append({"setting": st["name"], "threshold": st["threshold"], "max_skip": st["max_skip"], "tokens": tokens,
                     "ffn_skipped": frac, "matmul_flops_saved": frac * n * fl["ffn"] / per_token_flops,
                     "token_ppl": float(np.exp(nll / tokens)), "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)

    return rows, layer_skip, fl


def decoding(cfg, s, gt, val, settings):
    """Greedy decoding of fixed prompts (validation slices): agreement with the full model, FFNs skipped; then the
    CPU wall-clock of KV-cached decoding at batch 1 (compile excluded)."""
    n, dec, gate = s.cfg.depth, cfg.decode, gt.gate
    prompt_BxP = jnp.asarray(common.spaced_prompts(val, dec.prompts, dec.prompt_len))
    full_gen = common.generator(s.graphdef, common.full_step, dec.new_tokens)
    skip_gen = common.generator(s.graphdef, lambda m, t, st_, i, thr, k: ffn_skip.skip_step(m, t, st_, i,
                                                                                             gate(thr, k)),
                                dec.new_tokens)
    ref = np.asarray(full_gen(s.params, prompt_BxP).tokens_BxG)
    drows = []
    for st in settings:
        gen = skip_gen(s.params, prompt_BxP, jnp.float32(st["threshold"]), jnp.int32(st["max_skip"]))
        ffn_run = np.asarray(gen.layers_BxG)[:, 1:]      # token 0 comes from the full prefill
        drows.append({"setting": st["name"], "ffn_skipped": float(1 - ffn_run.mean() / n)}
                     | common.agreement(ref, np.asarray(gen.tokens_BxG)))
        print(drows[-1], flush=True)

    trows = []
    t_prompts = prompt_BxP[:dec.timing_prompts]
    for label, fn, extra in [("greedy (kv.full_step)", full_gen, ())] + [
            (f"ffn_skip {st['name']}", skip_gen, (jnp.float32(st["threshold"]), jnp.int32(st["max_skip"])))
            for st in settings]:
        secs = sum(common.time_generate(fn, s.params, t_prompts[i:i + 1], *extra, repeats=dec.timing_repeats)
                   for i in range(t_prompts.shape[0]))
        toks = t_prompts.shape[0] * dec.new_tokens
        trows.append({"decoder": label, "batch": 1, "sequences": int(t_prompts.shape[0]), "new_tokens": toks,
                      "seconds": secs, "tokens_per_s": toks / secs})
        print(trows[-1], flush=True)
    base = trows[0]["tokens_per_s"]
    for r in trows:
        r["speedup_vs_greedy"] = r["tokens_per_s"] / base

    return drows, trows


def report(run, s, calib, profile, rows, layer_skip, fl, drows, trows) -> Report:
    cfg, n = run.cfg, s.cfg.depth
    g, ev, dec = cfg.gate, cfg.ppl, cfg.decode
    full_ppl = rows[0]["token_ppl"]
    wall = run.seconds()
    md = "\n\n".join([
        "# FFN-SkipLLM on SmolLM2-135M-Instruct (WikiText-2)",
        run.prov.markdown() + f"  \nModel: {cfg.model.name}, {n} layers. Gate: cold layers [0, {g.cold_first}) and "
        f"the last {g.cold_last}; warm-up {g.warmup} tokens; max_skip {g.max_skip} (0: to the end of the hot "
        f"region). Whole run {wall / 60:.1f} min.",
        PAPER,
        "## Calibration (validation split, full-model cosines; thresholds never fit on test)",
        report_lib.markdown_table(calib, ["target", "threshold", "val_estimate"], ".4f"),
        f"## Perplexity (test, first {rows[0]['tokens']:,} tokens, windows of {ev.context}, decisions per token)\n"
        "ffn_skipped: fraction of all N x tokens FFN blocks skipped. matmul_flops_saved: that fraction times the "
        "FFN's share of a token's matmul multiply-adds (attention projections, FFNs and the output head; attention "
        "scores excluded): the upper bound of a compute saving, not a measured speed-up.",
        report_lib.markdown_table(rows, list(rows[0]), ".4f"),
        f"## Greedy decoding ({dec.prompts} prompts of {dec.prompt_len} validation tokens, {dec.new_tokens} new "
        "tokens, batch of all prompts)\nmatch: position-wise equality with the full model's greedy tokens; "
        "identical_prefix: mean tokens before the first difference; identical_rows: fraction of continuations "
        "equal throughout. ffn_skipped counts the decode steps (token 0 comes from the full-depth prefill).",
        report_lib.markdown_table(drows, list(drows[0]), ".3f"),
        f"## CPU wall-clock of KV-cached decoding (batch 1, {dec.timing_prompts} prompts x {dec.new_tokens} "
        "tokens, prefill included, compile excluded, best of "
        f"{dec.timing_repeats})\nThe MLP half runs under lax.cond, so at batch 1 a skipped FFN is not computed.",
        report_lib.markdown_table(trows, list(trows[0]), ".3f"),
    ])
    return Report(md, {
        "load_seconds": s.load_seconds, "wall_seconds": wall,
        "calibration": calib, "cosine_profile_validation": profile, "ppl": rows, "layer_skip_fraction": layer_skip,
        "decode": drows, "timing": trows, "flops_per_token": fl, "full_ppl": full_ppl},
        {".": lambda folder: plots(rows, drows, layer_skip, profile, folder)})


if __name__ == "__main__":
    main()
