"""DyVTE at small scale: per-row visual-token exit in a toy multimodal decoder (arXiv:2411.19628).

    python -m experiments.dyvte --config configs/dyvte.py:smoke [--outdir DIR] [--workdir DIR]

A ToyVLM (two-digit image + question -> one answer token) is trained; DyVTE's routers are then trained on its frozen,
detached states with the released code's label rule. On test: accuracy against the static exit layer of the image
tokens (the knee), per question kind (do harder questions need later exits?), the per-sample oracle, the learned
routers executed per row by the engine's token exit, the best static exit at equal compute and a random control of
many draws, with paired bootstrap intervals over test questions.

Where this differs from the released code (DoubtedSteam/DyVTE), on purpose: the code reads batch row 0 only at
inference (``hidden_states[0, ...]``, ``gate_logits[0] < gate_logits[1]``) and hard-codes LLaVA-1.5's image positions
(35..611); here every row has its own router decision and its image positions come from its tokens. The code's
router input averages the text after the image (excluding the answer); here every text token but the last
(preamble and question; the answer is not in the prompt). The label rule (0.99 agreement, 1.03 x loss) is the
code's, applied per sample; with a one-token answer agreement above 0.99 means the same argmax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eejax.data import composed
from eejax.eval import budgeted, paired, report
from eejax.exits import costs, tokens
from eejax.models import vlm
from experiments import _common_tokens as tx
from experiments._common import Report, Run, experiment

NAME = "dyvte"
PAPER = ("arXiv:2411.19628 (abstract v2): up to 45.7% less computation on LLaVA-1.5 with no performance drop; "
         "visual tokens stop contributing once the text tokens have absorbed the image")


# ------------------------------------------------------------------------------------------------ data, model


def questions(digits, num: int, seed: int, cfg) -> dict[str, np.ndarray]:
    q = composed.digit_questions(digits, num, seed=seed, patch=cfg.model.patch_size,
                                 same_fraction=cfg.data.same_fraction)
    return {"image": tx.normalise(q.images_NxHxWx1, cfg.data.name), "tokens": q.tokens_NxT, "answer": q.answer_N,
            "kind": q.kind_N}


def load(cfg, data_dir):
    train, val, test = tx.digit_splits(cfg, data_dir)
    return {"train": questions(train, cfg.data.num_train, cfg.seed, cfg),
            "router": questions(train, cfg.data.num_router, cfg.seed + 3, cfg),
            "val": questions(val, cfg.data.num_val, cfg.seed + 1, cfg),
            "test": questions(test, cfg.data.num_test, cfg.seed + 2, cfg)}


def model_config(cfg, seq_len: int) -> vlm.VLMConfig:
    return vlm.VLMConfig(max_len=seq_len, **cfg.model)


def answer_loss(graphdef):
    """Cross-entropy of the answer token, every token through every layer."""
    def loss_fn(params, batch, ctx):
        del ctx
        model = nnx.merge(graphdef, params)
        x = model.inputs(batch["image"], batch["tokens"])
        logits = model.answer_logits(model.scan(x).h, x.last_B).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer"]).mean()
        return ce, {"acc": jnp.mean(logits.argmax(-1) == batch["answer"])}
    return loss_fn


def router_loss(num_layers: int):
    """DyVTE's router training on cached, detached features: CE of each layer's router against its label."""
    def loss_fn(params, batch, ctx):
        del ctx
        logits = jnp.einsum("nld,ldk->nlk", batch["feat"], params["w"]) + params["b"][None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :num_layers - 1],
                                                             batch["label"][:, :num_layers - 1])
        return ce.mean(), {"acc": jnp.mean(logits[:, :-1].argmax(-1) == batch["label"][:, :-1])}
    return loss_fn


# ------------------------------------------------------------------------------------------------ evaluation


def static_pass(graphdef, params, split, bs, depth):
    """Per row, for every static exit layer l of the image tokens: the answer's argmax, its CE, and (from the
    all-token run) every layer's router score and features."""
    def fn(p, image, tok, answer):
        model = nnx.merge(graphdef, p)
        x = model.inputs(image, tok)
        full = model.scan(x)
        view = tokens.TokenView(jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape), x.valid_BxT, x.valid_BxT,
                                x.image_BxT)
        feat = jnp.stack([vlm.gate_features(full.out_E[l], view) for l in range(depth)], 1)
        score = jnp.stack([model.gate_score(feat[:, l], l) for l in range(depth)], 1)
        preds, losses = [], []
        for l in range(depth):
            h = full.h if l == depth - 1 else model.scan(x, jnp.full(tok.shape[:1], l, jnp.int32)).h
            lg = model.answer_logits(h, x.last_B).astype(jnp.float32)
            preds.append(lg.argmax(-1))
            losses.append(optax.softmax_cross_entropy_with_integer_labels(lg, answer))
        return dict(pred=jnp.stack(preds, 1), loss=jnp.stack(losses, 1), feat=feat, score=score,
                    text=jnp.sum(x.valid_BxT & ~x.image_BxT, 1))

    jfn = jax.jit(fn)
    return tx.batched(lambda b: jfn(params, b["image"], b["tokens"], b["answer"]),
                      {k: split[k] for k in ("image", "tokens", "answer")}, bs)


def labels(st, agree_rule: float, loss_ratio: float) -> np.ndarray:
    """DyVTE's label per row and layer: dropping the image after layer l keeps the full answer and its loss within
    ``loss_ratio`` of the full loss (agreement > ``agree_rule`` of a one-token answer: the same argmax)."""
    del agree_rule
    return (st["pred"] == st["pred"][:, -1:]) & (st["loss"] < loss_ratio * st["loss"][:, -1:])


def first_true(mask_NxL) -> np.ndarray:
    """The first layer where ``mask`` holds (the last layer when it never does before)."""
    m = np.asarray(mask_NxL).copy()
    m[:, -1] = True
    return m.argmax(1)


def executed(graphdef, params, split, thr, bs, mcfg, buckets):
    """The routers deciding per row, run by the engine (compacted, drop): exit layer, answer, slots per step."""
    def fn(p, image, tok, th):
        model = nnx.merge(graphdef, p)
        x = model.inputs(image, tok)
        out = model.visual_exit(x, th, tokens.Compacted(buckets))
        return dict(exit=vlm.exit_layer_of(out, x.image_BxT), pred=model.answer_logits(out.h, x.last_B).argmax(-1),
                    slots=jnp.broadcast_to(out.slots_S, (tok.shape[0], out.slots_S.shape[0])),
                    queries=out.queries_SxB.T)

    jfn = jax.jit(fn)
    return tx.batched(lambda b: jfn(params, b["image"], b["tokens"], jnp.float32(thr)),
                      {k: split[k] for k in ("image", "tokens")}, bs)


def interval_text(d, scale=100.0, fmt=".2f") -> str:
    return f"{scale * d.diff:+{fmt}} [{scale * d.lo:+{fmt}}, {scale * d.hi:+{fmt}}]"


def roofline_speedup(mcfg, slots_NxS, text_tokens: float, bs: int) -> float:
    """Predicted H200 time of the all-token prefill over the routed one at batch ``bs`` (cost model: roofline, H200
    calibrated; layers on the bucket slots, one host stop per bucket switch; gathers and routers not modelled)."""
    d, f, h, t = mcfg.d_model, mcfg.mlp_dim, mcfg.num_heads, slots_NxS.max()
    dense = [costs.vit_layer_work(bs, int(t), d, f, h)] * mcfg.depth
    times = []
    for slots_S in np.unique(slots_NxS, axis=0):
        parts = [costs.vit_layer_work(bs, int(s), d, f, h) for s in slots_S if s > 0]
        parts.append(costs.Work(host_stops=mcfg.depth - 1, name="bucket switches"))
        times.append(costs.predict(parts, "h200").time_s)
    del text_tokens
    return costs.predict(dense, "h200").time_s / float(np.mean(times))


# ------------------------------------------------------------------------------------------------ science


def science(cfg, data, workdir, prov):
    seq_len = data["train"]["tokens"].shape[1]
    mcfg = model_config(cfg, seq_len)
    L, bs, rs = mcfg.depth, cfg.eval.batch_size, cfg.eval.resamples
    graphdef, params = vlm.build(mcfg, cfg.seed)
    params, train_s = tx.fit(answer_loss(graphdef), params,
                             {k: data["train"][k] for k in ("image", "tokens", "answer")}, cfg.train,
                             workdir / "model", seed=cfg.seed, log_every=cfg.log_every, desc="toy-vlm")

    # routers: the label rule on held-out training questions, CE on detached features
    st_r = static_pass(graphdef, params, data["router"], bs, L)
    lab_r = labels(st_r, cfg.router.agree, cfg.router.loss_ratio)
    rparams = {"w": jnp.zeros((L, 2 * mcfg.d_model, 2)), "b": jnp.zeros((L, 2))}
    rparams, router_s = tx.fit(router_loss(L), rparams, {"feat": st_r["feat"].astype(np.float32),
                                                         "label": lab_r.astype(np.int32)},
                               cfg.router, workdir / "router", seed=cfg.seed, log_every=cfg.log_every,
                               desc="routers")
    model = nnx.merge(graphdef, params)
    for l in range(L):
        model.routers[l].kernel[...] = rparams["w"][l]
        model.routers[l].bias[...] = rparams["b"][l]
    graphdef, params = nnx.split(model)

    st = {name: static_pass(graphdef, params, data[name], bs, L) for name in ("val", "test")}
    test = data["test"]
    ans = test["answer"]
    correct = st["test"]["pred"] == ans[:, None]                                  # N x L
    flops = np.stack([vlm.prefill_flops(mcfg, st["test"]["text"], np.full(len(ans), l)) for l in range(L)], 1)
    full_flops = float(flops[:, -1].mean())

    # static exit layer: the knee
    rows_static = []
    for l in range(L):
        d = paired.mean_difference(correct[:, l], correct[:, -1], resamples=rs)
        rows_static.append({"image tokens through layer": l + 1, "test acc %": 100 * correct[:, l].mean(),
                            "vs full (points)": interval_text(d), "reading": d.reading(f"layer {l + 1}", "full"),
                            "MFLOPs / row": flops[:, l].mean() / 1e6,
                            "label rule holds % (test)": 100 * labels(st["test"], cfg.router.agree,
                                                                       cfg.router.loss_ratio)[:, l].mean()})
    knee = next(l for l in range(L) if not paired.mean_difference(correct[:, l], correct[:, -1],
                                                                  resamples=rs).hi < 0)

    # per-sample oracle (the label rule on test, with test answers) and the routers
    lab_t = labels(st["test"], cfg.router.agree, cfg.router.loss_ratio)
    oracle_l = first_true(lab_t)
    sim_l = first_true(st["test"]["score"] >= 0.0)
    ex = executed(graphdef, params, test, 0.0, bs, mcfg, (8, 16, 24, 32, seq_len))
    gate_l = ex["exit"]
    idx = np.arange(len(ans))
    arms = {"oracle (label rule on test)": oracle_l, "routers (exit > keep)": gate_l}

    # routers at validation-fit thresholds: the cheapest within max_drop points of full validation accuracy
    corr_val = st["val"]["pred"] == data["val"]["answer"][:, None]
    sv = st["val"]["score"][:, :-1].ravel()
    cands = np.unique(np.concatenate([np.quantile(sv, np.linspace(0.02, 0.98, cfg.eval.num_thresholds)), [0.0]]))
    fl_val = np.stack([vlm.prefill_flops(mcfg, st["val"]["text"], np.full(len(corr_val), l)) for l in range(L)], 1)
    val_pts = []
    for thr in cands:
        lv = first_true(st["val"]["score"] >= thr)
        val_pts.append((float(thr), corr_val[np.arange(len(lv)), lv].mean(), fl_val[np.arange(len(lv)), lv].mean()))
    ok = [p for p in val_pts if p[1] >= corr_val[:, -1].mean() - cfg.eval.max_drop / 100]
    thr_fit = min(ok, key=lambda p: p[2])[0] if ok else 0.0
    ex_fit = executed(graphdef, params, test, thr_fit, bs, mcfg, (8, 16, 24, 32, seq_len))
    arms[f"routers (val-fit threshold {thr_fit:.2f})"] = ex_fit["exit"]

    rows_arms = []
    for name, lay in arms.items():
        c = correct[idx, lay].astype(np.float64)
        fl = flops[idx, lay]
        dfull = paired.mean_difference(c, correct[:, -1], resamples=rs)
        mix = budgeted.static_mix(correct.T, flops.mean(0), float(fl.mean()))
        dmix = paired.mean_difference(c, mix, resamples=rs) if mix is not None else None
        rows_arms.append({"arm": name, "test acc %": 100 * c.mean(), "vs full": interval_text(dfull),
                          "mean layers with image": float(np.mean(lay + 1)), "MFLOPs / row": fl.mean() / 1e6,
                          "FLOPs saved %": 100 * (1 - fl.mean() / full_flops),
                          "vs best static, same FLOPs": "outside" if dmix is None else interval_text(dmix),
                          "reading": "" if dmix is None else dmix.reading(name.split(" (")[0], "static")})
    gate_c = correct[idx, gate_l].astype(np.float64)
    d_or = paired.mean_difference(gate_c, correct[idx, oracle_l], resamples=rs)

    # random control: exit layers drawn from the routers' histogram (same compute in expectation), many draws
    rng = np.random.default_rng(cfg.seed)
    rand = np.asarray([correct[idx, rng.permutation(gate_l)].mean() for _ in range(cfg.eval.random_draws)])
    rank = int(1 + np.sum(rand > gate_c.mean()))

    # per question kind: the knee and the exit layers the oracle and the routers pick
    rows_kind = []
    for k, kind in enumerate(composed.QUESTIONS):
        sel = test["kind"] == k
        if not sel.any():
            continue
        acc_l = correct[sel].mean(0)
        knee_k = next(l for l in range(L) if not paired.mean_difference(
            correct[sel, l], correct[sel, -1], resamples=rs).hi < 0)
        mo, mo_lo, mo_hi = paired.mean_interval(oracle_l[sel] + 1, resamples=rs)
        mg, mg_lo, mg_hi = paired.mean_interval(gate_l[sel] + 1, resamples=rs)
        rows_kind.append({"question": kind, "rows": int(sel.sum()), "full acc %": 100 * acc_l[-1],
                          **{f"acc L{l + 1} %": 100 * acc_l[l] for l in range(L - 1)},
                          "knee (layer)": knee_k + 1, "oracle mean layers": f"{mo:.2f} [{mo_lo:.2f}, {mo_hi:.2f}]",
                          "routers mean layers": f"{mg:.2f} [{mg_lo:.2f}, {mg_hi:.2f}]",
                          "routers acc %": 100 * gate_c[sel].mean()})

    # executed = simulated (the routers' scores on the all-token pass decide the same layer; the answer is the
    # static answer at that layer)
    checks = {"exit layers equal the all-token simulation %": 100 * float(np.mean(gate_l == sim_l)),
              "answers equal the static answer at that layer %":
                  100 * float(np.mean(ex["pred"] == st["test"]["pred"][idx, gate_l])),
              "FLOPs from executed counts equal the cost model %": 100 * float(np.mean(np.isclose(
                  costs.token_exit_flops(ex["queries"].T, ex["queries"].T, mcfg.d_model, mcfg.mlp_dim,
                                         mcfg.num_heads),
                  vlm.prefill_flops(mcfg, st["test"]["text"], gate_l, routers=False)
                  - costs.patch_embed_flops(mcfg.num_patches, mcfg.patch_size ** 2, mcfg.d_model)
                  - costs.linear_head_flops(mcfg.d_model, mcfg.vocab_size))))}

    # speed: batched prefill, measured CPU (load recorded) and the roofline cost model
    xb = {k: jnp.asarray(test[k][:bs]) for k in ("image", "tokens")}
    full_fn = jax.jit(lambda p, i, t: (lambda m, x: m.answer_logits(m.scan(x).h, x.last_B))(
        nnx.merge(graphdef, p), nnx.merge(graphdef, p).inputs(i, t)))
    routed_fn = jax.jit(lambda p, i, t: (lambda m, x: m.answer_logits(m.visual_exit(
        x, 0.0, tokens.Compacted((8, 16, 24, 32, seq_len))).h, x.last_B))(nnx.merge(graphdef, p),
                                                                            nnx.merge(graphdef, p).inputs(i, t)))
    tm = tx.timed({"all tokens, every layer": (full_fn, (params, xb["image"], xb["tokens"])),
                   "routers (exit > keep), compacted": (routed_fn, (params, xb["image"], xb["tokens"]))},
                  cfg.eval.time_iters)
    base = tm["all tokens, every layer"]["median_s"]
    rows_speed = [{"path": n, "batch": bs, "median ms": 1e3 * r["median_s"], "speed-up": base / r["median_s"],
                   "label": tx.cpu_label(r["load_1min"])} for n, r in tm.items()]
    rows_speed.append({"path": "routers (exit > keep), compacted", "batch": bs, "median ms": None,
                       "speed-up": roofline_speedup(mcfg, ex["slots"], 0.0, bs),
                       "label": "cost model (roofline, H200 calibrated; gathers and routers not modelled)"})

    results = dict(static=rows_static, knee_layer=knee + 1, arms=rows_arms, gate_minus_oracle=d_or._asdict(),
                   random=dict(draws=len(rand), median=100 * float(np.median(rand)), lo=100 * float(rand.min()),
                               hi=100 * float(rand.max()), best_of_n=100 * float(rand.max()), routers_rank=rank),
                   kinds=rows_kind, checks=checks, speed=rows_speed, val_points=val_pts, thr_fit=thr_fit,
                   router_label_rate=lab_r.mean(0).tolist(), train_seconds=train_s, router_seconds=router_s,
                   full_mflops=full_flops / 1e6, paper=PAPER,
                   scale=dict(train=cfg.data.num_train, router=cfg.data.num_router, val=cfg.data.num_val,
                              test=cfg.data.num_test, seq_len=seq_len, d_model=mcfg.d_model, depth=L,
                              steps=cfg.train.steps))
    md = markdown(cfg, mcfg, prov, results)
    curve = [(float(flops[idx, first_true(st["test"]["score"] >= p[0])].mean()),
              100 * float(correct[idx, first_true(st["test"]["score"] >= p[0])].mean())) for p in val_pts]
    statics = [(flops[:, l].mean(), 100 * correct[:, l].mean(), f"L{l + 1}") for l in range(L)]
    points = {"routers (threshold sweep, simulated)": curve,
              "oracle": [(flops[idx, oracle_l].mean(), 100 * correct[idx, oracle_l].mean())]}
    files = {"dyvte_acc_flops.png": lambda p: report.plot_accuracy_vs_flops(
        points, statics, p, title=f"DyVTE on {cfg.data.name} two-digit questions (test)")}
    return md, {"results": results}, files


def markdown(cfg, mcfg, prov, r) -> str:
    t = report.markdown_table
    first = lambda rows: list(rows[0]) if rows else []  # noqa: E731
    rnd = r["random"]
    d = r["gate_minus_oracle"]
    return "\n\n".join([
        f"# DyVTE at small scale on {cfg.data.name} two-digit questions",
        prov.markdown() + "  \n" + f"Scale: {cfg.data.num_train} train / {cfg.data.num_router} router / "
        f"{cfg.data.num_val} val / {cfg.data.num_test} test questions; ToyVLM width {mcfg.d_model}, {mcfg.depth} "
        f"layers, {mcfg.num_patches} image tokens in {r['scale']['seq_len']}, {cfg.train.steps} steps of batch "
        f"{cfg.train.batch_size}. Cost model: FLOPs of the tokens each layer runs (eejax.exits.costs; routers, patch "
        f"embedding and answer head included).  \nPaper: {PAPER}.",
        f"## Accuracy against the static exit layer of the image tokens (knee: layer {r['knee_layer']}, the first "
        "with no difference from full depth at this scale)", t(r["static"], first(r["static"])),
        "## Oracle, routers, best static at equal compute (paired bootstrap over test questions)",
        t(r["arms"], first(r["arms"])) + "\n\n" +
        f"Routers minus oracle: {100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}] points. Random "
        f"control ({rnd['draws']} draws of exit layers from the routers' histogram): median {rnd['median']:.2f}%, "
        f"range {rnd['lo']:.2f}-{rnd['hi']:.2f}% (best of {rnd['draws']}: {rnd['best_of_n']:.2f}%); the routers rank "
        f"{rnd['routers_rank']} of {rnd['draws'] + 1}.",
        "## Per question kind", t(r["kinds"], first(r["kinds"])),
        "## Executed = simulated", t([r["checks"]], list(r["checks"])),
        "## Speed (batched prefill; measured rows are CPU wall-clock under load, the last row a cost model)",
        t(r["speed"], first(r["speed"])),
    ]) + "\n"


@experiment(NAME, data=lambda cfg, args: load(cfg, args.data_dir))
def main(run: Run, data) -> Report:
    md, payload, files = science(run.cfg, data, run.workdir, run.prov)
    return Report(md, payload, files)


if __name__ == "__main__":
    main()
