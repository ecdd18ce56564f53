"""CBNet at small scale: a converting autoencoder + a small classifier, against BranchyNet-style exits.

    python -m experiments.cbnet --config configs/cbnet.py:smoke [--outdir DIR]

1. A BranchyNet-style multi-exit CNN (eejax/models/perceiver.py without the latent branch; a linear exit after every
   stage) is trained with the mean CE over its exits; a classifier of the first exit's architecture is also trained
   directly on raw images (the baseline PAPERS.md asks for).
2. Conversion targets, from the TRAIN split only: for each class, the train image the CNN's first exit classifies
   most confidently as its own class.
3. The converting autoencoder learns x -> target[label(x)] (MSE) on the train split. A control: an MLP classifier
   with the encoder's widths, trained directly. Every network here gets ONE training budget (the config's budget
   rule: equal examples seen, enforced by configs/cbnet.py's validate), so no arm is helped by more training.
4. Test: accuracy, FLOPs per image (the autoencoder counted) and measured batched CPU latency of CBNet
   (classifier(autoencoder(x)), the classifier = the CNN truncated at exit 1), the small classifiers alone, the full
   CNN, and BranchyNet exits with max-softmax thresholds fit on validation (MSDNet's budgeted protocol), executed by
   the engine (bucket-cascade executor; exits asserted equal to the simulated ones).
5. Every accuracy comparison with CBNet is paired on the test set (the same images): the difference and its
   paired bootstrap interval (``eejax.eval.bootstrap``); predictions are kept in ``cbnet_predictions.npz``.
   Earlier runs of the folder (``eval.earlier_runs``) are read, hashed (provenance ``inputs``) and their CBNet and
   control rows shown beside the new ones, so a control's number never disappears when its budget changes.
CBNet is an input transform, not a depth exit: it is compared on accuracy, FLOPs and latency, not on depth saved.
"""
from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from eejax.data import pipeline
from eejax.eval import bootstrap, budgeted
from eejax.eval import report as report_lib
from eejax.exits import costs, engine, losses
from eejax.harness import results as result_files
from eejax.models import cbnet as cbnet_lib
from eejax.models import perceiver as perceiver_lib
from eejax.nn.layers import build as nn_build
from eejax.train import Trainer, make_optimizer
from experiments import _common_vision as vision
from experiments._common import Report, Run, experiment


def cnn_config(cfg, depth: int | None = None) -> perceiver_lib.PerceiverConfig:
    kw = dict(cfg.model.to_dict(), latent_tokens=0, num_classes=10)
    if depth is not None:
        kw["depth"] = depth
    return perceiver_lib.PerceiverConfig(**kw)


def ae_config(cfg) -> cbnet_lib.AutoencoderConfig:
    m = cfg.model
    return cbnet_lib.AutoencoderConfig((m.image_size, m.image_size, m.channels), tuple(cfg.autoencoder.hidden))


def exits_loss(graphdef):
    """BranchyNet's joint training: the (equally weighted) mean CE over the exits."""
    def loss_fn(params, batch, ctx):
        del ctx
        logits = nnx.merge(graphdef, params).all_exits(batch["image"]).logits_ExBxC
        e = logits.shape[0]
        loss, ce_E = losses.multi_exit_ce(logits, batch["label"], jnp.full((e,), 1.0 / e))
        acc = jnp.mean(jnp.argmax(logits[-1], -1) == batch["label"])
        return loss, {"ce_first": ce_E[0], "ce_last": ce_E[-1], "acc_last": acc}
    return loss_fn


def train_cnn(cfg, mcfg, train_ds, workdir, name):
    graphdef, params = perceiver_lib.build(mcfg, cfg.seed)
    batches = pipeline.BatchIterator(train_ds, cfg.data.batch_size, seed=cfg.seed, **vision.host_slice())
    with Trainer(exits_loss(graphdef), params, make_optimizer(cfg.train.optim), workdir=workdir / name,
                 seed=cfg.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(batches, cfg.train.steps, desc=name).params
    return graphdef, params


def normalized_images(ds, index):
    """The images ``ds[index]`` exactly as the batch iterator feeds them (normalised)."""
    sub = ds.subset(np.asarray(index), ds.split)
    return next(iter(pipeline.BatchIterator(sub, len(sub), shuffle=False)))["image"]


def build_targets(graphdef, params, train_ds, cfg) -> cbnet_lib.Targets:
    """The easy image of each class, from the train split: the first exit's most confident image of the class."""
    if train_ds.split != "train":
        raise ValueError(f"conversion targets come from the train split only, got the {train_ds.split!r} split")
    @jax.jit
    def first_probs(params, x):
        return jax.nn.softmax(nnx.merge(graphdef, params).static(x, 0), -1)

    probs = np.concatenate([np.asarray(first_probs(params, x))[:n]
                            for x, n in vision.padded_eval_images(train_ds, cfg)])
    t = cbnet_lib.conversion_targets(probs, train_ds.labels_N, np.zeros((len(train_ds), 1)))
    return t._replace(images_KxHxWxC=normalized_images(train_ds, t.index_K))


def train_autoencoder(cfg, targets, train_ds, workdir):
    graphdef, params = cbnet_lib.build(ae_config(cfg), cfg.seed)
    tgt = jnp.asarray(targets.images_KxHxWxC)

    def loss_fn(params, batch, ctx):
        del ctx
        mse = cbnet_lib.conversion_loss(nnx.merge(graphdef, params)(batch["image"]), tgt, batch["label"])
        return mse, {"mse": mse}

    batches = pipeline.BatchIterator(train_ds, cfg.train_ae.batch_size, seed=cfg.seed + 1, **vision.host_slice())
    with Trainer(loss_fn, params, make_optimizer(cfg.train_ae.optim), workdir=workdir / "autoencoder",
                 seed=cfg.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(batches, cfg.train_ae.steps, desc="autoencoder").params
    return graphdef, params


class EncoderMlp(nnx.Module):
    """A control: an MLP classifier with the autoencoder's encoder widths (P-h1-...-hk-K), trained directly. The
    encoder must recognise the class to emit its prototype, so this measures how much of CBNet's accuracy an MLP
    of that size has on its own."""

    def __init__(self, acfg: cbnet_lib.AutoencoderConfig, num_classes: int, *, rngs: nnx.Rngs):
        dims = mlp_dims(acfg, num_classes)
        self.dense = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x_BxHxWxC):
        h = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
        for i, layer in enumerate(self.dense):
            h = layer(h) if i == len(self.dense) - 1 else jax.nn.relu(layer(h))
        return h


def train_mlp(cfg, train_ds, workdir):
    """The encoder-sized MLP classifier, trained with the classifiers' budget and optimizer (the CNNs' steps,
    batch and schedule; the budget rule makes that the autoencoder's number of examples too)."""
    acfg = ae_config(cfg)
    graphdef, params = nn_build(lambda rngs: EncoderMlp(acfg, 10, rngs=rngs), cfg.seed)

    def loss_fn(params, batch, ctx):
        del ctx
        logits = nnx.merge(graphdef, params)(batch["image"])
        ce = jnp.mean(losses.cross_entropy(logits, batch["label"]))
        return ce, {"acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    batches = pipeline.BatchIterator(train_ds, cfg.data.batch_size, seed=cfg.seed, **vision.host_slice())
    with Trainer(loss_fn, params, make_optimizer(cfg.train.optim), workdir=workdir / "encoder_mlp",
                 seed=cfg.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(batches, cfg.train.steps, desc="encoder-sized MLP").params
    dims = mlp_dims(acfg)
    return graphdef, params, sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def mlp_dims(acfg, num_classes: int = 10) -> tuple[int, ...]:
    return (acfg.pixels,) + tuple(int(h) for h in acfg.hidden) + (num_classes,)


def predict(fn, params, ds, cfg):
    """argmax of ``fn(params, x)`` over ``ds`` in order."""
    jfn = jax.jit(lambda p, x: jnp.argmax(fn(p, x), -1))
    return np.concatenate([np.asarray(jfn(params, x))[:n] for x, n in vision.padded_eval_images(ds, cfg)])


def conversion_mse(ae, params, ds, targets, cfg) -> float:
    """Mean squared distance of each converted image to its class's target, over ``ds``."""
    fn = jax.jit(ae)
    sq, off = [], 0
    for x, n in vision.padded_eval_images(ds, cfg):
        conv = np.asarray(fn(params, x))[:n]
        want = targets.images_KxHxWxC[ds.labels_N[off:off + n]]
        sq.append(np.mean(np.square(conv - want).reshape(n, -1), axis=1))
        off += n
    return float(np.mean(np.concatenate(sq)))


def latency(fn, args, cfg) -> float:
    """Measured ms per batch of ``eval.latency_batch`` (compiled first; batched, CPU): the median of the timed
    calls, which other jobs on the shared CPU disturb less than the mean."""
    return 1e3 * float(np.median(costs.measure(jax.jit(fn), *args, warmup=2, iters=cfg.eval.latency_iters).times_s))


def paired_differences(pred_by_name: dict[str, np.ndarray], labels_N: np.ndarray, ref: str,
                       seed: int = 0) -> list[dict]:
    """Accuracy of ``ref`` minus each other row's, in points, with the paired bootstrap 95% interval over the test
    images (the same images for both arms) and its reading."""
    ok = {k: (v == labels_N).astype(np.float64) for k, v in pred_by_name.items()}
    out = []
    for name, c in ok.items():
        if name == ref:
            continue
        d = bootstrap.paired_bootstrap(100 * ok[ref], 100 * c, seed=seed)
        out.append({"comparison": f"{ref} - {name}", "diff_points": d.diff, "ci95_lo": d.lo, "ci95_hi": d.hi,
                    "reading": d.reading("CBNet", "the row")})
    return out


def earlier_rows(paths, prov) -> list[dict]:
    """The CBNet and control rows of earlier runs' result JSONs (read and hashed as inputs of this run), labelled
    with their commit: a control's number stays in the table when a later run changes its budget."""
    rows = []
    for path in paths:
        with open(path) as f:
            old = json.load(f)
        art = result_files.record_input(prov, path, "earlier run of this folder", producer=old["provenance"])
        steps, batch = old["config"]["train"]["steps"], old["config"]["data"]["batch_size"]
        for r in old["results"]["rows"]:
            if r["model"].startswith(("CBNet: autoencoder", "control:")):
                rows.append({"run": f"commit {old['provenance']['commit']} ({art.sha256[:8]})",
                             "CNN budget": f"{steps} x {batch}", "model": r["model"], "test_acc": r["test_acc"],
                             "MFLOPs": r["MFLOPs"]})
    return rows


def plot_conversions(x_BxHxWxC, conv_BxHxWxC, targets_KxHxWxC, path, title):
    n = x_BxHxWxC.shape[0]
    fig = Figure(figsize=(1.2 * max(n, targets_KxHxWxC.shape[0]), 4))
    rows = [("input (test)", x_BxHxWxC), ("converted", conv_BxHxWxC), ("class targets (train)", targets_KxHxWxC)]
    axes = fig.subplots(3, max(n, targets_KxHxWxC.shape[0]), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(axes.shape[1]):
            ax = axes[r, c]
            ax.axis("off")
            if c < imgs.shape[0]:
                ax.imshow(np.asarray(imgs[c])[..., 0], cmap="gray")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)


def forwards(graphdef, s_graphdef, m_graphdef, a_graphdef, mcfg) -> types.SimpleNamespace:
    """Every compared model as ``fn(params, x) -> logits`` (CBNet: the autoencoder, then a classifier)."""
    def trunc(p, x):
        return nnx.merge(graphdef, p).static(x, 0)

    def full(p, x):
        return nnx.merge(graphdef, p).static(x, mcfg.depth - 1)

    def direct(p, x):
        return nnx.merge(s_graphdef, p).static(x, 0)

    def mlp(p, x):
        return nnx.merge(m_graphdef, p)(x)

    def ae(p, x):
        return nnx.merge(a_graphdef, p)(x)

    def cbnet_trunc(p, x):
        return cbnet_lib.pipeline(lambda z: ae(p[0], z), lambda z: trunc(p[1], z), x)

    def cbnet_direct(p, x):
        return cbnet_lib.pipeline(lambda z: ae(p[0], z), lambda z: direct(p[1], z), x)

    return types.SimpleNamespace(trunc=trunc, full=full, direct=direct, mlp=mlp, ae=ae, cbnet_trunc=cbnet_trunc,
                                 cbnet_direct=cbnet_direct)


def branchynet_exits(cfg, graphdef, params, mcfg, ec, val, test, xb):
    """BranchyNet exits: the budgeted curve from cached softmaxes, some priors executed by the engine."""
    labels = test.labels_N
    probs_val = vision.exit_probs(graphdef, params, val, cfg)
    probs_test = vision.exit_probs(graphdef, params, test, cfg)
    curve = budgeted.budgeted_curve(probs_val, val.labels_N, probs_test, labels, ec.cum_flops_E)
    conf_test = probs_test.max(-1)

    def dyn(p, x, t):
        return nnx.merge(graphdef, p).dynamic(x, t, executor=engine.BucketCascade()).logits_BxC

    exit_rows, exit_preds = [], {}
    for prior in cfg.eval.executed_priors:
        point, e_run, pred, agree = vision.run_prior(graphdef, params, test, cfg, curve, conf_test, prior)
        thr = point.thresholds_E
        exit_preds[f"BranchyNet exits, prior {point.prior:g}"] = pred
        exit_rows.append({"model": f"BranchyNet exits, prior {point.prior:g} (engine, bucket cascade)",
                          "test_acc": 100 * float(np.mean(pred == labels)),
                          "MFLOPs": costs.expected_flops(e_run, ec.cum_flops_E) / 1e6,
                          f"ms_per_batch{xb.shape[0]}": latency(dyn, (params, xb, jnp.asarray(thr, jnp.float32)),
                                                                cfg),
                          "exit_fractions": " / ".join(f"{f:.2f}" for f in
                                                       np.bincount(e_run, minlength=mcfg.depth) / len(e_run)),
                          "sim_agrees": agree})
    acc_E = (probs_test.argmax(-1) == labels[None]).mean(1)
    return curve, acc_E, exit_rows, exit_preds


@experiment("cbnet", data=vision.splits)
def main(run: Run, data) -> Report:
    cfg, (train_ds, val, test), workdir = run.cfg, data, run.workdir
    print(vision.describe(cfg, data))

    mcfg, scfg, acfg = cnn_config(cfg), cnn_config(cfg, depth=1), ae_config(cfg)
    graphdef, params = train_cnn(cfg, mcfg, train_ds, workdir, "branchynet")
    s_graphdef, s_params = train_cnn(cfg, scfg, train_ds, workdir, "small_direct")
    targets = build_targets(graphdef, params, train_ds, cfg)
    a_graphdef, a_params = train_autoencoder(cfg, targets, train_ds, workdir)
    m_graphdef, m_params, mlp_flops = train_mlp(cfg, train_ds, workdir)

    ec = perceiver_lib.flops(mcfg)
    ae_flops = cbnet_lib.autoencoder_flops(acfg)
    small_flops = perceiver_lib.flops(scfg).static_flops_E[0]
    assert abs(small_flops - ec.static_flops_E[0]) < 1e-6   # the same architecture as the truncated CNN
    f = forwards(graphdef, s_graphdef, m_graphdef, a_graphdef, mcfg)

    xb = vision.first_batch(test, cfg.eval.latency_batch)
    labels = test.labels_N
    static_rows, preds = [], {}
    for name, fn, p, flops in (
            (f"full CNN ({mcfg.depth} stages, static)", f.full, params, ec.static_flops_E[-1]),
            ("small classifier = CNN truncated at exit 1 (raw images)", f.trunc, params, ec.static_flops_E[0]),
            ("small classifier trained directly (raw images)", f.direct, s_params, small_flops),
            ("CBNet: autoencoder + truncated CNN (exit 1)", f.cbnet_trunc, (a_params, params),
             ae_flops + ec.static_flops_E[0]),
            ("CBNet variant: autoencoder + directly trained small classifier", f.cbnet_direct, (a_params, s_params),
             ae_flops + small_flops),
            (f"control: MLP {'-'.join(map(str, mlp_dims(acfg)))} (the encoder's widths) trained directly, "
             "same budget", f.mlp, m_params, mlp_flops)):
        pred = preds[name] = predict(fn, p, test, cfg)
        static_rows.append({"model": name, "test_acc": 100 * float(np.mean(pred == labels)), "MFLOPs": flops / 1e6,
                            f"ms_per_batch{xb.shape[0]}": latency(fn, (p, xb), cfg)})
    ae_ms = latency(f.ae, (a_params, xb), cfg)
    conv_mse = conversion_mse(f.ae, a_params, test, targets, cfg)
    curve, acc_E, exit_rows, exit_preds = branchynet_exits(cfg, graphdef, params, mcfg, ec, val, test, xb)
    preds.update(exit_preds)
    cb = static_rows[3]
    at_cb = float(vision.interp_curve(curve, cb["MFLOPs"] * 1e6))
    paired = paired_differences(preds, labels, cb["model"], cfg.seed)
    earlier = earlier_rows(cfg.eval.earlier_runs, run.prov)
    autoencoder = {"MFLOPs": ae_flops / 1e6, "ms_per_batch": ae_ms, "test_conversion_mse": conv_mse}
    sample = normalized_images(test, np.arange(8))
    conversions = (sample, jax.jit(f.ae)(a_params, jnp.asarray(sample)))
    compared = {"paired": paired, "earlier": earlier, "preds": preds}
    return report(run, data, static_rows, exit_rows, curve, acc_E, ec, mcfg, acfg, targets, autoencoder, at_cb,
                  conversions, xb, compared)


def report(run, data, static_rows, exit_rows, curve, acc_E, ec, mcfg, acfg, targets, autoencoder, at_cb,
           conversions, xb, compared) -> Report:
    cfg, (train_ds, val, test) = run.cfg, data
    ae_mflops, ae_ms, conv_mse = (autoencoder[k] for k in ("MFLOPs", "ms_per_batch", "test_conversion_mse"))
    cb = static_rows[3]
    paired, earlier, preds = compared["paired"], compared["earlier"], compared["preds"]
    key = f"ms_per_batch{xb.shape[0]}"
    plots = {
        "cbnet_accuracy_flops.png": lambda path: report_lib.plot_accuracy_vs_flops(
            {"BranchyNet exits (budgeted, test)": [(c.expected_flops, 100 * c.accuracy) for c in curve]},
            [(ec.static_flops_E[e], 100 * acc_E[e], f"exit{e + 1}") for e in range(mcfg.depth)]
            + [(r["MFLOPs"] * 1e6, r["test_acc"], lbl)
               for r, lbl in zip(static_rows[2:], ("direct", "CBNet", "CBNet'", "MLP"))],
            path, title=f"CBNet vs BranchyNet exits on {cfg.data.name} (test)"),
        "cbnet_conversions.png": lambda path: plot_conversions(
            *conversions, targets.images_KxHxWxC, path, f"{cfg.data.name}: test inputs, conversions, targets"),
        "cbnet_predictions.npz": lambda path: np.savez_compressed(
            path, labels=test.labels_N, names=np.asarray(list(preds)),
            preds=np.stack([preds[k] for k in preds]).astype(np.int8))}
    rows = static_rows + exit_rows
    cols = ["model", "test_acc", "MFLOPs", key, "exit_fractions", "sim_agrees"]
    rows = [{c: r.get(c, "") for c in cols} for r in rows]
    md = "\n\n".join([
        f"# CBNet at small scale on {cfg.data.name}",
        run.prov.markdown() + "  \n"
        + vision.data_line(cfg, train_ds, val, test) +
        f"Scale: CNN = stride-4 conv stem + {mcfg.depth} residual conv stages of width {mcfg.width} on a "
        f"{mcfg.grid}x{mcfg.grid} grid, a linear exit after each, {cfg.train.steps} steps of batch "
        f"{cfg.data.batch_size} (the directly trained small classifier: the same); autoencoder dense "
        f"{'-'.join(map(str, acfg.dims))}, {cfg.train_ae.steps} steps of batch {cfg.train_ae.batch_size}, MSE to "
        "the easy image of the input's class. FLOPs are analytic (2 per multiply-add); the autoencoder is counted "
        "in CBNet's cost; BranchyNet's cost counts every exit head evaluated. Energy is not measured (FLOPs are "
        f"the proxy). Latency: median of {cfg.eval.latency_iters} timed calls on one test batch of {xb.shape[0]}, "
        f"{result_files.device_description()}, a CPU shared with other jobs (noisy).",
        "Paper (arXiv:2403.07036, abstract): up to 4.8x lower inference latency and 79% less energy than competing "
        "techniques (BranchyNet, AdaDeep, SubFlow) at similar or higher accuracy, on MNIST / FMNIST / KMNIST, Raspberry "
        "Pi 4, a Google Cloud instance and a K80 GPU. Ours is a CPU-sized reproduction of the mechanism.",
        f"Conversion targets (train split indices {targets.index_K.tolist()}, first-exit probability of their "
        f"class {np.round(targets.confidence_K, 4).tolist()}); test conversion MSE to the class target "
        f"{conv_mse:.4f}. Plot of conversions: `cbnet_conversions.png`.",
        "## Test accuracy, FLOPs and measured latency\n"
        f"Autoencoder alone: {ae_mflops:.3f} MFLOPs, {ae_ms:.2f} ms per batch of {xb.shape[0]}. Per-exit test "
        f"accuracy of the CNN: {' / '.join(f'{100 * a:.2f}' for a in acc_E)}. BranchyNet's budgeted accuracy at "
        f"CBNet's FLOPs ({cb['MFLOPs']:.3f} M): {100 * at_cb:.2f}% (interpolated; NaN = outside its range). "
        "Plot: `cbnet_accuracy_flops.png`. sim_agrees: executed exits equal to the simulated ones (asserted).",
        report_lib.markdown_table(rows, cols),
        "## CBNet against every other row, paired on the test images\n"
        "diff_points: CBNet's test accuracy minus the row's, in points; ci95: paired bootstrap 95% interval over the "
        f"{len(test)} test images (10,000 resamples, `eejax.eval.bootstrap.paired_bootstrap`). An interval holding "
        "0 reads \"no difference at this scale\".",
        report_lib.markdown_table(paired, list(paired[0]), ".2f"),
        "## Earlier runs of this folder (their CBNet and control rows, kept)\n"
        + (report_lib.markdown_table(earlier, list(earlier[0]), ".2f") if earlier
           else "none given (eval.earlier_runs)")])
    return Report(md, {
        "results": {"rows": rows, "autoencoder": autoencoder,
                    "targets": {"split": "train", "index": targets.index_K.tolist(),
                                "confidence": targets.confidence_K.tolist()},
                    "paired_differences": paired, "earlier_runs": earlier,
                    "cnn_acc_E": acc_E.tolist(), "cum_flops": ec.cum_flops_E.tolist(),
                    "static_flops": ec.static_flops_E.tolist(), "branchynet_acc_at_cbnet_flops": at_cb,
                    "budgeted": vision.budgeted_rows(curve)}}, plots)


if __name__ == "__main__":
    main()
