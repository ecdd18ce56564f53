"""Image classification datasets from verified offline files, as in-memory `ArrayDataset`s.

Shape letters: N examples, H height, W width, C channels. Pixels stay uint8 here; scaling and normalisation
happen per batch in `pipeline.BatchIterator`, so a dataset costs 1 byte per pixel in host memory.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pathlib
import tempfile

import numpy as np

from eejax.data import files

SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CACHE_ENV_VAR = "EEJAX_CACHE_DIR"


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images and integer labels held in host memory.

    `name` keys the normalisation statistics (`pipeline.NORMALIZATION`); `split` records where the examples came
    from ("train", "test", "validation", ...) so that a validation split is never carved out of a test split.
    """
    images_NxHxWxC: np.ndarray
    labels_N: np.ndarray
    name: str
    num_classes: int
    split: str = ""

    def __post_init__(self):
        images, labels = self.images_NxHxWxC, self.labels_N
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 NxHxWxC, got {images.dtype} {images.shape}")
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise ValueError(f"{self.name}: labels must be int32 of shape ({len(images)},), got {labels.dtype} "
                             f"{labels.shape}")

    def __len__(self) -> int:
        return len(self.labels_N)

    def subset(self, indices_M: np.ndarray, split: str) -> ArrayDataset:
        """The examples at `indices_M` (copied), labelled as `split`."""
        return dataclasses.replace(self, images_NxHxWxC=self.images_NxHxWxC[indices_M],
                                   labels_N=self.labels_N[indices_M], split=split)


def read_idx(path: pathlib.Path, expected_ndim: int) -> np.ndarray:
    """Parses a gzipped IDX file of unsigned bytes (the MNIST format), checking magic number and size."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    # Magic: two zero bytes, type code 0x08 (uint8), number of dimensions; then one big-endian int32 per dim.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != expected_ndim:
        raise files.DataError(f"{path}: bad IDX magic {raw[:4].hex()}, expected 000008{expected_ndim:02x}")
    header = 4 + 4 * expected_ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_ndim))
    if len(raw) - header != int(np.prod(dims)):
        raise files.DataError(f"{path}: IDX payload has {len(raw) - header} bytes, dims {dims} need "
                              f"{int(np.prod(dims))}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}; expected one of {SPLITS}")


def _load_idx_dataset(data_dir, dataset_dir: str, name: str, split: str) -> ArrayDataset:
    _check_split(name, split)
    prefix = _IDX_PREFIX[split]
    images_NxHxW = read_idx(files.verified_path(data_dir, dataset_dir, f"{prefix}-images-idx3-ubyte.gz"), 3)
    labels_N = read_idx(files.verified_path(data_dir, dataset_dir, f"{prefix}-labels-idx1-ubyte.gz"), 1)
    if len(images_NxHxW) != len(labels_N) or images_NxHxW.shape[1:] != (28, 28):
        raise files.DataError(f"{name} {split}: images {images_NxHxW.shape} do not match labels {labels_N.shape}")
    return ArrayDataset(images_NxHxW[..., None], labels_N.astype(np.int32), name, 10, split)


def load_mnist(data_dir, split: str) -> ArrayDataset:
    """MNIST from the four IDX .gz files: 60,000 train / 10,000 test images of shape 28x28x1."""
    return _load_idx_dataset(data_dir, "mnist", "mnist", split)


def load_fashion_mnist(data_dir, split: str) -> ArrayDataset:
    """Fashion-MNIST (same IDX layout as MNIST): 60,000 train / 10,000 test images of shape 28x28x1."""
    return _load_idx_dataset(data_dir, "fashion-mnist", "fashion_mnist", split)


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(_CACHE_ENV_VAR) or pathlib.Path.home() / ".cache" / "eejax")


def _decode_jpegs(buffer: np.ndarray, offsets_N1: np.ndarray) -> np.ndarray:
    from PIL import Image  # Pillow is only needed for this JPEG copy of CIFAR-10.
    return np.stack([np.asarray(Image.open(io.BytesIO(buffer[a:b].tobytes())).convert("RGB"))
                     for a, b in zip(offsets_N1[:-1], offsets_N1[1:])])


def _save_atomically(path: pathlib.Path, array: np.ndarray) -> None:
    # Temp file in the same directory + rename: a concurrent or killed writer never leaves a half-written .npy.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_cifar10_jpeg(data_dir, split: str, cache_dir: str | os.PathLike | None = None) -> ArrayDataset:
    """CIFAR-10 from the JPEG (quality 75) copy: 50,000 train / 10,000 test images of shape 32x32x3.

    Decoding takes seconds (the train split ~13 s), so decoded pixels are cached as .npy under `cache_dir`
    (default $EEJAX_CACHE_DIR or ~/.cache/eejax), keyed by the npz's sha256 so a new npz never reuses them.
    """
    _check_split("cifar10", split)
    npz_path = files.verified_path(data_dir, "cifar10-jpeg", "cifar10_jpeg.npz")
    with np.load(npz_path) as z:
        labels_N = z[f"{split}_labels"].astype(np.int32)
        cache = pathlib.Path(cache_dir or default_cache_dir()) / (
            f"cifar10_jpeg-{files.sha256_file(npz_path)[:16]}-{split}-images_Nx32x32x3.npy")
        images_NxHxWxC = None
        if cache.is_file():
            images_NxHxWxC = np.load(cache)
            if images_NxHxWxC.shape != (len(labels_N), 32, 32, 3) or images_NxHxWxC.dtype != np.uint8:
                images_NxHxWxC = None  # stale or foreign file: decode again and overwrite it.
        if images_NxHxWxC is None:
            images_NxHxWxC = _decode_jpegs(z[f"{split}_jpeg"], z[f"{split}_offsets"])
            _save_atomically(cache, images_NxHxWxC)
    return ArrayDataset(images_NxHxWxC, labels_N, "cifar10", 10, split)


EMBEDDED_MNIST_PATH = pathlib.Path(__file__).with_name("embedded") / "mnist_test.npz"
# Written by embedded/make_embedded.py (deterministic zip); see embedded/README.md for the source files.
EMBEDDED_MNIST_SHA256 = "cdadf235db1e4836388734027ce03bd8bd1fcaca809c5230a594a9cf03deb575"


def load_embedded_mnist() -> ArrayDataset:
    """The MNIST test split (10,000 images, 28x28x1) that ships inside the package: no files, no network.

    It is the demo's only data; `pipeline.split_embedded` carves train/validation/test out of it.
    """
    with np.load(files.check_sha256(EMBEDDED_MNIST_PATH, EMBEDDED_MNIST_SHA256)) as z:
        images_NxHxW, labels_N = z["images_NxHxW"], z["labels_N"]
    return ArrayDataset(images_NxHxW[..., None], labels_N.astype(np.int32), "mnist", 10, "test")
