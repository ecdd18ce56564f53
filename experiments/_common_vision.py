"""Shared plumbing of the vision experiments (LGViT, MuE, DeeR, Dynamic Perceiver, CBNet, JEI-DNN, the window
cascade, EEEA-Net, Make Deep Networks Shallow Again): data, evaluation passes, the engine run on a test split, and
the two recurring models. Not a paper: a shared piece.

* data: ``load_data`` (train / validation / test of an image dataset, the embedded MNIST split needing no
  download), ``host_slice`` (each host's slice of a global batch), ``padded_eval_images`` (one in-order pass whose
  last batch is zero-padded, so one compiled program serves every batch);
* multi-exit models: ``exit_probs`` (every exit's softmax, cached for simulated policies and budgeted curves),
  ``executed`` (the exits the engine takes for real), ``check_agreement`` (executed equals simulated, up to ties);
* a ViT whose every layer exits through ONE shared head (the backbone of MuE and DeeR-VLA): ``shared_head_setup``
  trains it once (in ``<workdir>/backbone`` or a shared ``cfg.model_workdir``) and caches every layer's softmax
  and layer-to-layer cosine; ``run_engine`` runs its dynamic path;
* small classifiers trained with the one Trainer: ``train_classifier`` / ``scorer`` / ``evaluate`` for any
  ``forward(model, x) -> logits`` (Shallow Again's variants, EEEA-Net's candidates), ``train_vit`` /
  ``final_probs`` / ``cached_cls`` for a plain single-head ViT (JEI-DNN's backbone, the cascade's members).

Shapes: B batch, N examples (layers in ``all_layer_outputs``' engine calls), E exits, T tokens, D width, C classes,
K classes' targets.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eejax.data import pipeline
from eejax.errors import ConfigError
from eejax.eval import budgeted
from eejax.exits import costs, engine
from eejax.models import vit as vit_lib
from eejax.nn import param_count
from eejax.train import Trainer, make_optimizer

TIE_EPS = 1e-5   # executed and simulated exits may differ only for scores this close to a threshold

# ----------------------------------------------------------------------------------------------------- data


def embedded_splits(seed: int, data_dir, val_fraction: float | None = None) -> pipeline.TrainValTest:
    """The MNIST test split shipped inside the package, as train / validation / a fixed 2,000-image test part
    (``pipeline.split_embedded``; validation ``val_fraction`` of the rest, default 1,000 images)."""
    if data_dir is not None:
        raise ConfigError("--data_dir is not used by data.name='mnist_embedded' (it ships with the "
                          "package); drop it or set --config.data.name to a file dataset")
    full = pipeline.get_dataset("mnist_embedded", "all")
    if val_fraction is None:
        return pipeline.split_embedded(full, seed)
    num_val = int(round(val_fraction * (len(full) - 2000)))  # of the pool before the fixed test part
    return pipeline.split_embedded(full, seed, num_val=num_val)


def load_data(cfg, data_dir) -> pipeline.TrainValTest:
    """``(train, val, test)`` of ``cfg.data.name``: validation carved from train (``data.val_fraction``),
    ``data.train_size`` / ``data.test_size`` cap the splits (0: all)."""
    d = cfg.data
    if d.name == "mnist_embedded":
        train, val, test = embedded_splits(cfg.seed, data_dir, d.val_fraction)
    else:
        full = pipeline.get_dataset(d.name, "train", data_dir)
        train, val = pipeline.split_train_val(full, d.val_fraction, cfg.seed)
        test = pipeline.get_dataset(d.name, "test", data_dir)
    if d.train_size:
        train = train.subset(np.arange(min(d.train_size, len(train))), "train")
    if d.test_size:
        test = test.subset(np.arange(min(d.test_size, len(test))), "test")
    # Checked against the data before any training (the timing batch is drawn from the test split).
    tb = cfg.get("eval", {}).get("throughput_batch")
    if tb is not None and tb > len(test):
        raise ConfigError(f"config.eval.throughput_batch={tb} exceeds the {len(test)} test images "
                          f"(data.test_size={d.get('test_size', 0)}); lower it or test on more images")
    return train, val, test


def splits(cfg, args) -> pipeline.TrainValTest:
    """The runner's ``data`` hook: ``load_data`` from ``--data_dir``, before any file is written."""
    return load_data(cfg, args.data_dir)


def describe(cfg, data) -> str:
    """The line every vision run prints first: the splits and the devices."""
    train, val, test = data
    return (f"data {cfg.data.name}: train {len(train)} / val {len(val)} / test {len(test)}; devices: "
            f"{jax.device_count()} x {jax.devices()[0].device_kind}")


def host_slice() -> dict[str, int]:
    """Each host loads its slice of every global batch (multi-host runs)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def padded_eval_images(ds, cfg):
    """One in-order pass as ``(images, n_real)``, the last batch zero-padded so one compiled program serves all."""
    bs = cfg.data.eval_batch_size
    for batch in pipeline.BatchIterator(ds, bs, shuffle=False, drop_remainder=False):
        x = batch["image"]
        n = x.shape[0]
        yield (np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)]) if n < bs else x), n


def first_batch(ds, batch_size: int) -> np.ndarray:
    """The first ``batch_size`` images of ``ds`` in order (the batch throughput and latency are measured on)."""
    return next(iter(pipeline.BatchIterator(ds, batch_size, shuffle=False)))["image"]


# ----------------------------------------------------------------------------------------- multi-exit models


def exit_probs(graphdef, params, ds, cfg) -> np.ndarray:
    """Every exit's softmax for every example from the scan path, ``probs_ExNxC`` (``all_exits``)."""
    @jax.jit
    def fn(params, x):
        return jax.nn.softmax(nnx.merge(graphdef, params).all_exits(x).logits_ExBxC, axis=-1)

    return np.concatenate([np.asarray(fn(params, x))[:, :n] for x, n in padded_eval_images(ds, cfg)], axis=1)


def executed(graphdef, params, ds, cfg, thr, executor=None) -> tuple[np.ndarray, np.ndarray]:
    """``(exit_N, pred_N)``: exit and prediction per example, run by the model's engine path (``dynamic``: prefix
    program, max-softmax thresholds ``thr`` (one, or one per exit), the model's default executor or ``executor``)."""
    kw = {} if executor is None else {"executor": executor}

    @jax.jit
    def fn(params, x, thr):
        out = nnx.merge(graphdef, params).dynamic(x, thr, **kw)
        return out.exit_B, jnp.argmax(out.logits_BxC, -1)

    exits, preds = [], []
    for x, n in padded_eval_images(ds, cfg):
        e, p = fn(params, x, jnp.asarray(thr, jnp.float32))
        exits.append(np.asarray(e)[:n])
        preds.append(np.asarray(p)[:n])
    return np.concatenate(exits), np.concatenate(preds)


def check_agreement(e_run, e_sim, conf_ExN, thr_E) -> float:
    """Executed exits must equal the simulated ones, except for scores within TIE_EPS of a threshold."""
    diff = np.flatnonzero(e_run != e_sim)
    finite = np.where(np.isfinite(thr_E), thr_E, 0.0)
    near = np.any(np.isfinite(thr_E)[:, None] & (np.abs(conf_ExN[:, diff] - finite[:, None]) < TIE_EPS), axis=0)
    if not np.all(near):
        raise RuntimeError(f"engine exits differ from the simulated ones for {int(np.sum(~near))} examples whose "
                           "scores are not at a threshold")
    return float(np.mean(e_run == e_sim))


def run_prior(graphdef, params, ds, cfg, curve, conf_ExQ, prior: float):
    """The budgeted ``curve``'s point at the MSDNet prior nearest ``prior``, executed by the engine (bucket-cascade
    executor) on ``ds``, its exits checked against the ones simulated from ``conf_ExQ``: ``(point, exit_Q, pred_Q,
    sim_agrees)``."""
    point = next(c for c in curve if abs(c.prior - nearest_prior(prior)) < 1e-9)
    thr = point.thresholds_E
    e_run, pred = executed(graphdef, params, ds, cfg, thr, engine.BucketCascade())
    agree = check_agreement(e_run, budgeted.simulate_exits(conf_ExQ, thr), conf_ExQ, thr)
    return point, e_run, pred, agree


def data_line(cfg, train, val, test) -> str:
    """The Data line of a vision table."""
    return (f"Data: {cfg.data.name}: train {len(train)} / val {len(val)} (carved from train) / test "
            f"{len(test)}.  \n")


def nearest_prior(p: float) -> float:
    """The MSDNet prior of ``budgeted.priors()`` closest to ``p``."""
    pr = budgeted.priors()
    return float(pr[np.argmin(np.abs(pr - p))])


def interp_curve(curve, flops):
    """Accuracy of a budgeted curve at ``flops`` (linear interpolation; NaN outside its range)."""
    xs, ys = np.asarray([(c.expected_flops, c.accuracy) for c in curve]).T
    order = np.argsort(xs)
    return np.interp(flops, xs[order], ys[order], left=np.nan, right=np.nan)


def budgeted_rows(curve) -> list[dict]:
    """A budgeted curve as JSON rows."""
    return [{"prior": c.prior, "accuracy": c.accuracy, "expected_flops": c.expected_flops,
             "thresholds": c.thresholds_E.tolist()} for c in curve]


# ------------------------------------------------------------------- a shared head after every layer (MuE, DeeR)
# Both papers train every layer's output through the model's own final head (MuE: OFA's decoder layers share the
# output projection, label-smoothed CE summed over every layer; DeeR: exits every 2 layers with a shared action
# head). So the backbone is a ViT with one linear head (``exits=[N-1]``) trained with the mean, over every layer, of
# the label-smoothed CE of that head applied to the layer's output; at inference the same head sits after every
# layer (``shared_heads``). It lives in ``<workdir>/backbone``, or in ``cfg.model_workdir`` when set, so the MuE and
# DeeR scripts can share one trained backbone: that directory is locked and bound to the fields the backbone depends
# on, so a backbone trained with another recipe is refused, not silently reused.


def shared_head_config(cfg) -> vit_lib.ViTConfig:
    """One linear head after the last layer; the engine evaluates it after every layer."""
    return vit_lib.ViTConfig(**cfg.model.to_dict(), num_classes=10, exits=[cfg.model.depth - 1],
                             head_types="linear")


def exit_layers(mcfg: vit_lib.ViTConfig) -> tuple[int, ...]:
    return tuple(range(mcfg.depth))


def all_layer_outputs(model, x_BxHxWxC):
    """Scan path: the shared head after every layer (``ExitOutputs`` with E = N)."""
    n = model.cfg.depth
    return engine.scan_exits(model.layers, [model.heads[0]] * n, model.embed(x_BxHxWxC), exit_layers(model.cfg))


def smoothed_ce(logits_ExBxC, labels_B, smoothing: float):
    c = logits_ExBxC.shape[-1]
    target = jax.nn.one_hot(labels_B, c) * (1 - smoothing) + smoothing / c
    return -jnp.mean(jnp.sum(target[None] * jax.nn.log_softmax(logits_ExBxC.astype(jnp.float32), -1), -1), axis=1)


def shared_head_loss(graphdef, smoothing: float):
    def loss_fn(params, batch, ctx):
        del ctx
        outs = all_layer_outputs(nnx.merge(graphdef, params), batch["image"])
        ce_E = smoothed_ce(outs.logits_ExBxC, batch["label"], smoothing)
        acc_E = jnp.mean(jnp.argmax(outs.logits_ExBxC, -1) == batch["label"][None], axis=1)
        return jnp.mean(ce_E), {"ce_first": ce_E[0], "ce_last": ce_E[-1], "acc_first": acc_E[0],
                                "acc_last": acc_E[-1]}
    return loss_fn


def backbone_dir(run) -> pathlib.Path:
    """``cfg.model_workdir`` (locked, bound to the fields the backbone depends on) or ``<workdir>/backbone``."""
    cfg = run.cfg
    data = {k: v for k, v in cfg.data.to_dict().items() if k not in ("eval_batch_size", "test_size")}
    base = {"seed": cfg.seed, "data": data, "model": cfg.model.to_dict(), "train": cfg.train.to_dict()}
    return run.shared_workdir(cfg.model_workdir, base, run.workdir / "backbone")


def train_backbone(cfg, train_ds, model_dir):
    """Train (or resume) the shared-head backbone in ``model_dir``; returns ``(graphdef, params)``."""
    mcfg = shared_head_config(cfg)
    graphdef, params = vit_lib.build(mcfg, cfg.seed)
    batches = pipeline.BatchIterator(train_ds, cfg.data.batch_size, seed=cfg.seed, **host_slice())
    with Trainer(shared_head_loss(graphdef, cfg.train.label_smoothing), params, make_optimizer(cfg.train.optim),
                 workdir=model_dir, seed=cfg.seed, log_every=cfg.log_every,
                 ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(batches, cfg.train.steps, desc="shared-head ViT").params
    return graphdef, params


def flat_state(h_BxTxD):
    """MuE compares the whole layer state (every token), as one vector per example."""
    return h_BxTxD.reshape(h_BxTxD.shape[0], -1).astype(jnp.float32)


def cached_outputs(graphdef, params, ds, cfg):
    """Per layer and example: the shared head's softmax ``probs_ExNxC`` and MuE's cosine similarity of the layer's
    output with its input, ``cos_ExN`` (layer 1 against the embedding)."""
    @jax.jit
    def fn(params, x):
        model = nnx.merge(graphdef, params)
        h0 = model.embed(x)
        h_last, h_ExBxTxD = engine.run_layers(model.layers, h0)
        del h_last
        flat_ExBxF = jax.vmap(flat_state)(jnp.concatenate([h0[None], h_ExBxTxD]))
        a, b = flat_ExBxF[1:], flat_ExBxF[:-1]
        cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-9)
        logits = jax.vmap(lambda h: model.heads[0](h).logits_BxC)(h_ExBxTxD)
        return jax.nn.softmax(logits, -1), cos

    probs, cos = [], []
    for x, n in padded_eval_images(ds, cfg):
        p, c = fn(params, x)
        probs.append(np.asarray(p)[:, :n])
        cos.append(np.asarray(c)[:, :n])
    return np.concatenate(probs, 1), np.concatenate(cos, 1)


def shared_heads(model, report_state: bool):
    """The shared head once per layer; ``report_state``: its ``hidden_BxD`` is the whole flattened layer state
    (what MuE's saturation policy compares)."""
    head = model.heads[0]
    if not report_state:
        return [head] * model.cfg.depth

    def full(h):
        return head(h)._replace(hidden_BxD=flat_state(h))
    return [full] * model.cfg.depth


def run_engine(model, x, policy, executor=engine.BucketCascade(), report_state: bool = False):
    """The dynamic path: the engine's prefix program over every layer, the shared head at each exit."""
    n = model.cfg.depth
    return engine.run(model.layers, shared_heads(model, report_state), model.embed(x),
                      engine.prefix(n, exit_layers(model.cfg)), policy, executor)


def executed_shared_head(graphdef, params, ds, cfg, make_policy, thr, report_state=False):
    """Exit index and prediction per example, executed by the engine (bucket-cascade executor) under
    ``make_policy(thr)``."""
    @jax.jit
    def fn(params, x, thr):
        out = run_engine(nnx.merge(graphdef, params), x, make_policy(thr), report_state=report_state)
        return out.exit_B, jnp.argmax(out.logits_BxC, -1)

    exits, preds = [], []
    for x, n in padded_eval_images(ds, cfg):
        e, p = fn(params, x, thr)
        exits.append(np.asarray(e)[:n])
        preds.append(np.asarray(p)[:n])
    return np.concatenate(exits), np.concatenate(preds)


def layer_costs(mcfg: vit_lib.ViTConfig) -> costs.ExitCosts:
    """FLOPs per exit: the shared linear head counted at every exit evaluated on the way (``cum_flops_E``)."""
    t, d = mcfg.tokens, mcfg.d_model
    layer = costs.transformer_layer_flops(t, d, mcfg.mlp_dim, mcfg.num_heads)
    return costs.exit_costs(costs.patch_embed_flops(t - 1, mcfg.patch_size ** 2 * mcfg.channels, d),
                            [layer] * mcfg.depth, exit_layers(mcfg),
                            [costs.linear_head_flops(d, mcfg.num_classes)] * mcfg.depth)


class SharedHead(NamedTuple):
    """What experiments/mue.py and experiments/deer.py start from: the data, the shared-head backbone and every
    exit's cached softmax / layer-state cosine on validation and test, and the static model's throughput."""
    train: Any
    val: Any
    test: Any
    mcfg: vit_lib.ViTConfig
    ec: costs.ExitCosts       # analytic FLOPs per exit
    graphdef: Any
    params: Any
    probs_val: np.ndarray
    cos_val: np.ndarray
    probs_test: np.ndarray
    cos_test: np.ndarray
    xb: np.ndarray            # one test batch of cfg.eval.throughput_batch images, for throughput
    static_tp: float          # images/s of the static full-depth model on xb


def shared_head_setup(run, data) -> SharedHead:
    """Train (or resume) the shared-head backbone and cache its outputs on validation and test."""
    cfg, (train_ds, val, test) = run.cfg, data
    print(describe(cfg, data))
    mcfg = shared_head_config(cfg)
    graphdef, params = train_backbone(cfg, train_ds, backbone_dir(run))
    probs_val, cos_val = cached_outputs(graphdef, params, val, cfg)
    probs_test, cos_test = cached_outputs(graphdef, params, test, cfg)
    xb = first_batch(test, cfg.eval.throughput_batch)
    static_tp = costs.throughput(jax.jit(lambda p, x: nnx.merge(graphdef, p).static(x, 0)), xb.shape[0], params, xb)
    return SharedHead(train_ds, val, test, mcfg, layer_costs(mcfg), graphdef, params, probs_val, cos_val,
                      probs_test, cos_test, xb, static_tp)


# -------------------------------------------------------------------------- small classifiers, the one Trainer
# Any ``forward(model, x_BxHxWxC) -> logits_BxC`` (plain stack, parallel groups, ...) trained with plain
# cross-entropy: Make Deep Networks Shallow Again (one model per variant and seed), EEEA-Net (one per NAS candidate).

Forward = Callable[[nnx.Module, jax.Array], jax.Array]


def ce_loss(graphdef, forward: Forward):
    def loss_fn(params, batch, ctx):
        del ctx
        logits = forward(nnx.merge(graphdef, params), batch["image"]).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return ce, {"acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return loss_fn


class Trained(NamedTuple):
    params: object
    train_seconds: float   # wall-clock of this fit (compilation included); 0 when resumed from a finished run
    steps_per_sec: float   # the trainer's last logged rate (compilation excluded); nan when not logged


def train_classifier(graphdef, params, forward: Forward, train_ds, *, steps: int, batch_size: int, optim, seed: int,
                     workdir, log_every: int, desc: str) -> Trained:
    """``steps`` of AdamW-style training (``optim``: an eejax optimizer config) from ``params``; resumes from
    ``workdir/ckpt`` when a previous run got that far."""
    workdir = pathlib.Path(workdir)
    batches = pipeline.BatchIterator(train_ds, batch_size, seed=seed, **host_slice())
    start = time.perf_counter()
    with Trainer(ce_loss(graphdef, forward), params, make_optimizer(optim), workdir=workdir, seed=seed,
                 log_every=log_every, ckpt_every=steps) as tr:
        params = tr.fit(batches, steps, desc=desc).params
    seconds = time.perf_counter() - start
    rate = float("nan")
    log = workdir / "metrics.jsonl"
    if log.exists():
        rates = [r["steps_per_sec"] for r in map(json.loads, log.read_text().splitlines()) if "steps_per_sec" in r]
        rate = float(rates[-1]) if rates else rate
    return Trained(params, seconds, rate)


def padded(ds, batch_size: int):
    """One in-order pass as ``(images, labels, n_real)``, the last batch zero-padded (one compiled program)."""
    for batch in pipeline.BatchIterator(ds, batch_size, shuffle=False, drop_remainder=False):
        x, y, n = batch["image"], batch["label"], batch["image"].shape[0]
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros((batch_size - n,), y.dtype)])
        yield x, y, n


def scorer(graphdef, forward: Forward):
    """The jitted per-example ``(cross-entropy, correct)`` of a model; build it once per model and reuse it for
    every dataset (one compilation)."""
    @jax.jit
    def fn(params, x, y):
        logits = forward(nnx.merge(graphdef, params), x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y), jnp.argmax(logits, -1) == y
    return fn


def evaluate(graphdef, params, forward: Forward, ds, batch_size: int, *, fn=None) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of the model over every example of ``ds`` (``fn``: a ``scorer``)."""
    fn = scorer(graphdef, forward) if fn is None else fn
    ce, ok = [], []
    for x, y, n in padded(ds, batch_size):
        c, o = fn(params, x, y)
        ce.append(np.asarray(c)[:n])
        ok.append(np.asarray(o)[:n])
    return float(np.concatenate(ce).mean()), float(np.concatenate(ok).mean())


num_params = param_count    # the model's stored parameters (eejax.nn.param_count)


# A plain single-head ViT trained with label-smoothed CE on its final head: JEI-DNN's frozen backbone and the
# members of the window-based cascade; evaluation caches softmaxes / CLS tokens in padded batches (one compile).


def single_head_config(model_fields: dict, **overrides) -> vit_lib.ViTConfig:
    """One linear head after the last layer (a plain classifier)."""
    fields = {**model_fields, **overrides}
    return vit_lib.ViTConfig(**fields, num_classes=10, exits=[fields["depth"] - 1], head_types="linear")


def final_head_loss(graphdef, smoothing: float):
    def loss_fn(params, batch, ctx):
        del ctx
        logits_BxC = nnx.merge(graphdef, params).all_exits(batch["image"]).logits_ExBxC[-1:]
        ce = smoothed_ce(logits_BxC, batch["label"], smoothing)[0]
        return ce, {"ce": ce, "acc": jnp.mean(jnp.argmax(logits_BxC[0], -1) == batch["label"])}
    return loss_fn


def train_vit(mcfg: vit_lib.ViTConfig, cfg, train_ds, model_dir, seed: int, desc: str):
    """Train (or resume) one classifier in ``model_dir``; returns ``(graphdef, params)``."""
    graphdef, params = vit_lib.build(mcfg, seed)
    batches = pipeline.BatchIterator(train_ds, cfg.data.batch_size, seed=seed, **host_slice())
    with Trainer(final_head_loss(graphdef, cfg.train.label_smoothing), params, make_optimizer(cfg.train.optim),
                 workdir=model_dir, seed=seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(batches, cfg.train.steps, desc=desc).params
    return graphdef, jax.device_get(params)


def final_probs(graphdef, params, ds, cfg) -> np.ndarray:
    """The final head's softmax for every example, ``probs_NxC``."""
    @jax.jit
    def fn(params, x):
        return jax.nn.softmax(nnx.merge(graphdef, params).static(x, 0).astype(jnp.float32), -1)
    return np.concatenate([np.asarray(fn(params, x))[:n] for x, n in padded_eval_images(ds, cfg)])


def cached_cls(graphdef, params, ds, cfg) -> np.ndarray:
    """The CLS token after every layer, ``cls_NxLxD`` (what linear exit heads with CLS pooling read)."""
    @jax.jit
    def fn(params, x):
        model = nnx.merge(graphdef, params)
        _, h_LxBxTxD = engine.run_layers(model.layers, model.embed(x))
        return jnp.swapaxes(h_LxBxTxD[:, :, 0], 0, 1)
    return np.concatenate([np.asarray(fn(params, x))[:n] for x, n in padded_eval_images(ds, cfg)])
