"""Do Language Models Use Their Depth Efficiently? (arXiv:2505.13898) on SmolLM2: per-layer contributions to the
residual stream, the effect of skipping each layer on later layers and on the output, and the logit-lens depth at
which predictions settle.

    python -m experiments.depth_efficiency --config configs/depth_efficiency.py:smoke [--outdir DIR]

Every forward is the engine's scan path (``engine.run_layers``) over a layer program: the full model as a
*half-layer program* (each stored layer as an attention step then an MLP step), and for each skipped layer s the
same program without layer s (``engine.sequence`` of the other layers; the step table is traced, so the 30 skip
programs share one compiled function). See configs/depth_efficiency.py for the runbook.

Shapes: N layers, S program steps, B windows, T tokens per window, D width, V vocabulary.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.eval import report as report_lib
from eejax.exits import engine
from eejax.models import lm as lm_lib
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "depth_efficiency"
PAPER = ("Do Language Models Use Their Depth Efficiently? (Csordás, Manning, Potts; arXiv:2505.13898; NeurIPS "
         "2025)")


def _norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1))


def _cos(x, y):
    return jnp.sum(x * y, -1) / jnp.maximum(_norm(x) * _norm(y), 1e-12)


def _forward(model, tokens_BxT, program):
    """Residual stream after every program step (``S x B x T x D``), the embedding, the final logits."""
    pos_BxT, mask_BxTxT = common.causal_inputs(tokens_BxT)
    h0 = model.embed_tokens(tokens_BxT)
    h_last, h_SxBxTxD = engine.run_layers(model.layers, h0, layer_fn=lm_lib.sequence_layer_fn(pos_BxT, mask_BxTxT),
                                          program=program)
    return h0, h_SxBxTxD, model.shared_head(model.final_norm(h_last)).astype(jnp.float32)


def _contributions(h0, h_SxBxTxD):
    """Per layer of a half-layer program: its input, attention output a and MLP output m (``N x B x T x D``)."""
    after_attn, after_mlp = h_SxBxTxD[0::2], h_SxBxTxD[1::2]
    h_in = jnp.concatenate([h0[None], after_mlp[:-1]], 0)
    return h_in, after_attn - h_in, after_mlp - after_attn


def base_fn(graphdef, lens: bool):
    """The full model: contribution statistics (sums over tokens), and with ``lens`` the logit lens and what the
    skip runs compare to."""

    def f(params, tokens_BxT, targets_BxT):
        model = nnx.merge(graphdef, params)
        n = model.cfg.depth
        h0, h_S, logits = _forward(model, tokens_BxT, common.half_layer_program(range(n)))
        h_in, a, m = _contributions(h0, h_S)
        c = a + m
        hn = _norm(h_in)
        sums = {"attn_rel": jnp.sum(_norm(a) / hn, (1, 2)), "mlp_rel": jnp.sum(_norm(m) / hn, (1, 2)),
                "layer_rel": jnp.sum(_norm(c) / hn, (1, 2)), "attn_cos": jnp.sum(_cos(a, h_in), (1, 2)),
                "mlp_cos": jnp.sum(_cos(m, h_in), (1, 2)), "layer_cos": jnp.sum(_cos(c, h_in), (1, 2))}
        nll_BxT = common.nll_of(logits, targets_BxT)
        if not lens:
            return {"sums": sums, "nll_BxT": nll_BxT}
        logp_final = jax.nn.log_softmax(logits, -1)

        def logit_lens(h_BxTxD):   # the logit lens: the final RMSNorm and the tied head on an intermediate residual
            logp = jax.nn.log_softmax(model.shared_head(model.final_norm(h_BxTxD)).astype(jnp.float32), -1)
            kl = jnp.sum(jnp.exp(logp_final) * (logp_final - logp), -1)
            return jnp.argmax(logp, -1).astype(jnp.int32), kl

        top_NxBxT, kl_NxBxT = jax.lax.map(logit_lens, h_S[1::2])
        return {"sums": sums, "top_NxBxT": top_NxBxT, "kl_NxBxT": kl_NxBxT,
                "nll_BxT": nll_BxT, "contrib_NxBxTxD": c, "logp_BxTxV": logp_final}

    return jax.jit(f)


def skip_fn(graphdef, n: int):
    """The model without one layer (``layer_S`` traced: the other layers' half steps in order): relative change of
    each remaining layer's contribution against the full model's, and the output's KL / top-1 change / NLL."""

    def f(params, tokens_BxT, targets_BxT, layer_S, base_c_NxBxTxD, base_logp_BxTxV):
        model = nnx.merge(graphdef, params)
        prog = common.half_layer_program(range(n - 1))._replace(layer_S=layer_S)
        h0, h_S, logits = _forward(model, tokens_BxT, prog)
        _, a, m = _contributions(h0, h_S)
        chain_K = layer_S[0::2]                              # the stored layer at each kept position
        ref = base_c_NxBxTxD[chain_K]
        num_K, den_K = jnp.sum(_norm(a + m - ref), (1, 2)), jnp.sum(_norm(ref), (1, 2))
        logp = jax.nn.log_softmax(logits, -1)
        kl_BxT = jnp.sum(jnp.exp(base_logp_BxTxV) * (base_logp_BxTxV - logp), -1)
        top_change_BxT = jnp.argmax(logp, -1) != jnp.argmax(base_logp_BxTxV, -1)
        return {"num_K": num_K, "den_K": den_K, "kl_sum": jnp.sum(kl_BxT), "top_change_sum": jnp.sum(top_change_BxT),
                "nll_sum": jnp.sum(common.nll_of(logits, targets_BxT))}

    return jax.jit(f)


def settle_layer(top_NxM: np.ndarray) -> np.ndarray:
    """0-based index of the first layer whose top-1 equals the final top-1 and stays equal to the last layer."""
    agree = top_NxM == top_NxM[-1:]
    stays = np.flip(np.cumprod(np.flip(agree, 0), 0), 0)   # agree at l and at every later layer
    return top_NxM.shape[0] - stays.sum(0)


def _halves(x_N):
    n = len(x_N)
    return float(np.nanmean(x_N[:n // 2])), float(np.nanmean(x_N[n // 2:]))


def plots(outdir, contrib_rows, change_SxN, skip_rows, lens_rows, settle_M, n):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    layers = np.arange(1, n + 1)
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("attn_rel", "attention ||a||/||h||"), ("mlp_rel", "MLP ||m||/||h||"),
                       ("layer_rel", "layer ||a+m||/||h||")):
        ax[0].plot(layers, [r[key] for r in contrib_rows], marker=".", label=label)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("layer")
    ax[0].set_title("relative contribution to the residual")
    ax[0].legend(fontsize=8)
    for key, label in (("attn_cos", "attention"), ("mlp_cos", "MLP"), ("layer_cos", "layer")):
        ax[1].plot(layers, [r[key] for r in contrib_rows], marker=".", label=label)
    ax[1].axhline(0, color="grey", lw=0.5)
    ax[1].set_xlabel("layer")
    ax[1].set_title("cosine(contribution, residual)")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "contributions.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    im = ax[0].imshow(change_SxN, origin="lower", cmap="viridis", extent=(0.5, n + 0.5, 0.5, n + 0.5),
                      vmin=0, vmax=min(1.0, float(np.nanmax(change_SxN))))
    ax[0].set_xlabel("later layer l")
    ax[0].set_ylabel("skipped layer s")
    ax[0].set_title("relative change of layer l's contribution")
    fig.colorbar(im, ax=ax[0])
    ax[1].plot(layers, [r["kl"] for r in skip_rows], marker=".", label="KL(full || skipped)")
    ax[1].plot(layers, [r["top1_changed"] for r in skip_rows], marker=".", label="top-1 changed (fraction)")
    ax[1].plot(layers, [r["mean_future_change"] for r in skip_rows], marker=".", label="mean later-layer change")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("skipped layer s")
    ax[1].set_title("effect of skipping one layer")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "skip_effects.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].plot(layers, [r["kl_to_final"] for r in lens_rows], marker=".", color="C3")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("layer")
    ax[0].set_ylabel("KL(final || layer)", color="C3")
    a2 = ax[0].twinx()
    a2.plot(layers, [r["top1_eq_final"] for r in lens_rows], marker=".", label="top-1 = final")
    a2.plot(layers, [r["next_token_acc"] for r in lens_rows], marker=".", label="next-token accuracy")
    a2.set_ylim(0, 1)
    a2.legend(fontsize=8, loc="center left")
    ax[0].set_title("logit lens (final norm + tied head)")
    ax[1].hist(settle_M + 1, bins=np.arange(0.5, n + 1.5), color="C2")
    ax[1].set_xlabel("layer at which the top-1 settles")
    ax[1].set_ylabel("tokens")
    ax[1].set_title("depth at which predictions settle")
    fig.tight_layout()
    fig.savefig(outdir / "logit_lens.png", dpi=130)
    plt.close(fig)


@experiment(NAME)
def main(run: Run) -> Report:
    cfg, args = run.cfg, run.args
    lmod = common.model_of(run)
    d = cfg.data
    ids = common.wikitext_head(args.data_dir, lmod.tokenizer, d.windows * d.context + 1, d.split)
    tokens_WxT = ids[:-1].reshape(d.windows, d.context)
    targets_WxT = ids[1:].reshape(d.windows, d.context)
    print(f"model: {lmod.description} (loaded in {lmod.load_seconds:.0f} s); data: wikitext2/{d.split}, "
          f"{d.windows} windows x {d.context} tokens", flush=True)
    acc = passes(cfg, lmod, tokens_WxT, targets_WxT)
    return summarize(run, lmod, targets_WxT, acc)


class Accumulated(NamedTuple):
    """Sums over the windows of the full-model passes (with the logit lens where run) and the skip runs."""
    sums: dict
    tops: list
    kls: list
    nlls: list
    num_SxN: np.ndarray
    den_SxN: np.ndarray
    skip_acc: dict
    skip_tokens: int
    timing: dict


def passes(cfg, lmod, tokens_WxT, targets_WxT) -> Accumulated:
    """The full model over every window (contributions; the logit lens on the first ``lens.windows``), and on the
    first ``skip.windows`` the model without each layer in turn."""
    n, d = lmod.cfg.depth, cfg.data
    fb, fl, fs = base_fn(lmod.graphdef, False), base_fn(lmod.graphdef, True), skip_fn(lmod.graphdef, n)
    sums = None
    tops, kls, nlls = [], [], []
    num_SxN, den_SxN = np.zeros((n, n)), np.zeros((n, n))
    skip_acc = {s: np.zeros(3) for s in range(n)}
    skip_tokens = 0
    timing = {"base_s": 0.0, "skip_s": 0.0}
    for i in range(0, d.windows, d.chunk):
        tok, tgt = jnp.asarray(tokens_WxT[i:i + d.chunk]), jnp.asarray(targets_WxT[i:i + d.chunk])
        start = time.perf_counter()
        with_lens = i < cfg.lens.windows or i < cfg.skip.windows
        out = jax.block_until_ready((fl if with_lens else fb)(lmod.params, tok, tgt))
        timing["base_s"] += time.perf_counter() - start
        s_np = jax.tree.map(np.asarray, out["sums"])
        sums = s_np if sums is None else jax.tree.map(np.add, sums, s_np)
        if i < cfg.lens.windows:
            tops.append(np.asarray(out["top_NxBxT"]).reshape(n, -1))
            kls.append(np.asarray(out["kl_NxBxT"]).reshape(n, -1))
        nlls.append(np.asarray(out["nll_BxT"]).ravel())
        print(f"windows {i}..{i + d.chunk - 1}: full model done ({time.perf_counter() - start:.0f} s)", flush=True)
        if i < cfg.skip.windows:
            st = cfg.skip.tokens       # causal: the first positions of the windows are windows of their own
            skip_tokens += tok[:, :st].size
            start = time.perf_counter()
            for s in range(n):
                prog = common.half_layer_program([l for l in range(n) if l != s])
                r = jax.device_get(fs(lmod.params, tok[:, :st], tgt[:, :st], jnp.asarray(prog.layer_S),
                                      out["contrib_NxBxTxD"][:, :, :st], out["logp_BxTxV"][:, :st]))
                chain_K = np.asarray(prog.layer_S)[0::2]
                num_SxN[s, chain_K] += np.asarray(r["num_K"])
                den_SxN[s, chain_K] += np.asarray(r["den_K"])
                skip_acc[s] += [float(r["kl_sum"]), float(r["top_change_sum"]), float(r["nll_sum"])]
            timing["skip_s"] += time.perf_counter() - start
            print(f"windows {i}..{i + d.chunk - 1}: {n} skip runs done ({time.perf_counter() - start:.0f} s)",
                  flush=True)

    return Accumulated(sums, tops, kls, nlls, num_SxN, den_SxN, skip_acc, skip_tokens, timing)


def summarize(run, lmod, targets_WxT, acc: Accumulated) -> Report:
    cfg, n, d = run.cfg, lmod.cfg.depth, run.cfg.data
    sums, tops, kls, nlls, num_SxN, den_SxN, skip_acc, skip_tokens, timing = acc
    m = d.windows * d.context
    change_SxN = np.full((n, n), np.nan)
    upper = np.triu(np.ones((n, n), bool), 1)     # later layers only: earlier ones are untouched by construction
    change_SxN[upper] = num_SxN[upper] / np.maximum(den_SxN[upper], 1e-30)
    top_NxM, kl_NxM, nll_M = np.concatenate(tops, 1), np.concatenate(kls, 1), np.concatenate(nlls)
    lens_tokens = top_NxM.shape[1]
    targets_M = targets_WxT.ravel()[:lens_tokens]
    contrib_rows = [{"layer": l + 1} | {k: float(v[l] / m) for k, v in sums.items()} for l in range(n)]
    settle_M = settle_layer(top_NxM)
    lens_rows = [{"layer": l + 1, "kl_to_final": float(kl_NxM[l].mean()),
                  "top1_eq_final": float(np.mean(top_NxM[l] == top_NxM[-1])),
                  "next_token_acc": float(np.mean(top_NxM[l] == targets_M)),
                  "settled_by_here": float(np.mean(settle_M <= l))} for l in range(n)]
    base_nll = float(np.mean(np.concatenate(nlls).reshape(d.windows, d.context)[:cfg.skip.windows,
                                                                                  :cfg.skip.tokens]))
    skip_rows = []
    for s in range(n):
        later = change_SxN[s, s + 1:]
        skip_rows.append({"skipped_layer": s + 1, "kl": skip_acc[s][0] / skip_tokens,
                          "top1_changed": skip_acc[s][1] / skip_tokens,
                          "nll_change": skip_acc[s][2] / skip_tokens - base_nll,
                          "mean_future_change": float(np.mean(later)) if later.size else float("nan"),
                          "max_future_change": float(np.max(later)) if later.size else float("nan")})
    summary = {
        "tokens_analysed": m, "tokens_skip_analysis": skip_tokens, "full_model_nll": float(nll_M.mean()),
        "tokens_logit_lens": lens_tokens, "full_model_top1_acc": float(np.mean(top_NxM[-1] == targets_M)),
        "layer_rel_first_half_vs_second": _halves(np.asarray([r["layer_rel"] for r in contrib_rows])),
        "skip_future_change_first_vs_second": _halves(np.asarray([r["mean_future_change"] for r in skip_rows])),
        "skip_kl_first_vs_second": _halves(np.asarray([r["kl"] for r in skip_rows])),
        "skip_top1_first_vs_second": _halves(np.asarray([r["top1_changed"] for r in skip_rows])),
        "settle_layer_mean": float(np.mean(settle_M + 1)), "settle_layer_median": float(np.median(settle_M + 1)),
        "settle_relative_depth_mean": float(np.mean((settle_M + 1) / n)),
        "settled_in_first_half": float(np.mean(settle_M + 1 <= n // 2)),
        "settled_at_last_layer": float(np.mean(settle_M == n - 1)),
        "timing_s": timing}
    print({k: v for k, v in summary.items() if k != "timing_s"}, flush=True)

    h = summary
    md = "\n\n".join([
        f"# {PAPER}: residual-stream analyses on {cfg.model.name}",
        run.prov.markdown() + f"  \nModel: {lmod.description}.  \nData: wikitext2/{d.split} (as stored), the first "
        f"{m:,} tokens in {d.windows} windows of {d.context} (teacher-forced, no BOS) for the contributions; the logit "
        f"lens on the first {lens_tokens:,} and the skip analysis on the first {skip_tokens:,} of them. Full-model "
        f"next-token NLL {h['full_model_nll']:.3f}, top-1 accuracy {h['full_model_top1_acc']:.3f} (on the logit-lens "
        f"tokens). Wall-clock: full-model passes (with the logit lens where run) {timing['base_s']:.0f} s, {n} skip "
        f"runs {timing['skip_s']:.0f} s.",
        "Paper [abs]: on Llama 3.1 and Qwen 3, second-half layers contribute much less than first-half ones, with a "
        "phase transition between the halves; skipping second-half layers has a much smaller effect on future "
        "computations and on the output. No number to compare at 135M parameters.",
        "## Summary (first half of the layers vs second half)\n"
        f"- mean relative contribution ||a+m||/||h||: {h['layer_rel_first_half_vs_second'][0]:.3f} vs "
        f"{h['layer_rel_first_half_vs_second'][1]:.3f}\n"
        f"- skipping one layer, mean relative change of later layers' contributions: "
        f"{h['skip_future_change_first_vs_second'][0]:.3f} vs {h['skip_future_change_first_vs_second'][1]:.3f}\n"
        f"- skipping one layer, output KL(full || skipped): {h['skip_kl_first_vs_second'][0]:.4f} vs "
        f"{h['skip_kl_first_vs_second'][1]:.4f}; top-1 changed: {h['skip_top1_first_vs_second'][0]:.3f} vs "
        f"{h['skip_top1_first_vs_second'][1]:.3f}\n"
        f"- logit lens: the top-1 settles at layer {h['settle_layer_mean']:.1f} on average (median "
        f"{h['settle_layer_median']:.0f} of {n}); {100 * h['settled_in_first_half']:.1f}% of tokens settle within "
        f"the first half, {100 * h['settled_at_last_layer']:.1f}% only at the last layer",
        "## 1. Contributions to the residual stream (mean over tokens; h = the layer's input)\n"
        "![contributions](contributions.png)",
        report_lib.markdown_table(contrib_rows, list(contrib_rows[0].keys()), ".3f"),
        "## 2. Skipping one layer (the model without layer s, as an engine program)\n"
        "mean/max_future_change: relative change sum_t ||c'_l - c_l|| / sum_t ||c_l|| of the contributions of the "
        "layers after s, averaged / maximised over them; kl: mean KL(full || skipped) of the next-token "
        "distribution; top1_changed: fraction of tokens whose argmax changes; nll_change: change of the mean "
        "next-token NLL.\n![skip effects](skip_effects.png)",
        report_lib.markdown_table(skip_rows, list(skip_rows[0].keys()), ".4f"),
        "## 3. Logit lens (each layer's residual through the final RMSNorm and the tied head)\n"
        "settled_by_here: fraction of tokens whose top-1 already equals the final one at this layer and at every "
        "later layer.\n![logit lens](logit_lens.png)",
        report_lib.markdown_table(lens_rows, list(lens_rows[0].keys()), ".4f"),
    ])
    return Report(md, {
        "model": lmod.description, "summary": summary,
        "contributions": contrib_rows, "skips": skip_rows, "future_change_SxN": change_SxN, "logit_lens": lens_rows,
        "settle_layer_histogram": np.bincount(settle_M, minlength=n)},
        {".": lambda folder: plots(folder, contrib_rows, change_SxN, skip_rows, lens_rows, settle_M, n)})


if __name__ == "__main__":
    main()
