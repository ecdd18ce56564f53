"""Batches from arrays already in memory, resumable: the data side of training on cached features.

Papers that train a small part beside a frozen model (exit heads, drafters, routers, exit predictors, gates) run the
frozen model once over the data, keep its features on the host, and train on those. ``ArrayIterator`` hands such a
dict of equal-length arrays to ``Trainer.fit`` one batch at a time and saves its position with every checkpoint, so
the run resumes on the same batches:

    batches = ArrayIterator({"h_NxD": h, "label_N": y}, batch_size=64, seed=0, draw="with_replacement")
    with Trainer(loss_fn, head_params, optax.adam(1e-3), workdir=workdir, mesh=one_device_mesh()) as tr:
        head_params = tr.fit(batches, steps, frozen=model_params).params

How a batch is drawn (``draw``), each the numpy stream the hand-written loops it replaced used, so their results
carry over exactly:

* ``"epochs"``: shuffled epochs, epoch e's order ``default_rng([seed, e]).permutation(N)``, the remainder dropped;
* ``"with_replacement"``: ``batch_size`` rows drawn independently (``Generator.integers(0, N, batch_size)``);
* ``"without_replacement"``: ``batch_size`` distinct rows a step (``Generator.choice(N, batch_size,
  replace=False)``), drawn afresh every step;
* ``"all"``: every row, in order, every step (full-batch training); ``batch_size`` must be N.

The leading axis of every array is the example axis N (the one ``Trainer`` shards); arrays whose examples sit on
another axis are transposed by the caller. The batch is the whole global batch of one process: cached-feature
training is small and runs on one device (``one_device_mesh``).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import AxisType

DRAWS = ("epochs", "with_replacement", "without_replacement", "all")


class ArrayIterator:
    """Endless batches ``{name: array[idx]}`` of a dict of arrays with one leading example axis; see the module."""

    def __init__(self, arrays: Mapping[str, Any], batch_size: int, *, seed: int = 0, draw: str = "epochs"):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if not self.arrays:
            raise ValueError("arrays is empty")
        sizes = {k: v.shape[0] if v.ndim else None for k, v in self.arrays.items()}
        self.n = next(iter(sizes.values()))
        if self.n is None or any(s != self.n for s in sizes.values()):
            raise ValueError(f"arrays need one leading example axis of the same length, got {sizes}")
        if draw not in DRAWS:
            raise ValueError(f"{draw=} is not one of {DRAWS}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        if draw == "all" and batch_size != self.n:
            raise ValueError(f"draw='all' takes every row: batch_size={batch_size} must equal the {self.n} rows")
        if draw != "with_replacement" and batch_size > self.n:
            raise ValueError(f"batch_size={batch_size} is more than the {self.n} rows (draw={draw!r})")
        self.batch_size, self.seed, self.draw = int(batch_size), seed, draw
        self.epoch, self.index = 0, 0          # "epochs": the position of the next batch
        self._order = (-1, None)               # (epoch, permutation) of the epoch in progress
        self._rng = np.random.default_rng(seed)

    # The generator's state holds 128-bit integers: saved as strings, which every JSON reader keeps exactly.
    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch; with the arrays and ``seed``, all that determines the rest."""
        if self.draw == "epochs":
            return {"epoch": self.epoch, "index": self.index}
        if self.draw == "all":
            return {}
        s = self._rng.bit_generator.state
        return {"bit_generator": s["bit_generator"], "state": str(s["state"]["state"]),
                "inc": str(s["state"]["inc"]), "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.draw == "epochs":
            self.epoch, self.index = int(state["epoch"]), int(state["index"])
        elif self.draw != "all":
            self._rng.bit_generator.state = {
                "bit_generator": state["bit_generator"],
                "state": {"state": int(state["state"]), "inc": int(state["inc"])},
                "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}

    def _indices(self) -> np.ndarray:
        if self.draw == "with_replacement":
            return self._rng.integers(0, self.n, self.batch_size)
        if self.draw == "without_replacement":
            return self._rng.choice(self.n, self.batch_size, replace=False)
        if self.draw == "all":
            return np.arange(self.n)
        if self.index >= self.n // self.batch_size:
            self.epoch, self.index = self.epoch + 1, 0
        if self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
        idx = self._order[1][self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return idx

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.draw == "all":
            return dict(self.arrays)
        idx = self._indices()
        return {k: v[idx] for k, v in self.arrays.items()}


def one_device_mesh() -> jax.sharding.Mesh:
    """A ("data",) mesh over this process's first device: for training whose batches need not divide the devices
    (cached features, full-batch fits)."""
    return jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.local_devices()[:1])
