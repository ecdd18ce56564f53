"""Pure-JAX reference of the gated residual MLP step (same signature as ``kernel.gated_mlp``).

For the rows whose ``active`` is set: ``r + gelu(h @ w1[layer] + b1[layer]) @ w2[layer] + b2[layer]`` with the
residual ``r`` (default ``h``; a pre-LN block passes ``h = ln(r)``); the other rows get ``r`` back. Shapes: N rows, D width, F hidden (MLP) width, L stacked layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gated_mlp_ref(h_NxD: jax.Array, active_N: jax.Array, w1_LxDxF: jax.Array, b1_LxF: jax.Array,
                  w2_LxFxD: jax.Array, b2_LxD: jax.Array, layer, *, residual_NxD: jax.Array | None = None,
                  block_rows: int | None = None, block_k: int | None = None, block_d: int | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """The kernel's tiling arguments are accepted and ignored. Accumulates in float32, as the kernel does."""
    del block_rows, block_k, block_d, interpret
    f32 = jnp.float32
    x_NxF = jnp.dot(h_NxD, w1_LxDxF[layer], preferred_element_type=f32) + b1_LxF[layer].astype(f32)[None, :]
    x_NxF = jax.nn.gelu(x_NxF).astype(w2_LxFxD.dtype)
    y_NxD = jnp.dot(x_NxF, w2_LxFxD[layer], preferred_element_type=f32) + b2_LxD[layer].astype(f32)[None, :]
    r_NxD = h_NxD if residual_NxD is None else residual_NxD
    y_NxD = r_NxD.astype(f32) + y_NxD
    return jnp.where(active_N[:, None], y_NxD.astype(r_NxD.dtype), r_NxD)
