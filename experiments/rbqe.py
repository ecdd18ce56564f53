"""RBQE at small scale: a staged enhancer of JPEG-compressed digits that stops at the first stage whose output a
blind quality score accepts (arXiv:2006.16581).

    python -m experiments.rbqe --config configs/rbqe.py:smoke [--outdir DIR] [--workdir DIR]

One blind model (``eejax.models.enhancer``) is trained on images re-compressed at every QF of ``data.qualities``,
mixed, on the mean over exits of the MSE to the clean image; with ``train.specialists``, one model per QF is trained
the same way on that QF alone (the paper's QF-specific models). For every validation and test image and every exit:
the blockiness score of the output (blind: no reference) and the dPSNR (full reference, for evaluation only). The
blind rule exits at the first stage whose score >= T (RBQE's rule; T swept over validation quantiles, one point fit
on validation); the fixed-depth arms run a number of stages; the oracle takes the stage of best true dPSNR (it reads
the clean image: a bound, not a method). The fitted T is executed by the engine (``Enhancer.dynamic``, masked loop)
and checked against the simulated exits.

Where it differs from the released code (RyanXingQL/RBQE): its test script picks the output from the known
compression level, not the blind score; here the blind score decides. Its IQA is a Tchebichef-moment score computed
offline in MATLAB; here a blockiness ratio on the 8x8 grid (``eejax.exits.image_quality``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data import jpeg
from eejax.eval import bootstrap, budgeted, report
from eejax.exits import image_quality as iq
from eejax.models import enhancer as enh
from experiments import _common_tokens as tx
from experiments import _common_vision as cv
from experiments._common import Report, Run, experiment

NAME = "rbqe"
PAPER = ("arXiv:2006.16581 (abstract): no number, \"state-of-the-art in both blind quality enhancement and "
         "resource efficiency\"; released code: JPEG QF {10..50}, 5 nested outputs of 10.2 / 14.7 / 18.7 / 22.9 / "
         "27.6 GFLOPs, exit at the first output whose IQA score >= 0.67 (JPEG)")


# ------------------------------------------------------------------------------------------------ data, training


def compressed(ds, qualities):
    """``(inputs_QxNxHxWxC, clean_NxHxWxC)`` in [0, 1]."""
    levels = jpeg.recompress_levels(ds.images_NxHxWxC, qualities)
    return levels.astype(np.float32) / 255.0, ds.images_NxHxWxC.astype(np.float32) / 255.0


def load(cfg, data_dir):
    train, val, test = cv.load_data(cfg, data_dir)
    val = val.subset(np.arange(min(cfg.eval.val_size, len(val))), "validation")
    qs = tuple(cfg.data.qualities)
    return {"sizes": (len(train), len(val), len(test)), "train": compressed(train, qs), "val": compressed(val, qs),
            "test": compressed(test, qs)}


def mse_loss(graphdef):
    """The mean over exits of the MSE to the clean image (every output supervised, as RBQE trains its nested
    outputs)."""
    def loss_fn(params, batch, ctx):
        del ctx
        imgs = nnx.merge(graphdef, params).all_exits(batch["x"])
        mse_E = jnp.mean((imgs - batch["y"][None]) ** 2, axis=(1, 2, 3, 4))
        return mse_E.mean(), {"mse_first": mse_E[0], "mse_last": mse_E[-1]}
    return loss_fn


def fit(run: Run, mcfg, x_MxHxWxC, y_MxHxWxC, name: str):
    graphdef, params = enh.build(mcfg, run.cfg.seed)
    params, seconds = tx.fit(mse_loss(graphdef), params, {"x": x_MxHxWxC, "y": y_MxHxWxC}, run.cfg.train,
                             run.workdir / name, seed=run.cfg.seed, log_every=run.cfg.log_every, desc=name)
    return graphdef, params, seconds


# ------------------------------------------------------------------------------------------------ evaluation


def per_exit(graphdef, params, x_QxNxHxWxC, y_NxHxWxC, bs: int):
    """Blind score and dPSNR of every exit, ``E x Q x N`` each."""
    def scores(p, x, y):   # B x E each (tx.batched concatenates along the leading axis)
        imgs = nnx.merge(graphdef, p).all_exits(x)
        return jax.vmap(iq.blockiness_quality)(imgs).T, jax.vmap(lambda im: iq.delta_psnr(im, x, y))(imgs).T

    fn = jax.jit(scores)
    out = [tx.batched(lambda b: fn(params, b["x"], b["y"]), {"x": x_q, "y": y_NxHxWxC}, bs) for x_q in x_QxNxHxWxC]
    return np.stack([o[0].T for o in out], 1), np.stack([o[1].T for o in out], 1)


def blind_exits(score_ExM: np.ndarray, thr: float) -> np.ndarray:
    """RBQE's rule: the first exit whose score >= thr, the last otherwise."""
    ok = score_ExM >= thr
    return np.where(ok.any(0), np.argmax(ok, 0), score_ExM.shape[0] - 1)


def _diff(d: bootstrap.Difference, a: str, b: str) -> dict:
    return {"dB": d.diff, "95% CI": f"[{d.lo:+.3f}, {d.hi:+.3f}]", "reading": d.reading(a, b)}


def sweep(cfg, sv, gv, st, gt, cum_E, static_E):
    """The threshold sweep (validation and test), each test point against the fixed-depth mix of equal FLOPs."""
    n_e = sv.shape[0]
    sv2, gv2, st2, gt2 = (a.reshape(n_e, -1) for a in (sv, gv, st, gt))
    cands = np.concatenate([np.unique(np.quantile(sv2[:-1], np.linspace(0, 1, cfg.eval.num_thresholds))), [np.inf]])
    curve = []
    for t in cands:
        ev, et = blind_exits(sv2, t), blind_exits(st2, t)
        g = gt2[et, np.arange(et.size)]
        flops = float(np.mean(cum_E[et]))
        mix = budgeted.static_mix(gt2, static_E, flops)
        d = bootstrap.paired_bootstrap(g, mix, resamples=cfg.eval.resamples) if mix is not None else None
        curve.append({"threshold": float(t), "val_depth": float(np.mean(ev + 1)),
                      "val_dpsnr": float(gv2[ev, np.arange(ev.size)].mean()), "test_depth": float(np.mean(et + 1)),
                      "test_dpsnr": float(g.mean()), "test_MFLOPs": flops / 1e6,
                      "blind - fixed depth, same FLOPs": "outside the fixed range" if d is None else
                      f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]",
                      "reading": "" if d is None else d.reading("blind", "fixed depth")})
    full_val = float(gv2[-1].mean())
    ok = [c for c in curve if c["val_dpsnr"] >= cfg.eval.depth_fraction * full_val]
    return curve, min(ok, key=lambda c: c["val_depth"]), full_val


def per_qf(qs, x_test, st, gt, thr, specialists):
    """Per QF at the operating threshold: depth and dPSNR of the blind exit, full depth, the oracle, and the blind
    model minus the QF's specialist (paired over test images)."""
    e_t = blind_exits(st.reshape(st.shape[0], -1), thr).reshape(st.shape[1:])
    e_or = np.argmax(gt, 0)
    rows, comps = [], []
    for qi, q in enumerate(qs):
        idx = np.arange(gt.shape[2])
        blind_q = gt[e_t[qi], qi, idx]
        rows.append({"QF": q, "input blockiness": float(np.asarray(iq.blockiness_quality(jnp.asarray(x_test[qi])))
                                                         .mean()),
                     "blind depth": float(np.mean(e_t[qi] + 1)), "blind dPSNR": float(blind_q.mean()),
                     "full-depth dPSNR": float(gt[-1, qi].mean()), "oracle depth": float(np.mean(e_or[qi] + 1)),
                     "oracle dPSNR": float(gt[e_or[qi], qi, idx].mean()),
                     "specialist dPSNR": float(specialists[qi].mean()) if specialists is not None else None})
        if specialists is not None:
            for arm, g in (("blind model, full depth", gt[-1, qi]), ("blind model, blind exit", blind_q)):
                comps.append({"QF": q, "comparison": f"{arm} minus QF-{q} specialist (full depth)",
                              **_diff(bootstrap.paired_bootstrap(g, specialists[qi]), "blind", "specialist")})
    return rows, comps, e_t


def executed(graphdef, params, x_test, thr, e_sim_QxN, score_ExQxN, bs: int) -> dict:
    """The engine's exits at the operating threshold against the simulated ones, over every row and over the rows
    whose scores are all clear of the threshold (a score within ``cv.TIE_EPS`` may flip under float reassociation)."""
    dyn = jax.jit(lambda p, x: nnx.merge(graphdef, p).dynamic(x, jnp.float32(thr)).exit_B)
    e_run = np.stack([tx.batched(lambda b: dyn(params, b["x"]), {"x": x_q}, bs) for x_q in x_test]).ravel()
    e_sim = e_sim_QxN.ravel()
    score = score_ExQxN.reshape(score_ExQxN.shape[0], -1)
    clear = np.all(np.abs(score - thr) > cv.TIE_EPS, 0) if np.isfinite(thr) else np.ones(e_sim.size, bool)
    return {"threshold": thr, "rows": int(e_sim.size), "rows_clear_of_threshold": int(clear.sum()),
            "exits_equal_clear": float(np.mean(e_run[clear] == e_sim[clear])),
            "exits_equal_all": float(np.mean(e_run == e_sim))}


# ------------------------------------------------------------------------------------------------ the run


@experiment(NAME, data=lambda cfg, args: load(cfg, args.data_dir))
def main(run: Run, data) -> Report:
    cfg, qs = run.cfg, tuple(run.cfg.data.qualities)
    mcfg, bs = enh.EnhancerConfig(**cfg.model.to_dict()), cfg.data.eval_batch_size
    (xt, yt), (xv, yv), (xs, ys) = data["train"], data["val"], data["test"]
    print(f"data {cfg.data.name}: train / val / test {data['sizes']} images x QFs {qs}")
    graphdef, params, train_s = fit(run, mcfg, xt.reshape((-1,) + xt.shape[2:]), np.tile(yt, (len(qs), 1, 1, 1)),
                                    "blind")
    spec, spec_s = None, []
    if cfg.train.specialists:
        spec = []
        for qi, q in enumerate(qs):
            gd, p, s = fit(run, mcfg, xt[qi], yt, f"qf{q}")
            spec.append(per_exit(gd, p, xs[qi:qi + 1], ys, bs)[1][-1, 0])
            spec_s.append(s)
    sv, gv = per_exit(graphdef, params, xv, yv, bs)
    st, gt = per_exit(graphdef, params, xs, ys, bs)
    cum = np.asarray(enh.flops(mcfg).cum_flops_E)                 # blind: every head and its score on the way
    static = np.asarray(enh.flops(mcfg, iqa=False).static_flops_E)
    curve, op, full_val = sweep(cfg, sv, gv, st, gt, cum, static)
    rows_qf, comps_qf, e_t = per_qf(qs, xs, st, gt, op["threshold"], spec)
    gt2 = gt.reshape(mcfg.stages, -1)
    blind_g = gt2[e_t.ravel(), np.arange(e_t.size)]
    compare = [{"comparison": "oracle minus blind (operating point)",
                **_diff(bootstrap.paired_bootstrap(gt2.max(0), blind_g, resamples=cfg.eval.resamples), "oracle",
                        "blind")}]
    results = {"curve": curve, "operating_point": op, "per_qf": rows_qf, "specialists": comps_qf,
               "static": [{"stages": e + 1, "test dPSNR": float(gt2[e].mean()), "MFLOPs": static[e] / 1e6}
                          for e in range(mcfg.stages)],
               "compare": compare, "executed": executed(graphdef, params, xs, op["threshold"], e_t, st, bs),
               "train_s": {"blind": train_s, "specialists": spec_s}, "full_val_dpsnr": full_val,
               "cum_flops": cum.tolist(), "static_flops": static.tolist(), "encoder": jpeg.encoder_info(),
               "test_inputs_sha256": jpeg.sha256_array(np.round(xs * 255).astype(np.uint8)), "paper": PAPER}
    return Report(markdown(cfg, mcfg, run, data["sizes"], results), {"results": results},
                  {"rbqe_curves.png": lambda p: plot(cfg, results, gt2, static, p)})


def plot(cfg, r, gt2, static, path):
    curves = {"blind (threshold sweep)": [(c["test_MFLOPs"] * 1e6, c["test_dpsnr"]) for c in r["curve"]]}
    statics = [(static[e], float(gt2[e].mean()), f"S{e + 1}") for e in range(len(static))]
    report.plot_accuracy_vs_flops(curves, statics, path, ylabel="test dPSNR (dB)",
                                  title=f"RBQE blind exit vs fixed depth on {cfg.data.name} (test)")


def markdown(cfg, mcfg, run, sizes, r) -> str:
    t = report.markdown_table
    op = r["operating_point"]
    parts = [
        f"# RBQE at small scale on {cfg.data.name}",
        run.prov.markdown() + "  \n"
        f"Data: {cfg.data.name}: train {sizes[0]} / val {sizes[1]} / test {sizes[2]} images, each at QF "
        f"{', '.join(map(str, cfg.data.qualities))} (Pillow {r['encoder']['pillow']}, libjpeg "
        f"{r['encoder']['libjpeg']}).  \nScale: enhancer width {mcfg.width}, {mcfg.stages} stages of "
        f"{mcfg.convs_per_stage} 3x3 convolutions, an image head per stage; {cfg.train.steps} AdamW steps of batch "
        f"{cfg.train.batch_size} per model (blind model {r['train_s']['blind']:.0f} s"
        + (f"; {len(r['train_s']['specialists'])} QF specialists, same steps each" if cfg.train.specialists else "")
        + "). MFLOPs per image (cost model): blind = stem, stages and every head and blockiness score up to the "
        "exit; fixed depth = stem, stages and one head.  \n" f"Paper: {r['paper']}.",
        "## Fixed depth (test, mean over QFs)", t(r["static"], list(r["static"][0]), ".4g"),
        f"## Per QF at the blind threshold fit on validation ({op['threshold']:.4g}: fewest stages at "
        f"{cfg.eval.depth_fraction:.0%} of full-depth validation dPSNR); the oracle picks the stage of best true "
        "dPSNR (it reads the clean image)", t(r["per_qf"], list(r["per_qf"][0]), ".4g")]
    if r["specialists"]:
        parts += ["## The one blind model against per-QF specialists (paired bootstrap over test images, dB)",
                  t(r["specialists"], list(r["specialists"][0]), ".4g")]
    parts += ["## Oracle vs blind (paired bootstrap over test images x QFs, dB)",
              t(r["compare"], list(r["compare"][0]), ".4g"),
              "## Executed by the engine at the operating threshold",
              t([r["executed"]], list(r["executed"]), ".4g"),
              "## Threshold sweep (test rows against the fixed-depth mix of equal mean FLOPs, paired bootstrap, dB)",
              t(r["curve"], list(r["curve"][0]), ".4g")]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
