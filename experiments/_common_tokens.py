"""Plumbing shared by the token-exit papers (DToP, DyVTE): digit splits, training on the one Trainer over in-memory
arrays, padded batched evaluation, measured CPU timing with the machine's load beside it.

Shapes: N examples, B batch.
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Callable, Mapping

import jax
import numpy as np

from eejax.data import pipeline
from eejax.exits import costs
from eejax.train import ArrayIterator, Trainer, make_optimizer


def digit_splits(cfg, data_dir):
    """``(train, val, test)`` digit ``ArrayDataset``s: validation carved from train (``cfg.data.val_fraction``),
    test the dataset's own test split; ``mnist_embedded`` (smoke) needs no files."""
    if cfg.data.name == "mnist_embedded":
        return pipeline.split_embedded(pipeline.get_dataset("mnist_embedded", "all"), cfg.seed)
    tv = pipeline.split_train_val(pipeline.get_dataset(cfg.data.name, "train", data_dir), cfg.data.val_fraction,
                                  cfg.seed)
    return tv.train, tv.val, pipeline.get_dataset(cfg.data.name, "test", data_dir)


def normalise(images_uint8: np.ndarray, name: str) -> np.ndarray:
    """uint8 pixels to the float inputs the models take (the source dataset's mean / std)."""
    norm = pipeline.NORMALIZATION["mnist" if name == "mnist_embedded" else name]
    x = images_uint8.astype(np.float32) / 255.0
    return (x - np.asarray(norm.mean_C, np.float32)) / np.asarray(norm.std_C, np.float32)


def fit(loss_fn, params, arrays: Mapping[str, np.ndarray], tcfg, workdir: pathlib.Path, *, seed: int,
        log_every: int, desc: str):
    """``tcfg.steps`` updates of ``loss_fn(params, batch, ctx)`` over shuffled epochs of ``arrays``
    (``eejax.train.ArrayIterator``, epoch e's order ``default_rng([seed, e])``, remainder dropped); resumes from
    ``workdir/ckpt``. Returns ``(params, seconds)`` (0 seconds when a finished run was resumed)."""
    start = time.perf_counter()
    with Trainer(loss_fn, params, make_optimizer(tcfg.optim), workdir=workdir, seed=seed, log_every=log_every,
                 ckpt_every=tcfg.steps) as tr:
        params = tr.fit(ArrayIterator(arrays, tcfg.batch_size, seed=seed), tcfg.steps, desc=desc).params
    return params, time.perf_counter() - start


def batched(fn: Callable, arrays: Mapping[str, np.ndarray], batch_size: int):
    """``fn(batch_dict)`` over in-order batches of ``arrays``, the last padded (with its first row) to
    ``batch_size`` so one compiled program serves all; outputs (any pytree of ``B x ...`` leaves) concatenated as
    numpy and cut to N."""
    n = len(next(iter(arrays.values())))
    outs = []
    for s in range(0, n, batch_size):
        batch = {}
        for k, v in arrays.items():
            part = v[s:s + batch_size]
            if len(part) < batch_size:
                part = np.concatenate([part, np.repeat(part[:1], batch_size - len(part), 0)])
            batch[k] = part
        outs.append(jax.device_get(fn(batch)))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outs)


def timed(calls: Mapping[str, tuple[Callable, tuple]], iters: int) -> dict[str, dict[str, float]]:
    """Measured wall-clock per call (``costs.measure_interleaved``: compilation excluded by its warm-up round,
    round-robin so a slow spell of the shared machine hits every candidate alike); the 1-minute load average is
    recorded beside it."""
    t = costs.measure_interleaved(calls, warmup=1, iters=iters)
    load = os.getloadavg()[0]
    return {name: {"median_s": float(np.median(x.times_s)), "min_s": x.min_s, "load_1min": load}
            for name, x in t.items()}


def cpu_label(load: float) -> str:
    return f"measured, {os.cpu_count()}-core shared CPU, 1-min load {load:.1f}"
