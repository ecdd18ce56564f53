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


def integer(value, name: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """A Python or numpy integer (not a bool, not a float such as 2.5 that ``range`` or a shape would reject or
    truncate) within ``[lo, hi]``; returns it as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an integer" + _bounds(lo, hi))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}={value!r} must be an integer" + _bounds(lo, hi))
    return int(value)


def positive_number(value, name: str, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``), not a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")
    return float(value)


def dtype_name(value, name: str = "dtype") -> None:
    """``None`` or a name ``jnp.dtype`` accepts (a model config's compute dtype)."""
    if value is None:
        return
    try:
        jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is not a dtype name (e.g. 'float32', 'bfloat16')") from None


def config_ints(cfg, **lowest: int) -> None:
    """Model-config fields that are sizes: each ``getattr(cfg, name)`` an integer >= its bound, named in the
    error (``d_model=-8`` otherwise fails deep inside an initializer with an unrelated shape error, and
    ``num_classes=0`` with a division by zero).

        checks.config_ints(self, d_model=1, depth=1, num_classes=2)
    """
    for name, bound in lowest.items():
        integer(getattr(cfg, name), name, lo=bound)


def batch_array(x, name: str, *, ndim: int | None = None) -> None:
    """A numpy or JAX array (a Python list would fail deep inside with an unrelated message) with ``ndim`` axes
    when given and at least one example on its leading (batch) axis."""
    if not isinstance(x, (np.ndarray, jax.Array)):
        raise ValueError(f"{name} must be a numpy or JAX array, got {type(x).__name__} (convert it with "
                         "np.asarray)")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} of shape {tuple(x.shape)} must have {ndim} axes")
    if x.ndim and x.shape[0] == 0:
        raise ValueError(f"{name} of shape {tuple(x.shape)} hold no example (an empty batch)")


def _bounds(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""
