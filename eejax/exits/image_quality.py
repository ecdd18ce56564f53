"""Image-output exits (engine feature F12): an exit whose head returns an image, and a no-reference quality score of
that image as the exit measure.

RBQE (Xing, Xu, Li, Guan, ECCV 2020, arXiv:2006.16581) enhances a compressed image progressively and stops at the
first output whose *blind* quality score reaches a threshold ``T_Q``: the measure reads the head's output image,
not logits, and needs no clean reference. Its score is a Tchebichef-moment blockiness IQA (computed offline in
MATLAB in the released code); here the score is a plain blockiness ratio on the JPEG 8 x 8 grid
(:func:`blockiness_quality`, in the spirit of Wu & Yuen's GBIM, 1997): the mean absolute step between neighbouring
pixels *inside* blocks against the mean step *across* block boundaries,

    quality = D_inside / (D_inside + D_boundary)

0.5 for an image without block structure, falling towards 0 as blocking grows (a JPEG at lower quality factor has
larger steps at the block edges than inside the blocks). It is computed on the luminance (the channel mean for
colour images; RBQE works on Y), is scale-free, and costs a few elementwise operations per pixel
(:func:`blockiness_flops`, counted at every exit it is evaluated).

``blockiness`` is the engine measure (``confidence.image_measure``): with ``policies.threshold(blockiness, T, E)``
a row stops at the first exit whose output scores >= T, the last exit otherwise: RBQE's rule.

:func:`psnr` and :func:`delta_psnr` are the *full-reference* scores used to evaluate (and, as an oracle, to pick
exits with the answer known); they are never an exit measure.

Shapes: B batch, H height, W width, C channels, D feature width, E exits.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eejax.exits import confidence as conf_lib


class ImageOut(NamedTuple):
    """What an image exit head returns."""

    image_BxHxWxC: jax.Array   # the enhanced image (pixel scale of the input, e.g. [0, 1])
    hidden_BxD: jax.Array      # pooled features at the exit (for hidden-state measures and the measure state)


def _check_images(x, name: str):
    if x.ndim != 4:
        raise ValueError(f"{name} must be B x H x W x C images, got shape {x.shape}")


def blockiness_quality(images_BxHxWxC: jax.Array, block: int = 8, eps: float = 1e-6) -> jax.Array:
    """``D_inside / (D_inside + D_boundary)`` per image (see the module docstring): 0.5 without block structure
    (a flat image included), lower with blocking. Block boundaries sit between pixels ``k*block - 1`` and ``k*block`` (JPEG's grid from the
    top-left corner); the image needs more than ``block`` pixels per side."""
    _check_images(images_BxHxWxC, "images_BxHxWxC")
    _, h, w, _ = images_BxHxWxC.shape
    if block < 2 or min(h, w) <= block:
        raise ValueError(f"{block=} must be >= 2 and below the image side ({h} x {w})")
    y = images_BxHxWxC.astype(jnp.float32).mean(axis=-1)                 # luminance (channel mean)
    dx_BxHxW1 = jnp.abs(jnp.diff(y, axis=2))
    dy_BxH1xW = jnp.abs(jnp.diff(y, axis=1))
    edge_x = (jnp.arange(w - 1) % block) == block - 1                    # step from column k*block-1 to k*block
    edge_y = (jnp.arange(h - 1) % block) == block - 1
    n_edge = edge_x.sum() * h + edge_y.sum() * w
    n_in = (~edge_x).sum() * h + (~edge_y).sum() * w
    ex_1x1xW1, ey_1xH1x1 = edge_x[None, None, :], edge_y[None, :, None]
    d_edge = (jnp.sum(dx_BxHxW1 * ex_1x1xW1, axis=(1, 2)) + jnp.sum(dy_BxH1xW * ey_1xH1x1, axis=(1, 2))) / n_edge
    d_in = (jnp.sum(dx_BxHxW1 * ~ex_1x1xW1, axis=(1, 2)) + jnp.sum(dy_BxH1xW * ~ey_1xH1x1, axis=(1, 2))) / n_in
    return (d_in + eps) / (d_in + d_edge + 2 * eps)   # a flat image (no steps at all) scores 0.5


def blockiness_flops(height: int, width: int, channels: int = 1) -> int:
    """Elementwise operations of ``blockiness_quality`` on one image: the channel mean, two differences, their
    absolute values and masked sums (about 8 per pixel). Elementwise work is left out of ``eejax.exits.costs``'
    FLOP convention, but the IQA is the exit rule's whole cost, evaluated at every exit a row reaches, so the
    experiments count it."""
    return (channels - 1) * height * width + 8 * height * width


blockiness = conf_lib.image_measure(blockiness_quality)


def psnr(images_BxHxWxC: jax.Array, reference_BxHxWxC: jax.Array, peak: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio per image in dB, ``10 log10(peak^2 / MSE)``, the image clipped to ``[0, peak]``
    first (the stored output); MSE floored at 1e-10 (identical images give 100 dB)."""
    _check_images(images_BxHxWxC, "images_BxHxWxC")
    if images_BxHxWxC.shape != reference_BxHxWxC.shape:
        raise ValueError(f"images {images_BxHxWxC.shape} and reference {reference_BxHxWxC.shape} differ in shape")
    x = jnp.clip(images_BxHxWxC.astype(jnp.float32), 0.0, peak)
    mse = jnp.mean((x - reference_BxHxWxC.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(peak ** 2 / jnp.maximum(mse, 1e-10))


def delta_psnr(enhanced_BxHxWxC, compressed_BxHxWxC, clean_BxHxWxC, peak: float = 1.0) -> jax.Array:
    """dPSNR: the PSNR the enhancement gains over the compressed input, per image (RBQE's reported measure)."""
    return psnr(enhanced_BxHxWxC, clean_BxHxWxC, peak) - psnr(compressed_BxHxWxC, clean_BxHxWxC, peak)


__all__ = ["ImageOut", "blockiness_quality", "blockiness_flops", "blockiness", "psnr", "delta_psnr"]
