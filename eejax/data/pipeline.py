"""Dataset registry, train/validation splits, and a deterministic, resumable, per-host batch iterator.

Shape letters: B global batch, b per-host batch (B / process_count), H height, W width, C channels, N examples.

Determinism: epoch e's order is `np.random.default_rng([seed, e]).permutation(N)`, so the batch at
(seed, epoch, index) never depends on what ran before; `BatchIterator.state_dict()` is two integers and
restoring it (with the train state, nanodo-style) replays exactly the batches an uninterrupted run would see.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from eejax.data import files, vision
from eejax.data.vision import ArrayDataset


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of pixels scaled to [0, 1]."""
    mean_C: tuple[float, ...]
    std_C: tuple[float, ...]

    @classmethod
    def from_dataset(cls, ds: ArrayDataset) -> Normalization:
        """Statistics of `ds` itself (compute them on the training split)."""
        pixels = ds.images_NxHxWxC.reshape(-1, ds.images_NxHxWxC.shape[-1]) / 255.0
        return cls(tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist()))


# Training-split statistics, keyed by ArrayDataset.name (the embedded MNIST copy uses MNIST's).
NORMALIZATION = {
    "mnist": Normalization((0.1307,), (0.3081,)),
    "fashion_mnist": Normalization((0.2860,), (0.3530,)),
    # Of the decoded JPEG copy (standard CIFAR-10 is [0.4914, 0.4822, 0.4465] / [0.2470, 0.2435, 0.2616]).
    "cifar10": Normalization((0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)),
}

_FILE_LOADERS = {"mnist": vision.load_mnist, "fashion_mnist": vision.load_fashion_mnist,
                 "cifar10": vision.load_cifar10_jpeg}
DATASETS = (*_FILE_LOADERS, "mnist_embedded")
IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
                "mnist_embedded": (28, 28, 1)}  # H, W, C of each dataset, checked against model configs
EMBEDDED_SPLITS = ("train", "validation", "test", "all")
EMBEDDED_SEED = 0


class TrainVal(NamedTuple):
    train: ArrayDataset
    val: ArrayDataset


class TrainValTest(NamedTuple):
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def get_dataset(name: str, split: str, data_dir=None, source: str = "files") -> ArrayDataset:
    """Dataset `name` ∈ DATASETS, split "train" | "test", from verified files (`source="files"`) or TFDS.

    `data_dir` is eejax's data directory for files (see `files.resolve_data_dir`) and TFDS's for tfds.
    "cifar10" from files is the JPEG copy. "mnist_embedded" needs no files: its splits are "train" / "validation"
    / "test" from `split_embedded(..., seed=EMBEDDED_SEED)`, or "all" for the 10,000 images.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if source == "tfds":
        if name == "mnist_embedded":
            raise ValueError("mnist_embedded ships with the package; use source='files'")
        from eejax.data.tfds_source import load_tfds
        return load_tfds(name, split, data_dir)
    if source != "files":
        raise ValueError(f"unknown source {source!r}; expected 'files' or 'tfds'")
    if name == "mnist_embedded":
        if split not in EMBEDDED_SPLITS:
            raise ValueError(f"mnist_embedded: unknown split {split!r}; expected one of {EMBEDDED_SPLITS}")
        ds = vision.load_embedded_mnist()
        if split == "all":
            return ds
        return split_embedded(ds, EMBEDDED_SEED)[("train", "validation", "test").index(split)]
    return _FILE_LOADERS[name](files.resolve_data_dir(data_dir), split)


def split_train_val(ds: ArrayDataset, val_fraction: float, seed: int) -> TrainVal:
    """Disjoint random train / validation parts of a TRAIN split; the permutation depends only on `seed`.

    Validation (early-exit calibration, model selection) is carved from train so the test split stays unseen.
    """
    if ds.split.startswith("test"):
        raise ValueError(f"{ds.name}: refusing to carve a validation split out of the {ds.split!r} split")
    num_val = int(round(val_fraction * len(ds)))
    if not 0 < num_val < len(ds):
        raise ValueError(f"{val_fraction=} of {len(ds)} examples leaves an empty train or validation part")
    perm_N = np.random.default_rng(seed).permutation(len(ds))
    return TrainVal(ds.subset(np.sort(perm_N[num_val:]), "train"), ds.subset(np.sort(perm_N[:num_val]), "validation"))


def split_embedded(ds: ArrayDataset, seed: int, num_val: int = 1000, num_test: int = 2000) -> TrainValTest:
    """Train / validation / test from the embedded 10,000-image MNIST test split.

    Test is always the last `num_test` images by index, whatever the seed, so results with different seeds are
    comparable; train and validation are a seeded permutation of the rest. The last MNIST test images come from
    NIST's SD-1 writers (harder than the first 5,000), so test accuracy runs a little below full-MNIST figures.
    """
    num_pool = len(ds) - num_test
    if not 0 < num_val < num_pool:
        raise ValueError(f"{num_val=} and {num_test=} do not fit in {len(ds)} examples")
    perm_P = np.random.default_rng(seed).permutation(num_pool)
    return TrainValTest(ds.subset(np.sort(perm_P[num_val:]), "train"),
                        ds.subset(np.sort(perm_P[:num_val]), "validation"),
                        ds.subset(np.arange(num_pool, len(ds)), "test"))


class BatchIterator:
    """Batches `{"image": float32 bxHxWxC (normalised), "label": int32 b}` from an ArrayDataset.

    shuffle=True: infinite over epochs, order from (seed, epoch). shuffle=False: one pass in index order (eval);
    with drop_remainder=False the last batch is smaller. With process_count > 1 each host gets the rows
    [process_index::process_count] of every global batch of `batch_size` (a short last eval batch may then
    split unevenly across hosts).
    """

    def __init__(self, ds: ArrayDataset, batch_size: int, seed: int = 0, *, drop_remainder: bool = True,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 normalization: Normalization | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an integer >= 0")
        if batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(f"{batch_size=} must divide by {process_count=} and 0 <= {process_index=} < it")
        if drop_remainder and len(ds) < batch_size:
            raise ValueError(f"{ds.name}/{ds.split} has {len(ds)} examples, fewer than {batch_size=}")
        if normalization is None and ds.name not in NORMALIZATION:
            raise ValueError(f"no normalization for {ds.name!r}; pass normalization=Normalization.from_dataset(train)")
        norm = normalization or NORMALIZATION[ds.name]
        self.ds, self.batch_size, self.seed = ds, batch_size, seed
        self.drop_remainder, self.shuffle = drop_remainder, shuffle
        self.process_index, self.process_count = process_index, process_count
        self._mean_C = np.asarray(norm.mean_C, np.float32)
        self._std_C = np.asarray(norm.std_C, np.float32)
        self.epoch, self.index = 0, 0
        self._order = (-1, None)  # (epoch, permutation) of the epoch in progress

    @property
    def num_batches_per_epoch(self) -> int:
        n = len(self.ds)
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch; with `seed`, all that determines the rest of the stream."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.num_batches_per_epoch:
            raise ValueError(f"bad iterator state {state}; {self.num_batches_per_epoch} batches per epoch")
        self.epoch, self.index = epoch, index

    def _epoch_order(self) -> np.ndarray:
        if self._order[0] != self.epoch:
            order_N = (np.random.default_rng([self.seed, self.epoch]).permutation(len(self.ds)) if self.shuffle
                       else np.arange(len(self.ds)))
            self._order = (self.epoch, order_N)
        return self._order[1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.num_batches_per_epoch:
            if not self.shuffle:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.batch_size
        indices_B = self._epoch_order()[start:start + self.batch_size]
        indices_b = indices_B[self.process_index::self.process_count]
        self.index += 1
        images_bxHxWxC = self.ds.images_NxHxWxC[indices_b].astype(np.float32) / 255.0
        return {"image": (images_bxHxWxC - self._mean_C) / self._std_C, "label": self.ds.labels_N[indices_b]}
