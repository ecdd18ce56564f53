"""JPEG re-compression of uint8 images (Pillow), for compressed-image enhancement (RBQE, arXiv:2006.16581).

The clean images come from the verified offline files (``eejax.data.get_dataset``: sha256-checked); this module
encodes each at a JPEG quality factor (QF) and decodes it back, in memory. Pillow's encoder is libjpeg's baseline
encoder with the standard quantisation tables scaled by the QF (4:2:0 chroma subsampling for RGB), deterministic for
a given libjpeg build: ``encoder_info`` names the build so results can record it, and callers hash the arrays they
produce. For CIFAR-10 the "clean" images are themselves the JPEG q75 copy on hand (``load_cifar10_jpeg``), so there
the QF 10-50 versions are a second compression of them.

Shapes: N images, H height, W width, C channels (1 or 3), Q quality factors.
"""
from __future__ import annotations

import hashlib
import io
from typing import Sequence

import numpy as np


def _pil():
    try:
        from PIL import Image, features  # noqa: PLC0415
    except ImportError as e:   # pragma: no cover (Pillow is a dependency of matplotlib, always installed here)
        raise ImportError("JPEG re-compression needs Pillow (pip install pillow)") from e
    return Image, features


def encoder_info() -> dict[str, str]:
    """The Pillow and libjpeg versions that encode (record them beside results)."""
    import PIL  # noqa: PLC0415

    _, features = _pil()
    return {"pillow": PIL.__version__, "libjpeg": str(features.version("jpg"))}


def check_quality(quality) -> int:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= int(quality) <= 95:
        raise ValueError(f"quality={quality!r} must be an integer JPEG quality factor in [1, 95]")
    return int(quality)


def recompress(images_NxHxWxC: np.ndarray, quality: int) -> np.ndarray:
    """Each image JPEG-encoded at ``quality`` and decoded back (uint8, same shape)."""
    quality = check_quality(quality)
    x = np.asarray(images_NxHxWxC)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 N x H x W x C with C in (1, 3), got {x.dtype} {x.shape}")
    image_cls, _ = _pil()
    out = np.empty_like(x)
    for i, img in enumerate(x):
        buf = io.BytesIO()
        image_cls.fromarray(img[..., 0] if x.shape[-1] == 1 else img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        dec = np.asarray(image_cls.open(buf))
        out[i] = dec[..., None] if x.shape[-1] == 1 else dec
    return out


def recompress_levels(images_NxHxWxC: np.ndarray, qualities: Sequence[int]) -> np.ndarray:
    """``Q x N x H x W x C``: the images at every quality factor of ``qualities``."""
    if not len(qualities):
        raise ValueError("qualities names no quality factor")
    return np.stack([recompress(images_NxHxWxC, q) for q in qualities])


def sha256_array(x: np.ndarray) -> str:
    """A digest of an array's dtype, shape and bytes (to record the compressed sets a run used)."""
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.tobytes())
    return h.hexdigest()


__all__ = ["encoder_info", "check_quality", "recompress", "recompress_levels", "sha256_array"]
