"""Faster inference paths over the engine's stacked layers; each returns what ``engine.while_exits`` returns.

``engine.while_exits`` masks: a row that has exited is frozen but still computed until the *last* row of the batch
exits. The paths here cut that waste and agree with it row for row (same exit, same logits; tested):

* ``compacted_exits``: before each exit segment, the still-active rows are moved to the front with a stable
  permutation and gathered into a *bucket*: the smallest of a few static batch sizes (``default_buckets``: about
  B, B/2, B/4, B/8) that holds them, picked with ``lax.switch`` on the active count. The segment's layers, the exit
  head and the confidence measure run on the bucket only; the results are scattered back. Pure XLA, any backend.
* ``sharded_exits``: ``jax.shard_map`` over a 1-D data mesh with replicated weights; each device runs the engine's
  while-loop on its own rows, so its loop stops when *its* rows are done. (Under plain ``jit`` with a sharded batch
  the loop condition is a global ``any`` and every device runs the deepest row's depth.) The loop body has no
  collectives. ``layers_run`` comes back per device.

Shapes: B batch, S bucket rows, K buckets, E exits, C classes, P devices on the data axis; ``h`` is ``B x ...``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from eejax import checks
from eejax.exits import confidence as conf_lib
from eejax.exits import engine


def default_buckets(batch: int, num: int = 4, multiple: int = 8) -> tuple[int, ...]:
    """Bucket sizes ``ceil(batch / 2**i)`` for ``i < num``, rounded up to ``multiple`` (capped at ``batch``)."""
    if batch < 1 or num < 1 or multiple < 1:
        raise ValueError(f"{batch=}, {num=}, {multiple=} must all be >= 1")
    sizes = {min(batch, -(-math.ceil(batch / 2 ** i) // multiple) * multiple) for i in range(num)}
    return tuple(sorted(sizes))


def _check_buckets(buckets: Sequence[int] | None, batch: int) -> tuple[int, ...]:
    if buckets is None:
        return default_buckets(batch)
    sizes = sorted({int(s) for s in buckets} | {batch})   # the full batch is always a bucket
    if sizes[0] < 1 or sizes[-1] > batch:
        raise ValueError(f"bucket sizes {sorted(buckets)} must lie in [1, {batch=}]")
    return tuple(sizes)


def compacted_exits(layers: nnx.Module, heads: Sequence[Callable[[jax.Array], engine.HeadOut]], h0: jax.Array,
                    exit_layers: Sequence[int], threshold, *, measure: conf_lib.Measure = conf_lib.max_softmax,
                    layer_fn: engine.LayerFn = engine.call_layer,
                    buckets: Sequence[int] | None = None) -> engine.DynamicOutputs:
    """``engine.while_exits`` with each exit segment run on a bucket of the still-active rows only.

    Same arguments and outputs as ``engine.while_exits``, plus ``buckets``: the static bucket sizes (the batch size
    is always added; default ``default_buckets(B)``). Every bucket size compiles its own copy of the segment and
    the heads, so keep the list short. Layers and heads must treat rows independently (no batch statistics).
    """
    engine.check_exits(layers, heads, exit_layers)
    layer_def, stacked = nnx.split(layers)
    num_exits = len(exit_layers)
    ends_E = jnp.asarray(exit_layers, jnp.int32) + 1
    starts_E = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_E[:-1]])
    checks.thresholds(threshold, num_exits)
    thr_E = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (num_exits,))
    batch = h0.shape[0]
    sizes_K = _check_buckets(buckets, batch)
    probe = jax.eval_shape(heads[0], h0)
    zero_B = (h0.reshape(batch, -1)[:, 0] * 0).astype(jnp.int32)   # data-derived, as in the engine

    def run_segment(e, h_S):
        # No row mask inside the bucket: its inactive rows (padding up to the bucket size) are discarded on scatter.
        def layer_body(l, h):
            return layer_fn(nnx.merge(layer_def, jax.tree.map(lambda p: p[l], stacked)), h, l)
        return jax.lax.fori_loop(starts_E[e], ends_E[e], layer_body, h_S)

    def bucket_step(size: int, c: engine.DepthCarry, perm_B: jax.Array) -> engine.DepthCarry:
        idx_S = perm_B[:size]                      # the active rows first, then exited rows as padding
        take = lambda x: x.at[idx_S].get(unique_indices=True, mode="promise_in_bounds")  # noqa: E731
        valid_S = take(c.active_B)
        h_S = run_segment(c.e, take(c.h))
        out = jax.lax.switch(c.e, list(heads), h_S)
        state_S = jax.tree.map(take, c.measure)
        score_S, new_state_S = measure(out, state_S)
        stop_S = valid_S & ((score_S >= thr_E[c.e]) | (c.e == num_exits - 1))

        def put(full, new_S, mask_S):
            # Rows of the bucket that are not in ``mask_S`` get their own old value back (indices are unique).
            old_S = take(full)
            merged = jnp.where(engine.mask_like(mask_S, new_S), new_S.astype(full.dtype), old_S)
            return full.at[idx_S].set(merged, unique_indices=True, mode="promise_in_bounds")

        return engine.DepthCarry(
            e=c.e + 1, h=put(c.h, h_S, valid_S), active_B=put(c.active_B, valid_S & ~stop_S, valid_S),
            exit_B=put(c.exit_B, jnp.broadcast_to(c.e, stop_S.shape), stop_S),
            logits_BxC=put(c.logits_BxC, out.logits_BxC, stop_S), score_B=put(c.score_B, score_S, stop_S),
            measure=jax.tree.map(lambda full, new: put(full, new, valid_S), c.measure, new_state_S))

    branches = [functools.partial(bucket_step, size) for size in sizes_K]

    def body(c: engine.DepthCarry) -> engine.DepthCarry:
        count = jnp.sum(c.active_B.astype(jnp.int32))
        perm_B = jnp.argsort(~c.active_B, stable=True)          # stable: active rows keep their order
        which = jnp.searchsorted(jnp.asarray(sizes_K, jnp.int32), count)   # smallest bucket >= count
        return jax.lax.switch(jnp.minimum(which, len(sizes_K) - 1), branches, c, perm_B)

    def cond(c: engine.DepthCarry):
        return (c.e < num_exits) & jnp.any(c.active_B)

    init = engine.DepthCarry(
        e=jnp.int32(0), h=h0, active_B=zero_B == 0, exit_B=zero_B,
        logits_BxC=jnp.zeros(probe.logits_BxC.shape, probe.logits_BxC.dtype) + zero_B[:, None],
        score_B=zero_B.astype(jnp.float32), measure=conf_lib.init_state(probe, zero_B))
    final = jax.lax.while_loop(cond, body, init)
    return engine.DynamicOutputs(logits_BxC=final.logits_BxC, exit_B=final.exit_B,
                                 exit_layer_B=ends_E[final.exit_B] - 1, score_B=final.score_B,
                                 layers_run=ends_E[final.e - 1])


def sharded_exits(mesh: Mesh, layers: nnx.Module, heads: Sequence[nnx.Module], h0: jax.Array,
                  exit_layers: Sequence[int], threshold, *, measure: conf_lib.Measure = conf_lib.max_softmax,
                  layer_fn: engine.LayerFn = engine.call_layer, axis_name: str = "data",
                  path: Callable[..., engine.DynamicOutputs] = engine.while_exits) -> engine.DynamicOutputs:
    """Per-device early termination: each device runs ``path`` (default ``engine.while_exits``) on its own rows.

    Needs ``jax.shard_map`` rather than ``jit`` + a sharded batch because the while-loop's condition must be local:
    under ``jit`` it is an ``any`` over the global batch. Weights (``layers`` and ``heads``, NNX modules) are
    replicated; ``h0`` is split over ``axis_name``. Outputs are per row as usual, except ``layers_run``, which has
    one entry per device (P). ``path=compacted_exits`` composes both ideas. Call it under ``jax.jit``.
    """
    ndev = mesh.shape[axis_name]
    if h0.shape[0] % ndev:
        raise ValueError(f"batch {h0.shape[0]} not divisible by the {ndev} devices of mesh axis {axis_name!r}")
    graphdef, state = nnx.split((layers, tuple(heads)))
    checks.thresholds(threshold, len(exit_layers))
    thr_E = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (len(exit_layers),))
    rows = P(axis_name)

    def per_device(state, h0_local, thr_E):
        layers_l, heads_l = nnx.merge(graphdef, state)
        out = path(layers_l, list(heads_l), h0_local, exit_layers, thr_E, measure=measure, layer_fn=layer_fn)
        return out._replace(layers_run=out.layers_run.reshape(1))

    # check_vma=True holds: the loop carries derive from the sharded rows (engine's ``zero_B``), the weights stay
    # invariant and nothing in the body communicates.
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), rows, P()),
                       out_specs=engine.DynamicOutputs(rows, rows, rows, rows, rows))
    return fn(state, h0, thr_E)


__all__ = ["default_buckets", "compacted_exits", "sharded_exits"]
