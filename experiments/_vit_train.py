"""Train and score one small ViT classifier with the repo's Trainer: the shared step of experiments that train many
small models (Make Deep Networks Shallow Again: one model per variant and seed; EEEA-Net: one per NAS candidate).

``forward(model, x_BxHxWxC) -> logits_BxC`` says how the model is run (plain stack, parallel groups, ...); training
is plain cross-entropy on it, through ``eejax.train.Trainer`` (checkpointed in ``workdir``, so a killed run resumes).
Shapes: B batch, C classes, N examples.
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
from eejax.train import Trainer, make_optimizer
from experiments.lgvit import _host_slice

Forward = Callable[[nnx.Module, jax.Array], jax.Array]


def ce_loss(graphdef, forward: Forward):
    def loss_fn(params, batch, rng, step):
        del rng, step
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
