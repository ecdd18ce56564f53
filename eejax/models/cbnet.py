"""CBNet's converting autoencoder (Mahmud et al., arXiv:2403.07036): hard images in, easy images out, for a small
classifier.

The autoencoder is trained to map every image of class k to ONE fixed *easy* image of class k (the conversion
target); a lightweight classifier (here: a multi-exit CNN truncated at its first exit) then classifies the converted
image. Every input takes the same cheap path: this is an input transform, not a per-input exit.

Conversion targets (:func:`conversion_targets`): for each class, the training image of that class that the early-exit
model classifies most confidently (highest probability of its own class) at its first exit. Build them from the
TRAIN split only.

Shapes: B batch, H x W x C image, P = H*W*C pixels, K classes, N examples.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.nn.layers import build as nn_build


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    image_shape: tuple[int, int, int] = (28, 28, 1)
    hidden: tuple[int, ...] = (128, 32)   # encoder widths; the decoder mirrors them

    def __post_init__(self):
        if not isinstance(self.image_shape, (tuple, list)) or len(self.image_shape) != 3:
            raise ValueError(f"image_shape={self.image_shape!r} must be (height, width, channels)")
        for i, n in enumerate(self.image_shape):
            checks.integer(n, f"image_shape[{i}]", lo=1)
        if not isinstance(self.hidden, (tuple, list)) or not self.hidden:
            raise ValueError(f"hidden={self.hidden!r} needs at least one positive width")
        for i, h in enumerate(self.hidden):
            checks.integer(h, f"hidden[{i}]", lo=1)

    @property
    def pixels(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def dims(self) -> tuple[int, ...]:
        """Widths of every dense layer's input and output: P, h1, ..., hk, ..., h1, P."""
        hs = tuple(int(h) for h in self.hidden)
        return (self.pixels,) + hs + hs[-2::-1] + (self.pixels,)


class ConvertingAutoencoder(nnx.Module):
    """Dense encoder / decoder with ReLU between layers and a linear output (images stay in the normalised space the
    classifier reads)."""

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.dims
        self.dense = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(d[:-1], d[1:])])

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        checks.batch_array(x_BxHxWxC, "images")
        if x_BxHxWxC.shape[1:] != tuple(self.cfg.image_shape):
            raise ValueError(f"images of shape {x_BxHxWxC.shape[1:]}, autoencoder expects {self.cfg.image_shape}")
        h = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
        for i, layer in enumerate(self.dense):
            h = layer(h)
            if i < len(self.dense) - 1:
                h = jax.nn.relu(h)
        return h.reshape(x_BxHxWxC.shape)


def build(cfg: AutoencoderConfig, seed: int):
    return nn_build(lambda rngs: ConvertingAutoencoder(cfg, rngs=rngs), seed)


def autoencoder_flops(cfg: AutoencoderConfig) -> int:
    """Dense layers only (2 FLOPs per multiply-add, the eejax.exits.costs convention)."""
    d = cfg.dims
    return int(sum(2 * a * b for a, b in zip(d[:-1], d[1:])))


class Targets(NamedTuple):
    images_KxHxWxC: np.ndarray   # the easy image of each class
    index_K: np.ndarray          # its index in the split it came from (the train split)
    confidence_K: np.ndarray     # the first exit's probability of its own class for that image


def conversion_targets(first_exit_probs_NxK: np.ndarray, labels_N: np.ndarray, images_NxHxWxC: np.ndarray
                       ) -> Targets:
    """For each class k, the image of class k with the highest first-exit probability of class k (pass TRAIN
    arrays: targets must not come from the evaluation data)."""
    probs, labels = np.asarray(first_exit_probs_NxK), np.asarray(labels_N)
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or images_NxHxWxC.shape[0] != labels.shape[0]:
        raise ValueError(f"want probs [N, K], labels [N], images [N, ...]; got {probs.shape}, {labels.shape}, "
                         f"{images_NxHxWxC.shape}")
    num_classes = probs.shape[1]
    own_N = probs[np.arange(len(labels)), labels]
    index = []
    for k in range(num_classes):
        members = np.flatnonzero(labels == k)
        if members.size == 0:
            raise ValueError(f"class {k} has no example in the split; every class needs a conversion target")
        index.append(members[np.argmax(own_N[members])])
    index_K = np.asarray(index)
    return Targets(np.asarray(images_NxHxWxC)[index_K], index_K, own_N[index_K])


def pipeline(autoencoder: Callable[[jax.Array], jax.Array], classifier: Callable[[jax.Array], jax.Array],
             x_BxHxWxC: jax.Array) -> jax.Array:
    """CBNet's inference: ``classifier(autoencoder(x))`` (logits)."""
    return classifier(autoencoder(x_BxHxWxC))


def conversion_loss(converted_BxHxWxC: jax.Array, targets_KxHxWxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Mean squared error between each converted image and the easy image of its class."""
    return jnp.mean(jnp.square(converted_BxHxWxC - targets_KxHxWxC[labels_B]))


__all__: Sequence[str] = ["AutoencoderConfig", "ConvertingAutoencoder", "build", "autoencoder_flops", "Targets",
                          "conversion_targets", "pipeline", "conversion_loss"]
