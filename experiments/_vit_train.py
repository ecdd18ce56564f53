"""Train and score small ViT classifiers with the repo's one Trainer (checkpoints, resume, ``metrics.jsonl``): the
shared step of the experiments that train many small models.

* ``train`` / ``scorer`` / ``padded``: any ``forward(model, x_BxHxWxC) -> logits_BxC`` (plain stack, parallel
  groups, ...) trained with plain cross-entropy: Make Deep Networks Shallow Again (one model per variant and seed),
  EEEA-Net (one per NAS candidate).
* ``single_head_config`` / ``train_vit`` / ``cached_probs`` / ``cached_cls``: a plain single-head ViT trained with
  label-smoothed CE on its final head: JEI-DNN's frozen backbone and the members of the window-based cascade;
  evaluation caches softmaxes / CLS tokens in padded batches (one compile).

Shapes: B batch, N layers (examples for cached outputs), T tokens, D width, C classes.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eejax.data import pipeline
from eejax.exits import engine
from eejax.models import vit as vit_lib
from eejax.train import Trainer, make_optimizer
from experiments._shared_head_vit import smoothed_ce
from experiments.lgvit import _host_slice, padded_eval_images

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


def train(graphdef, params, forward: Forward, train_ds, *, steps: int, batch_size: int, optim, seed: int, workdir,
          log_every: int, desc: str) -> Trained:
    """``steps`` of AdamW-style training (``optim``: an eejax optimizer config) from ``params``; resumes from
    ``workdir/ckpt`` when a previous run got that far."""
    workdir = pathlib.Path(workdir)
    batches = pipeline.BatchIterator(train_ds, batch_size, seed=seed, **_host_slice())
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


def num_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ------------------------------------------------------------ single-head ViT (JEI-DNN, cascades)


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
    batches = pipeline.BatchIterator(train_ds, cfg.data.batch_size, seed=seed, **_host_slice())
    with Trainer(final_head_loss(graphdef, cfg.train.label_smoothing), params, make_optimizer(cfg.train.optim),
                 workdir=model_dir, seed=seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(batches, cfg.train.steps, desc=desc).params
    return graphdef, jax.device_get(params)


def cached_probs(graphdef, params, ds, cfg) -> np.ndarray:
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
