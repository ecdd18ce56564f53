"""Depth-grouped continuous batching: a pool of slots over a queue of inputs, one layer per slot per step.

The masked and cascade paths (``engine.while_exits``, ``paths.cascade_exits``) process a *batch*: the batch is
done when its deepest row is done, so shallow rows leave idle (masked) or shrinking (cascade) work behind. For a
*stream* of inputs, continuous batching keeps the device full instead: ``S`` slots each hold one sample at its own
current layer; every step applies **one layer to every slot**, whatever layer that is; a slot whose sample exits
(or finishes the last layer) writes the sample's result to an output buffer and is refilled with the next queued
input at layer 0. Everything runs in one ``lax.while_loop`` over steps that ends when the queue is empty and every
slot is done.

One step on the pre-LN block (``eejax.nn.layers.Block``), with ``l_S`` the layer each slot runs next:

1. Sort the slots by layer (stable ``argsort``; empty slots last), so that the ``T`` token rows of the slots at
   layer ``l`` are contiguous in ``rows_(S*T)xD``; group sizes are ``count_N * T``.
2. Every weight matmul (fused QKV, attention output, fc1, fc2) is one ``jax.lax.ragged_dot(rows_(S*T)xD,
   W_NxDxF, group_sizes_N)``: the layers are the groups. LayerNorm parameters and biases are gathered per slot
   (``p_NxD[l_S]``); LayerNorm runs as the model's own ``nnx.LayerNorm`` vmapped over slots; attention is the
   usual batched einsum (it mixes tokens of one slot only).
3. Un-sort. Slots whose just-finished layer is an exit layer evaluate that exit's head and the confidence measure.
   Heads are evaluated **per exit with masks**: exit ``e``'s head runs on all ``S`` slots under a ``lax.cond`` that
   skips it when no slot sits at exit ``e``, and each slot keeps the output of its own exit. Any head type works
   (heterogeneous heads included); the cost is up to ``E`` head evaluations on ``S`` slots per step, negligible for
   linear heads (``E*S*D*C`` FLOPs against ``S*T*(12*D^2 + 2*T*D)`` for a layer) but not for ViT-EE-style heads.

Results agree with ``engine.while_exits`` sample for sample (same exit, logits to float tolerance; tested).

Backend note: ``ragged_dot`` is lowered natively on TPU (``chlo.ragged_dot``) and on GPU (``chlo.ragged_dot``, or a
Pallas/Triton kernel under ``jax_ragged_dot_use_gpu_pallas_triton_lowering``). On CPU jax 0.10 lowers it to a
masked dense dot over all ``N`` groups, i.e. ``N`` times the FLOPs of the grouped matmul: correct, but CPU timings
of this path say nothing about its value on an accelerator.

Shapes: Q queued inputs (the "batch" B of the outputs), S slots, T tokens, D width, F output width of a matmul,
N layers, E exits, C classes, H heads, K head dim.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

from eejax.exits import confidence as conf_lib
from eejax.exits import engine, policies
from eejax.nn.layers import Block, require_pre_ln


class ContinuousOutputs(NamedTuple):
    """Per-input result of the continuous path (as ``engine.DynamicOutputs``, with ``steps`` for ``layers_run``)."""

    out: object              # head output of the exit each input took (B = Q, in queue order)
    exit_B: jax.Array        # exit index taken (0..E-1)
    exit_layer_B: jax.Array  # 0-based layer index after which the input exited
    score_B: jax.Array       # confidence score at the exit taken
    steps: jax.Array         # loop steps taken (each applies one layer to every slot)

    @property
    def logits_BxC(self) -> jax.Array:
        return self.out.logits_BxC


class SlotCarry(NamedTuple):
    """Carry of the continuous-batching while-loop."""

    steps: jax.Array          # steps taken so far
    next_q: jax.Array         # the next queued input to load
    h_SxTxD: jax.Array        # each slot's hidden state
    layer_S: jax.Array        # the layer each slot runs next
    sample_S: jax.Array       # the queue index of the input a slot holds
    live_S: jax.Array         # slot holds an unfinished input
    policy_state: object      # per slot; reset on refill
    out_Q: object             # output buffers (the head output pytree), written when an input exits
    exit_Q: jax.Array
    score_Q: jax.Array


class BlockWeights(NamedTuple):
    """The stacked weights of a pre-LN ``Block`` in the layout the grouped step uses (leading layer axis N)."""

    ln1: nnx.LayerNorm        # the stacked LayerNorm modules themselves (applied per slot with vmap)
    ln2: nnx.LayerNorm
    qkv_NxDx3D: jax.Array
    qkv_b_Nx3D: jax.Array
    out_NxDxD: jax.Array
    out_b_NxD: jax.Array
    fc1_NxDxF: jax.Array
    fc1_b_NxF: jax.Array
    fc2_NxFxD: jax.Array
    fc2_b_NxD: jax.Array


def grouped_linear(x_SxTxD: jax.Array, kernel_NxDxF: jax.Array, bias_NxF: jax.Array, sorted_layer_S: jax.Array,
                   count_N: jax.Array, like: nnx.Linear | None = None) -> jax.Array:
    """``x @ W[l_s] + b[l_s]`` for every slot ``s`` as one ``ragged_dot`` (slots sorted by layer, layers as groups).

    ``count_N`` counts the (live) slots per layer; slots beyond ``sum(count_N)`` (empty slots, sorted last) belong
    to no group and get an unspecified value. ``like`` (an ``nnx.Linear``) supplies dtype and precision so that
    the result matches that module's own call.
    """
    s, t, d = x_SxTxD.shape
    promote = like.promote_dtype if like is not None else dtypes.promote_dtype
    x, kernel, bias = promote((x_SxTxD, kernel_NxDxF, bias_NxF), dtype=getattr(like, "dtype", None))
    precision = getattr(like, "precision", None)
    y = jax.lax.ragged_dot(x.reshape(s * t, d), kernel, (count_N * t).astype(jnp.int32), precision=precision)
    bias_SxF = bias[jnp.minimum(sorted_layer_S, kernel.shape[0] - 1)]   # empty slots carry the sentinel N
    return y.reshape(s, t, -1) + bias_SxF[:, None, :]


def block_weights(layers: nnx.Module) -> BlockWeights:
    """Pull the stacked weights out of ``layers`` (an ``nnx.vmap``-stacked ``Block``); fail loudly otherwise."""
    if not isinstance(layers, Block):
        raise TypeError(f"continuous batching implements the pre-LN eejax.nn.layers.Block; got "
                        f"{type(layers).__name__}")
    require_pre_ln(layers, "continuous batching")
    a, m = layers.attn, layers.mlp
    return BlockWeights(ln1=layers.ln1, ln2=layers.ln2,
                        qkv_NxDx3D=a.qkv.kernel[...], qkv_b_Nx3D=a.qkv.bias[...],
                        out_NxDxD=a.out.kernel[...], out_b_NxD=a.out.bias[...],
                        fc1_NxDxF=m.fc1.kernel[...], fc1_b_NxF=m.fc1.bias[...],
                        fc2_NxFxD=m.fc2.kernel[...], fc2_b_NxD=m.fc2.bias[...])


def _per_slot_layernorm(ln: nnx.LayerNorm, x_SxTxD: jax.Array, layer_S: jax.Array) -> jax.Array:
    """The stacked LayerNorm module applied to each slot with that slot's layer's scale and bias."""
    ln_def, ln_state = nnx.split(ln)
    num_layers = jax.tree.leaves(ln_state)[0].shape[0]
    state_S = jax.tree.map(lambda p: p[jnp.minimum(layer_S, num_layers - 1)], ln_state)
    return jax.vmap(lambda st, x: nnx.merge(ln_def, st)(x))(state_S, x_SxTxD)


def grouped_block_step(layers: nnx.Module, h_SxTxD: jax.Array, layer_S: jax.Array,
                       live_S: jax.Array | None = None) -> jax.Array:
    """Apply layer ``layer_S[s]`` of the stacked pre-LN ``Block`` to slot ``s``, for every slot at once.

    Same math as ``Block.__call__`` (tested). Slots with ``live_S`` False are left out of every group; their output
    is unspecified.
    """
    w = block_weights(layers)
    s, t, d = h_SxTxD.shape
    num_layers = w.qkv_NxDx3D.shape[0]
    num_heads = layers.attn.num_heads
    live_S = jnp.ones((s,), bool) if live_S is None else live_S
    key_S = jnp.where(live_S, layer_S, num_layers)              # empty slots sort last, in no group
    perm_S = jnp.argsort(key_S, stable=True)
    inv_S = jnp.argsort(perm_S)
    l_S = key_S[perm_S]
    count_N = jnp.sum(l_S[:, None] == jnp.arange(num_layers)[None, :], axis=0)
    h = h_SxTxD[perm_S]

    # Attention half; mirrors layers.SelfAttention.
    x = _per_slot_layernorm(w.ln1, h, l_S)
    qkv = grouped_linear(x, w.qkv_NxDx3D, w.qkv_b_Nx3D, l_S, count_N, layers.attn.qkv)
    qkv = qkv.reshape(s, t, 3, num_heads, d // num_heads)
    q_SxTxHxK, k_SxTxHxK, v_SxTxHxK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits_SxHxTxT = jnp.einsum("bthk,bshk->bhts", q_SxTxHxK, k_SxTxHxK) / jnp.sqrt(q_SxTxHxK.shape[-1])
    probs = jax.nn.softmax(logits_SxHxTxT.astype(jnp.float32), axis=-1).astype(v_SxTxHxK.dtype)
    o = jnp.einsum("bhts,bshk->bthk", probs, v_SxTxHxK).reshape(s, t, d)
    h = h + grouped_linear(o, w.out_NxDxD, w.out_b_NxD, l_S, count_N, layers.attn.out)

    # MLP half; mirrors layers.Mlp.
    x = _per_slot_layernorm(w.ln2, h, l_S)
    x = jax.nn.gelu(grouped_linear(x, w.fc1_NxDxF, w.fc1_b_NxF, l_S, count_N, layers.mlp.fc1))
    h = h + grouped_linear(x, w.fc2_NxFxD, w.fc2_b_NxD, l_S, count_N, layers.mlp.fc2)
    return h[inv_S]


def _heads_per_slot(heads, h_SxTxD, exit_S, at_exit_S, probe):
    """Each slot's own exit head output: head ``e`` runs (on all slots) only if some slot sits at exit ``e``."""
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), probe)
    out = zeros
    for e, head in enumerate(heads):
        at_e_S = at_exit_S & (exit_S == e)
        out_e = jax.lax.cond(jnp.any(at_e_S), lambda h, head=head: head(h), lambda h: zeros, h_SxTxD)
        out = engine.where_rows(at_e_S, out_e, out)
    return out


def continuous_exits(layers: nnx.Module, heads: Sequence[Callable[[jax.Array], engine.HeadOut]],
                     h0_QxTxD: jax.Array, exit_layers: Sequence[int], threshold=None, *, num_slots: int,
                     measure: conf_lib.Measure = conf_lib.max_softmax, policy=None) -> ContinuousOutputs:
    """Early exit over a queue of ``Q`` embedded inputs with ``num_slots`` slots (continuous batching).

    Arguments as ``engine.while_exits`` (``h0`` is the queue, in order; ``layers`` must be a stacked
    ``eejax.nn.layers.Block``). The policy is ``policy`` or ``policies.threshold(measure, threshold)``; each slot
    is decided by the engine's one stop rule (``engine.exit_check``) at its own exit. Every head must return the
    same shapes.
    """
    num_layers = engine.check_exits(layers, heads, exit_layers)
    block_weights(layers)   # type check up front
    num_exits = len(exit_layers)
    if policy is None:
        policy = policies.threshold(measure, threshold, num_exits)
    q = h0_QxTxD.shape[0]
    if q < 1 or num_slots < 1:
        raise ValueError(f"need at least one input and one slot: {h0_QxTxD.shape=}, {num_slots=}")
    s = num_slots
    exit_of_layer = [-1] * num_layers
    for e, l in enumerate(exit_layers):
        exit_of_layer[l] = e
    exit_of_layer_N = jnp.asarray(exit_of_layer, jnp.int32)
    exit_layer_E = jnp.asarray(exit_layers, jnp.int32)

    slots_like = jax.ShapeDtypeStruct((s,) + h0_QxTxD.shape[1:], h0_QxTxD.dtype)
    probes = [jax.eval_shape(head, slots_like) for head in heads]
    sigs = {tuple((a.shape, a.dtype) for a in jax.tree.leaves(p)) for p in probes}
    if len(sigs) > 1:
        raise ValueError(f"every exit head must return the same shapes and dtypes; got {sorted(map(str, sigs))}")
    probe = probes[0]
    idx_S = jnp.arange(s, dtype=jnp.int32)
    # A slot's policy state starts afresh from the input it is (re)filled with (a router reads that input).
    fresh = lambda h_SxTxD: policy.init(probe, idx_S * 0, h_SxTxD)  # noqa: E731

    def body(c: SlotCarry) -> SlotCarry:
        h = grouped_block_step(layers, c.h_SxTxD, c.layer_S, c.live_S)
        exit_S = exit_of_layer_N[jnp.minimum(c.layer_S, num_layers - 1)]
        at_exit_S = c.live_S & (exit_S >= 0)
        out = _heads_per_slot(heads, h, exit_S, at_exit_S, probe)
        stop_S, score_S, state = engine.exit_check(policy, out, c.policy_state, jnp.maximum(exit_S, 0), num_exits,
                                                   at_exit_S)

        # Write the finished inputs' results at their queue positions (other slots scatter out of bounds: dropped).
        dest_S = jnp.where(stop_S, c.sample_S, q)
        out_Q = jax.tree.map(lambda buf, o: buf.at[dest_S].set(o.astype(buf.dtype), mode="drop"), c.out_Q, out)
        exit_Q = c.exit_Q.at[dest_S].set(exit_S, mode="drop")
        score_Q = c.score_Q.at[dest_S].set(score_S, mode="drop")

        # Refill the finished slots, in slot order, with the next queued inputs.
        new_q_S = c.next_q + jnp.cumsum(stop_S.astype(jnp.int32)) - 1
        got_S = stop_S & (new_q_S < q)
        refill_SxTxD = h0_QxTxD[jnp.clip(new_q_S, 0, q - 1)]
        h = jnp.where(got_S[:, None, None], refill_SxTxD, h)
        return SlotCarry(
            steps=c.steps + 1, next_q=c.next_q + jnp.sum(got_S.astype(jnp.int32)), h_SxTxD=h,
            layer_S=jnp.where(stop_S, 0, c.layer_S + 1), sample_S=jnp.where(got_S, new_q_S, c.sample_S),
            live_S=jnp.where(stop_S, got_S, c.live_S), policy_state=engine.where_rows(got_S, fresh(refill_SxTxD), state),
            out_Q=out_Q, exit_Q=exit_Q, score_Q=score_Q)

    def cond(c: SlotCarry):
        return jnp.any(c.live_S)

    zero_Q = jnp.zeros((q,), jnp.int32)
    init = SlotCarry(
        steps=jnp.int32(0), next_q=jnp.int32(min(s, q)), h_SxTxD=h0_QxTxD[jnp.minimum(idx_S, q - 1)],
        layer_S=idx_S * 0, sample_S=idx_S, live_S=idx_S < q,
        policy_state=fresh(h0_QxTxD[jnp.minimum(idx_S, q - 1)]),
        out_Q=jax.tree.map(lambda a: jnp.zeros((q,) + a.shape[1:], a.dtype), probe),
        exit_Q=zero_Q, score_Q=zero_Q.astype(jnp.float32))
    final = jax.lax.while_loop(cond, body, init)
    return ContinuousOutputs(out=final.out_Q, exit_B=final.exit_Q,
                             exit_layer_B=exit_layer_E[final.exit_Q], score_B=final.score_Q, steps=final.steps)


class Continuous(NamedTuple):
    """The continuous-batching executor for ``engine.run``: prefix programs over stacked ``eejax.nn.Block``
    layers, the batch streamed through ``num_slots`` slots. ``layers_run`` reports the loop's steps."""

    num_slots: int

    def run(self, layers, heads, h0, program, policy, *, layer_fn, aux, fields=None):
        del fields   # every head output field is kept (the slots' heads run under per-exit conditionals)
        n = engine.num_layers_of(layers)
        steps = np.asarray(program.layer_S)
        if (aux is not None or layer_fn is not engine.call_layer or engine.per_row(program)
                or program.sub_S is not None or not np.array_equal(steps, np.arange(n))):
            raise ValueError("the continuous executor runs prefix programs of whole layers, no aux state")
        exit_layers = tuple(int(s) for s in np.asarray(program.exit_step_E))
        if policy is None:
            policy = policies.fixed_exit(jnp.full((jax.tree.leaves(h0)[0].shape[0],), len(exit_layers) - 1))
        res = continuous_exits(layers, heads, h0, exit_layers, num_slots=self.num_slots, policy=policy)
        return engine.DynamicOutputs(out=res.out, exit_B=res.exit_B, exit_layer_B=res.exit_layer_B,
                                     score_B=res.score_B, layers_run=res.steps)


def vit_continuous_exits(model, x_QxHxWxC: jax.Array, threshold, *, num_slots: int,
                         measure: str | conf_lib.Measure = "max_softmax") -> ContinuousOutputs:
    """``continuous_exits`` for an ``eejax.models.vit.ViT``: the queue is embedded in one batch, then streamed."""
    measure = conf_lib.get_measure(measure) if isinstance(measure, str) else measure
    return continuous_exits(model.layers, list(model.heads), model.embed(x_QxHxWxC), model.cfg.exit_layers,
                            threshold, num_slots=num_slots, measure=measure)


__all__ = ["Continuous", "ContinuousOutputs", "SlotCarry", "BlockWeights", "grouped_linear", "block_weights",
           "grouped_block_step", "continuous_exits", "vit_continuous_exits"]
