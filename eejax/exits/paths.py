"""Executors that wrap the engine's loop: per-device (``Sharded``) and the Pallas MLP kernel (``GatedKernel``), and
the ``cascade_exits`` / ``sharded_exits`` shortcuts (``compacted_exits``: the baseline ``engine.Compacted``, for
benchmarks). Each returns what ``engine.run`` returns and agrees with the masked executor row for row (same exit,
same outputs; tested).

* ``Sharded(mesh, inner)``: ``jax.shard_map`` over a 1-D data mesh with replicated weights; each device runs the
  engine's loop (``inner``: Masked or BucketCascade) on its own rows, so its loop stops when *its* rows are done. Under
  plain ``jit`` with a sharded batch the loop condition is a global ``any`` and every device runs the deepest row's
  depth. The loop body has no collectives; ``layers_run`` comes back per device.
* ``GatedKernel()``: the masked loop on layers of ``eejax.nn.Block``, with each layer's MLP half run by the gated
  MLP step (``eejax.kernels.gated_step``) on the rows still running: row tiles with no running row are skipped.
  ``gated_mlp_auto`` dispatches to the Pallas kernel on GPU and to the jnp reference elsewhere (the reference does
  the full matmul; only the kernel skips work). Its speed is timed by ``benchmarks/vit_paths.py`` (path
  ``gated_kernel``).

Shapes: B batch, Z devices on the data axis, T tokens, D width.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from eejax.exits import confidence as conf_lib
from eejax.exits import engine, policies
from eejax.kernels.gated_step import gated_mlp_auto
from eejax.nn.layers import Block, require_pre_ln

default_buckets = engine.default_buckets


class Sharded(NamedTuple):
    """Per-device early termination (see the module docstring). Weights and heads are replicated, rows split."""

    mesh: Mesh
    inner: object = engine.Masked()
    axis_name: str = "data"

    def run(self, layers, heads, h0, program, policy, *, layer_fn, aux, fields=None):
        ndev = self.mesh.shape[self.axis_name]
        batch = jax.tree.leaves(h0)[0].shape[0]
        if batch % ndev:
            raise ValueError(f"batch {batch} not divisible by the {ndev} devices of mesh axis {self.axis_name!r}")
        if aux is not None or engine.per_row(program):
            raise ValueError("the sharded executor splits rows only: no aux state and no per-row program")
        module_heads = all(isinstance(h, nnx.Module) for h in heads)
        graphdef, state = nnx.split((layers, tuple(heads) if module_heads else ()))
        rows = P(self.axis_name)
        # A per-row exit list is split with the rows; other policies hold only per-exit values (replicated).
        per_row = (isinstance(policy, policies.FixedExit)
                   and jnp.ndim(policy.exit_B) == 1) if policy is not None else False
        exit_B = jnp.asarray(policy.exit_B, jnp.int32) if per_row else jnp.zeros((batch,), jnp.int32)

        def per_device(state, h0_local, exit_local):
            layers_l, heads_l = nnx.merge(graphdef, state)
            pol = policies.fixed_exit(exit_local) if per_row else policy
            out = engine.run(layers_l, list(heads_l) if module_heads else heads, h0_local, program, pol,
                             self.inner, layer_fn=layer_fn, fields=fields)
            # The policy's state stays on the device (its leaves need not have a row axis to shard).
            return out._replace(layers_run=jnp.reshape(out.layers_run, (1,)), policy_state=None)

        # check_vma=True holds: the loop carries derive from the sharded rows (engine.zeros_from), the weights stay
        # invariant and nothing in the body communicates.
        spec = engine.DynamicOutputs(out=rows, exit_B=rows, exit_layer_B=rows, score_B=rows, layers_run=rows,
                                     h=None if isinstance(self.inner, engine.BucketCascade) else rows, aux=None)
        return jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), rows, rows), out_specs=spec)(state, h0,
                                                                                                    exit_B)


class GatedKernel(NamedTuple):
    """The masked loop with each ``eejax.nn.Block`` layer's MLP half in the gated-step kernel (rows that stopped,
    in whole tiles, are skipped). ``block_rows``: the kernel's row tile over the flattened ``B*T`` tokens."""

    block_rows: int = 32

    def run(self, layers, heads, h0, program, policy, *, layer_fn, aux, fields=None):
        if not isinstance(layers, Block) or layer_fn is not engine.call_layer:
            raise TypeError("GatedKernel runs stacked eejax.nn.Block layers with the default layer_fn; got "
                            f"{type(layers).__name__}")
        if program.ffn_SxB is not None:
            raise ValueError("GatedKernel runs the block's one MLP; an FFN route (ffn_SxB) needs the Masked executor")
        fc1, fc2 = layers.mlp.fc1, layers.mlp.fc2
        w1, b1, w2, b2 = fc1.kernel[...], fc1.bias[...], fc2.kernel[...], fc2.bias[...]
        block_rows = self.block_rows

        def kernel_layer(layer, h_BxTxD, ctx: engine.StepCtx):
            require_pre_ln(layer, "the gated-MLP kernel path")
            run_B = ctx.run_B
            if ctx.sub_B is not None:
                h_BxTxD = engine.where_rows((ctx.sub_B & engine.ATTN) > 0, layer.attn_half(h_BxTxD), h_BxTxD)
                run_B = run_B & ((ctx.sub_B & engine.MLP) > 0)
            else:
                h_BxTxD = layer.attn_half(h_BxTxD)
            b, t, d = h_BxTxD.shape
            x = layer.ln2(h_BxTxD).reshape(b * t, d)
            y = gated_mlp_auto(x.astype(w1.dtype), jnp.repeat(run_B, t), w1, b1, w2, b2, ctx.layer,
                               residual_NxD=h_BxTxD.reshape(b * t, d), block_rows=block_rows)
            return y.reshape(b, t, d)

        return engine.run(layers, heads, h0, program, policy, engine.Masked(), layer_fn=kernel_layer, aux=aux,
                          fields=fields)


def cascade_exits(layers: nnx.Module, heads: Sequence[Callable[[jax.Array], engine.HeadOut]], h0: jax.Array,
                  exit_layers: Sequence[int], threshold, *, measure: conf_lib.Measure = conf_lib.max_softmax,
                  layer_fn: engine.LayerFn = engine.call_layer,
                  buckets: Sequence[int] | None = None) -> engine.DynamicOutputs:
    """Prefix exit with a confidence threshold on the cascade executor (``engine.BucketCascade(buckets)``)."""
    return engine.while_exits(layers, heads, h0, exit_layers, threshold, measure=measure, layer_fn=layer_fn,
                              executor=engine.BucketCascade(None if buckets is None else tuple(buckets)))


def compacted_exits(layers: nnx.Module, heads: Sequence[Callable[[jax.Array], engine.HeadOut]], h0: jax.Array,
                    exit_layers: Sequence[int], threshold, *, measure: conf_lib.Measure = conf_lib.max_softmax,
                    layer_fn: engine.LayerFn = engine.call_layer,
                    buckets: Sequence[int] | None = None) -> engine.DynamicOutputs:
    """Prefix exit with a confidence threshold on the BASELINE compacted executor (``engine.Compacted(buckets)``),
    for side-by-side benchmarks against ``cascade_exits``."""
    return engine.while_exits(layers, heads, h0, exit_layers, threshold, measure=measure, layer_fn=layer_fn,
                              executor=engine.Compacted(None if buckets is None else tuple(buckets)))


def sharded_exits(mesh: Mesh, layers: nnx.Module, heads: Sequence[nnx.Module], h0: jax.Array,
                  exit_layers: Sequence[int], threshold, *, measure: conf_lib.Measure = conf_lib.max_softmax,
                  layer_fn: engine.LayerFn = engine.call_layer, axis_name: str = "data",
                  inner=engine.Masked()) -> engine.DynamicOutputs:
    """Prefix exit with a confidence threshold on ``Sharded(mesh, inner)``; call it under ``jax.jit``."""
    engine.check_exits(layers, heads, exit_layers)
    program = engine.prefix(engine.num_layers_of(layers), exit_layers)
    return engine.run(layers, heads, h0, program, policies.threshold(measure, threshold, len(exit_layers)),
                      Sharded(mesh, inner, axis_name), layer_fn=layer_fn)


__all__ = ["Sharded", "GatedKernel", "default_buckets", "cascade_exits", "compacted_exits", "sharded_exits"]
