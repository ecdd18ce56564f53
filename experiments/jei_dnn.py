"""JEI-DNN at small scale: exit gates on uncertainty features trained jointly with the exit classifiers (IMs) of a
frozen ViT, against max-softmax thresholds on the same IMs at equal FLOPs; accuracy, ECE and conformal sets.

    python -m experiments.jei_dnn --config configs/jei_dnn.py:smoke [--outdir DIR]
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eejax.eval import budgeted, uncertainty
from eejax.eval import report as report_lib
from eejax.exits import confidence as conf_lib
from eejax.exits import costs, engine, policies
from eejax.models import vit as vit_lib
from eejax.train import ArrayIterator, Trainer, one_device_mesh
from experiments import _common_vision as vision
from experiments._common import Report, Run, experiment, logged_loss


# ------------------------------------------------------------------------------------------- IMs and gates
# IMs: LayerNorm + linear classifier on the CLS token after layers 1..N-1 (E-1 of them), as plain arrays with a
# leading IM axis so they train on the cached CLS tokens and run in the engine as the same function.


def init_ims(key, num_ims: int, d: int, c: int):
    return {"scale": jnp.ones((num_ims, d)), "bias": jnp.zeros((num_ims, d)),
            "w": jax.random.normal(key, (num_ims, d, c)) * d ** -0.5, "b": jnp.zeros((num_ims, c))}


def im_logits(ims, e, cls_BxD):
    """IM ``e`` on CLS tokens (LayerNorm eps 1e-6 as nnx.LayerNorm)."""
    x = cls_BxD.astype(jnp.float32)
    mu = x.mean(-1, keepdims=True)
    x = (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
    return (x * ims["scale"][e][None] + ims["bias"][e][None]) @ ims["w"][e] + ims["b"][e][None]


def all_im_logits(ims, cls_BxLxD):
    """Every IM on its layer's CLS token: ``logits_ExBxC`` for the E-1 intermediate exits."""
    num_ims = ims["w"].shape[0]
    return jax.vmap(lambda e: im_logits(ims, e, cls_BxLxD[:, e]))(jnp.arange(num_ims))


def im_head(ims, e):
    """IM ``e`` as an engine head on the layer's tokens (fields shaped like the final LinearHead's)."""
    def head(h_BxTxD):
        return engine.HeadOut(logits_BxC=im_logits(ims, e, h_BxTxD[:, 0]), feat_BxD=h_BxTxD[:, 0],
                              hidden_BxD=h_BxTxD.mean(axis=1), gate_B=jnp.zeros(h_BxTxD.shape[:1], jnp.float32))
    return head


def ce_ExB(logits_ExBxC, labels_B):
    logp = jax.nn.log_softmax(logits_ExBxC.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, labels_B[None, :, None], -1)[..., 0]


def gate_probs(gates, logits_ExBxC):
    """Gate probability at each intermediate exit: ``sigmoid(features . w_e + b_e)``, ``float32[E-1, B]``."""
    feats = jax.vmap(conf_lib.uncertainty_features)(logits_ExBxC)
    return jax.nn.sigmoid(jnp.einsum("ebf,ef->eb", feats, gates["w"]) + gates["b"][:, None])


def gate_loss(gates, logits_ExBxC, final_logits_BxC, labels_B, cost_E, lam):
    """dynn's gate objective: the cheapest good exit l* = argmin_l CE_l + lambda cost_l (final head included);
    gate e's target is 1 iff e >= l*; BCE with the positives of each gate re-weighted by its 0/1 ratio."""
    full = jnp.concatenate([logits_ExBxC, final_logits_BxC[None]])
    target_B = jnp.argmin(ce_ExB(full, labels_B) + lam * cost_E[:, None], axis=0)
    num_ims = logits_ExBxC.shape[0]
    t_ExB = (jnp.arange(num_ims)[:, None] >= target_B[None]).astype(jnp.float32)
    ones = t_ExB.sum(1, keepdims=True)
    pos_w = jnp.where(ones > 0, (t_ExB.shape[1] - ones) / jnp.maximum(ones, 1.0), 1.0)
    feats = jax.vmap(conf_lib.uncertainty_features)(logits_ExBxC)
    z = jnp.einsum("ebf,ef->eb", feats, gates["w"]) + gates["b"][:, None]
    bce = -(t_ExB * jax.nn.log_sigmoid(z) + (1 - t_ExB) * jax.nn.log_sigmoid(-z))
    return jnp.mean(bce * jnp.where(t_ExB > 0, jnp.maximum(pos_w, 1e-3), 1.0))


def weighted_im_loss(ims, gates, cls_BxLxD, labels_B):
    """dynn's weighted IM loss: CE_e weighted by the gates' exit probability P_e = max(0, min(g_e, 1 - sum_{k<e}
    g_k)), rescaled per example so its weights keep the unweighted total (gates frozen)."""
    logits = all_im_logits(ims, cls_BxLxD)
    g = jax.lax.stop_gradient(gate_probs(gates, logits))
    before = jnp.cumsum(g, 0) - g
    p_ExB = jnp.maximum(0.0, jnp.minimum(g, 1.0 - before))
    l_ExB = ce_ExB(logits, labels_B)
    ratio_B = jax.lax.stop_gradient(l_ExB.sum(0) / jnp.maximum((p_ExB * l_ExB).sum(0), 1e-8))
    return jnp.mean(p_ExB * l_ExB * ratio_B[None])


def train_jei(cache_tr, labels_tr, final_tr, cost_E, jc, num_classes, workdir, log):
    """Warm-up IMs (plain CE), then per lambda the alternating gate / IM phases, each phase continuing its own
    Adam state across rounds (the other half passed frozen). Returns the warm-up IMs and ``{lambda: (ims, gates,
    history)}``. Batches: ``jc.batch_size`` cached CLS tokens drawn with replacement."""
    num_layers, d = cache_tr.shape[1:]
    arrays = {"cls": cache_tr, "label": labels_tr, "final": final_tr}
    opt, mesh = optax.adam(jc.lr), one_device_mesh()

    def batches(seed):
        return ArrayIterator(arrays, jc.batch_size, seed=seed, draw="with_replacement")

    def warm_loss(ims, b, ctx):
        del ctx
        return jnp.mean(ce_ExB(all_im_logits(ims, b["cls"]), b["label"])), {}

    def gate_phase(gates, b, ctx):
        ims, lam = ctx.frozen
        return gate_loss(gates, all_im_logits(ims, b["cls"]), b["final"], b["label"], cost_E, lam), {}

    def im_phase(ims, b, ctx):
        return weighted_im_loss(ims, ctx.frozen, b["cls"], b["label"]), {}

    def trainer(loss_fn, params, where):
        return Trainer(loss_fn, params, opt, workdir=workdir / where, seed=jc.seed, mesh=mesh,
                       log_every=max(jc.warmup_steps, 1), ckpt_every=max(jc.warmup_steps, 1))

    ims = init_ims(jax.random.fold_in(jax.random.PRNGKey(jc.seed), 0), num_layers - 1, d, num_classes)
    with trainer(warm_loss, ims, "warmup") as tr:
        ims = tr.fit(batches(jc.seed), jc.warmup_steps, desc="warm-up IMs").params
    log(f"warm-up IMs: {jc.warmup_steps} steps, last batch mean CE "
        f"{logged_loss(workdir / 'warmup', jc.warmup_steps):.4f}")
    out = {}
    for li, lam in enumerate(jc.lambdas):
        gates = {"w": jnp.zeros((num_layers - 1, conf_lib.NUM_UNCERTAINTY_FEATURES)),
                 "b": jnp.zeros((num_layers - 1,))}
        p_ims, hist = ims, []
        where = f"lambda{li}"
        with trainer(gate_phase, gates, f"{where}/gates") as tg, trainer(im_phase, ims, f"{where}/ims") as ti:
            bg, bi = batches(jc.seed + 1 + 2 * li), batches(jc.seed + 2 + 2 * li)
            for r in range(jc.rounds):
                gates = tg.fit(bg, (r + 1) * jc.gate_steps, desc=f"gates lambda {lam:g}",
                               frozen=(p_ims, jnp.float32(lam))).params
                p_ims = ti.fit(bi, (r + 1) * jc.im_steps, desc=f"IMs lambda {lam:g}", frozen=gates).params
                hist.append({"round": r + 1,
                             "gate_loss": logged_loss(workdir / where / "gates", (r + 1) * jc.gate_steps),
                             "im_loss": logged_loss(workdir / where / "ims", (r + 1) * jc.im_steps)})
        log(f"lambda {lam:g}: " + ", ".join(f"round {h['round']} gate {h['gate_loss']:.4f} IM {h['im_loss']:.4f}"
                                            for h in hist))
        out[lam] = (p_ims, gates, hist)
    return ims, out


# ------------------------------------------------------------------------------------------------ evaluation


def split_outputs(ims, gates, cache, final_logits):
    """``(probs_ExNxC, gate_ExN)`` of one split from its cached CLS tokens (E exits: the IMs, then the final head;
    the last exit's gate is 1: everyone left exits there)."""
    logits = jnp.concatenate([all_im_logits(ims, jnp.asarray(cache)), jnp.asarray(final_logits)[None]])
    g = gate_probs(gates, logits[:-1])
    return np.asarray(jax.nn.softmax(logits, -1), np.float64), np.asarray(jnp.concatenate([g, jnp.ones_like(g[:1])]))


def arm_metrics(probs_ExNxC, exits_N, labels_N, cum_flops_E, bins):
    n = exits_N.shape[0]
    p_NxC = probs_ExNxC[exits_N, np.arange(n)]
    correct = p_NxC.argmax(-1) == labels_N
    return p_NxC, {"acc": 100 * float(correct.mean()), "MFLOPs": costs.expected_flops(exits_N, cum_flops_E) / 1e6,
                   "ece_%": 100 * uncertainty.ece(p_NxC.max(-1), correct, bins),
                   "mean_exit": float(np.mean(exits_N + 1))}


def matched_threshold(conf_val_ExN, target_flops, cum_flops_E, num):
    """The global max-softmax threshold whose VALIDATION expected FLOPs is closest to ``target_flops``."""
    cands = np.concatenate([np.unique(np.quantile(conf_val_ExN[:-1].ravel(), np.linspace(0, 1, num))), [np.inf]])
    fl = np.asarray([costs.expected_flops(budgeted.simulate_exits(conf_val_ExN, np.full(len(cum_flops_E), t)),
                                          cum_flops_E) for t in cands])
    return float(cands[np.argmin(np.abs(fl - target_flops))])


def check_executed(exit_sim_N, exit_run_N, score_ExN, thr, what, tol=1e-4):
    """Executed exits must equal the simulated ones, except where the deciding score is within ``tol`` of the
    threshold (float differences between the cached and the engine path); anything else is a bug."""
    bad = np.flatnonzero(exit_sim_N != exit_run_N)
    first = np.minimum(exit_sim_N, exit_run_N)[bad]
    near = np.abs(score_ExN[first, bad] - thr) < tol
    if not near.all():
        raise RuntimeError(f"{what}: the engine's exits differ from the simulated ones at {int((~near).sum())} "
                           "examples away from the threshold")
    return float(np.mean(exit_sim_N == exit_run_N))


@experiment("jei_dnn", data=vision.splits)
def main(run: Run, data) -> Report:
    cfg, (train, val, test) = run.cfg, data
    print(vision.describe(cfg, data))
    mcfg = vision.single_head_config(cfg.model.to_dict())
    graphdef, params = vision.train_vit(mcfg, cfg, train, run.workdir / "backbone", cfg.seed, "backbone")
    jc = cfg.jei
    n_layers, c = mcfg.depth, mcfg.num_classes
    ee_cfg = dataclasses.replace(mcfg, exits="all")
    ec = vit_lib.flops(ee_cfg)                 # every exit a linear head; cum_flops counts all heads on the way
    cost_E = jnp.asarray(ec.cum_flops_E / ec.cum_flops_E[-1], jnp.float32)

    @jax.jit
    def final_logits_fn(p, cls_BxD):
        return nnx.merge(graphdef, p).heads[0].cls(cls_BxD, cls_BxD[:, None]).logits_BxC

    caches = {}
    for name, ds in (("train", train), ("val", val), ("test", test)):
        cls = vision.cached_cls(graphdef, params, ds, cfg)
        caches[name] = (cls, np.asarray(final_logits_fn(params, jnp.asarray(cls[:, -1]))), ds.labels_N)
    print(f"cached CLS tokens: train {caches['train'][0].shape}, val {caches['val'][0].shape}, test "
          f"{caches['test'][0].shape}")
    log_lines = []

    def log(msg):
        print(msg)
        log_lines.append(msg)

    warm_ims, per_lambda = train_jei(caches["train"][0], caches["train"][2], caches["train"][1], cost_E, jc, c,
                                     run.keyed_dir("jei", {"jei": jc, "seed": cfg.seed}), log)

    no_gates = {"w": jnp.zeros((n_layers - 1, conf_lib.NUM_UNCERTAINTY_FEATURES)), "b": jnp.zeros(n_layers - 1)}
    probs_warm_test, _ = split_outputs(warm_ims, no_gates, *caches["test"][:2])
    y_test = test.labels_N
    static_rows = [{"exit_after_layer": e + 1, "warmup_IM_test_acc": 100 * float((probs_warm_test[e].argmax(-1)
                                                                                 == y_test).mean()),
                    "MFLOPs_static": ec.static_flops_E[e] / 1e6} for e in range(n_layers)]
    rows, curves, results = evaluate_lambdas(cfg, graphdef, params, ec, caches, per_lambda, test, val)
    # The decoupled reference: max-softmax thresholds over the warm-up IMs (plain multi-exit CE, no gates).
    sweep = budgeted.threshold_sweep(probs_warm_test, y_test, ec.cum_flops_E, np.linspace(0.3, 1.0, 36))
    curves["accuracy"]["max-softmax, warm-up IMs (sweep)"] = [(p.expected_flops, 100 * p.accuracy) for p in sweep]
    results.update(rows=rows, static=static_rows, cum_flops=ec.cum_flops_E.tolist(),
                   static_flops=ec.static_flops_E.tolist(), log=log_lines)
    return report(run, data, mcfg, ec, results, curves, probs_warm_test)


def evaluate_lambdas(cfg, graphdef, params, ec, caches, per_lambda, test, val):
    """Per lambda: JEI's gates and max-softmax at the validation-matched FLOPs on the same IMs, simulated from the
    cached CLS tokens and executed by the engine on test (exits must match), with conformal sets and ECE."""
    ec_cfg = cfg.eval
    n_layers = len(ec.cum_flops_E)
    y_val, y_test = val.labels_N, test.labels_N

    # Executed runs: the engine on the frozen backbone with the IMs as heads (bucket-cascade executor).
    def dyn(p, ims, x, policy):
        model = nnx.merge(graphdef, p)
        heads = [im_head(ims, e) for e in range(n_layers - 1)] + [model.heads[0]]
        return engine.run(model.layers, heads, model.embed(x), engine.prefix(n_layers, range(n_layers)), policy,
                          engine.BucketCascade())

    run_gate = jax.jit(lambda p, ims, x, w, b: _exit_pred(dyn(p, ims, x, policies.uncertainty_gate(w, b))))
    run_thr = jax.jit(lambda p, ims, x, t: _exit_pred(dyn(p, ims, x, policies.threshold("max_softmax", t,
                                                                                          n_layers))))

    def executed(fn, *extra):
        exits, preds = [], []
        for x, n in vision.padded_eval_images(test, cfg):
            e, p = fn(params, *extra[:1], x, *extra[1:])
            exits.append(np.asarray(e)[:n])
            preds.append(np.asarray(p)[:n])
        return np.concatenate(exits), np.concatenate(preds)

    xb = vision.first_batch(test, ec_cfg.throughput_batch)
    static_tp = costs.throughput(jax.jit(lambda p, x: nnx.merge(graphdef, p).static(x, 0)), xb.shape[0], params, xb)

    rows, curves, set_curves, ece_curves, results = [], {}, {}, {}, {"lambdas": {}}
    for lam, (ims, gates, hist) in per_lambda.items():
        w_ExF = jnp.concatenate([gates["w"], jnp.zeros((1, gates["w"].shape[1]))])
        b_E = jnp.concatenate([gates["b"], jnp.zeros(1)])
        pv, gv = split_outputs(ims, gates, *caches["val"][:2])
        pt, gt = split_outputs(ims, gates, *caches["test"][:2])
        half = np.full(n_layers, 0.5)
        e_val_jei, e_test_jei = budgeted.simulate_exits(gv, half), budgeted.simulate_exits(gt, half)
        flops_val_jei = costs.expected_flops(e_val_jei, ec.cum_flops_E)
        t = matched_threshold(pv.max(-1), flops_val_jei, ec.cum_flops_E, ec_cfg.num_candidates)
        e_val_thr = budgeted.simulate_exits(pv.max(-1), np.full(n_layers, t))
        e_test_thr = budgeted.simulate_exits(pt.max(-1), np.full(n_layers, t))
        # Executed by the engine on test; exits must match the simulation.
        e_run, pred_run = executed(run_gate, ims, w_ExF, b_E)
        agree_jei = check_executed(e_test_jei, e_run, gt, 0.5, f"JEI lambda {lam:g}")
        e_run_t, pred_run_t = executed(run_thr, ims, jnp.float32(t))
        agree_thr = check_executed(e_test_thr, e_run_t, pt.max(-1), t, f"threshold lambda {lam:g}")
        tp_jei = costs.throughput(run_gate, xb.shape[0], params, ims, xb, w_ExF, b_E)
        tp_thr = costs.throughput(run_thr, xb.shape[0], params, ims, xb, jnp.float32(t))
        for arm, e_val, e_test, e_exec, pred_exec, agree, tp in (
                ("JEI gates", e_val_jei, e_test_jei, e_run, pred_run, agree_jei, tp_jei),
                ("max-softmax", e_val_thr, e_test_thr, e_run_t, pred_run_t, agree_thr, tp_thr)):
            p_val, m_val = arm_metrics(pv, e_val, y_val, ec.cum_flops_E, ec_cfg.ece_bins)
            p_test, m_test = arm_metrics(pt, e_test, y_test, ec.cum_flops_E, ec_cfg.ece_bins)
            row = {"lambda": lam, "arm": arm, "threshold": 0.5 if arm == "JEI gates" else t,
                   "val_MFLOPs": m_val["MFLOPs"], "test_MFLOPs": m_test["MFLOPs"],
                   "test_mean_exit": m_test["mean_exit"], "test_acc": m_test["acc"],
                   "executed_acc": 100 * float(np.mean(pred_exec == y_test)), "test_ece_%": m_test["ece_%"]}
            for a in ec_cfg.alphas:
                st = uncertainty.conformal_lac(p_val, y_val, p_test, y_test, a)
                row[f"cov@{a:g}"] = 100 * st.coverage
                row[f"set@{a:g}"] = st.mean_size
            row.update({"sim_agrees": agree, "b%d_throughput_speedup" % xb.shape[0]: tp / static_tp})
            rows.append(row)
            curves.setdefault(arm, []).append((m_test["MFLOPs"] * 1e6, m_test["acc"]))
            a0 = ec_cfg.alphas[0]
            set_curves.setdefault(arm, []).append((m_test["MFLOPs"] * 1e6, row[f"set@{a0:g}"]))
            ece_curves.setdefault(arm, []).append((m_test["MFLOPs"] * 1e6, m_test["ece_%"]))
        results["lambdas"][str(lam)] = {
            "gates_w": np.asarray(gates["w"]).tolist(), "gates_b": np.asarray(gates["b"]).tolist(),
            "history": hist, "threshold": t,
            "im_test_acc": [100 * float((pt[e].argmax(-1) == y_test).mean()) for e in range(n_layers)],
            "exit_fractions_jei": np.bincount(e_test_jei, minlength=n_layers).tolist(),
            "exit_fractions_thr": np.bincount(e_test_thr, minlength=n_layers).tolist()}
    return rows, {"accuracy": curves, "set": set_curves, "ece": ece_curves}, results


def report(run, data, mcfg, ec, results, curves, probs_warm_test) -> Report:
    cfg, (train, val, test) = run.cfg, data
    jc, ec_cfg, n_layers, y_test = cfg.jei, cfg.eval, mcfg.depth, test.labels_N
    rows, static_rows, log_lines = results["rows"], results["static"], results["log"]
    statics = [(ec.static_flops_E[e], 100 * float((probs_warm_test[e].argmax(-1) == y_test).mean()), f"L{e + 1}")
               for e in range(n_layers)]
    title = f"JEI-DNN vs max-softmax on {cfg.data.name} (test; one point per lambda)"
    a0 = ec_cfg.alphas[0]
    plots = {"jei_accuracy.png": lambda path: report_lib.plot_accuracy_vs_flops(curves["accuracy"], statics, path,
                                                                               title=title),
             "jei_conformal.png": lambda path: report_lib.plot_accuracy_vs_flops(
                 curves["set"], [], path, title=title, ylabel=f"mean LAC set size at alpha={a0:g}"),
             "jei_ece.png": lambda path: report_lib.plot_accuracy_vs_flops(curves["ece"], [], path, title=title,
                                                                           ylabel="ECE (%)")}
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]
    wins = {k: sum(j[k] < m[k] for j, m in pairs) for k in ("test_ece_%", f"set@{a0:g}")}
    wins["test_acc"] = sum(j["test_acc"] > m["test_acc"] for j, m in pairs)
    md = "\n\n".join([
        f"# JEI-DNN at small scale on {cfg.data.name}",
        run.prov.markdown() + "  \n"
        + vision.data_line(cfg, train, val, test) +
        f"Scale: frozen ViT depth {n_layers}, width {cfg.model.d_model}, patch {cfg.model.patch_size}, trained "
        f"{cfg.train.steps} steps of batch {cfg.data.batch_size} on its final head only; {n_layers - 1} IMs "
        f"(LayerNorm + linear on CLS) and gates on 4 uncertainty features, warm-up {jc.warmup_steps} steps, then "
        f"{jc.rounds} rounds of {jc.gate_steps} gate + {jc.im_steps} IM steps (batch {jc.batch_size}) per lambda "
        "on cached CLS tokens. FLOPs count every head evaluated on the way (the gates' 4-feature dot products are "
        "not counted).",
        "Paper (arXiv:2310.09163, abstract): no headline number; \"significant performance improvements on "
        "classification datasets\" and \"better uncertainty characterization\" (frozen T2T-ViT-7/14 on CIFAR-10/100, "
        "SVHN, CIFAR-100-LT). Ours: the mechanism on a CPU-sized ViT; only orderings are comparable.",
        "## Per lambda: JEI gates vs max-softmax on the same IMs at the validation-matched FLOPs (test)\n"
        f"Conformal: LAC sets calibrated on validation (each arm its own exits), coverage and mean size on test. "
        f"JEI ahead of max-softmax: accuracy {wins['test_acc']}/{len(pairs)}, lower ECE {wins['test_ece_%']}/"
        f"{len(pairs)}, smaller sets at alpha={a0:g} {wins[f'set@{a0:g}']}/{len(pairs)}. sim_agrees: fraction of "
        "test examples whose executed exit (engine, bucket cascade) equals the simulated one; throughput speed-up is "
        "measured against the static full-depth model on one batch.",
        report_lib.markdown_table(rows, list(rows[0])),
        "## Warm-up IMs (plain multi-exit CE) per exit, test\n",
        report_lib.markdown_table(static_rows, list(static_rows[0])),
        "## Training log\n" + "\n".join(f"    {line}" for line in log_lines),
        "Plots: `jei_accuracy.png` (accuracy vs FLOPs; the warm-up IMs' max-softmax sweep and per-exit accuracies "
        "for reference), `jei_conformal.png` (set size vs FLOPs), `jei_ece.png` (ECE vs FLOPs)."])
    return Report(md, {"results": results}, plots)


def _exit_pred(out):
    return out.exit_B, jnp.argmax(out.logits_BxC, -1)


if __name__ == "__main__":
    main()
