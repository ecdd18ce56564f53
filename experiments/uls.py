"""Unified Layer Skipping vs early exit vs SkipDecode at equal layers per token, on SmolLM2-135M (KV-cached decode).

    python -m experiments.uls --config configs/uls.py:smoke [--outdir DIR]

See configs/uls.py for the runbook (methods, protocol, scale, wall-clock).
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from eejax.decoding import layer_skip as ls
from eejax.decoding import skipdecode
from eejax.eval import report as report_lib
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "uls"
FAMILIES = ("ULS", "early exit", "SkipDecode")


def methods_for(cfg, n: int, g: int) -> tuple[list[common.Method], list[dict]]:
    """The full model, then ULS / early exit / SkipDecode at each target speed-up (same layers per token)."""
    u = cfg.uls
    methods, meta = [common.full_method()], [{"target": 1.0, "family": "full", "skipped": 0}]
    for r in u.speedups:
        keep = ls.uls_layers(n, r, keep_first=u.keep_first, keep_last=u.keep_last)
        k = n - keep.size
        methods.append(common.table_method(f"ULS {r:g}x", keep, n, "skips " + ",".join(
            str(l) for l in np.setdiff1d(np.arange(n), keep))))
        methods.append(common.table_method(f"early exit {r:g}x", np.arange(keep.size), n,
                                           f"layers 0..{keep.size - 1} + final norm/head"))
        layers_g = skipdecode.schedule_for_speedup(g, n, n / keep.size)
        methods.append(common.Method(
            f"SkipDecode {r:g}x", "skipdecode",
            lambda m, t, s, i, lg, kb=u.skipdecode_keep_bottom: skipdecode.skip_step(m, t, s, i, lg, keep_bottom=kb),
            lambda pre, lg=jnp.asarray(layers_g): (lg,), f"layers {layers_g[0]}->{layers_g[-1]}"))
        meta += [{"target": r, "family": f, "skipped": k} for f in FAMILIES]
    return methods, meta


def plot(rows, path, n, batches):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    full = rows[0]
    for fam, marker in zip(FAMILIES, "osd"):
        rs = [r for r in rows if r["family"] == fam]
        x = [r["avg_layers"] for r in rs]
        axes[0].plot(x, [r["ppl"] for r in rs], marker=marker, label=fam)
        axes[1].plot(x, [r["agreement"] for r in rs], marker=marker, label=fam)
        for b, ls_ in zip(batches, ("-", "--", ":")):
            axes[2].plot([r["target"] for r in rs], [r[f"b{b}_speedup"] for r in rs], marker=marker, ls=ls_,
                         label=f"{fam} batch {b}")
    axes[0].axhline(full["ppl"], color="k", lw=0.8, label="full model")
    axes[0].set_yscale("log")
    axes[0].set(xlabel="mean layers per generated token", ylabel="WikiText-2 test perplexity (decode, log)")
    axes[1].set(xlabel="mean layers per generated token", ylabel="greedy agreement with the full model")
    ts = sorted({r["target"] for r in rows})
    axes[2].plot(ts, ts, color="k", lw=0.8, label="target")
    axes[2].set(xlabel="target speed-up r (layers N / (N - k))", ylabel="measured decode speed-up (CPU)")
    common.finish_figure(fig, axes, f"ULS vs early exit vs SkipDecode on a {n}-layer LM (no fine-tuning)", path)


@experiment(NAME)
def main(run: Run) -> Report:
    su = common.setup(run)
    cfg, e, n = su.cfg, su.cfg.eval, su.mcfg.depth
    data = common.wikitext_eval(cfg, su.args, su.tokenizer)
    runner = common.Runner(su.graphdef, e.prompt_len, e.new_tokens)
    methods, meta = methods_for(cfg, n, e.new_tokens)
    t0 = time.perf_counter()
    ppl = common.perplexity(runner, su.params, data.windows_WxL, methods, e.batch)
    agree = common.greedy(runner, su.params, data.prompts_QxP, methods, e.greedy_batch)
    times = common.timing(runner, su.params, data.prompts_QxP, methods, cfg.timing.batches, cfg.timing.rounds)
    eval_s = time.perf_counter() - t0

    rows = []
    for m, mt in zip(methods, meta):
        row = {"target": mt["target"], "family": mt["family"], "method": m.name, "skipped": mt["skipped"],
               "avg_layers": ppl[m.name]["avg_layers"], "layer_speedup": n / ppl[m.name]["avg_layers"],
               "ppl": ppl[m.name]["ppl"], "agreement": agree[m.name]["agreement"],
               "prefix": agree[m.name]["prefix"]}
        row |= times[m.name]
        row["detail"] = m.detail
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    return report(su, data, methods, rows, agree, eval_s)


def report(su, data, methods, rows, agree, eval_s) -> Report:
    cfg, e, n = su.cfg, su.cfg.eval, su.mcfg.depth
    files = {"uls_quality_vs_layers.png": lambda path: plot(rows, path, n, cfg.timing.batches)}
    cols = [k for k in rows[0] if k != "detail"] + ["detail"]
    b = cfg.timing.batches
    best = {}
    for r in cfg.uls.speedups:
        at = {row["family"]: row for row in rows if row["target"] == r}
        best[f"{r:g}x"] = min(FAMILIES, key=lambda f: at[f]["ppl"])
    md = "\n\n".join([
        "# Unified Layer Skipping vs early exit vs SkipDecode (KV-cached decoding, no fine-tuning)",
        su.prov.markdown() + f"  \n{common.model_line(su)} Loaded in {su.load_s:.0f} s; evaluation "
        f"{eval_s:.0f} s.  \nData: {data.description}.",
        "Paper: ULS (Liu, Meng, Zhou 2024, arXiv:2404.06954) reports no single headline number: at a given target "
        "speed-up, ULS (a fine-tuned model, an input-independent, evenly spread skip set) beats dynamic methods in "
        "quality and real throughput on machine translation and summarisation, and supports batched decoding with "
        "the KV cache. Here nothing is fine-tuned (the model is the frozen SmolLM2-135M-Instruct), so this measures "
        "which skip *pattern* a pretrained model tolerates best at equal compute, and the measured speed-ups.",
        "## Quality and speed vs target speed-up (equal layers per generated token within a target)\n"
        "skipped: k = round(N (1 - 1/r)) layers. avg_layers: measured mean layers per generated token (SkipDecode's "
        "schedule is rounded per position). ppl: teacher-forced perplexity through the KV-cached decode step "
        "(prompt prefilled at full depth). agreement / prefix: free-running greedy tokens equal to the full "
        "model's, and the mean identical prefix (of "
        f"{e.new_tokens - 1} tokens). b{{B}}_tok_s: decode-only tokens/s at batch B (prefill excluded, compile "
        f"excluded, best of {cfg.timing.rounds} interleaved rounds); b{{B}}_speedup: against plain greedy decoding "
        f"(`per_token.full_depth_step`) at the same batch. Early exit uses the model's final norm and head after "
        "its last kept layer: the model has no trained exit norms or heads.",
        report_lib.markdown_table(rows, cols, ".3f"),
        "Lowest perplexity at each target: " + ", ".join(f"{k}: {v}" for k, v in best.items()) + ".",
        f"Plot: `uls_quality_vs_layers.png` (perplexity and agreement vs mean layers; measured speed-up vs target at "
        f"batch {b[0]} and {b[-1]}).",
    ])
    return Report(md, {
        "data": data.description, "load_seconds": su.load_s, "eval_seconds": eval_s, "rows": rows,
        "skip_sets": {m.name: m.detail for m in methods},
        "uls_keep": {f"{r:g}": ls.uls_layers(n, r, keep_first=cfg.uls.keep_first,
                                            keep_last=cfg.uls.keep_last).tolist() for r in cfg.uls.speedups},
        "greedy_tokens": {m.name: agree[m.name]["tokens"].tolist() for m in methods[:1]}}, files)


if __name__ == "__main__":
    main()
