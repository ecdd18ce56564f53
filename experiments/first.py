"""FiRST: prompt-conditioned per-sequence layer skipping on SmolLM2-135M, against the static ULS set at equal layers.

    python -m experiments.first --config configs/first.py:smoke [--outdir DIR]

See configs/first.py for the runbook (routers, training on cached prefill features, evaluation, scale).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.text import load_tokens
from eejax.decoding import layer_skip as ls
from eejax.eval import bootstrap
from eejax.eval import report as report_lib
from eejax.train import ArrayIterator, Trainer, make_optimizer, one_device_mesh, read_metrics
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "first"


# ------------------------------------------------------------------------------------------------- features


def training_windows(cfg, args, tok) -> np.ndarray:
    """``train.windows`` windows of P + T + 1 tokens spread evenly over the Gutenberg training books."""
    t = cfg.train
    ids = load_tokens(args.data_dir, "gutenberg", "train", tok)
    length = cfg.eval.prompt_len + t.cont_len + 1
    if ids.size < t.windows * length:
        raise ValueError(f"Gutenberg train has {ids.size} tokens; train.windows={t.windows} x {length} need more")
    starts = np.linspace(0, ids.size - length, t.windows).astype(np.int64)
    return np.stack([ids[s:s + length] for s in starts])


def cached_features(su, windows_WxL: np.ndarray, log=print) -> dict[str, np.ndarray]:
    """Full-depth prefill of every training prompt, once: pooled layer inputs (W x N x D, float32) and the prompt
    K/V (N x W x J x P x K: the KV cache's layout, float16), in ``<workdir>/features.npz``."""
    path = su.workdir / "features.npz"
    if path.exists():
        with np.load(path) as f:
            feats = {k: f[k] for k in f.files}
        p = su.cfg.eval.prompt_len     # the slot axis of the cache layout (older files held N x W x P x J x K)
        if np.array_equal(feats["windows"], windows_WxL) and feats["k"].shape[3] == p:
            log(f"features: reusing {path}")
            return feats
    p, bsz = su.cfg.eval.prompt_len, su.cfg.train.prefill_batch
    fn = jax.jit(lambda params, x: ls.prefill_pooled(nnx.merge(su.graphdef, params), x,
                                                     jnp.full((x.shape[0],), p, jnp.int32), p))
    pooled, ks, vs = [], [], []
    start = time.perf_counter()
    for i in range(0, windows_WxL.shape[0], bsz):
        pre = fn(su.params, jnp.asarray(windows_WxL[i:i + bsz, :p]))
        pooled.append(np.asarray(pre.pooled_NxBxD).transpose(1, 0, 2))
        ks.append(np.asarray(pre.state.cache.k_NxBxJxSxK, np.float16))
        vs.append(np.asarray(pre.state.cache.v_NxBxJxSxK, np.float16))
        log(f"  features: {i + bsz}/{windows_WxL.shape[0]} prompts ({time.perf_counter() - start:.0f} s)")
    feats = {"windows": windows_WxL, "pooled_WxNxD": np.concatenate(pooled), "k": np.concatenate(ks, axis=1),
             "v": np.concatenate(vs, axis=1), "seconds": np.float64(time.perf_counter() - start)}
    np.savez(path, **feats)
    return feats


# ------------------------------------------------------------------------------------------------- training


def train_routers(su, feats, log=print) -> tuple[ls.Routers, list[dict], float]:
    """Straight-through router training on the frozen model over the cached features (``train.batch`` windows a step,
    drawn without replacement), resumable in ``<workdir>/routers-<hash of the train config>``; reuses
    ``<workdir>/routers-<hash>.npz`` when it exists (a finished training of that config)."""
    cfg, t, n = su.cfg, su.cfg.train, su.mcfg.depth
    key = hashlib.sha256(json.dumps(t.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    path = su.workdir / f"routers-{key}.npz"
    if path.exists():
        with np.load(path) as f:
            log(f"routers: reusing {path}")
            return ls.Routers(jnp.asarray(f["w"]), jnp.asarray(f["b"])), json.loads(str(f["log"])), float(f["secs"])
    routable = ls.routable(n)
    rho = 1.0 - t.target_skip / routable.sum()
    p = cfg.eval.prompt_len

    def loss_fn(r, batch, ctx):
        model = nnx.merge(su.graphdef, ctx.frozen)
        pooled_BxNxD, win_BxL = batch["pooled_WxNxD"], batch["windows"]
        k, v = jnp.swapaxes(batch["k_WxNx"], 0, 1), jnp.swapaxes(batch["v_WxNx"], 0, 1)
        gate, p_keep = ls.straight_through(ls.router_logits(r, pooled_BxNxD.transpose(1, 0, 2)), routable)
        cont = win_BxL[:, p:]
        logits = ls.gated_continuation_logits(model, k, v, cont[:, :-1], gate)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        ce = -jnp.mean(jnp.take_along_axis(logp, cont[:, 1:, None], -1))
        # The rate is that of the hard decisions (straight-through: the gate's forward value is 0/1, its gradient
        # the sigmoid's); a penalty on the soft probabilities is met by p = target > 0.5 while nothing is skipped.
        keep_rate_B = jnp.sum(jnp.where(jnp.asarray(routable)[:, None], gate, 0.0), 0) / routable.sum()
        pen = jnp.mean(jnp.square(keep_rate_B - rho))
        skipped = jnp.mean(jnp.sum(1.0 - gate, 0))
        return ce + t.rate_weight * pen, {"ce": ce, "penalty": pen, "skipped": skipped, "p_keep": jnp.mean(p_keep)}

    # The trainer's batch axis leads: the prompt K/V are cached layers first, so swap them (views).
    arrays = {"pooled_WxNxD": feats["pooled_WxNxD"], "windows": feats["windows"],
              "k_WxNx": np.swapaxes(feats["k"], 0, 1), "v_WxNx": np.swapaxes(feats["v"], 0, 1)}
    workdir = su.workdir / f"routers-{key}"
    start = time.perf_counter()
    with Trainer(loss_fn, ls.init_routers(n, su.mcfg.d_model, t.keep_bias), make_optimizer(t.optim),
                 workdir=workdir, seed=cfg.seed, mesh=one_device_mesh(), log_every=t.log_every,
                 ckpt_every=t.log_every) as tr:
        routers = tr.fit(ArrayIterator(arrays, t.batch, seed=cfg.seed, draw="without_replacement"), t.steps,
                         desc="routers", frozen=su.params).params
    secs = time.perf_counter() - start
    hist = {r["step"]: {"step": r["step"], **{k: float(r[k]) for k in ("ce", "penalty", "skipped", "p_keep", "loss")}}
            for r in read_metrics(workdir)}
    hist = list(hist.values())
    for rec in hist:
        log(" ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in rec.items()))
    np.savez(path, w=np.asarray(routers.w_NxD), b=np.asarray(routers.b_N), log=json.dumps(hist), secs=secs)
    return routers, hist, secs


# ------------------------------------------------------------------------------------------------- evaluation


def random_keep_sets(rng, routable, k: int, draws: int) -> list[np.ndarray]:
    """``draws`` random keep sets, each skipping ``k`` routable layers drawn uniformly without replacement. A random
    control is a distribution, not one draw: one draw can land on a layer whose skip alone ruins the model (on
    SmolLM2 skipping its second layer alone costs KL 3.3), so the method is placed within many draws (median,
    range, rank)."""
    n = routable.shape[0]
    return [np.setdiff1d(np.arange(n), rng.choice(np.flatnonzero(routable), k, replace=False)) for _ in range(draws)]


def random_control(ppl: dict, agree: dict, k: int, draw_names: list[str], method: str, seed: int) -> dict:
    """The method's place among the random draws at k skipped layers: the draws' median and range of perplexity and
    agreement, the method's rank (1 = lower perplexity than every draw), and the paired bootstrap interval (over the
    evaluation windows) of the method's perplexity minus the median draw's (the draw at the median rank; of an even
    number of draws, the upper of the two middle ones)."""
    p_R = np.array([ppl[d]["ppl"] for d in draw_names])
    a_R = np.array([agree[d]["agreement"] for d in draw_names])
    median_draw = draw_names[int(np.argsort(p_R)[len(p_R) // 2])]
    d = paired_ppl(ppl, method, median_draw, seed)
    return {"k": k, "draws": len(draw_names), "random_ppl_median": float(np.median(p_R)),
            "random_ppl_min": float(p_R.min()), "random_ppl_max": float(p_R.max()),
            "random_agree_median": float(np.median(a_R)), "random_agree_min": float(a_R.min()),
            "random_agree_max": float(a_R.max()), "method": method, "method_ppl": ppl[method]["ppl"],
            "method_rank": int(1 + np.sum(p_R < ppl[method]["ppl"])), "of": len(draw_names) + 1,
            "median_draw": median_draw, "diff_vs_median_draw": d.diff, "ci95_lo": d.lo, "ci95_hi": d.hi,
            "reading": ppl_reading(d, method, median_draw)}


def paired_ppl(ppl: dict, a: str, b: str, seed: int = 0) -> bootstrap.Difference:
    """Perplexity of ``a`` minus ``b`` on the same windows, with the paired bootstrap 95% interval that resamples
    whole windows (a window's tokens are correlated); every window scores the same number of tokens, so
    exp(mean of the windows' mean NLL) is the perplexity."""
    return bootstrap.paired_bootstrap(ppl[a]["nll_W"], ppl[b]["nll_W"], transform=np.exp, seed=seed)


def ppl_reading(d: bootstrap.Difference, a: str, b: str) -> str:
    """Perplexity is better lower: "a better than b", "a worse than b" or "no difference at this scale"."""
    return d.reading(a, b).replace(" above ", " worse than ").replace(" below ", " better than ")


def plot(rows, skip_freq, path, n):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    full = next(r for r in rows if r["family"] == "full")
    for fam, marker in zip(("FiRST top-k", "ULS", "router static", "random"), "osd^"):
        rs = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["avg_skipped"])
        ls_ = "" if fam == "random" else "-"     # the random draws: a cloud of points at each k
        axes[0].plot([r["avg_skipped"] for r in rs], [r["ppl"] for r in rs], marker=marker, ls=ls_, label=fam)
        axes[1].plot([r["avg_skipped"] for r in rs], [r["agreement"] for r in rs], marker=marker, ls=ls_, label=fam)
    for r in rows:
        if r["family"] == "FiRST":
            axes[0].plot([r["avg_skipped"]], [r["ppl"]], "k*", ms=12, label="FiRST (hard decisions)")
            axes[1].plot([r["avg_skipped"]], [r["agreement"]], "k*", ms=12, label="FiRST (hard decisions)")
    axes[0].axhline(full["ppl"], color="k", lw=0.8, label="full model")
    axes[0].set_yscale("log")
    axes[0].set(xlabel="layers skipped per generated token (mean)", ylabel="WikiText-2 perplexity (decode, log)")
    axes[1].set(xlabel="layers skipped per generated token (mean)", ylabel="greedy agreement with the full model")
    for name, freq in skip_freq.items():
        axes[2].plot(np.arange(n), freq, marker=".", label=name)
    axes[2].set(xlabel="layer", ylabel="fraction of sequences skipping it (hard decisions)")
    common.finish_figure(fig, axes, f"FiRST routers vs static skip sets on a {n}-layer LM (frozen model)", path)


@experiment(NAME)
def main(run: Run) -> Report:
    su = common.setup(run)
    cfg, e, n = su.cfg, su.cfg.eval, su.mcfg.depth
    routable = ls.routable(n)
    for k in (*e.skips, cfg.train.target_skip):
        if k > routable.sum():
            raise ValueError(f"cannot skip {k} of the {routable.sum()} routable layers of {n}")
    data = common.wikitext_eval(cfg, su.args, su.tokenizer)
    train_w = training_windows(cfg, su.args, su.tokenizer)
    feats = cached_features(su, train_w)
    routers, hist, train_s = train_routers(su, feats)

    methods, meta, first_keep, train_logit_NxW, train_keep, draws = build_methods(su, routers, feats)
    ev = evaluate(su, data, methods, meta, first_keep, train_keep)
    return report(su, data, feats, hist, train_s, ev, train_logit_NxW, draws)


def build_methods(su, routers, feats):
    """The full model, FiRST (hard decisions, and top-k per row), and at each k the ULS set, the routers' static
    set and ``eval.random_draws`` random sets (``draws``: their names per k)."""
    e, n = su.cfg.eval, su.mcfg.depth
    routable = ls.routable(n)
    # The router's static set: the layers with the lowest mean keep logit over the training prompts.
    train_logit_NxW = np.asarray(ls.router_logits(routers, jnp.asarray(feats["pooled_WxNxD"]).transpose(1, 0, 2)))
    mean_logit = np.where(routable, train_logit_NxW.mean(1), np.inf)
    train_keep = np.asarray(ls.hard_keep(jnp.asarray(train_logit_NxW), routable))
    rng = np.random.default_rng(e.random_seed)

    def first_keep(skip=None):
        def keep_fn(pre):
            logit = ls.router_logits(routers, pre.pooled_NxBxD)
            return ls.hard_keep(logit, routable) if skip is None else ls.topk_keep(logit, routable, skip)
        return keep_fn

    methods = [common.full_method(), common.row_method("FiRST", first_keep(), "router logit > 0, per sequence")]
    meta = [{"family": "full", "k": 0}, {"family": "FiRST", "k": None}]
    draws = {}
    for k in e.skips:
        static = np.setdiff1d(np.arange(n), np.argsort(mean_logit, kind="stable")[:k])
        uls = ls.uls_layers(n, skip=k)
        skipped = lambda keep: ",".join(str(l) for l in np.setdiff1d(np.arange(n), keep))  # noqa: E731
        methods += [common.row_method(f"FiRST top-{k}", first_keep(k), f"each row skips its {k} lowest"),
                    common.table_method(f"ULS skip {k}", uls, n, "skips " + skipped(uls)),
                    common.table_method(f"router static skip {k}", static, n, "skips " + skipped(static))]
        meta += [{"family": f, "k": k} for f in ("FiRST top-k", "ULS", "router static")]
        # Draw 0 of the first k is the single draw of the earlier runs (same seed, same order).
        draws[k] = [f"random skip {k} #{i}" for i in range(e.random_draws)]
        for name, rand in zip(draws[k], random_keep_sets(rng, routable, k, e.random_draws)):
            methods.append(common.table_method(name, rand, n, "skips " + skipped(rand)))
            meta.append({"family": "random", "k": k})

    return methods, meta, first_keep, train_logit_NxW, train_keep, draws


class Evaluation(NamedTuple):
    rows: list
    eval_s: float
    eval_keep: np.ndarray
    distinct: int
    skip_freq: dict
    ppl: dict      # per method: perplexity, mean layers, per-window NLL (common.perplexity)
    agree: dict    # per method: greedy agreement with the full model (common.greedy)


def evaluate(su, data, methods, meta, first_keep, train_keep) -> Evaluation:
    """Decode-path perplexity, greedy agreement and speed of every method; FiRST's decisions on the eval prompts."""
    cfg, e, n = su.cfg, su.cfg.eval, su.mcfg.depth
    runner = common.Runner(su.graphdef, e.prompt_len, e.new_tokens)
    t0 = time.perf_counter()
    ppl = common.perplexity(runner, su.params, data.windows_WxL, methods, e.batch)
    # ULS at the number of layers FiRST's hard decisions skipped on average (rounded): the matched static set.
    k_hard = int(round(n - ppl["FiRST"]["avg_layers"]))
    matched = common.table_method(f"ULS skip {k_hard} (matched to FiRST)", ls.uls_layers(n, skip=k_hard), n)
    if matched.name.split(" (")[0] not in ppl:
        ppl |= common.perplexity(runner, su.params, data.windows_WxL, [matched], e.batch)
        methods.append(matched)
        meta.append({"family": "ULS", "k": k_hard})
    agree = common.greedy(runner, su.params, data.prompts_QxP, methods, e.greedy_batch)
    timed = [methods[0], methods[1], next(m for m in methods if m.name in (f"ULS skip {k_hard}", matched.name))]
    times = common.timing(runner, su.params, data.prompts_QxP, timed, cfg.timing.batches, cfg.timing.rounds)
    eval_s = time.perf_counter() - t0

    # Per-sequence decisions on the evaluation prompts (how input-dependent are they?).
    pre_fn = runner.prefill
    eval_keep = []
    for i in range(0, data.windows_WxL.shape[0], e.batch):
        pre = pre_fn(su.params, jnp.asarray(data.windows_WxL[i:i + e.batch, :e.prompt_len]))
        eval_keep.append(np.asarray(first_keep()(pre)))
    eval_keep = np.concatenate(eval_keep, axis=1)
    distinct = len({tuple(col) for col in eval_keep.T})
    skip_freq = {"Gutenberg train prompts": (1 - train_keep.mean(1)).tolist(),
                 "WikiText-2 eval prompts": (1 - eval_keep.mean(1)).tolist()}

    rows = []
    for m, mt in zip(methods, meta):
        name = m.name
        row = {"family": mt["family"], "k": mt["k"], "method": name, "avg_layers": ppl[name]["avg_layers"],
               "avg_skipped": n - ppl[name]["avg_layers"], "ppl": ppl[name]["ppl"],
               "agreement": agree[name]["agreement"], "prefix": agree[name]["prefix"]}
        row |= times.get(name, {})
        row["detail"] = m.detail
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    return Evaluation(rows, eval_s, eval_keep, distinct, skip_freq, ppl, agree)


def report(su, data, feats, hist, train_s, ev, train_logit_NxW, draws) -> Report:
    cfg, e, n = su.cfg, su.cfg.eval, su.mcfg.depth
    rows, eval_s, eval_keep, distinct, skip_freq, ppl, agree = ev
    files = {"first_quality_vs_skipped.png": lambda path: plot(rows, skip_freq, path, n)}
    cols = ["family", "method", "avg_layers", "avg_skipped", "ppl", "agreement", "prefix"]
    tcols = ["method", "avg_layers"] + [f"b{b}_{x}" for b in cfg.timing.batches for x in ("tok_s", "speedup")]
    by = {(r["family"], r["k"]): r for r in rows if r["family"] != "random"}
    cmp_rows, rand_rows, paired = [], [], []
    for k in e.skips:
        f, u, s = (by[(fam, k)] for fam in ("FiRST top-k", "ULS", "router static"))
        rc = random_control(ppl, agree, k, draws[k], f["method"], cfg.seed)
        rand_rows.append(rc)
        cmp_rows.append({"k": k, "FiRST_top_k_ppl": f["ppl"], "ULS_ppl": u["ppl"], "router_static_ppl": s["ppl"],
                         "random_ppl_median": rc["random_ppl_median"], "FiRST_agree": f["agreement"],
                         "ULS_agree": u["agreement"], "router_static_agree": s["agreement"],
                         "random_agree_median": rc["random_agree_median"]})
        for a, b in ((f["method"], u["method"]), (f["method"], s["method"]), (u["method"], s["method"]),
                     (f["method"], rc["median_draw"])):
            d = paired_ppl(ppl, a, b, cfg.seed)
            paired.append({"k": k, "a": a, "b": b, "ppl_a_minus_b": d.diff, "ci95_lo": d.lo, "ci95_hi": d.hi,
                           "reading": ppl_reading(d, "a", "b")})
    d = paired_ppl(ppl, "FiRST", "full model", cfg.seed)
    paired.append({"k": None, "a": "FiRST", "b": "full model", "ppl_a_minus_b": d.diff, "ci95_lo": d.lo,
                   "ci95_hi": d.hi, "reading": ppl_reading(d, "a", "b")})
    t, last = cfg.train, hist[-1]
    md = "\n\n".join([
        "# FiRST: prompt-routed per-sequence layer skipping vs static skip sets (frozen SmolLM2, KV-cached decode)",
        su.prov.markdown() + f"  \n{common.model_line(su)}  \nData: training prompts: {t.windows} windows of "
        f"{e.prompt_len} + {t.cont_len + 1} tokens spread over the Gutenberg training books; evaluation: "
        f"{data.description}.  \nTraining: {t.steps} steps of batch {t.batch} ({t.optim.name}, lr {t.optim.lr:g}), "
        f"target {t.target_skip} skipped layers (rate weight {t.rate_weight:g}), {train_s:.0f} s (feature caching "
        f"{float(feats['seconds']):.0f} s, once); last logged step: CE {last['ce']:.3f}, hard-skipped "
        f"{last['skipped']:.2f} layers per sequence. No LoRA: only the {n} x ({su.mcfg.d_model} + 1) router "
        f"parameters are trained. Evaluation {eval_s:.0f} s.",
        "Paper: FiRST (Jain et al. 2024, arXiv:2410.12513) gives no number in its abstract: lower latency with "
        "quality competitive with the base model, and input adaptivity matters. The paper fine-tunes the routers "
        "(optionally with LoRA) per task on Llama-class models; ours are trained on generic book text and evaluated "
        "on WikiText-2 (a domain shift), on a 135M model.",
        "## Every method (decode-path perplexity, greedy agreement)\n"
        "avg_layers / avg_skipped: measured per generated token (FiRST's hard decisions give each sequence its own "
        "count). The prefill always runs at full depth (the routers read every layer's prompt input), for every "
        "method; its cost is not in these numbers.",
        report_lib.markdown_table(rows, cols + ["detail"], ".3f"),
        "## At equal layers per row (k skipped)\nrandom: the median over the random draws (next table).",
        report_lib.markdown_table(cmp_rows, list(cmp_rows[0]), ".3f"),
        f"## The random control: {e.random_draws} draws per k\n"
        "Each draw skips k routable layers drawn uniformly. method_rank: the method's perplexity rank among the draws "
        "and itself (1 = lower than every draw). diff_vs_median_draw: the method's perplexity minus the median "
        "draw's, with its paired bootstrap 95% interval over the evaluation windows. Every draw's row is in the "
        "first table.",
        report_lib.markdown_table(rand_rows, [c for c in rand_rows[0] if c != "method"], ".3f"),
        "## Paired differences (perplexity, same windows)\n"
        "ppl_a_minus_b with the paired bootstrap 95% interval (10,000 resamples of whole windows, "
        "`eejax.eval.bootstrap.paired_bootstrap`); an interval holding 0 reads \"no difference at this scale\".",
        report_lib.markdown_table(paired, list(paired[0]), ".3f"),
        f"## Decode speed (decode-only tokens/s, best of {cfg.timing.rounds} interleaved rounds)\n"
        "FiRST at batch B > 1 runs the union of its rows' kept layers (each row's own skips are masked), so its "
        "saving shrinks as rows disagree; at batch 1 it runs exactly the row's set.",
        report_lib.markdown_table([r for r in rows if f"b{cfg.timing.batches[0]}_tok_s" in r],
                              tcols, ".2f"),
        f"## How input-dependent are the decisions?\n{distinct} distinct skip sets over the "
        f"{eval_keep.shape[1]} WikiText-2 prompts; per-layer skip frequency in `first_quality_vs_skipped.png` "
        "(right).",
    ])
    return Report(md, {
        "data": data.description, "rows": rows,
        "equal_layers": cmp_rows, "random_control": rand_rows, "paired_differences": paired,
        "nll_per_window": {k: v["nll_W"] for k, v in ppl.items()}, "train_log": hist, "train_seconds": train_s,
        "feature_seconds": float(feats["seconds"]), "eval_seconds": eval_s, "skip_frequency": skip_freq,
        "distinct_eval_sets": distinct, "eval_keep_NxW": eval_keep.astype(int).tolist(),
        "router_mean_train_logit": train_logit_NxW.mean(1).tolist()}, files)


if __name__ == "__main__":
    main()
