"""Depth chosen before running (engine feature F7): a gate predicts each row's exit from its input, then the rows
run grouped by that exit, each group as a static-depth sub-batch.

ECO-M2F (Yao et al., arXiv:2404.15244) in three steps:

* (A) train a model whose encoder can exit after any of several depths (a multi-exit loss);
* (B) for every example of a labelling set compute the quality ``q_e`` of exiting at ``e`` and label the example
  ``argmax_e [q_e - beta * depth_e]`` (:func:`gate_labels`: the "derived dataset");
* (C) train a gate, one linear layer on the average-pooled encoder *input* tokens (:class:`DepthGate`), on those
  labels. Only (B) and (C) are redone to move along the quality / cost trade-off (a new ``beta``).

Applying the labels of (B) directly is an oracle (they read the answer); the gate is the method.

At inference each row's exit is its own gate argmax (:func:`predict_exits`). This differs from the released code
(GYeow/ECO-M2F): ``i_exit = gates.argmax() + 2`` takes the argmax of the flattened ``B x 5`` gate tensor, one
number for the whole batch, which is a depth only at batch size 1.

Execution (:func:`run_grouped`): every row's depth is known before any layer runs, so nothing is decided inside
the loop. The rows are sorted by exit (stable), each exit's rows are cut into chunks of static sizes
(:func:`plan_groups`: ``multiple * 2**i``, the largest that fits first, so only an exit's last chunk is padded, by
fewer than ``multiple`` rows), and each chunk runs a static-depth program: the program's steps up to its exit and
that exit's head only (:func:`static_program`: a loop of known trip count). The cost per batch:

* host stops: one (the gate's exits read on the host to cut the groups); none inside a chunk's program
  (``tests/test_gate_first.py`` reads both from the compiled programs with ``eejax.exits.hlo``);
* FLOPs: the sum over chunks of chunk size x the exit's static cost (:func:`plan_flops`, padding included), so a
  batch's cost follows its mean depth, where a per-row exit loop (``engine.Masked``) computes every row until the
  deepest row of the batch is done and decides after every exit.

:class:`Grouped` is the same executor behind ``engine.run``, for the policies that fix the depth before running
(``policies.router`` with a gate, ``policies.fixed_exit``); it runs from the host and cannot be traced by ``jax.jit``
(the chunk programs are jitted and cached).

Shapes: B batch, T tokens, D width, E exits, K chunks, S rows of a chunk (its static size).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.exits import costs, engine, policies

# ------------------------------------------------------------------------------------------------ the gate


class DepthGate(nnx.Module):
    """ECO-M2F's gating network (``GatingFunction``): the encoder's input tokens average-pooled, then one linear
    layer to one logit per exit."""

    def __init__(self, d_model: int, num_exits: int, *, rngs: nnx.Rngs):
        if d_model < 1 or num_exits < 1:
            raise ValueError(f"{d_model=} and {num_exits=} must be >= 1")
        self.fc = nnx.Linear(d_model, num_exits, rngs=rngs)

    def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
        """Exit logits ``B x E`` of the encoder input ``h_BxTxD``."""
        return self.from_pooled(pool_tokens(h_BxTxD))

    def from_pooled(self, pooled_BxD: jax.Array) -> jax.Array:
        """Exit logits from already pooled tokens (retraining the gate reads cached pooled features)."""
        return self.fc(pooled_BxD)


def pool_tokens(h_BxTxD: jax.Array) -> jax.Array:
    """The average over every axis between the batch and the width (tokens, or a feature map's H x W)."""
    if h_BxTxD.ndim < 2:
        raise ValueError(f"pool_tokens needs a batch and a width axis, got shape {h_BxTxD.shape}")
    return h_BxTxD.mean(axis=tuple(range(1, h_BxTxD.ndim - 1))) if h_BxTxD.ndim > 2 else h_BxTxD


def gate_flops(d_model: int, num_exits: int) -> int:
    """FLOPs of the gate's linear layer on one pooled vector (pooling is an O(T*D) sum, not counted, as in
    ``eejax.exits.costs``)."""
    return costs.linear_head_flops(d_model, num_exits)


def predict_exits(gate_logits_BxE: jax.Array) -> jax.Array:
    """Each row's exit: its own argmax over the exits (``int32[B]``; not the released code's batch-wide argmax)."""
    if gate_logits_BxE.ndim != 2:
        raise ValueError(f"gate logits must be B x E, got shape {gate_logits_BxE.shape}")
    return jnp.argmax(gate_logits_BxE, axis=-1).astype(jnp.int32)


def gate_policy(gate: Callable[[Any], jax.Array]) -> policies.Router:
    """``policies.router`` whose depth is the gate's per-row argmax on the loop's input ``h0``."""
    return policies.router(lambda h0: predict_exits(gate(h0)))


def gate_labels(quality_ExN, beta: float, depth_E=None) -> np.ndarray:
    """ECO-M2F's derived dataset: ``argmax_e [quality_ExN[e, n] - beta * depth_E[e]]`` per example (ties go to the
    shallower exit). ``depth_E``: each exit's depth in layers (default ``1..E``); ``beta >= 0`` prices one layer in
    units of the quality."""
    q = np.asarray(quality_ExN, np.float64)
    if q.ndim != 2 or q.size == 0:
        raise ValueError(f"quality_ExN must be a non-empty E x N array, got shape {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError("quality_ExN holds non-finite values")
    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f"beta={beta!r} must be a finite number >= 0 (the price of one layer)")
    depth_E = np.arange(1, q.shape[0] + 1, dtype=np.float64) if depth_E is None else np.asarray(depth_E, np.float64)
    if depth_E.shape != (q.shape[0],) or np.any(np.diff(depth_E) <= 0):
        raise ValueError(f"depth_E must give one strictly increasing depth per exit ({q.shape[0]}), got {depth_E}")
    return np.argmax(q - beta * depth_E[:, None], axis=0).astype(np.int32)


# ------------------------------------------------------------------------------------------------ grouping


class GroupPlan(NamedTuple):
    """How a batch runs grouped by exit: chunk k holds the rows ``order_B[start_K[k] : start_K[k] + rows_K[k]]``
    (all with exit ``exit_K[k]``), padded to ``size_K[k]`` rows."""

    order_B: np.ndarray   # batch rows sorted by exit (stable: equal exits keep batch order)
    exit_K: np.ndarray    # exit each chunk runs to
    start_K: np.ndarray   # the chunk's first position in order_B
    rows_K: np.ndarray    # real rows in the chunk
    size_K: np.ndarray    # the static size the chunk runs at (rows_K plus padding)

    @property
    def num_chunks(self) -> int:
        return int(self.exit_K.shape[0])

    @property
    def padding(self) -> int:
        """Rows computed and thrown away."""
        return int(np.sum(self.size_K - self.rows_K))


def chunk_sizes(batch: int, multiple: int = 8) -> tuple[int, ...]:
    """Static chunk sizes ``multiple * 2**i`` up to ``batch`` (``(batch,)`` when the batch is smaller than
    ``multiple``): one compiled program per (exit, size)."""
    if batch < 1 or multiple < 1:
        raise ValueError(f"{batch=} and {multiple=} must be >= 1")
    if batch < multiple:
        return (batch,)
    sizes, s = [], multiple
    while s <= batch:
        sizes.append(s)
        s *= 2
    return tuple(sizes)


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sorted({int(s) for s in sizes}))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"chunk sizes {sizes} must be one or more integers >= 1")
    return sizes


def plan_groups(exit_B, num_exits: int, sizes: Sequence[int]) -> GroupPlan:
    """Sort the rows by exit and cut each exit's rows into chunks: the largest size that the remaining rows fill,
    the smallest size (padded) for a remainder below it. Runs on the host (``exit_B`` concrete)."""
    exit_B = np.asarray(exit_B)
    if exit_B.ndim != 1 or exit_B.size == 0 or not np.issubdtype(exit_B.dtype, np.integer):
        raise ValueError(f"exit_B must be a non-empty vector of exit indices, got {exit_B.dtype} {exit_B.shape}")
    if exit_B.min() < 0 or exit_B.max() >= num_exits:
        raise ValueError(f"exit_B holds exits in [{exit_B.min()}, {exit_B.max()}]; the program has {num_exits=}")
    sizes = _check_sizes(sizes)
    order_B = np.argsort(exit_B, kind="stable")
    chunks, pos = [], 0
    for e, n in enumerate(np.bincount(exit_B, minlength=num_exits).tolist()):
        while n > 0:
            fit = [s for s in sizes if s <= n]
            size = fit[-1] if fit else sizes[0]
            rows = min(size, n)
            chunks.append((e, pos, rows, size))
            pos, n = pos + rows, n - rows
    exit_K, start_K, rows_K, size_K = (np.asarray(c, np.int64) for c in zip(*chunks))
    return GroupPlan(order_B, exit_K, start_K, rows_K, size_K)


def plan_flops(plan: GroupPlan, static_flops_E) -> float:
    """FLOPs a grouped run executes: chunk size x the static cost of its exit (a truncated model: the steps up to
    the exit and that exit's head; ``costs.ExitCosts.static_flops_E``), padding rows included. Add what every row
    runs before the groups (an embedding, a stem, the gate) separately."""
    static_flops_E = np.asarray(static_flops_E, np.float64)
    return float(np.sum(plan.size_K * static_flops_E[plan.exit_K]))


def plan_work(plan: GroupPlan, step_work: Callable[[int], costs.Work], head_work: Callable[[int], costs.Work],
              steps_E) -> list[costs.Work]:
    """The grouped run as roofline parts (``costs.predict``): per chunk, ``steps_E[e]`` program steps and one head
    at its static size, plus the one host stop that cuts the groups. ``step_work(rows)`` / ``head_work(rows)``:
    one step / one head on ``rows`` rows (e.g. ``costs.vit_layer_work``, ``costs.linear_head_work``)."""
    steps_E = np.asarray(steps_E)
    parts = []
    for e, size in zip(plan.exit_K.tolist(), plan.size_K.tolist()):
        parts.append(step_work(size).times(float(steps_E[e])))
        parts.append(head_work(size))
    parts.append(costs.Work(host_stops=1.0, name="group cut (exits read on the host)"))
    return parts


# ------------------------------------------------------------------------------------------------ execution


def static_program(program: engine.Program, e: int) -> engine.Program:
    """The program's steps up to exit ``e`` with one exit at its end: a static-depth model of that exit."""
    if not checks.is_concrete(program.layer_S) or not checks.is_concrete(program.exit_step_E):
        raise ValueError("grouped runs need a static program (concrete layer_S and exit_step_E)")
    if engine.per_row(program):
        raise ValueError("grouped runs move rows into chunks; a per-row program (row_sub_SxB, ffn_SxB) is not "
                         "supported")
    ends = np.asarray(program.exit_step_E)
    if not 0 <= e < ends.shape[0]:
        raise ValueError(f"exit {e} outside [0, {ends.shape[0]})")
    end = int(ends[e]) + 1
    sub_S = None if program.sub_S is None else np.asarray(program.sub_S)[:end]
    return engine.Program(np.asarray(program.layer_S)[:end], np.asarray(program.repeat_S)[:end],
                          np.asarray([end - 1], np.int32), sub_S)


def _steps_key(program: engine.Program) -> tuple:
    """A hashable form of a static program (a jit static argument)."""
    sub = None if program.sub_S is None else tuple(np.asarray(program.sub_S).tolist())
    return (tuple(np.asarray(program.layer_S).tolist()), tuple(np.asarray(program.repeat_S).tolist()), sub)


def _program_of(key: tuple) -> engine.Program:
    layer_S, repeat_S, sub_S = key
    return engine.Program(np.asarray(layer_S, np.int32), np.asarray(repeat_S, np.int32),
                          np.asarray([len(layer_S) - 1], np.int32), None if sub_S is None else np.asarray(sub_S))


@functools.partial(jax.jit, static_argnames=("layer_def", "head_def", "steps", "layer_fn"))
def _chunk_apply(layer_state, head_state, h0, idx_S, *, layer_def, head_def, steps, layer_fn):
    """One chunk: gather its rows from the batch, run the static program, the exit's head. No host stop."""
    layers = nnx.merge(layer_def, layer_state)
    head = nnx.merge(head_def, head_state) if isinstance(head_def, nnx.GraphDef) else head_def
    h_S = jax.tree.map(lambda x: x[idx_S], h0)
    return engine.run(layers, [head], h_S, _program_of(steps), None, layer_fn=layer_fn).out


def chunk_fn(layers: nnx.Module, head, program: engine.Program, e: int, *,
             layer_fn: engine.LayerFn = engine.call_layer) -> Callable[[Any, Any], Any]:
    """``f(h0, idx_S) -> head output``: exit ``e``'s static-depth model on rows ``idx_S`` of ``h0`` (the compiled
    program of one chunk; ``hlo.profile`` reads its host stops)."""
    layer_def, layer_state = nnx.split(layers)
    head_def, head_state = nnx.split(head) if isinstance(head, nnx.Module) else (head, None)
    steps = _steps_key(static_program(program, e))
    return functools.partial(_chunk_apply, layer_state, head_state, layer_def=layer_def, head_def=head_def,
                             steps=steps, layer_fn=layer_fn)


class GroupedOutputs(NamedTuple):
    """A grouped run's per-row result, in batch order."""

    out: Any                 # the head output of each row's exit
    exit_B: jax.Array        # the exit each row ran to
    exit_layer_B: jax.Array  # the program step after which it exited
    plan: GroupPlan          # the chunks that ran
    host_stops: int          # 1: the exits read on the host to cut the groups


def _check_exit_outputs(probes: dict) -> None:
    shapes = {e: jax.tree.map(lambda a: (a.shape[1:], a.dtype), p) for e, p in probes.items()}
    first = next(iter(shapes.values()))
    bad = [e for e, s in shapes.items() if s != first]
    if bad:
        raise ValueError(f"grouped runs put every exit's output in one batch: the heads of exits {bad} return "
                         f"other shapes or dtypes than exit {next(iter(shapes))} ({shapes[bad[0]]} vs {first})")


def run_grouped(layers: nnx.Module, heads: Sequence[Callable], h0, program: engine.Program, exit_B, *,
                multiple: int = 8, sizes: Sequence[int] | None = None,
                layer_fn: engine.LayerFn = engine.call_layer) -> GroupedOutputs:
    """Run row b of ``h0`` to exit ``exit_B[b]`` only: rows grouped by exit into static chunks (``plan_groups``),
    each chunk a static-depth program (``chunk_fn``). ``exit_B`` is read on the host (the run's one host stop), so
    call this outside ``jax.jit``; the chunks run asynchronously and the outputs stay on the device."""
    num_exits = program.num_exits
    if len(heads) != num_exits:
        raise ValueError(f"{len(heads)} heads for a program with {num_exits} exits")
    batch = engine.check_h0(h0) if hasattr(engine, "check_h0") else jax.tree.leaves(h0)[0].shape[0]
    if not checks.is_concrete(exit_B):
        raise ValueError("run_grouped reads exit_B on the host to cut the groups; call it outside jax.jit (the "
                         "chunk programs are jitted)")
    exit_np = np.asarray(jax.device_get(exit_B))
    if exit_np.shape != (batch,):
        raise ValueError(f"exit_B has shape {exit_np.shape}; want one exit per row, ({batch},)")
    plan = plan_groups(exit_np, num_exits, chunk_sizes(batch, multiple) if sizes is None else sizes)
    fns = {e: chunk_fn(layers, heads[e], program, e, layer_fn=layer_fn) for e in np.unique(plan.exit_K).tolist()}
    if len(fns) > 1:
        _check_exit_outputs({e: jax.eval_shape(fn, h0, np.zeros((1,), np.int32)) for e, fn in fns.items()})
    outs, pos_B, offset = [], np.zeros((batch,), np.int32), 0
    for e, start, rows, size in zip(*(x.tolist() for x in plan[1:])):
        idx = plan.order_B[start:start + rows]
        idx_S = np.concatenate([idx, np.full((size - rows,), idx[-1])]).astype(np.int32)
        outs.append(fns[e](h0, idx_S))
        pos_B[idx] = offset + np.arange(rows)
        offset += size
    cat = jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs) if len(outs) > 1 else outs[0]
    out = jax.tree.map(lambda x: x[pos_B], cat)
    ends = np.asarray(program.exit_step_E)
    return GroupedOutputs(out, jnp.asarray(exit_np, jnp.int32), jnp.asarray(ends[exit_np], jnp.int32), plan, 1)


def planned_exits(policy, h0, num_exits: int) -> jax.Array:
    """The exits a depth-before-running policy fixes for ``h0`` (``policies.router``, ``policies.fixed_exit``;
    None: every row at the last exit)."""
    batch = jax.tree.leaves(h0)[0].shape[0]
    if policy is None:
        return jnp.full((batch,), num_exits - 1, jnp.int32)
    if isinstance(policy, policies.Router):
        exit_B = policy.predict(h0)
    elif isinstance(policy, policies.FixedExit):
        exit_B = policy.exit_B
    else:
        raise ValueError(f"the grouped executor needs the depth before running (policies.router or "
                         f"policies.fixed_exit); {type(policy).__name__} decides after each exit: use engine.Masked")
    return jnp.broadcast_to(jnp.asarray(exit_B, jnp.int32), (batch,))


class Grouped(NamedTuple):
    """``engine.run`` executor for depth-before-running policies: ``run_grouped`` on the exits the policy fixes.
    The rows' outputs come back in batch order; ``h`` and ``aux`` are not returned (rows never share a loop)."""

    multiple: int = 8
    sizes: tuple[int, ...] | None = None

    def run(self, layers, heads, h0, program, policy, *, layer_fn, aux, fields=None):
        del fields   # every field of the exit's head is returned (heads run once per row)
        if aux is not None:
            raise ValueError("the grouped executor moves rows into chunks; it cannot carry an aux state (use "
                             "engine.Masked)")
        exit_B = planned_exits(policy, h0, program.num_exits)
        g = run_grouped(layers, heads, h0, program, exit_B, multiple=self.multiple, sizes=self.sizes,
                        layer_fn=layer_fn)
        return engine.DynamicOutputs(out=g.out, exit_B=g.exit_B, exit_layer_B=g.exit_layer_B,
                                     score_B=jnp.zeros(g.exit_B.shape, jnp.float32),
                                     layers_run=jnp.max(g.exit_layer_B) + 1)


__all__ = ["DepthGate", "pool_tokens", "gate_flops", "predict_exits", "gate_policy", "gate_labels", "GroupPlan",
           "chunk_sizes", "plan_groups", "plan_flops", "plan_work", "static_program", "chunk_fn", "GroupedOutputs",
           "run_grouped", "planned_exits", "Grouped"]
