"""Plumbing shared by the token-exit papers (DToP, DyVTE): digit splits, resumable batches of in-memory arrays,
training on the one Trainer, padded batched evaluation, measured CPU timing with the machine's load beside it.

Shapes: N examples, B batch.
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from eejax.data import pipeline
from eejax.exits import costs
from eejax.train import Trainer, make_optimizer


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


class Batches:
    """Endless shuffled epochs of a dict of equal-length arrays (epoch e's order ``default_rng([seed, e])``,
    remainder dropped); its position is saved with every checkpoint, so a rerun resumes on the same batches."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.n = len(next(iter(self.arrays.values())))
        if any(len(v) != self.n for v in self.arrays.values()) or not 1 <= batch_size <= self.n:
            raise ValueError(f"need equal-length arrays and 1 <= batch_size <= {self.n}, got {batch_size}")
        self.batch_size, self.seed, self.epoch, self.index = batch_size, seed, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.n // self.batch_size:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        idx = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return {k: v[idx] for k, v in self.arrays.items()}


def fit(loss_fn, params, arrays: Mapping[str, np.ndarray], tcfg, workdir: pathlib.Path, *, seed: int,
        log_every: int, desc: str):
    """``tcfg.steps`` updates of ``loss_fn(params, batch, rng)`` over shuffled batches of ``arrays``; resumes from
    ``workdir/ckpt``. Returns ``(params, seconds)`` (0 seconds when a finished run was resumed)."""
    start = time.perf_counter()
    with Trainer(loss_fn, params, make_optimizer(tcfg.optim), workdir=workdir, seed=seed, log_every=log_every,
                 ckpt_every=tcfg.steps) as tr:
        params = tr.fit(Batches(arrays, tcfg.batch_size, seed), tcfg.steps, desc=desc).params
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
    """Measured wall-clock per call (``costs.measure``, compilation excluded by its warm-up), round-robin so a slow
    spell of the shared machine hits every candidate alike; the 1-minute load average is recorded beside it."""
    times = {name: [] for name in calls}
    for name, (fn, args) in calls.items():
        costs.measure(fn, *args, warmup=1, iters=1)
    for _ in range(iters):
        for name, (fn, args) in calls.items():
            times[name].append(costs.measure(fn, *args, warmup=0, iters=1).mean_s)
    load = os.getloadavg()[0]
    return {name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)), "load_1min": load}
            for name, t in times.items()}


def cpu_label(load: float) -> str:
    return f"measured, {os.cpu_count()}-core shared CPU, 1-min load {load:.1f}"
