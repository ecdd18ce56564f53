"""The dynamic-depth engine: one set of stacked layer parameters, two execution paths.

* ``scan_exits`` (training): ``lax.scan`` over all N layers, every exit head evaluated, so a loss at every exit is
  differentiable. Returns :class:`ExitOutputs` with a leading exit axis E.
* ``while_exits`` (inference): a ``lax.while_loop`` over exit *segments* (the layers between two exits) with a
  per-sample active mask. A sample stops at the first exit whose confidence score reaches its threshold; rows that
  stopped are frozen by masked updates; the loop ends when every row has exited or the last exit ran. Returns
  :class:`DynamicOutputs`.

Both paths call the same two pieces of the model:

* ``layers``: an NNX module whose parameters carry a leading layer axis N (built with ``nnx.vmap``), called one
  layer at a time as ``layer_fn(layer_module, h, l)``;
* ``heads``: a sequence of E callables ``head(h) -> HeadOut``; heads may be heterogeneous (different modules per
  exit). The dynamic path picks exit ``e``'s head with ``lax.switch``, so only that head runs.

Invariant (tested): for every sample, the dynamic path's logits equal the scan path's logits at the exit that sample
took. With threshold +inf every sample runs to the last exit; with -inf every sample stops at the first exit.

``layer_mask_NxB`` on the scan path is a per-(layer, sample) program: ``h <- where(mask, layer(h), h)``. Prefix
early exit is the special case "mask is 1 up to the exit"; skip and layer-drop methods (LayerSkip, SkipDecode) set
other patterns.

Shapes: B batch, N layers, E exits, C classes, D width; ``h`` is ``B x ...`` (``BxTxD`` for a ViT, ``BxD`` for a
decoder step) or a pytree of such arrays (e.g. a hidden state plus a U-ViT's long-skip stack).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eejax.exits import confidence as conf_lib


class HeadOut(NamedTuple):
    """What an exit head returns."""

    logits_BxC: jax.Array
    feat_BxD: jax.Array    # the head's own pooled feature (used by feature distillation)
    hidden_BxD: jax.Array  # pooled backbone hidden state at the exit (used by hidden-state similarity)
    gate_B: jax.Array      # a learned exit gate's logit (zeros when the head has no gate)


class ExitOutputs(NamedTuple):
    """Every exit's outputs from the scan path (leading exit axis E)."""

    logits_ExBxC: jax.Array
    feat_ExBxD: jax.Array
    hidden_ExBxD: jax.Array
    gate_ExB: jax.Array
    h_last: jax.Array  # the backbone's output after the last layer (``B x ...``)


class DynamicOutputs(NamedTuple):
    """The while-loop path's per-sample result."""

    logits_BxC: jax.Array  # the logits of the exit each sample took
    exit_B: jax.Array      # exit index taken (0..E-1)
    exit_layer_B: jax.Array  # 0-based layer index after which the sample exited
    score_B: jax.Array     # confidence score at the exit taken
    layers_run: jax.Array  # layers the batch loop executed (the deepest row's depth)


class DepthCarry(NamedTuple):
    """Carry of the inference while-loop (over exits)."""

    e: jax.Array           # next exit to evaluate
    h: jax.Array           # hidden state, frozen for rows that have exited
    active_B: jax.Array    # rows still running
    exit_B: jax.Array
    logits_BxC: jax.Array
    score_B: jax.Array
    measure: conf_lib.MeasureState


LayerFn = Callable[[nnx.Module, jax.Array, jax.Array], jax.Array]


def call_layer(layer: nnx.Module, h: jax.Array, l: jax.Array) -> jax.Array:
    """Default ``layer_fn``: the layer ignores its index."""
    del l
    return layer(h)


def exit_layers_from(spec, num_layers: int) -> tuple[int, ...]:
    """Exit positions as sorted 0-based layer indices; the last layer is always an exit.

    ``spec`` is ``"all"`` (after every layer), ``"every:k"`` (after layers k-1, 2k-1, ...), ``"from:k"`` (after
    every 0-based layer >= k), or an explicit list of 0-based layer indices.
    """
    if isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        if kind == "all":
            layers = range(num_layers)
        elif kind == "every" and arg.isdigit() and int(arg) > 0:
            layers = range(int(arg) - 1, num_layers, int(arg))
        elif kind == "from" and arg.isdigit():
            layers = range(int(arg), num_layers)
        else:
            raise ValueError(f"bad exit spec {spec!r}: use 'all', 'every:k', 'from:k' or a list of layer indices")
    else:
        layers = [int(i) for i in spec]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"exit layers {bad} outside [0, {num_layers})")
    return tuple(sorted(set(layers) | {num_layers - 1}))


def mask_like(mask_B: jax.Array, x: jax.Array) -> jax.Array:
    """A per-row mask reshaped to broadcast against ``x`` (``B x ...``)."""
    return mask_B.reshape(mask_B.shape + (1,) * (x.ndim - 1))


def where_rows(mask_B, new, old):
    """Row-wise select over matching pytrees: ``new`` where ``mask_B`` is set, ``old`` elsewhere."""
    return jax.tree.map(lambda n, o: jnp.where(mask_like(mask_B, n), n, o), new, old)


def run_layers(layers: nnx.Module, h0: jax.Array, *, layer_fn: LayerFn = call_layer,
               layer_mask_NxB: jax.Array | None = None, remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """``lax.scan`` over the stacked layers; returns the last hidden state and every layer's output (leading N)."""
    layer_def, stacked = nnx.split(layers)
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    batch = jax.tree.leaves(h0)[0].shape[0]
    mask_NxB = jnp.ones((num_layers, batch), bool) if layer_mask_NxB is None else layer_mask_NxB

    def body(h, xs):
        state_l, l, mask_B = xs
        new_h = layer_fn(nnx.merge(layer_def, state_l), h, l)
        h = where_rows(mask_B, new_h, h)
        return h, h

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, h0, (stacked, jnp.arange(num_layers), mask_NxB))


def check_exits(layers, heads, exit_layers) -> int:
    """One head per exit and an exit after the last layer; returns the number of layers."""
    num_layers = jax.tree.leaves(nnx.state(layers))[0].shape[0]
    if len(heads) != len(exit_layers) or exit_layers[-1] != num_layers - 1:
        raise ValueError(f"{len(heads)=} heads for {exit_layers=} with {num_layers=}: need one head per exit and an "
                         "exit after the last layer")
    return num_layers


def scan_exits(layers: nnx.Module, heads: Sequence[Callable[[jax.Array], HeadOut]], h0: jax.Array,
               exit_layers: Sequence[int], *, layer_fn: LayerFn = call_layer,
               layer_mask_NxB: jax.Array | None = None, remat: bool = False) -> ExitOutputs:
    """Training path: every layer runs under ``lax.scan``; every exit head sees its layer's output."""
    check_exits(layers, heads, exit_layers)
    h_last, h_Nx = run_layers(layers, h0, layer_fn=layer_fn, layer_mask_NxB=layer_mask_NxB, remat=remat)
    outs = [head(jax.tree.map(lambda x, l=l: x[l], h_Nx)) for head, l in zip(heads, exit_layers)]  # h may be a pytree
    stacked_out = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return ExitOutputs(*stacked_out, h_last=h_last)


def while_exits(layers: nnx.Module, heads: Sequence[Callable[[jax.Array], HeadOut]], h0: jax.Array,
                exit_layers: Sequence[int], threshold, *, measure: conf_lib.Measure = conf_lib.max_softmax,
                layer_fn: LayerFn = call_layer) -> DynamicOutputs:
    """Inference path: per-sample early exit inside one ``lax.while_loop`` over the same stacked parameters.

    ``threshold`` is a scalar or one value per exit; a row exits at exit e when ``score >= threshold[e]``; the last
    exit always takes every row still running. The loop stops as soon as no row is active.
    """
    check_exits(layers, heads, exit_layers)
    layer_def, stacked = nnx.split(layers)
    num_exits = len(exit_layers)
    ends_E = jnp.asarray(exit_layers, jnp.int32) + 1                   # segment e runs layers [starts, ends)
    starts_E = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_E[:-1]])
    thr_E = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (num_exits,))

    # Probe one head for the output shapes (trace only; nothing runs).
    probe = jax.eval_shape(heads[0], h0)
    first = jax.tree.leaves(h0)[0]
    batch = first.shape[0]
    # Initial carries derived from the data so they carry its sharding (needed under shard_map, JAX-NOTES §5).
    zero_B = (first.reshape(batch, -1)[:, 0] * 0).astype(jnp.int32)

    def run_segment(e, h, active_B):
        def layer_body(l, h):
            state_l = jax.tree.map(lambda p: p[l], stacked)
            new_h = layer_fn(nnx.merge(layer_def, state_l), h, l)
            return where_rows(active_B, new_h, h)
        return jax.lax.fori_loop(starts_E[e], ends_E[e], layer_body, h)

    def cond(c: DepthCarry):
        return (c.e < num_exits) & jnp.any(c.active_B)

    def body(c: DepthCarry):
        h = run_segment(c.e, c.h, c.active_B)
        out = jax.lax.switch(c.e, list(heads), h)
        score_B, measure = measure_step(out, c.measure, c.active_B)
        last = c.e == num_exits - 1
        stop_B = c.active_B & ((score_B >= thr_E[c.e]) | last)
        return DepthCarry(
            e=c.e + 1, h=h, active_B=c.active_B & ~stop_B,
            exit_B=jnp.where(stop_B, c.e, c.exit_B),
            logits_BxC=jnp.where(stop_B[:, None], out.logits_BxC, c.logits_BxC),
            score_B=jnp.where(stop_B, score_B, c.score_B), measure=measure)

    def measure_step(out, state, active_B):
        score_B, new_state = measure(out, state)
        return score_B, where_rows(active_B, new_state, state)   # exited rows keep their state

    init = DepthCarry(
        e=jnp.int32(0), h=h0, active_B=zero_B == 0, exit_B=zero_B,
        logits_BxC=jnp.zeros(probe.logits_BxC.shape, probe.logits_BxC.dtype) + zero_B[:, None],
        score_B=zero_B.astype(jnp.float32),
        measure=conf_lib.init_state(probe, zero_B))
    final = jax.lax.while_loop(cond, body, init)
    exit_layer_B = ends_E[final.exit_B] - 1
    return DynamicOutputs(logits_BxC=final.logits_BxC, exit_B=final.exit_B, exit_layer_B=exit_layer_B,
                          score_B=final.score_B, layers_run=ends_E[final.e - 1])


def exits_from_scores(score_ExB: jax.Array, threshold) -> jax.Array:
    """The exit each sample would take given every exit's score (the scan path's view of the while-loop policy)."""
    num_exits = score_ExB.shape[0]
    thr_E = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (num_exits,))
    fire_ExB = score_ExB >= thr_E[:, None]
    fire_ExB = fire_ExB.at[-1].set(True)
    return jnp.argmax(fire_ExB, axis=0)


def scores_from_outputs(outs: ExitOutputs, measure: conf_lib.Measure = conf_lib.max_softmax) -> jax.Array:
    """Run a confidence measure over the scan path's exits in order (stateful measures see the previous exits)."""
    per_exit = [HeadOut(*(x[e] for x in outs[:4])) for e in range(outs.logits_ExBxC.shape[0])]
    batch = outs.logits_ExBxC.shape[1]
    state = conf_lib.init_state(per_exit[0], jnp.zeros((batch,), jnp.int32))
    scores = []
    for out in per_exit:
        s, state = measure(out, state)
        scores.append(s)
    return jnp.stack(scores)


def take_exit(x_ExB_: jax.Array, exit_B: jax.Array) -> jax.Array:
    """Select, for each sample, its row of an ``E x B x ...`` array at the exit it took."""
    return jnp.take_along_axis(x_ExB_, exit_B.reshape((1, -1) + (1,) * (x_ExB_.ndim - 2)), axis=0)[0]


__all__ = ["HeadOut", "ExitOutputs", "DynamicOutputs", "DepthCarry", "call_layer", "exit_layers_from",
           "check_exits", "where_rows", "mask_like", "run_layers", "scan_exits", "while_exits", "exits_from_scores", "scores_from_outputs", "take_exit"]
