"""Shallow-and-wide layer groups: stacked residual layers run side by side on the same input, their updates summed.

"Make Deep Networks Shallow Again" (Bermeitinger, Hrycej, Handschuh, KDIR 2023, arXiv:2309.08414): a residual
stack ``prod_i (I + F_i)`` expands to ``I + sum_i F_i + higher-order terms``; keeping the first order gives

    y = x + sum_i F_i(x),    F_i(x) = layer_i(x) - x     (every layer of the group reads the same x)

With ``k`` layers per group, ``N`` stored layers become ``N / k`` sequential groups of ``k`` parallel layers:
``k = 1`` is the ordinary residual stack, ``k = N`` the fully parallel (depth-1) net. The parameters are the same
stacked layers, only viewed as ``(N / k, k, ...)``; so a grouped stack runs on the engine's usual programs (the
prefix program over ``N / k`` steps for the static path, ``run_layers`` / ``scan_exits`` for training), with
``parallel_layer_fn`` as the ``layer_fn`` that evaluates one group as a ``vmap`` over its ``k`` layers and sums.

Shapes: N stored layers, U = N / k groups, L = k layers per group, B batch, T tokens, D width.
"""
from __future__ import annotations

import jax
from flax import nnx

from eejax.exits import engine


def group_layers(layers: nnx.Module, k: int) -> nnx.Module:
    """The stacked ``layers`` (leading axis N) viewed as ``N / k`` groups of ``k`` (leading axes U x L); the
    parameters are reshaped, not copied or re-initialised, so gradients flow to the same leaves."""
    n = engine.num_layers_of(layers)
    if k < 1 or n % k:
        raise ValueError(f"{k=} layers per group must be >= 1 and divide the {n} stored layers")
    layer_def, stacked = nnx.split(layers)
    return nnx.merge(layer_def, jax.tree.map(lambda p: p.reshape((n // k, k) + p.shape[1:]), stacked))


def parallel_layer_fn(layer: nnx.Module, h, ctx: engine.StepCtx):
    """``layer_fn`` for a grouped stack: ``h + sum_k (layer_k(h) - h)`` over the group's K layers (one ``vmap``).

    Whole layers only: a program with sublayer bits (``ctx.sub_B``) has no meaning for a parallel group."""
    if ctx.sub_B is not None:
        raise ValueError("parallel layer groups run whole layers; the program must not set sublayer bits")
    layer_def, group = nnx.split(layer)
    delta_LxBx = jax.vmap(lambda p: nnx.merge(layer_def, p)(h) - h)(group)
    return h + delta_LxBx.sum(axis=0)


def static_run(layers: nnx.Module, head, h0, k: int):
    """The static (no exit) forward of the stack with ``k`` layers per parallel group, through the engine's prefix
    program over the groups; ``k = 1`` is the plain sequential stack with the default ``layer_fn``."""
    grouped = layers if k == 1 else group_layers(layers, k)
    g = engine.num_layers_of(grouped)
    fn = engine.call_layer if k == 1 else parallel_layer_fn
    return engine.run(grouped, [head], h0, engine.prefix(g, [g - 1]), None, layer_fn=fn)


def train_forward(layers: nnx.Module, h0, k: int, *, remat: bool = False):
    """The scan (training) path of the same grouped stack: the hidden state after the last group."""
    grouped = layers if k == 1 else group_layers(layers, k)
    fn = engine.call_layer if k == 1 else parallel_layer_fn
    h_last, _ = engine.run_layers(grouped, h0, layer_fn=fn, remat=remat)
    return h_last
