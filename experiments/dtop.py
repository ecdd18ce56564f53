"""DToP at small scale: token early exit in a segmentation ViT on synthetic digit canvases (arXiv:2308.01045).

    python -m experiments.dtop --config configs/dtop.py:smoke [--outdir DIR] [--workdir DIR]

One SegViT with per-token heads after layers 2 / 4 / 6 is trained with the auxiliary-loss recipe (every token, every
head). On that one model: each head on every token is "fewer layers for every token"; DToP runs the tokens through
the engine's token exit (``eejax.exits.tokens``: compacted executor, drop mode), a confident token's prediction
finalised at the head where it exits, the k most confident exiting tokens of each class kept (k = 5, the paper's,
and k = 0). Thresholds are picked on validation; everything reported is on test, with paired bootstrap intervals
over test canvases. Every executed run is checked against the teacher-forced pass under its own schedule (exits and
FLOPs), and the "naive" simulation from the plain all-token pass is reported beside it.

Where this differs from the released code (zbwxp/Dynamic-Token-Pruning), on purpose: the code loops over the images
of a batch in Python and prunes each alone (``x_[:, ~b_id]``); here every row prunes its own tokens inside one
batched program. The code zeroes exited tokens' features and builds the final prediction of an exited token from
the LAST head's class scores times an earlier head's mask (ATM heads); here an exited token keeps the prediction of
the head where it exited, as the paper describes. Heads are per-token linear classifiers, not 3-layer ATM decoders.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import nnx

from eejax.data import composed
from eejax.eval import budgeted, paired, report, segmentation
from eejax.exits import costs, engine, tokens
from eejax.models import segvit
from experiments import _common_tokens as tx
from experiments._common import Report, Run, experiment

NAME = "dtop"
PAPER = ("arXiv:2308.01045 (abstract): 20-35% less computation for plain-ViT segmenters without accuracy loss; "
         "README: ADE20K SegViT ViT-B 109.9 -> 86.8 GFLOPs (-21%) at 49.6 -> 49.8 mIoU, ViT-L 617.0 -> 412.8 "
         "(-33%) at 53.3 -> 52.8")


# ------------------------------------------------------------------------------------------------ data, model


def canvases(digits, num: int, seed: int, cfg) -> dict[str, np.ndarray]:
    cv = composed.digit_canvases(digits, num, seed=seed, digits=tuple(cfg.data.digits))
    labels = composed.patch_labels(cv.labels_NxHxW, cfg.model.patch_size, cv.background,
                                   cfg.data.patch_min_fraction)
    return {"image": tx.normalise(cv.images_NxHxWx1, cfg.data.name), "label": labels,
            "digits": cv.digits_N, "bg_frac": (labels == cv.background).mean(1)}


def load(cfg, data_dir):
    train, val, test = tx.digit_splits(cfg, data_dir)
    return {"train": canvases(train, cfg.data.num_train, cfg.seed, cfg),
            "val": canvases(val, cfg.data.num_val, cfg.seed + 1, cfg),
            "test": canvases(test, cfg.data.num_test, cfg.seed + 2, cfg)}


def model_config(cfg) -> segvit.SegViTConfig:
    return segvit.SegViTConfig(num_classes=11, **cfg.model)


def aux_loss(graphdef):
    """Mean over the heads of the per-token cross-entropy, every token through every layer (DToP's base model)."""
    def loss_fn(params, batch, ctx):
        del ctx
        logits = nnx.merge(graphdef, params).all_exits(batch["image"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)
        nll_E = -jnp.take_along_axis(logp, batch["label"][None, ..., None], -1).mean((1, 2, 3))
        acc_E = (logits.argmax(-1) == batch["label"][None]).mean((1, 2))
        return nll_E.mean(), {"ce_first": nll_E[0], "ce_last": nll_E[-1], "acc_first": acc_E[0], "acc_last": acc_E[-1]}
    return loss_fn


# ------------------------------------------------------------------------------------------------ evaluation


def static_pass(graphdef, params, split, bs):
    """Every head on every token (the plain all-token pass): logits ``E x N x T x C``."""
    fn = jax.jit(lambda p, x: jnp.moveaxis(nnx.merge(graphdef, p).all_exits(x), 0, 1))
    return np.moveaxis(tx.batched(lambda b: fn(params, b["image"]), {"image": split["image"]}, bs), 1, 0)


def confidence_policy(thr, num_exits: int, top_k: int):
    """DToP's rule: one threshold for every early head; the last head takes every remaining token."""
    return tokens.confidence(jnp.stack([jnp.asarray(thr, jnp.float32)] * (num_exits - 1) + [jnp.float32(1.0)]),
                             num_exits, top_k)


def dtop_fns(graphdef, mcfg, buckets, top_k, mode="drop", margin=1e-4):
    """``(run, check)`` jitted for one top-k and mode: the executed DToP (drop: the compacted executor; freeze: the
    masked one, the only executor that keeps a frozen token as a key; per token the prediction and the exit, per row
    the counts, per step the slots) and the teacher-forced pass under the executed schedule (the policy replayed on
    its heads must take the same exits and counts, and the same predictions wherever the teacher-forced top-2 logits
    are more than ``margin`` apart: a closer pair flips under float32 reassociation of compacted vs masked math)."""
    E = len(mcfg.exit_layers)
    executor = tokens.Compacted(buckets) if mode == "drop" else tokens.Masked()

    def run_fn(p, x, thr):
        out = nnx.merge(graphdef, p).token_exit(x, confidence_policy(thr, E, top_k), executor, mode=mode)
        b = x.shape[0]
        return dict(pred=out.out.logits_BxQxC.argmax(-1).astype(jnp.int8), exit=out.exit_BxT.astype(jnp.int8),
                    queries=out.queries_SxB.T, keys=out.keys_SxB.T,
                    slots=jnp.broadcast_to(out.slots_S, (b, out.slots_S.shape[0])))

    def check_fn(p, x, thr, exit_BxT, pred_BxT, queries_BxS):
        pol = confidence_policy(thr, E, top_k)
        exit_BxT = exit_BxT.astype(jnp.int32)
        sim = nnx.merge(graphdef, p).scan(x, exit_BxT, mode=mode)
        replayed = tokens.replay(pol, sim, exit_BxT, mcfg.program, mode=mode)
        logits = tokens.take_exit(sim.out_E, exit_BxT).logits_BxQxC
        top2 = jax.lax.top_k(logits, 2)[0]
        clear = top2[..., 0] - top2[..., 1] > margin
        same_pred = (logits.argmax(-1) == pred_BxT) | ~clear
        q_sim = tokens.schedule_masks(replayed, mcfg.program, mode=mode)[0].sum(-1).T
        return ((replayed == exit_BxT).all(1) & same_pred.all(1) & (q_sim == queries_BxS).all(1))

    return jax.jit(run_fn), jax.jit(check_fn)


def naive_exits(plain_logits_ExNxTxC, thr, top_k, mcfg, mode="drop"):
    """The exits the policy takes on the plain all-token pass (the simulation that ignores that dropping tokens
    changes the states of the others)."""
    E, n, t = plain_logits_ExNxTxC.shape[:3]
    pol = confidence_policy(thr, E, top_k)
    fn = jax.jit(lambda lg: tokens.replay(pol, tokens.TokenScan(tokens.TokenHeadOut(lg), None),
                                          jnp.full(lg.shape[1:3], E - 1, jnp.int32), mcfg.program, mode=mode))
    return np.concatenate([np.asarray(fn(plain_logits_ExNxTxC[:, s:s + 500])) for s in range(0, n, 500)])


def evaluate_point(fns, params, split, thr, bs, mcfg, plain_logits=None, top_k=0, mode="drop"):
    run_fn, check_fn = fns
    r = tx.batched(lambda b: run_fn(params, b["image"], jnp.float32(thr)), {"image": split["image"]}, bs)
    r["flops"] = segvit.run_flops(mcfg, r["queries"].T, r["keys"].T)
    r["conf"] = segmentation.confusion_matrices(r["pred"].astype(np.int64), split["label"], mcfg.num_classes)
    if plain_logits is not None:
        r["exec_eq_sim"] = tx.batched(lambda b: check_fn(params, b["image"], jnp.float32(thr), b["exit"], b["pred"],
                                                         b["queries"]),
                                      {"image": split["image"], "exit": r["exit"], "pred": r["pred"],
                                       "queries": r["queries"]}, bs)
        r["naive_agree"] = (naive_exits(plain_logits, thr, top_k, mcfg, mode) == r["exit"]).mean(1)
    return r


def physical_flops(mcfg, slots_NxS, bs: int) -> float:
    """Per-image FLOPs of the batched compacted run: every step computes ``bs x slots`` token slots (padding
    included) and each head runs on the slots of its segment; averaged over the batch."""
    layer = costs.token_layer_flops(slots_NxS, slots_NxS, mcfg.d_model, mcfg.mlp_dim, mcfg.num_heads).sum(1)
    heads = slots_NxS[:, list(mcfg.exit_layers)].sum(1) * segvit.head_flops(mcfg)
    return float(np.mean(segvit.embed_flops(mcfg) + layer + heads))


def roofline_speedup(mcfg, slots_NxS, bs: int) -> float:
    """Predicted H200 time of the dense model over the compacted DToP run at batch ``bs`` (cost model: roofline,
    H200 calibrated; layers and heads on the bucket slots, one host stop per bucket switch; gathers not modelled)."""
    d, f, h = mcfg.d_model, mcfg.mlp_dim, mcfg.num_heads
    E = len(mcfg.exit_layers)
    dense = [costs.vit_layer_work(bs, mcfg.tokens, d, f, h)] * mcfg.depth + [
        costs.linear_head_work(bs * mcfg.tokens, d, mcfg.num_classes)]
    times = []
    for slots_S in np.unique(slots_NxS, axis=0):
        parts = [costs.vit_layer_work(bs, int(s), d, f, h) for s in slots_S]
        parts += [costs.linear_head_work(bs * int(slots_S[l]), d, mcfg.num_classes) for l in mcfg.exit_layers]
        parts.append(costs.Work(host_stops=E - 1, name="bucket switches"))
        times.append(costs.predict(parts, "h200").time_s)
    return costs.predict(dense, "h200").time_s / float(np.mean(times))


def spearman_interval(x, y, resamples: int, seed: int = 0):
    n = len(x)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        boot.append(scipy.stats.spearmanr(x[i], y[i])[0])
    lo, hi = np.nanquantile(boot, [0.025, 0.975])
    return float(scipy.stats.spearmanr(x, y)[0]), float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ science


def science(cfg, data, workdir, prov):
    mcfg = model_config(cfg)
    bs, E, rs = cfg.eval.batch_size, len(mcfg.exit_layers), cfg.eval.resamples
    graphdef, params = segvit.build(mcfg, cfg.seed)
    params, train_s = tx.fit(aux_loss(graphdef), params, {k: data["train"][k] for k in ("image", "label")},
                             cfg.train, workdir / "model", seed=cfg.seed, log_every=cfg.log_every, desc="segvit")
    val, test = data["val"], data["test"]
    C = mcfg.num_classes
    static, plain_test = {}, None
    for name, split in (("val", val), ("test", test)):
        logits = static_pass(graphdef, params, split, bs)
        static[name] = [segmentation.confusion_matrices(logits[e].argmax(-1), split["label"], C) for e in range(E)]
        plain_test = logits if name == "test" else None
    static_flops = [segvit.static_flops(mcfg, e) for e in range(E)]
    full_val, full_test = segmentation.miou(static["val"][-1].sum(0)), static["test"][-1]
    rows_static = []
    for e in range(E):
        m, lo, hi = segmentation.miou_interval(static["test"][e], resamples=rs)
        rows_static.append({"head after layer": mcfg.exit_layers[e] + 1, "test mIoU %": 100 * m,
                            "95% CI": f"[{100 * lo:.1f}, {100 * hi:.1f}]", "MFLOPs / image": static_flops[e] / 1e6})

    arms = [(mode, k) for mode in cfg.eval.modes for k in cfg.eval.top_ks]
    sweep, points = [], {}
    for mode, k in arms:
        fns = dtop_fns(graphdef, mcfg, tuple(cfg.eval.buckets), k, mode, cfg.eval.pred_margin)
        for thr in cfg.eval.thresholds:
            v = evaluate_point(fns, params, val, thr, bs, mcfg)
            t = evaluate_point(fns, params, test, thr, bs, mcfg, plain_test, k, mode)
            points[(mode, k, thr)] = (v, t)
            d = segmentation.miou_difference(t["conf"], full_test, resamples=rs)
            label = test["label"]
            sweep.append({
                "mode": mode, "top_k": k, "threshold": f"{thr:g}",
                "val mIoU %": 100 * segmentation.miou(v["conf"].sum(0)),
                "val MFLOPs": float(v["flops"].mean()) / 1e6, "test mIoU %": 100 * segmentation.miou(t["conf"].sum(0)),
                "vs full (points)": _interval(d),
                "test MFLOPs": float(t["flops"].mean()) / 1e6,
                "saved %": 100 * (1 - t["flops"].mean() / static_flops[-1]),
                "saved % (batched slots)": 100 * (1 - physical_flops(mcfg, t["slots"], bs) / static_flops[-1]),
                **{f"exit {e + 1} %": 100 * float((t["exit"] == e).mean()) for e in range(E)},
                "bg at exit 1 %": 100 * float((t["exit"][label == C - 1] == 0).mean()),
                "digit at exit 1 %": 100 * float((t["exit"][label != C - 1] == 0).mean()),
                "exec = sim (exits, preds, FLOPs)": bool(t["exec_eq_sim"].all()),
                "naive sim agrees %": 100 * float(t["naive_agree"].mean())})

    # operating points, fit on validation: the cheapest threshold within max_drop points of full depth
    rows_op, ops = [], {}
    for mode, k in arms:
        ok = [thr for thr in cfg.eval.thresholds
              if segmentation.miou(points[(mode, k, thr)][0]["conf"].sum(0)) >= full_val - cfg.eval.max_drop / 100]
        if not ok:
            continue
        thr = min(ok, key=lambda x: points[(mode, k, x)][0]["flops"].mean())
        t = points[(mode, k, thr)][1]
        ops[(mode, k)] = thr
        d = segmentation.miou_difference(t["conf"], full_test, resamples=rs)
        mix = budgeted.static_mix(static["test"], static_flops, float(t["flops"].mean()))
        dm = segmentation.miou_difference(t["conf"], mix, resamples=rs) if mix is not None else None
        rows_op.append({"mode": mode, "top_k": k, "threshold (val)": f"{thr:g}",
                        "test mIoU %": 100 * segmentation.miou(t["conf"].sum(0)),
                        "vs full depth": _interval(d),
                        "reading": d.reading("DToP", "full depth"),
                        "FLOPs saved %": 100 * (1 - t["flops"].mean() / static_flops[-1]),
                        "vs fewer layers, same FLOPs": "outside the static range" if dm is None else _interval(dm),
                        "reading ": "" if dm is None else dm.reading("DToP", "fewer layers")})

    # the curve against "fewer layers for every token" at matched FLOPs, every threshold
    rows_match = []
    for mode, k in arms:
        for thr in cfg.eval.thresholds:
            t = points[(mode, k, thr)][1]
            mix = budgeted.static_mix(static["test"], static_flops, float(t["flops"].mean()))
            if mix is None:
                continue
            dm = segmentation.miou_difference(t["conf"], mix, resamples=rs)
            rows_match.append({"mode": mode, "top_k": k, "threshold": f"{thr:g}",
                               "MFLOPs": float(t["flops"].mean()) / 1e6,
                               "DToP - fewer layers (points)": _interval(dm),
                               "reading": dm.reading("DToP", "fewer layers")})

    # ablations at the same threshold: top-k (the paper's k vs k = 0) per mode; freeze vs drop per k
    rows_topk, rows_mode = [], []
    k0, k1 = cfg.eval.top_ks[0], cfg.eval.top_ks[-1]
    for mode in cfg.eval.modes if len(cfg.eval.top_ks) > 1 else ():
        for thr in cfg.eval.thresholds:
            a, b = points[(mode, k0, thr)][1], points[(mode, k1, thr)][1]
            dk = segmentation.miou_difference(a["conf"], b["conf"], resamples=rs)
            df = paired.mean_difference(a["flops"] / 1e6, b["flops"] / 1e6, resamples=rs)
            rows_topk.append({"mode": mode, "threshold": f"{thr:g}", f"mIoU k={k0} - k={k1} (points)": _interval(dk),
                              "reading": dk.reading(f"k={k0}", f"k={k1}"),
                              f"MFLOPs k={k0} - k={k1}": f"{df.diff:+.3f} [{df.lo:+.3f}, {df.hi:+.3f}]"})
    if {"drop", "freeze"} <= set(cfg.eval.modes):
        for k in cfg.eval.top_ks:
            for thr in cfg.eval.thresholds:
                a, b = points[("freeze", k, thr)][1], points[("drop", k, thr)][1]
                dk = segmentation.miou_difference(a["conf"], b["conf"], resamples=rs)
                df = paired.mean_difference(a["flops"] / 1e6, b["flops"] / 1e6, resamples=rs)
                rows_mode.append({"top_k": k, "threshold": f"{thr:g}", "mIoU freeze - drop (points)": _interval(dk),
                                  "reading": dk.reading("freeze", "drop"),
                                  "MFLOPs freeze - drop": f"{df.diff:+.3f} [{df.lo:+.3f}, {df.hi:+.3f}]"})

    # savings against the background fraction, and which tokens leave first: drop mode, the paper's k, the
    # configured analysis threshold (an operating point fit on validation may be one where nothing exits)
    k_op, thr_op = cfg.eval.top_ks[0], cfg.eval.analysis_threshold
    t = points[("drop", k_op, thr_op)][1]
    saved = 1 - t["flops"] / static_flops[-1]
    rho = spearman_interval(test["bg_frac"], saved, min(rs, 1000))
    rows_bg = []
    for n in sorted(set(test["digits"].tolist())):
        sel = test["digits"] == n
        m, lo, hi = paired.mean_interval(100 * saved[sel], resamples=rs)
        rows_bg.append({"digits": n, "images": int(sel.sum()), "background %": 100 * float(test["bg_frac"][sel].mean()),
                        "FLOPs saved %": m, "95% CI": f"[{lo:.1f}, {hi:.1f}]"})
    bg = test["label"] == C - 1
    ex = t["exit"].astype(np.float64)
    per_img = np.array([ex[i][bg[i]].mean() - ex[i][~bg[i]].mean() for i in range(len(ex)) if (~bg[i]).any()])
    gap = paired.mean_interval(per_img, resamples=rs)

    # speed: measured CPU (load recorded) and the roofline cost model, batched
    x = jnp.asarray(test["image"][:bs])
    dense = jax.jit(lambda p, x: nnx.merge(graphdef, p).heads[-1](engine.run_layers(
        nnx.merge(graphdef, p).layers, nnx.merge(graphdef, p).embed(x))[0]).logits_BxQxC)
    pol_fn = functools.partial(_executed, graphdef, E, k_op)
    calls = {"full depth (plain)": (dense, (params, x)),
             "DToP compacted": (jax.jit(lambda p, x, th: pol_fn(p, x, th, tokens.Compacted(tuple(cfg.eval.buckets)))),
                                (params, x, jnp.float32(thr_op))),
             "DToP masked": (jax.jit(lambda p, x, th: pol_fn(p, x, th, tokens.Masked())),
                             (params, x, jnp.float32(thr_op)))}
    tm = tx.timed(calls, cfg.eval.time_iters)
    base = tm["full depth (plain)"]["median_s"]
    rows_speed = [{"path": name, "batch": bs, "median ms": 1e3 * r["median_s"], "min ms": 1e3 * r["min_s"],
                   "speed-up vs full": base / r["median_s"], "label": tx.cpu_label(r["load_1min"])}
                  for name, r in tm.items()]
    rows_speed.append({"path": "DToP compacted", "batch": bs, "median ms": None, "min ms": None,
                       "speed-up vs full": roofline_speedup(mcfg, t["slots"], bs),
                       "label": "cost model (roofline, H200 calibrated; gathers not modelled)"})

    results = dict(static=rows_static, sweep=sweep, operating=rows_op, matched=rows_match, top_k=rows_topk,
                   freeze_vs_drop=rows_mode,
                   background=rows_bg, spearman_bg_saved=rho, bg_minus_digit_exit=gap, speed=rows_speed,
                   op_threshold=thr_op, op_top_k=k_op, train_seconds=train_s, static_mflops=[f / 1e6 for f in
                                                                                            static_flops],
                   full_val_miou=full_val, paper=PAPER,
                   scale=dict(train=cfg.data.num_train, val=cfg.data.num_val, test=cfg.data.num_test,
                              tokens=mcfg.tokens, d_model=mcfg.d_model, depth=mcfg.depth, steps=cfg.train.steps))
    curves = {f"DToP {mode} k={k}": [(points[(mode, k, th)][1]["flops"].mean(), 100 * segmentation.miou(
        points[(mode, k, th)][1]["conf"].sum(0))) for th in cfg.eval.thresholds] for mode, k in arms}
    curves["fewer layers (mixtures)"] = [(f, 100 * segmentation.miou(static["test"][e].sum(0)))
                                         for e, f in enumerate(static_flops)]
    statics = [(static_flops[e], 100 * segmentation.miou(static["test"][e].sum(0)), f"L{mcfg.exit_layers[e] + 1}")
               for e in range(E)]
    md = markdown(cfg, mcfg, prov, results)
    files = {"dtop_miou_flops.png": lambda p: report.plot_accuracy_vs_flops(
                 curves, statics, p, title=f"DToP vs fewer layers on {cfg.data.name} canvases (test)",
                 ylabel="mIoU %"),
             "dtop_bg_savings.png": lambda p: _scatter(test["bg_frac"], 100 * saved, p, rho)}
    return md, {"results": results}, files


def _interval(d) -> str:
    """A paired mIoU difference in points: ``+d [lo, hi]``."""
    return f"{100 * d.diff:+.2f} [{100 * d.lo:+.2f}, {100 * d.hi:+.2f}]"


def _executed(graphdef, E, k, p, x, thr, executor):
    return nnx.merge(graphdef, p).token_exit(x, confidence_policy(thr, E, k), executor).out.logits_BxQxC


def _scatter(x, y, path, rho):
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(100 * x, y, ".", alpha=0.3)
    ax.set(xlabel="background tokens %", ylabel="FLOPs saved %",
           title=f"per test canvas; Spearman {rho[0]:.2f} [{rho[1]:.2f}, {rho[2]:.2f}]")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def markdown(cfg, mcfg, prov, r) -> str:
    t = report.markdown_table
    first = lambda rows: list(rows[0]) if rows else []  # noqa: E731
    return "\n\n".join([
        f"# DToP at small scale on {cfg.data.name} digit canvases",
        prov.markdown() + "  \n" + f"Scale: {cfg.data.num_train} train / {cfg.data.num_val} val / {cfg.data.num_test} "
        f"test canvases of 2-4 digits; SegViT width {mcfg.d_model}, {mcfg.depth} layers, {mcfg.tokens} tokens, "
        f"heads after layers {[l + 1 for l in mcfg.exit_layers]}, {cfg.train.steps} steps of batch "
        f"{cfg.train.batch_size}. Cost model: FLOPs of the tokens each layer updated (eejax.exits.costs; heads and "
        "embedding included).  \n" f"Paper: {PAPER}.",
        "## Fewer layers for every token (each head on all tokens)", t(r["static"], first(r["static"])),
        "## DToP threshold sweep (test; compacted executor, batch "
        f"{cfg.eval.batch_size}; 'vs full' is a paired bootstrap interval over test canvases)",
        t(r["sweep"], first(r["sweep"])),
        f"## Operating points, fit on validation (cheapest threshold within {cfg.eval.max_drop} mIoU points of full)",
        t(r["operating"], first(r["operating"])),
        "## The curve against fewer layers at the same mean FLOPs (per-image mixtures of two static depths)",
        t(r["matched"], first(r["matched"])),
        "## Top-k ablation (same threshold)", t(r["top_k"], first(r["top_k"])),
        "## Freeze vs drop (same threshold and k; freeze keeps an exited token as a key, run by the masked executor, "
        "so its batched slots save nothing)", t(r["freeze_vs_drop"], first(r["freeze_vs_drop"])),
        f"## Background (drop, k={r['op_top_k']}, threshold {r['op_threshold']}, fixed in the config)",
        t(r["background"], first(r["background"])) + "\n\n" +
        f"Spearman(background fraction, FLOPs saved) = {r['spearman_bg_saved'][0]:.2f} "
        f"[{r['spearman_bg_saved'][1]:.2f}, {r['spearman_bg_saved'][2]:.2f}]; per canvas, mean exit index of "
        f"background tokens minus digit tokens = {r['bg_minus_digit_exit'][0]:+.2f} "
        f"[{r['bg_minus_digit_exit'][1]:+.2f}, {r['bg_minus_digit_exit'][2]:+.2f}].",
        "## Speed (batched; measured rows are CPU wall-clock under load, the last row a cost model)",
        t(r["speed"], first(r["speed"])),
    ]) + "\n"


@experiment(NAME, data=lambda cfg, args: load(cfg, args.data_dir))
def main(run: Run, data) -> Report:
    md, payload, files = science(run.cfg, data, run.workdir, run.prov)
    return Report(md, payload, files)


if __name__ == "__main__":
    main()
