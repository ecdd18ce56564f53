"""DeeR-VLA's exit mechanism at small scale: exit when consecutive exits agree, under an average and a peak budget.

    python -m experiments.deer --config configs/deer.py:smoke [--outdir DIR]

The shared-head multi-exit ViT (experiments/_common_vision.py; MuE's backbone, shareable through
``--config.model_workdir``) is trained or resumed. Every layer's softmax is cached on validation and test. For each
peak cap M (DeeR's max_layer) and each prior p of eejax.eval.budgeted, DeeR's exit-ratio prior puts a fraction
q_k proportional to p^k of the VALIDATION examples at exits 2..M (exit 1 has no previous output to agree with),
and ``budgeted.select_thresholds`` turns it into per-exit thresholds on the agreement score (minus the distance of
consecutive softmaxes). For each average budget B the prior with the best validation accuracy whose validation
mean layers is within B is kept; its thresholds run on TEST through the engine (``policies.agreement``, bucket-cascade
executor), and the table shows whether the test average and peak respect B and M, against static depths.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.eval import bootstrap, budgeted
from eejax.eval import report as report_lib
from eejax.exits import costs, policies
from experiments import _common_vision as vision
from experiments._common import Report, Run, experiment


def _exit_and_pred(out):
    return out.exit_B, jnp.argmax(out.logits_BxC, -1)


def agreement_scores(probs_ExNxC: np.ndarray) -> np.ndarray:
    """Minus ||softmax_e - softmax_{e-1}||_2 per exit and example; -inf at the first exit (nothing to agree with)."""
    p = np.asarray(probs_ExNxC, np.float64)
    dist = np.linalg.norm(p[1:] - p[:-1], axis=-1)
    return np.concatenate([np.full((1, p.shape[1]), -np.inf), -dist])


def prior_thresholds(score_val_ExN: np.ndarray, prior: float, max_exit: int) -> np.ndarray:
    """Score thresholds (exit when score >= t) realising DeeR's exit-ratio prior on validation: fractions
    proportional to prior^k over exits 1..max_exit, nobody at exit 0 (+inf), everyone left at max_exit (-inf)."""
    num_exits = score_val_ExN.shape[0]
    allowed = score_val_ExN[1:max_exit + 1]
    thr = budgeted.select_thresholds(allowed, budgeted.target_fractions(prior, allowed.shape[0]))
    return np.concatenate([[np.inf], thr, np.full(num_exits - max_exit - 1, -np.inf)])


def distance_thresholds(score_thr_E: np.ndarray) -> np.ndarray:
    """The policy's distance thresholds T_e (fire when dist < T_e) equal to ``score >= t_e`` with score = -dist:
    the next float32 above -t_e, so an example exactly at the threshold exits in both."""
    t = -np.asarray(score_thr_E, np.float32)
    return np.where(np.isfinite(t), np.nextafter(t, np.float32(np.inf)), t).astype(np.float32)


def evaluate(score_ExN, correct_ExN, thr_E, cum_flops_E):
    e_N = budgeted.simulate_exits(score_ExN, thr_E)
    n = score_ExN.shape[1]
    return {"mean_layers": float(np.mean(e_N + 1)), "peak_layers": int(e_N.max()) + 1,
            "acc": float(correct_ExN[e_N, np.arange(n)].mean()), "flops": costs.expected_flops(e_N, cum_flops_E),
            "exits": e_N}


class Engine(NamedTuple):
    """DeeR's policy run by the engine on the test split: per-example exits, and throughput on one batch."""
    executed: Any     # (score thresholds, max exit) -> (exit_N, pred_N)
    throughput: Any   # (score thresholds, max exit) -> images/s on su.xb


def engine_paths(su, cfg) -> Engine:
    graphdef, params, n_layers, xb = su.graphdef, su.params, su.mcfg.depth, su.xb

    def make_policy(thr_E, max_exit):
        return policies.agreement(thr_E, n_layers, max_exit=max_exit)

    dyn = jax.jit(lambda p, x, thr, m: vision.run_engine(nnx.merge(graphdef, p), x, make_policy(thr, m)).logits_BxC,
                  static_argnums=3)
    run_fn = jax.jit(lambda p, x, thr, m: _exit_and_pred(vision.run_engine(nnx.merge(graphdef, p), x,
                                                                           make_policy(thr, m))), static_argnums=3)

    def executed(thr_E, max_exit):
        """Exit and prediction per test example, executed by the engine (one compile per cap)."""
        exits, preds = [], []
        for x, n in vision.padded_eval_images(su.test, cfg):
            e, p = run_fn(params, x, jnp.asarray(distance_thresholds(thr_E)), max_exit)
            exits.append(np.asarray(e)[:n])
            preds.append(np.asarray(p)[:n])
        return np.concatenate(exits), np.concatenate(preds)

    def throughput(thr_E, max_exit):
        return costs.throughput(dyn, xb.shape[0], params, xb, jnp.asarray(distance_thresholds(thr_E)), max_exit)

    return Engine(executed, throughput)


@experiment("deer", data=vision.splits)
def main(run: Run, data) -> Report:
    su = vision.shared_head_setup(run, data)
    cfg, ec, val, test = run.cfg, su.ec, su.val, su.test
    probs_val, probs_test = su.probs_val, su.probs_test
    correct_val = probs_val.argmax(-1) == val.labels_N[None]
    correct_test = probs_test.argmax(-1) == test.labels_N[None]
    s_val, s_test = agreement_scores(probs_val), agreement_scores(probs_test)
    static_acc = correct_test.mean(1)
    eng = engine_paths(su, cfg)

    rows, unfit, curves, results, hist = [], [], {}, {"caps": {}}, {}
    for cap in cfg.eval.max_layers:
        max_exit = cap - 1
        per_prior = []
        for p in budgeted.priors():
            thr = prior_thresholds(s_val, p, max_exit)
            v, t = evaluate(s_val, correct_val, thr, ec.cum_flops_E), evaluate(s_test, correct_test, thr,
                                                                               ec.cum_flops_E)
            per_prior.append((p, thr, v, t))
        curves[f"DeeR, peak {cap} layers"] = [(t["flops"], 100 * t["acc"]) for _, _, _, t in per_prior]
        results["caps"][cap] = [{"prior": p, "thresholds": thr.tolist(),
                                 "val": {k: x for k, x in v.items() if k != "exits"},
                                 "test": {k: x for k, x in t.items() if k != "exits"}} for p, thr, v, t in per_prior]
        for budget in cfg.eval.budgets:
            ok = [x for x in per_prior if x[2]["mean_layers"] <= budget + 1e-9]
            if not ok:
                unfit.append(f"budget {budget:g} layers under cap {cap}")
                continue
            p, thr, v, _ = max(ok, key=lambda x: (x[2]["acc"], x[2]["mean_layers"]))
            sim = evaluate(s_test, correct_test, thr, ec.cum_flops_E)
            exits_run, preds_run = eng.executed(thr, max_exit)
            rows.append(budget_row(budget, cap, p, v, sim, exits_run, preds_run, static_acc, su,
                                   eng.throughput(thr, max_exit)))
            if cap == max(cfg.eval.max_layers) and budget == cfg.eval.budgets[len(cfg.eval.budgets) // 2]:
                hist[f"budget {budget:g} layers"] = exits_run

    results.update(rows=rows, unfit=unfit, static_acc=static_acc.tolist(), cum_flops=ec.cum_flops_E.tolist(),
                   static_flops=ec.static_flops_E.tolist())
    return report(run, su, results, curves, hist)


def budget_row(budget, cap, p, v, sim, exits_run, preds_run, static_acc, su, tp) -> dict:
    """One average budget under one peak cap, executed on test."""
    ec, test, n_layers, xb = su.ec, su.test, su.mcfg.depth, su.xb
    mean_run, peak_run = float(np.mean(exits_run + 1)), int(exits_run.max()) + 1
    acc_run = float(np.mean(preds_run == test.labels_N))
    within = [l for l in range(n_layers) if l + 1 <= budget]
    return {
        "budget_layers": budget, "peak_cap": cap, "prior": p, "val_mean_layers": v["mean_layers"],
        "test_mean_layers": mean_run, "avg_met": "yes" if mean_run <= budget + 1e-9 else "NO",
        "test_peak_layers": peak_run, "peak_met": "yes" if peak_run <= cap else "NO",
        "test_acc": 100 * acc_run,
        "static_acc_at_same_layers": 100 * float(np.interp(mean_run, np.arange(1, n_layers + 1),
                                                           static_acc)),
        "best_static_within_budget": 100 * float(static_acc[within].max()) if within else float("nan"),
        "speedup_flops": ec.cum_flops_E[-1] / costs.expected_flops(exits_run, ec.cum_flops_E),
        "b%d_throughput_speedup" % xb.shape[0]: tp / su.static_tp,
        "sim_agrees": float(np.mean(sim["exits"] == exits_run))}


def report(run, su, results, curves, hist) -> Report:
    cfg, ec, n_layers = run.cfg, su.ec, su.mcfg.depth
    train, val, test = su.train, su.val, su.test
    rows, unfit, static_acc = results["rows"], results["unfit"], np.asarray(results["static_acc"])
    # Several budgets can select the same prior (the same thresholds and test point): count each point once, and
    # say "above static" only when the two-proportion 95% interval (conservative for one test set) excludes 0.
    fitted = list({(r["peak_cap"], r["prior"]): r for r in rows}.values())
    n_avg = sum(r["avg_met"] == "yes" for r in fitted)
    n_peak = sum(r["peak_met"] == "yes" for r in fitted)
    above = [bootstrap.proportion_difference(r["test_acc"] / 100, r["static_acc_at_same_layers"] / 100, len(test))
             for r in fitted]
    n_above = sum(r["test_acc"] > r["static_acc_at_same_layers"] for r in fitted)
    n_above_sep = sum(d.separated and d.diff > 0 for d in above)
    statics = [(ec.static_flops_E[l], 100 * static_acc[l], f"L{l + 1}") for l in range(n_layers)]
    plots = {"deer_curves.png": lambda path: report_lib.plot_accuracy_vs_flops(
        curves, statics, path, title=f"DeeR exits on {cfg.data.name} (test; thresholds fit on validation)")}
    if hist:
        plots["deer_exits.png"] = lambda path: report_lib.plot_exit_histogram(hist, n_layers, path,
                                                                              title="exit layer (executed)")
    cols = list(rows[0]) if rows else ["budget_layers"]
    md = "\n\n".join([
        f"# DeeR-VLA's exit mechanism at small scale on {cfg.data.name}",
        run.prov.markdown() + "  \n"
        + vision.data_line(cfg, train, val, test) +
        f"Scale: ViT depth {n_layers}, width {cfg.model.d_model}, patch {cfg.model.patch_size}, one linear head "
        f"shared by every layer (an exit after every layer), {cfg.train.steps} steps of batch "
        f"{cfg.data.batch_size}; the backbone is the one MuE's script trains (same recipe and seed"
        + (f", shared directory `{cfg.model_workdir}`" if cfg.model_workdir else "") + "). "
        "FLOPs count the shared head at every exit evaluated (DeeR needs every exit's output to compare).",
        "Paper (arXiv:2411.02359, abstract): on CALVIN, 5.2-6.5x less LLM compute and 2-6x less LLM GPU memory "
        "without loss of task success (OpenFlamingo 3B/9B, exits every 2 layers, shared action head). Ours is a "
        f"{n_layers}-layer ViT classifier on {cfg.data.name}: the mechanism and its budget constraints, not the "
        "robot numbers.",
        f"## Budgets (fit on validation, executed on test by the engine)\n"
        f"{len(rows)} (budget, cap) rows, {len(fitted)} distinct operating points (several budgets select the same "
        f"prior). Over the distinct points: average budget met on test at {n_avg}/{len(fitted)}, peak cap at "
        f"{n_peak}/{len(fitted)}; accuracy above the static depth at the same mean layers (interpolated) at "
        f"{n_above}/{len(fitted)}, outside the 95% two-proportion interval at {n_above_sep}/{len(fitted)}. "
        "best_static_within_budget: the best truncated model whose depth fits the average budget. sim_agrees: "
        "fraction of test examples whose executed exit equals the simulated one."
        + (f" No prior met on validation: {', '.join(unfit)}." if unfit else ""),
        report_lib.markdown_table(rows, cols),
        "## Static depth (test)\n",
        report_lib.markdown_table([{"layers": l + 1, "test_acc": 100 * static_acc[l],
                                    "MFLOPs": ec.static_flops_E[l] / 1e6} for l in range(n_layers)],
                                  ["layers", "test_acc", "MFLOPs"]),
        "Plot: `deer_curves.png` (every prior, per cap; static depths as triangles)"
        + ("; exit histogram: `deer_exits.png`." if hist else ".")])
    return Report(md, {"results": results}, plots)


if __name__ == "__main__":
    main()
