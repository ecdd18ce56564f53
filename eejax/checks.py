"""Input checks of the public API: a clear ValueError naming the argument, instead of a wrong answer downstream.

Shapes and dtypes are checked always (they are static under ``jax.jit``); values (token ids in range, finite pixels,
thresholds that are not NaN) only when the array is concrete, i.e. when called outside ``jit``: inside a traced
function they are unknown, and the caller's own checks (config validation, data loaders) cover them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def thresholds(threshold, num_exits: int, *, name: str = "threshold", lo: float | None = None,
               hi: float | None = None) -> None:
    """A scalar or one value per exit (shape ``(num_exits,)``); no NaN; within ``[lo, hi]`` when given."""
    shape = np.shape(threshold)
    if shape not in ((), (num_exits,)):
        raise ValueError(f"{name} has shape {shape}; want a scalar or one value per exit, shape ({num_exits},)")
    if not is_concrete(threshold):
        return
    t = np.asarray(threshold)
    if not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)) or t.dtype == bool:
        raise ValueError(f"{name} must be a number or an array of numbers, got dtype {t.dtype}")
    t = t.astype(np.float64)
    if np.isnan(t).any():
        raise ValueError(f"{name}={threshold!r} contains NaN")
    finite = t[np.isfinite(t)]     # +inf (never exit early) and -inf (always exit) are meaningful everywhere
    if (lo is not None and (finite < lo).any()) or (hi is not None and (finite > hi).any()):
        raise ValueError(f"{name}={threshold!r} outside [{lo}, {hi}] (the measure's range)")


def token_ids(tokens, vocab_size: int, *, name: str = "tokens") -> None:
    """Integer token ids in ``[0, vocab_size)`` (checked for concrete arrays)."""
    dtype = jnp.asarray(tokens).dtype if is_concrete(tokens) else tokens.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {dtype}")
    if is_concrete(tokens) and np.size(tokens):
        t = np.asarray(tokens)
        if t.min() < 0 or t.max() >= vocab_size:
            raise ValueError(f"{name} hold ids in [{t.min()}, {t.max()}]; the vocabulary is [0, {vocab_size})")


def images(x, shape_HxWxC: tuple[int, int, int], *, name: str = "images") -> None:
    """Float ``B x H x W x C`` images (normalised, not raw uint8), finite when concrete."""
    shape, dtype = np.shape(x), (np.asarray(x).dtype if is_concrete(x) and not hasattr(x, "dtype") else x.dtype)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(shape_HxWxC):
        raise ValueError(f"{name} of shape {tuple(shape)}; the model expects B x {tuple(shape_HxWxC)}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} have dtype {dtype}; the model expects normalised floats (e.g. uint8 pixels / 255 "
                         "then the dataset's mean/std, as eejax.data.pipeline.BatchIterator gives)")
    if is_concrete(x) and not bool(np.isfinite(np.asarray(x)).all()):
        raise ValueError(f"{name} contain NaN or inf values")
