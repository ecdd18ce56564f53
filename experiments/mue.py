"""MuE at small scale: exit when consecutive layers' states are similar (cosine), against max-softmax exits.

    python -m experiments.mue --config configs/mue.py:smoke [--outdir DIR]

One ViT whose every layer exits through the same shared head (experiments/_common_vision.py) is trained once.
Every layer's softmax and MuE's layer-to-layer cosine similarity (the whole token tensor, layer 1 against the
embedding) are cached on validation and test. Each arm has one global threshold (MuE's rule), fit on VALIDATION
to a mean-layer budget and to a fraction of full-depth accuracy (the paper's 99% / 96%), then applied to TEST.
The selected thresholds are executed by the engine (``policies.saturation`` / ``policies.threshold``, bucket-cascade
executor) and must agree with the simulation; throughput is measured against the static full-depth model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.eval import budgeted
from eejax.eval import report as report_lib
from eejax.exits import costs, policies
from experiments import _common_vision as vision
from experiments._common import Report, Run, experiment

ARMS = ("MuE (cosine of consecutive states)", "max-softmax")


def candidate_thresholds(score_val_ExN: np.ndarray, num: int) -> np.ndarray:
    """Quantiles of the validation scores at the early exits, plus +inf (full depth for every example)."""
    qs = np.quantile(score_val_ExN[:-1].ravel(), np.linspace(0.0, 1.0, num))
    return np.concatenate([np.unique(qs), [np.inf]])


def operating_points(score_ExN, correct_ExN, thresholds, cum_flops_E):
    """(threshold, mean layers, accuracy, expected FLOPs) for each global threshold (``budgeted.simulate_exits``)."""
    n = score_ExN.shape[1]
    rows = []
    for t in thresholds:
        e_N = budgeted.simulate_exits(score_ExN, np.full(score_ExN.shape[0], t))
        rows.append((float(t), float(np.mean(e_N + 1)), float(correct_ExN[e_N, np.arange(n)].mean()),
                     costs.expected_flops(e_N, cum_flops_E)))
    return np.asarray(rows)


def fit_budget(val_pts, budget):
    """The threshold whose validation mean layers is within ``budget`` with the best validation accuracy."""
    ok = np.flatnonzero(val_pts[:, 1] <= budget + 1e-9)
    if ok.size == 0:
        return None
    best = ok[np.lexsort((val_pts[ok, 1], val_pts[ok, 2]))[-1]]   # best accuracy, then more layers
    return val_pts[best, 0]


def fit_quality(val_pts, fraction, full_acc):
    """The threshold with the fewest validation layers whose validation accuracy >= fraction x full depth."""
    ok = np.flatnonzero(val_pts[:, 2] >= fraction * full_acc - 1e-12)
    return val_pts[ok[np.argmin(val_pts[ok, 1])], 0]


def _policy_maker(arm, num_exits):
    """``(threshold -> policy, whether the heads must report the whole layer state)``."""
    if arm == ARMS[0]:
        return (lambda t: policies.saturation(t, num_exits, first=vision.flat_state)), True
    return (lambda t: policies.threshold("max_softmax", t, num_exits)), False


def evaluate_arm(arm, su, cfg, scores, correct_val, correct_test, full_val, full_test):
    """One arm: its candidate thresholds' operating points on validation and test, the thresholds fit to the budgets
    and quality targets on validation, executed on test by the engine."""
    ec, test, graphdef, params, n_layers = su.ec, su.test, su.graphdef, su.params, su.mcfg.depth
    xb, static_tp = su.xb, su.static_tp
    s_val, s_test = scores[arm]
    cands = candidate_thresholds(s_val, cfg.eval.num_candidates)
    val_pts = operating_points(s_val, correct_val, cands, ec.cum_flops_E)
    test_pts = operating_points(s_test, correct_test, cands, ec.cum_flops_E)
    make_policy, report_state = _policy_maker(arm, n_layers)
    dyn = jax.jit(lambda p, x, t: vision.run_engine(nnx.merge(graphdef, p), x, make_policy(t),
                                                    report_state=report_state).logits_BxC)

    def executed(t):
        return vision.executed_shared_head(graphdef, params, test, cfg, make_policy, jnp.float32(t),
                                           report_state=report_state)

    def point(t, target, kind):
        e_sim = budgeted.simulate_exits(s_test, np.full(n_layers, t))
        e_run, pred_run = executed(t)
        tp = costs.throughput(dyn, xb.shape[0], params, xb, jnp.float32(t))
        v = val_pts[np.flatnonzero(val_pts[:, 0] == t)[0]]
        return {"arm": arm, kind: target, "threshold": t, "val_layers": v[1], "val_acc": 100 * v[2],
                "test_layers": float(np.mean(e_run + 1)), "test_acc": 100 * float(np.mean(pred_run ==
                                                                                           test.labels_N)),
                "layers_saved_%": 100 * (1 - np.mean(e_run + 1) / n_layers),
                "speedup_flops": ec.cum_flops_E[-1] / costs.expected_flops(e_run, ec.cum_flops_E),
                "b%d_throughput_speedup" % xb.shape[0]: tp / static_tp,
                "sim_agrees": float(np.mean(e_sim == e_run))}

    rows_budget, rows_quality, hist = [], [], None
    for b in cfg.eval.budgets:
        t = fit_budget(val_pts, b)
        if t is not None:
            rows_budget.append(point(t, b, "budget_layers"))
    for q in cfg.eval.quality:
        t = fit_quality(val_pts, q, full_val)
        row = point(t, q, "quality")
        row["test_acc_/_full_%"] = 100 * (row["test_acc"] / 100) / full_test
        rows_quality.append(row)
        if q == cfg.eval.quality[0]:
            hist = executed(t)[0]
    points = {"candidates": cands.tolist(), "val_points": val_pts.tolist(), "test_points": test_pts.tolist()}
    return rows_budget, rows_quality, hist, points


@experiment("mue", data=vision.splits)
def main(run: Run, data) -> Report:
    su = vision.shared_head_setup(run, data)
    cfg, ec, val, test, n_layers = run.cfg, su.ec, su.val, su.test, su.mcfg.depth
    probs_val, cos_val, probs_test, cos_test = su.probs_val, su.cos_val, su.probs_test, su.cos_test
    correct_val = probs_val.argmax(-1) == val.labels_N[None]
    correct_test = probs_test.argmax(-1) == test.labels_N[None]
    full_val, full_test = correct_val[-1].mean(), correct_test[-1].mean()
    scores = {ARMS[0]: (cos_val, cos_test), ARMS[1]: (probs_val.max(-1), probs_test.max(-1))}

    rows_static = [{"layers": l + 1, "test_acc": 100 * correct_test[l].mean(),
                    "MFLOPs": ec.static_flops_E[l] / 1e6,
                    "mean_cos_to_previous": float(cos_test[l].mean())} for l in range(n_layers)]
    rows_budget, rows_quality, curves, results, hist = [], [], {}, {"arms": {}}, {}
    for arm in ARMS:
        budget, quality, hist[arm], results["arms"][arm] = evaluate_arm(arm, su, cfg, scores, correct_val,
                                                                        correct_test, full_val, full_test)
        rows_budget += budget
        rows_quality += quality
        curves[arm] = [(f, 100 * a) for _, _, a, f in results["arms"][arm]["test_points"]]

    # The paper's ordering at matched layers: MuE's test accuracy vs max-softmax's, interpolated on the test curves.
    def interp(arm, layers):
        pts = np.asarray(results["arms"][arm]["test_points"])
        order = np.argsort(pts[:, 1])
        return float(np.interp(layers, pts[order, 1], pts[order, 2]))
    grid = np.linspace(1.5, n_layers - 0.5, 2 * n_layers - 3)
    rows_match = [{"mean_layers": m, "MuE_acc": 100 * interp(ARMS[0], m), "maxprob_acc": 100 * interp(ARMS[1], m),
                   "MuE_minus_maxprob": 100 * (interp(ARMS[0], m) - interp(ARMS[1], m))} for m in grid]
    results.update(static=rows_static, budget=rows_budget, quality=rows_quality, matched=rows_match,
                   full_val_acc=float(full_val), full_test_acc=float(full_test),
                   cum_flops=ec.cum_flops_E.tolist(), static_flops=ec.static_flops_E.tolist())
    return report(run, su, results, curves, hist, correct_test)


def report(run, su, results, curves, hist, correct_test) -> Report:
    cfg, ec, n_layers = run.cfg, su.ec, su.mcfg.depth
    train, val, test = su.train, su.val, su.test
    rows_static, rows_quality, rows_budget, rows_match = (results[k] for k in ("static", "quality", "budget",
                                                                               "matched"))
    full_val, full_test = results["full_val_acc"], results["full_test_acc"]
    statics = [(ec.static_flops_E[l], 100 * correct_test[l].mean(), f"L{l + 1}") for l in range(n_layers)]
    plots = {"mue_curves.png": lambda path: report_lib.plot_accuracy_vs_flops(
                 curves, statics, path, title=f"MuE vs max-softmax on {cfg.data.name} (test; one global threshold)"),
             "mue_exits.png": lambda path: report_lib.plot_exit_histogram(
                 hist, n_layers, path,
                 title=f"exit layer at {100 * cfg.eval.quality[0]:g}% of full accuracy (executed)")}
    wins = sum(r["MuE_minus_maxprob"] > 0 for r in rows_match)
    md = "\n\n".join([
        f"# MuE at small scale on {cfg.data.name}",
        run.prov.markdown() + "  \n"
        + vision.data_line(cfg, train, val, test) +
        f"Scale: ViT depth {n_layers}, width {cfg.model.d_model}, patch {cfg.model.patch_size}, one linear head "
        f"shared by every layer, {cfg.train.steps} steps of batch {cfg.data.batch_size}, label smoothing "
        f"{cfg.train.label_smoothing}. FLOPs count the shared head at every exit evaluated on the way (the engine "
        "evaluates it for both arms; MuE's decision itself needs no head).",
        "Paper (arXiv:2211.11152, abstract): on OFA-base, up to 50% less expected inference time at 99% of full "
        "performance (SNLI-VE) and 40% at 96% (MS COCO captioning). Ours is a "
        f"{n_layers}-layer ViT classifier trained from scratch on {cfg.data.name}, so only the orderings are "
        "comparable.",
        "## Static depth (the shared head after layer l, test)", report_lib.markdown_table(rows_static,
                                                                                          list(rows_static[0])),
        "## At the paper's operating points (thresholds fit on validation to a fraction of full-depth validation "
        "accuracy, executed on test by the engine)\n"
        f"Full depth: val {100 * full_val:.2f}%, test {100 * full_test:.2f}%. sim_agrees: fraction of test "
        "examples whose executed exit equals the simulated one; throughput is measured (bucket-cascade executor) "
        "against the static full-depth model on one batch.",
        report_lib.markdown_table(rows_quality, list(rows_quality[0])),
        "## At mean-layer budgets (thresholds fit on validation, executed on test)",
        report_lib.markdown_table(rows_budget, list(rows_budget[0])),
        f"## Matched mean layers (test curves interpolated): MuE ahead at {wins}/{len(rows_match)} points\n"
        "Plot: `mue_curves.png` (accuracy vs FLOPs, static depths as triangles); exit histogram: `mue_exits.png`.",
        report_lib.markdown_table(rows_match, list(rows_match[0]))])
    return Report(md, {"results": results}, plots)


if __name__ == "__main__":
    main()
