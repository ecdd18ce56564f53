"""DYNAMAX (arXiv:2504.20922) at small scale: early exits on a Mamba LM vs an equal-parameter transformer LM, and
linear / MLP / Mamba-block exit classifiers at matched parameters, in per-token early-exit decoding.

    python -m experiments.dynamax --config configs/dynamax.py:smoke [--outdir DIR]

See configs/dynamax.py for the runbook (models, training, protocol, scale, wall-clock). The recipe: train both
backbones with exits (eejax.models.mamba_lm.distilled_lm_loss), train the exit classifiers on each frozen backbone
(eejax.models.exit_classifier), decode the windows teacher-forced through eejax.decoding.recurrent for every state
mode x exit decision x threshold, fit thresholds on the calibration windows, compare on the test windows.
"""
from __future__ import annotations

import functools
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.lm import WindowIterator
from eejax.decoding import recurrent as rec
from eejax.decoding.per_token import static_thresholds
from eejax.eval import report
from eejax.exits import confidence as conf_lib
from eejax.exits import costs, hlo
from eejax.models import exit_classifier as ec
from eejax.models import lm, mamba_lm
from experiments import _common_lm as lm_common
from experiments._common import Report, Run, experiment

NAME = "dynamax"
ARCHS = ("mamba", "transformer")


# ------------------------------------------------------------------------------------------------------ models


def matched_mlp_dim(mamba_cfg: mamba_lm.MambaConfig, tkw: dict, vocab: int) -> int:
    """The transformer MLP width whose layer holds as many parameters as a Mamba block (embedding and norms are
    the same in both models)."""
    def layer(f):
        return costs.lm_param_counts({**tkw, "mlp_dim": f, "vocab_size": vocab})["layer"]
    return min(range(1, 16 * tkw["d_model"]), key=lambda f: abs(layer(f) - mamba_cfg.layer_params()))


def model_configs(cfg, vocab: int) -> dict[str, Any]:
    m = mamba_lm.MambaConfig(vocab_size=vocab, exits=cfg.exits, **cfg.mamba.to_dict())
    tkw = cfg.transformer.to_dict()
    tkw["mlp_dim"] = tkw["mlp_dim"] or matched_mlp_dim(m, tkw, vocab)
    return {"mamba": m, "transformer": lm.LMConfig(vocab_size=vocab, exits=cfg.exits, **tkw)}


def build(arch: str, mcfg, seed: int):
    return (mamba_lm.build if arch == "mamba" else lm.build)(mcfg, seed)


def train_backbone(cfg, arch, mcfg, corpus, workdir) -> tuple[Any, Any, float]:
    """Stage 1 (resumes from ``workdir/<arch>``): the LM with exits, final CE + decaying-weight KD of the exits."""
    gd, params = build(arch, mcfg, cfg.seed)
    t = cfg.train
    loss_fn = mamba_lm.distilled_lm_loss(gd, mcfg.exit_layers, weighting=t.weighting, kd_weight=t.kd_weight,
                                         temperature=t.temperature)
    batches = WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.seed)
    start = time.perf_counter()
    params = lm_common.fit(loss_fn, params, t.optim, batches, t.steps, pathlib.Path(workdir) / arch / "base", cfg,
                  f"{arch} LM")
    return gd, params, time.perf_counter() - start


def classifier_configs(cfg, mcfg) -> dict[str, ec.ClassifierConfig]:
    c, d = cfg.classifier, mcfg.d_model
    mamba_kw = dict(d_state=c.d_state, conv_width=c.conv_width)
    out = {}
    for kind in c.kinds:
        hidden = ec.hidden_for_budget(kind, d, c.budget, **mamba_kw) if kind != "linear" else 1
        out[kind] = ec.ClassifierConfig(kind, d, mcfg.num_exits, hidden, **mamba_kw)
    return out


def train_classifiers(cfg, arch, lm_gd, lm_params, ccfgs, corpus, workdir) -> tuple[dict, float]:
    """Stage 2 on the frozen LM: every classifier kind side by side (one frozen forward per batch)."""
    built = {k: ec.build(c, cfg.seed + 1) for k, c in ccfgs.items()}
    loss_fn = ec.classifier_loss(lm_gd, lm_params, {k: g for k, (g, _) in built.items()}, top_k=cfg.classifier.top_k)
    batches = WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.seed + 1)
    start = time.perf_counter()
    params = lm_common.fit(loss_fn, {k: p for k, (_, p) in built.items()}, cfg.classifier.optim, batches,
                  cfg.classifier.steps, pathlib.Path(workdir) / arch / "classifiers", cfg, f"{arch} classifiers")
    return {k: (built[k][0], params[k]) for k in ccfgs}, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------ costs


def token_counts(mcfg, ccfg, e: int, mode: str, gate: str, static: bool = False) -> costs.TokenCounts:
    """What one token that leaves at exit ``e`` evaluates: layers, vocabulary heads (every exit passed under max
    softmax; the exit taken only under a classifier's gate or a static exit), classifier calls (the exits passed, and
    under ``propagate`` a stateful classifier's update at the exits after; the last exit has none), and the skipped
    layers whose state ``propagate`` advances."""
    n, num_e = mcfg.depth, mcfg.num_exits
    k = mcfg.exit_layers[e]
    layers = n if mode == "oracle" else k + 1
    heads = 1 if static or gate != "max_softmax" else e + 1
    clf = 0 if ccfg is None else min(e + 1, num_e - 1)
    if ccfg is not None and (mode == "oracle" or (mode == "propagate" and ccfg.stateful)):
        clf = num_e - 1
    fill = n - (k + 1) if mode == "propagate" and not static else 0
    return costs.TokenCounts(layers=float(layers), heads=float(heads), predictors=float(clf),
                             predictor_params=0 if ccfg is None else ccfg.params_each(), kv_fill_layers=float(fill))


def flops_per_token(mcfg, counts: costs.TokenCounts, c) -> float:
    return float(sum(p.flops for p in costs.decode_work(mcfg, counts, batch=c.batch, cache_len=c.cache_len,
                                                         dtype=c.dtype)))


def cost_table(mcfg, ccfg, mode, gate, c, static=False) -> np.ndarray:
    """Relative FLOPs per token (to the full model's) of a token leaving at each exit (``float[E]``)."""
    full = flops_per_token(mcfg, costs.greedy_counts(mcfg), c)
    return np.asarray([flops_per_token(mcfg, token_counts(mcfg, ccfg, e, mode, gate, static), c) / full
                       for e in range(mcfg.num_exits)])


def mean_counts(mcfg, ccfg, mode, gate, exit_hist_E, host_stops: float, static=False) -> costs.TokenCounts:
    p = np.asarray(exit_hist_E, np.float64) / max(np.sum(exit_hist_E), 1)
    per = [token_counts(mcfg, ccfg, e, mode, gate, static) for e in range(mcfg.num_exits)]
    fields = {f: float(sum(pe * getattr(c, f) for pe, c in zip(p, per)))
              for f in ("layers", "heads", "predictors", "kv_fill_layers")}
    return costs.TokenCounts(**fields, host_stops=host_stops,
                             predictor_params=0 if ccfg is None else ccfg.params_each())


# ------------------------------------------------------------------------------------------------------ decoding


class Arm(NamedTuple):
    """One way to decode: a state mode and an exit decision (max softmax or a classifier kind)."""
    mode: str
    gate: str

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.gate}"


@functools.lru_cache(maxsize=None)
def _decoder(lm_gd, clf_gd, mode: str, gate: str, new_tokens: int):
    """``f(lm_params, clf_params, thr_E, prompt, force) -> Decoded``, jitted once per arm (thresholds traced)."""
    measure = conf_lib.max_softmax if gate == "max_softmax" else conf_lib.learned

    def f(lm_params, clf_params, thr_E, prompt, force):
        model = nnx.merge(lm_gd, lm_params)
        clf = None if clf_gd is None else nnx.merge(clf_gd, clf_params)
        if mode == "full":
            step = functools.partial(rec.full_step, classifiers=clf)
        else:
            step = functools.partial(rec.exit_step, threshold=thr_E, measure=measure, mode=mode, classifiers=clf)
        return rec.generate(model, prompt, jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32), new_tokens,
                            lambda m, t, s, i: step(m, t, s, i), classifiers=clf, force_BxG=force)

    return jax.jit(f)


class Backbone(NamedTuple):
    arch: str
    mcfg: Any
    gd: Any
    params: Any
    classifiers: dict          # kind -> (graphdef, params)
    ccfgs: dict                # kind -> ClassifierConfig

    def clf(self, gate):
        return (None, None) if gate == "max_softmax" else self.classifiers[gate]


class Sweep(NamedTuple):
    """Per-window metrics of one arm at one threshold on one split (W windows)."""
    nll_W: np.ndarray
    agree_W: np.ndarray
    cost_W: np.ndarray        # relative FLOPs per token (cost model, batch 1)
    layers_W: np.ndarray      # mean layers a token's output used (exit depth)
    exit_hist_E: np.ndarray   # tokens leaving at each exit


def decode_split(bb: Backbone, arm: Arm, thr_E, windows, ref_argmax: list | None, cost_E, new_tokens: int):
    """Decode every window of a split teacher-forced; returns the Sweep and the argmax tokens (for a reference)."""
    clf_gd, clf_params = bb.clf(arm.gate)
    f = _decoder(bb.gd, clf_gd, arm.mode, arm.gate, new_tokens)
    e_of_layer = np.asarray(bb.mcfg.exit_of_layer)
    nll, agree, cost, layers, hist, argmaxes = [], [], [], [], np.zeros(bb.mcfg.num_exits), []
    for j, (prompt, cont) in enumerate(zip(windows.prompts, windows.continuations)):
        d = jax.device_get(f(bb.params, clf_params, jnp.asarray(thr_E, jnp.float32), jnp.asarray(prompt),
                             jnp.asarray(cont)))
        argmaxes.append(d.argmax_BxG)
        exit_BxG = e_of_layer[d.exit_layer_BxG[:, 1:]]        # tokens 1.. come from decode steps
        nll.append(-d.logprob_BxG[:, 1:].mean(1))
        agree.append((d.argmax_BxG[:, 1:] == ref_argmax[j][:, 1:]).mean(1) if ref_argmax is not None
                     else np.ones(len(prompt)))
        cost.append(np.asarray(cost_E)[exit_BxG].mean(1))
        layers.append((d.exit_layer_BxG[:, 1:] + 1).mean(1))
        hist += np.bincount(exit_BxG.ravel(), minlength=bb.mcfg.num_exits)
    return Sweep(*(np.concatenate(x) for x in (nll, agree, cost, layers)), hist), argmaxes


def host_stop_profile(bb: Backbone, arm: Arm, windows) -> hlo.HloProfile:
    """The compiled decode step of an arm, read by ``eejax.exits.hlo`` (its host stops at any trip counts)."""
    clf_gd, clf_params = bb.clf(arm.gate)
    measure = conf_lib.max_softmax if arm.gate == "max_softmax" else conf_lib.learned
    prompt = jnp.asarray(windows.prompts[0])
    num_e = bb.mcfg.num_exits

    def step(lm_params, cp, tok_B, state):
        model, clf = nnx.merge(bb.gd, lm_params), None if clf_gd is None else nnx.merge(clf_gd, cp)
        if arm.mode == "full":
            return rec.full_step(model, tok_B, state, 0, classifiers=clf)
        return rec.exit_step(model, tok_B, state, 0, jnp.full((num_e,), 0.9), measure=measure, mode=arm.mode,
                             classifiers=clf)

    model, clf = nnx.merge(bb.gd, bb.params), None if clf_gd is None else nnx.merge(clf_gd, clf_params)
    _, state = rec.prefill(model, prompt, jnp.full((prompt.shape[0],), prompt.shape[1]), 2 * prompt.shape[1],
                           classifiers=clf)
    return hlo.profile(step, bb.params, clf_params, prompt[:, -1], state)


# ------------------------------------------------------------------------------------------------------ statistics


def paired(a_W, b_W, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """mean(a - b) over windows and its 95% paired percentile bootstrap interval (windows resampled)."""
    d = np.asarray(a_W, np.float64) - np.asarray(b_W, np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, (resamples, d.size))
    lo, hi = np.quantile(d[idx].mean(1), [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def ci_text(t, fmt=".3f") -> str:
    d, lo, hi = t
    sep = "" if lo <= 0 <= hi else " *"
    return f"{d:+{fmt}} [{lo:+{fmt}}, {hi:+{fmt}}]{sep}"


def mean_ci(x_W, resamples, seed=0, fmt=".3f") -> str:
    m, lo, hi = paired(x_W, np.zeros_like(x_W), resamples, seed)
    return f"{m:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def fit_compute(calib: dict, target: float, tol: float = 0.05):
    """The threshold whose calibration compute is closest to ``target`` (None if none within ``tol``)."""
    thr, sw = min(calib.items(), key=lambda kv: (abs(kv[1].cost_W.mean() - target), kv[1].cost_W.mean()))
    return thr if abs(sw.cost_W.mean() - target) <= tol else None


def fit_agreement(calib: dict, target: float):
    """The cheapest threshold whose calibration agreement reaches ``target`` (None if none does)."""
    ok = [(sw.cost_W.mean(), thr) for thr, sw in calib.items() if sw.agree_W.mean() >= target]
    return min(ok)[1] if ok else None


# ------------------------------------------------------------------------------------------------------ stages


def evaluate(cfg, bb: Backbone, calib, test) -> dict:
    """Full model, static exits and every arm x threshold on both splits; ``sweeps[(mode, gate)][split][thr]``."""
    e, c = cfg.eval, cfg.costs
    num_e = bb.mcfg.num_exits
    ones = np.ones(num_e)
    full = {s: decode_split(bb, Arm("full", "max_softmax"), ones, w, None, ones, e.new_tokens) for s, w in
            (("calib", calib), ("test", test))}
    ref = {s: full[s][1] for s in full}
    out = {"full": {s: full[s][0] for s in full}, "static": {}, "sweeps": {}}
    static_cost = cost_table(bb.mcfg, None, "propagate", "max_softmax", c, static=True)
    for ex in range(num_e - 1):
        out["static"][ex] = decode_split(bb, Arm("propagate", "max_softmax"), static_thresholds(num_e, ex), test,
                                         ref["test"], static_cost, e.new_tokens)[0]
    arms = [Arm(m, g) for m in e.modes[bb.arch] for g in (e.oracle_gates if m == "oracle" else e.gates)]
    for arm in arms:
        ccfg = None if arm.gate == "max_softmax" else bb.ccfgs[arm.gate]
        cost_E = cost_table(bb.mcfg, ccfg, arm.mode, arm.gate, c)
        res = {s: {} for s in ("calib", "test")}
        for thr in e.thresholds:
            for s, w in (("calib", calib), ("test", test)):
                res[s][float(thr)] = decode_split(bb, arm, jnp.full((num_e,), thr), w, ref[s], cost_E,
                                                  e.new_tokens)[0]
        out["sweeps"][arm] = res
        print(f"{bb.arch} {arm.label}: " + ", ".join(
            f"thr {t:g}: compute {sw.cost_W.mean():.3f} agreement {sw.agree_W.mean():.3f}"
            for t, sw in res["test"].items()), flush=True)
    return out


def operating_points(cfg, bb: Backbone, ev: dict, calib, host: dict) -> list[dict]:
    """Thresholds fit on calibration (to each compute target and each agreement target), measured on test."""
    e, c = cfg.eval, cfg.costs
    full_test = ev["full"]["test"]
    rows = []
    for arm, res in ev["sweeps"].items():
        ccfg = None if arm.gate == "max_softmax" else bb.ccfgs[arm.gate]
        fits = [("compute", t, fit_compute(res["calib"], t)) for t in e.compute_targets]
        fits += [("agreement", t, fit_agreement(res["calib"], t)) for t in e.agreement_targets]
        for kind, target, thr in fits:
            row = {"arch": bb.arch, "mode": arm.mode, "gate": arm.gate, "fit": kind, "target": target,
                   "threshold": thr}
            if thr is not None:
                sw = res["test"][thr]
                counts = mean_counts(bb.mcfg, ccfg, arm.mode, arm.gate, sw.exit_hist_E,
                                     host.get(arm, 0.0))
                sp = costs.predicted_speedup(bb.mcfg, counts, batch=c.batch, cache_len=c.cache_len, dtype=c.dtype,
                                             device=c.device)
                row |= {"compute": float(sw.cost_W.mean()), "saving": 1 - float(sw.cost_W.mean()),
                        "layers": float(sw.layers_W.mean()), "agreement": float(sw.agree_W.mean()),
                        "nll": float(sw.nll_W.mean()), "dnll_vs_full": paired(sw.nll_W, full_test.nll_W,
                                                                              e.resamples),
                        "saving_ci": paired(1 - sw.cost_W, np.zeros_like(sw.cost_W), e.resamples),
                        "agreement_ci": paired(sw.agree_W, np.zeros_like(sw.agree_W), e.resamples),
                        "speedup_h200": sp.value, "speedup_h200_floor": sp.limit, "speedup_label": sp.label,
                        "bound": sp.bound, "counts": counts._asdict()}
            rows.append(row)
    return rows


def comparisons(cfg, evs: dict) -> list[dict]:
    """Paired comparisons on the test windows at thresholds fit on calibration: classifier kinds against each
    other and against max softmax, propagate vs freeze (Mamba), dynamic vs static truncation at the static exit's
    compute, and the two backbones' savings at equal agreement."""
    e = cfg.eval
    out = []

    def pick(ev, arm, kind, target):
        res = ev["sweeps"].get(arm)
        if res is None:
            return None
        thr = fit_compute(res["calib"], target) if kind == "compute" else fit_agreement(res["calib"], target)
        return None if thr is None else res["test"][thr]

    def add(what, arch, target, a_name, a, b_name, b, fit="compute", base_a=None, base_b=None):
        """a - b; with ``base_a`` / ``base_b`` (each model's full run) the NLLs are taken relative to them: two
        backbones compared by what their exits lose, not by their own quality."""
        if a is None or b is None:
            return
        nll_a = a.nll_W - (0 if base_a is None else base_a.nll_W)
        nll_b = b.nll_W - (0 if base_b is None else base_b.nll_W)
        out.append({"comparison": what, "arch": arch, "fit": fit, "target": target, "a": a_name, "b": b_name,
                    "compute_a": float(a.cost_W.mean()), "compute_b": float(b.cost_W.mean()),
                    "dnll": paired(nll_a, nll_b, e.resamples), "dagree": paired(a.agree_W, b.agree_W, e.resamples),
                    "dsaving": paired(1 - a.cost_W, 1 - b.cost_W, e.resamples)})

    for arch, ev in evs.items():
        gates = [g for g in e.gates if g != "max_softmax"]
        for t in e.compute_targets:
            for g in gates:
                add("classifier vs max softmax", arch, t, g, pick(ev, Arm("propagate", g), "compute", t),
                    "max_softmax", pick(ev, Arm("propagate", "max_softmax"), "compute", t))
            if "mamba" in gates and "mlp" in gates:
                add("Mamba-block vs MLP classifier", arch, t, "mamba", pick(ev, Arm("propagate", "mamba"),
                                                                             "compute", t),
                    "mlp", pick(ev, Arm("propagate", "mlp"), "compute", t))
            if "mamba" in gates and "linear" in gates:
                add("Mamba-block vs linear classifier", arch, t, "mamba", pick(ev, Arm("propagate", "mamba"),
                                                                                "compute", t),
                    "linear", pick(ev, Arm("propagate", "linear"), "compute", t))
            if arch == "mamba":
                for g in e.gates:
                    add("freeze vs propagate", arch, t, f"freeze/{g}", pick(ev, Arm("freeze", g), "compute", t),
                        f"propagate/{g}", pick(ev, Arm("propagate", g), "compute", t))
        for ex, st in ev["static"].items():
            t = float(st.cost_W.mean())
            for g in [g for g in ("max_softmax", "mamba") if g in e.gates]:
                for m in [m for m in ("propagate", "freeze") if m in e.modes[arch]]:
                    add(f"per-token exit vs static exit {ex}", arch, t, f"{m}/{g}",
                        pick(ev, Arm(m, g), "compute", t), f"static exit {ex}", st)
    if set(evs) == set(ARCHS):
        for t in e.agreement_targets:
            for g in e.gates:
                for m in ("propagate", "freeze"):
                    if m not in e.modes["mamba"]:
                        continue
                    add("Mamba LM vs transformer: saving at equal agreement (dnll: each vs its own full model)",
                        "both", t, f"mamba {m}/{g}", pick(evs["mamba"], Arm(m, g), "agreement", t),
                        f"transformer propagate/{g}", pick(evs["transformer"], Arm("propagate", g), "agreement", t),
                        fit="agreement", base_a=evs["mamba"]["full"]["test"],
                        base_b=evs["transformer"]["full"]["test"])
    return out


# ------------------------------------------------------------------------------------------------------ report


def plot(evs: dict, path):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, len(evs), figsize=(6.5 * len(evs), 8), squeeze=False)
    for j, (arch, ev) in enumerate(evs.items()):
        for i, (metric, label) in enumerate((("nll_W", "test NLL (nats/char)"),
                                             ("agree_W", "agreement with the full model"))):
            ax = axes[i, j]
            for arm, res in ev["sweeps"].items():
                pts = sorted((sw.cost_W.mean(), getattr(sw, metric).mean()) for sw in res["test"].values())
                ax.plot(*zip(*pts), marker=".", ls="-" if arm.mode == "propagate" else
                        ("--" if arm.mode == "freeze" else ":"), label=arm.label)
            st = sorted((sw.cost_W.mean(), getattr(sw, metric).mean()) for sw in ev["static"].values())
            full = ev["full"]["test"]
            st.append((1.0, getattr(full, metric).mean()))
            ax.plot(*zip(*st), "ks-", lw=2, label="static truncation (+ full)")
            ax.set(xlabel="relative FLOPs per token (cost model, heads and state updates counted)", ylabel=label,
                   title=f"{arch} LM")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


POINT_FIELDS = ("compute", "saving", "layers", "nll", "dnll_vs_full", "agreement", "speedup_h200",
                "speedup_h200_floor")


def _fmt_row(r: dict) -> dict:
    r = {**dict.fromkeys(POINT_FIELDS), **r}
    keep = {k: v for k, v in r.items() if k not in ("counts", "dnll_vs_full", "saving_ci", "agreement_ci",
                                                    "speedup_label", "bound")}
    keep["dnll_vs_full"] = ""
    if r.get("threshold") is not None:
        keep["threshold"] = f"{r['threshold']:g}"   # as given: 0.9995 must not print as 1.000
    if r["dnll_vs_full"] is not None:
        keep["dnll_vs_full"] = ci_text(r["dnll_vs_full"])
        keep["saving"] = f"{r['saving']:.3f} [{r['saving_ci'][1]:.3f}, {r['saving_ci'][2]:.3f}]"
        keep["agreement"] = f"{r['agreement']:.3f} [{r['agreement_ci'][1]:.3f}, {r['agreement_ci'][2]:.3f}]"
    return keep


def write_report(cfg, su, info: dict, evs: dict, points: list, comps: list, stops: list) -> Report:
    cols = ["arch", "mode", "gate", "fit", "target", "threshold", "compute", "saving", "layers", "nll",
            "dnll_vs_full", "agreement", "speedup_h200", "speedup_h200_floor"]
    static_rows = []
    for arch, ev in evs.items():
        full = ev["full"]["test"]
        for ex, st in ev["static"].items():
            static_rows.append({"arch": arch, "exit": f"after layer {info[arch]['exit_layers'][ex] + 1}",
                                "compute": float(st.cost_W.mean()), "nll": float(st.nll_W.mean()),
                                "dnll_vs_full": ci_text(paired(st.nll_W, full.nll_W, cfg.eval.resamples)),
                                "agreement": mean_ci(st.agree_W, cfg.eval.resamples)})
        static_rows.append({"arch": arch, "exit": "full model", "compute": 1.0, "nll": float(full.nll_W.mean()),
                            "dnll_vs_full": "", "agreement": "1"})
    comp_rows = [{"comparison": r["comparison"], "arch": r["arch"], "fit": r["fit"], "target": r["target"],
                  "a": r["a"], "b": r["b"], "compute_a": r["compute_a"], "compute_b": r["compute_b"],
                  "dnll (a-b)": ci_text(r["dnll"]), "dagree (a-b)": ci_text(r["dagree"]),
                  "dsaving (a-b)": ci_text(r["dsaving"])} for r in comps]
    model_rows = [{"arch": a, **{k: v for k, v in i.items() if k not in ("exit_layers", "classifier_params")}}
                  for a, i in info.items()]
    clf_rows = [{"arch": a, "kind": k, "params_each": p} for a, i in info.items()
                for k, p in i["classifier_params"].items()]
    e = cfg.eval
    md = "\n\n".join([
        "# DYNAMAX at small scale: early exits on a Mamba LM vs a transformer LM, and three exit classifiers",
        su.prov.markdown() + f"  \nData: {su.corpus.description}; thresholds fit on {e.calib_batches} batches of "
        f"{e.batch} validation windows, reported on the next {e.test_batches} ({e.prompt_len} prompt + "
        f"{e.new_tokens} characters each, {e.new_tokens - 1} scored per window).",
        "Paper: DYNAMAX (Nogales, Gambella, Roveri, IJCNN 2025, arXiv:2504.20922): early exits on Codestral 7B Mamba "
        "vs Mistral 7B, Mamba blocks as exit classifiers; the abstract gives no number.",
        "## Models (equal parameters) and exit classifiers\n"
        "params: every parameter (embedding, blocks, exit norms); layer_params: one block; train_s: training "
        "wall-clock in this run (0 when resumed); head_share: the vocabulary head's share of the full model's "
        "FLOPs per token (cost model, batch 1).",
        report.markdown_table(model_rows, list(model_rows[0].keys()), ".4g"),
        report.markdown_table(clf_rows, ["arch", "kind", "params_each"], ".0f"),
        "## Quality vs exit depth: static truncation (every token leaves at one exit)\n"
        "compute: relative FLOPs per token (one head). dnll_vs_full: test NLL minus the full model's, paired "
        "bootstrap 95% interval over windows (* : interval excludes 0). agreement: argmax equal to the full "
        "model's, with its interval.",
        report.markdown_table(static_rows, list(static_rows[0].keys()), ".3f"),
        "## Per-token early exit at thresholds fit on calibration\n"
        "fit=compute: threshold whose calibration compute is closest to the target (blank: none within 0.05); "
        "fit=agreement: the cheapest threshold whose calibration agreement reaches the target. compute: relative "
        "FLOPs per token on test (cost model: layers, vocabulary heads at every exit passed under max softmax or "
        "once under a classifier, classifier calls, skipped-layer state updates under propagate); saving = 1 - "
        "compute [95% interval]. speedup_h200: `costs.predicted_speedup` (cost model, roofline, H200 calibrated; "
        "the decode step's host stops included) from the mean counts at batch 1, beside its spec-sheet floor; no "
        "CPU timing is claimed.",
        report.markdown_table([_fmt_row(r) for r in points], cols, ".3f"),
        "## Paired comparisons on the test windows\n"
        "Each line: arm a minus arm b, each at its own calibration-fit threshold; mean over test windows and the "
        "95% paired bootstrap interval (* : excludes 0, else no difference at this scale). compute_a / compute_b: "
        "realised relative compute (a comparison at matched compute is only as matched as these).",
        report.markdown_table(comp_rows, list(comp_rows[0].keys()) if comp_rows else ["comparison"], ".3f"),
        "## Host stops of the decode step (`eejax.exits.hlo`, read from the compiled program)\n"
        "Per generated token: data-dependent loops and conditionals that wait on the host on a GPU, at the "
        "realised mean trip counts (exits evaluated, layers per exit segment) and at the upper bound (every exit).",
        report.markdown_table(stops, list(stops[0].keys()), ".2f"),
        "Plot: `dynamax_quality_vs_compute.png` (test NLL and agreement against relative compute, every arm's "
        "threshold sweep, static truncation in black)."])
    data = {"provenance": su.prov._asdict(), "config": cfg.to_dict(), "data": su.corpus.description,
            "models": info, "static": static_rows, "operating_points": points, "comparisons": comps,
            "host_stops": stops,
            "sweeps": {arch: {arm.label: {s: {str(t): {"compute": float(sw.cost_W.mean()),
                                                       "nll": float(sw.nll_W.mean()),
                                                       "agreement": float(sw.agree_W.mean()),
                                                       "layers": float(sw.layers_W.mean()),
                                                       "exit_hist": sw.exit_hist_E.tolist()}
                                                  for t, sw in res[s].items()} for s in res}
                                  for arm, res in ev["sweeps"].items()} for arch, ev in evs.items()}}
    return Report(md, data, {"dynamax_quality_vs_compute.png": lambda path: plot(evs, path)})


# ------------------------------------------------------------------------------------------------------ main


class Setup(NamedTuple):
    cfg: Any
    args: Any
    prov: Any
    workdir: pathlib.Path
    outdir: pathlib.Path
    corpus: Any


def prepare_backbone(su: Setup, arch: str, mcfg) -> tuple[Backbone, dict]:
    cfg = su.cfg
    gd, params, train_s = train_backbone(cfg, arch, mcfg, su.corpus, su.workdir)
    ccfgs = classifier_configs(cfg, mcfg)
    clfs, clf_s = train_classifiers(cfg, arch, gd, params, ccfgs, su.corpus, su.workdir)
    c = cfg.costs
    parts = costs.decode_work(mcfg, costs.greedy_counts(mcfg), batch=c.batch, cache_len=c.cache_len, dtype=c.dtype)
    head_share = sum(p.flops for p in parts if p.name == "heads") / sum(p.flops for p in parts)
    info = {"params": mamba_lm.param_count(params),
            "layer_params": mcfg.layer_params() if arch == "mamba" else costs.lm_param_counts(mcfg)["layer"],
            "depth": mcfg.depth, "d_model": mcfg.d_model,
            "detail": (f"expand {mcfg.expand}, state {mcfg.d_state}, conv {mcfg.conv_width}, dt rank {mcfg.rank}"
                       if arch == "mamba" else f"{mcfg.num_heads} q / {mcfg.num_kv_heads} kv heads, "
                       f"{mcfg.mlp} MLP {mcfg.mlp_dim}"),
            "head_share": head_share, "train_s": train_s, "classifier_train_s": clf_s,
            "exit_layers": list(mcfg.exit_layers),
            "classifier_params": {k: v.params_each() for k, v in ccfgs.items()}}
    return Backbone(arch, mcfg, gd, params, clfs, ccfgs), info


def host_stop_table(cfg, bb: Backbone, ev: dict, windows) -> tuple[dict, list[dict]]:
    """Host stops per decode step at the realised mean trip counts (exits evaluated, layers per exit segment)
    and at the upper bound (every exit)."""
    out, rows = {}, []
    seg_max = max(np.diff([-1, *bb.mcfg.exit_layers]))
    for arm, res in ev["sweeps"].items():
        hist = sum(sw.exit_hist_E for sw in res["test"].values())
        evaluated = float(np.sum(hist * (np.arange(bb.mcfg.num_exits) + 1)) / hist.sum())
        ran = float(np.sum(hist * (np.asarray(bb.mcfg.exit_layers) + 1)) / hist.sum())
        prof = host_stop_profile(bb, arm, windows)
        mean = float(prof.host_stops((evaluated, ran / evaluated)))
        upper = float(prof.host_stops((bb.mcfg.num_exits, seg_max)))
        out[arm] = mean
        rows.append({"arch": bb.arch, "arm": arm.label, "host_stops_mean": mean, "host_stops_upper": upper})
    full = float(host_stop_profile(bb, Arm("full", "max_softmax"), windows).host_stops(1))
    rows.append({"arch": bb.arch, "arm": "full model", "host_stops_mean": full, "host_stops_upper": full})
    return out, rows


@experiment(NAME, data=lm_common.corpus)
def main(run: Run, corpus) -> Report:
    su = Setup(run.cfg, run.args, run.prov, run.workdir, run.outdir, corpus)
    print(f"data: {corpus.description}; device: {run.prov.device}", flush=True)
    cfg, e = su.cfg, su.cfg.eval
    mcfgs = model_configs(cfg, su.corpus.tokenizer.vocab_size)
    calib = lm_common.eval_windows(su.corpus.eval_ids, e.batch, e.prompt_len, e.new_tokens, 0, e.calib_batches)
    test = lm_common.eval_windows(su.corpus.eval_ids, e.batch, e.prompt_len, e.new_tokens, e.calib_batches,
                                  e.test_batches)
    evs, info, points, stops = {}, {}, [], []
    for arch in ARCHS:
        bb, info[arch] = prepare_backbone(su, arch, mcfgs[arch])
        t0 = time.perf_counter()
        evs[arch] = evaluate(cfg, bb, calib, test)
        host, rows = host_stop_table(cfg, bb, evs[arch], test)
        stops += rows
        points += operating_points(cfg, bb, evs[arch], calib, host)
        info[arch]["eval_s"] = time.perf_counter() - t0
    comps = comparisons(cfg, evs)
    return write_report(cfg, su, info, evs, points, comps, stops)


if __name__ == "__main__":
    main()
