"""The dynamic-depth engine: a *layer program* x an *exit policy* x an *executor*, over stacked layer parameters.

One set of layer parameters (leading axis N = stored layer, built with ``nnx.vmap``) runs two ways:

* **training** (``scan_exits`` / ``run_layers``): ``lax.scan`` over every step of the program, every exit head
  evaluated, so a loss at every exit is differentiable. Returns :class:`ExitOutputs` with a leading exit axis E.
* **inference** (``run``): one compiled loop over the program's exit *segments* (the steps between two exits). The
  three parts are independent:

  - the **program** (:class:`Program`) says which stored layer runs at each step ``s`` (``layer_S``: prefix exit,
    skip sets, repeats, reorderings), which sublayers (``sub_S``, or per row ``row_sub_SxB``: attention half,
    MLP half, both, or nothing), which repeat of its stored layer a step is (``repeat_S``, for per-loop hooks such as
    per-loop LoRA) and after which steps an exit is evaluated (``exit_step_E``);
  - the **policy** (:mod:`eejax.exits.policies`) decides per row after each exit: a confidence measure against
    per-exit thresholds, a batch-mean rule, a fixed exit, a router that predicts the exit before running;
  - the **executor** says how the rows physically run: :class:`Masked` (rows that stopped are frozen by masked
    updates until the deepest row is done; ``keep_running`` keeps computing them, e.g. for oracle K/V),
    :class:`Compacted` (the still-active rows gathered into a smaller static bucket per segment),
    ``Sharded`` (``eejax.exits.paths``: ``jax.shard_map``, each device stops when its own rows are done),
    ``Continuous`` (``eejax.exits.continuous``: a pool of slots over a queue) and ``GatedKernel``
    (``eejax.exits.paths``: the masked loop with the MLP half in the Pallas gated-step kernel).

  The stop rule is written once, in :func:`exit_check`: a row stops at exit ``e`` when the policy fires or ``e`` is
  the last exit; a stopped row keeps its policy state. Every executor calls it.

``layer_fn(layer, h, ctx)`` runs one step: ``ctx`` (:class:`StepCtx`) carries the step, the stored layer index,
the repeat index, the per-row sublayer bits and the auxiliary state ``aux``. When ``run`` is given an ``aux`` (a KV
cache, say), ``layer_fn`` returns ``(h, aux)``: the hidden state is masked per row, ``aux`` is written for every
row (exited rows write from their frozen state: CALM's state propagation).

Invariant (tested for every executor and policy): each row's dynamic output equals the scan path's output at the
exit that row took. With threshold +inf every row runs to the last exit; with -inf every row stops at the first.

Shapes: B batch, S program steps, N stored layers, E exits, C classes, D width; ``h`` is ``B x ...`` (``BxTxD``
for a ViT, ``BxTxD`` with T new tokens for a decoder step) or a pytree of such arrays (a U-ViT's long-skip stack).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.exits import confidence as conf_lib

ATTN, MLP, FULL = 1, 2, 3   # sublayer bits of a step: attention (token-mixing) half, MLP half, both


class HeadOut(NamedTuple):
    """What a classifier (or LM) exit head returns. Other heads return their own NamedTuple (e.g. diffusion's
    epsilon head); the engine carries any pytree with a leading batch axis, and each measure reads its fields."""

    logits_BxC: jax.Array  # class logits (an LM's vocabulary logits, C = V)
    feat_BxD: jax.Array    # the head's own pooled feature (used by feature distillation)
    hidden_BxD: jax.Array  # pooled backbone hidden state at the exit (used by hidden-state similarity)
    gate_B: jax.Array      # a learned exit gate's logit (zeros when the head has no gate)


class ExitOutputs(NamedTuple):
    """Every exit's outputs from the scan path (leading exit axis E)."""

    logits_ExBxC: jax.Array
    feat_ExBxD: jax.Array
    hidden_ExBxD: jax.Array
    gate_ExB: jax.Array
    h_last: jax.Array  # the backbone's output after the last step (``B x ...``)


class StackedExits(NamedTuple):
    """The scan path's result for heads that return something other than a HeadOut."""

    out: Any     # the heads' outputs, every leaf stacked on a leading exit axis E
    h_last: Any  # the backbone's output after the last step


class DynamicOutputs(NamedTuple):
    """The inference loop's per-row result."""

    out: Any               # the head output (e.g. HeadOut) of the exit each row took, ``B x ...`` leaves
    exit_B: jax.Array      # exit index taken (0..E-1)
    exit_layer_B: jax.Array  # 0-based program step after which the row exited (the layer, for prefix programs)
    score_B: jax.Array     # the policy's score at the exit taken
    layers_run: jax.Array  # program steps the loop executed (the deepest row); one per device under Sharded
    h: Any = None          # final hidden state (frozen at each row's exit unless the executor keeps rows running)
    aux: Any = None        # final auxiliary state (e.g. the KV cache)
    policy_state: Any = None   # the policy's final state (what a recording policy such as ``shadow`` recorded)

    @property
    def logits_BxC(self) -> jax.Array:
        return self.out.logits_BxC


class StepCtx(NamedTuple):
    """What ``layer_fn`` learns about the step it runs."""

    step: jax.Array        # int32[]: program step
    layer: jax.Array       # int32[]: stored layer run at this step
    repeat: jax.Array      # int32[]: how often this stored layer already ran earlier in the program
    sub_B: jax.Array | None  # int32[B] sublayer bits (ATTN | MLP) per row; None: the whole layer for every row
    aux: Any = None        # auxiliary state carried through the loop (None when the run has none)
    run_B: jax.Array | None = None   # bool[B]: rows whose result of this step is kept (kernels may skip the rest)


LayerFn = Callable[..., Any]


def call_layer(layer: nnx.Module, h, ctx: StepCtx):
    """Default ``layer_fn``: the whole layer, or its halves (``attn_half`` / ``mlp_half``) under sublayer bits."""
    if ctx.sub_B is None:
        return layer(h)
    h = where_rows((ctx.sub_B & ATTN) > 0, layer.attn_half(h), h)
    return where_rows((ctx.sub_B & MLP) > 0, layer.mlp_half(h), h)


# ------------------------------------------------------------------------------------------------- programs


class Program(NamedTuple):
    """A layer program: what runs at each of S steps and where the E exits sit. Arrays are numpy for static
    programs and may be traced (SkipDecode's per-position budget); ``exit_step_E`` must be static for the scan path.

    ``sub_S`` (all rows) and ``row_sub_SxB`` (per row; 0 = the row skips the step) are None for programs that run
    whole layers; then ``layer_fn`` sees ``ctx.sub_B = None``.
    """

    layer_S: jax.Array                 # int32[S] stored layer at step s
    repeat_S: jax.Array                # int32[S] repeat index of that stored layer at step s
    exit_step_E: jax.Array             # int32[E] step after which exit e is evaluated (increasing; last = end)
    sub_S: jax.Array | None = None     # int32[S] sublayer bits of step s for every row
    row_sub_SxB: jax.Array | None = None   # int32[S, B] sublayer bits of step s for row b

    @property
    def num_exits(self) -> int:
        return self.exit_step_E.shape[0]

    @property
    def num_steps(self) -> int:
        """Static length of the step table (the steps actually run end at ``exit_step_E[-1]``)."""
        return self.layer_S.shape[0]


def _repeats(layer_S) -> np.ndarray:
    layer_S = np.asarray(layer_S)
    return np.asarray([int(np.sum(layer_S[:s] == l)) for s, l in enumerate(layer_S)], np.int32)


def prefix(num_layers: int, exit_layers: Sequence[int]) -> Program:
    """Early exit's program: layers 0..N-1 in order, an exit after each layer of ``exit_layers``."""
    exit_layers = check_exit_steps(exit_layers, num_layers)
    return Program(np.arange(num_layers, dtype=np.int32), np.zeros((num_layers,), np.int32),
                   np.asarray(exit_layers, np.int32))


def sequence(layer_S: Sequence[int], exit_steps: Sequence[int] | None = None, *, num_layers: int | None = None
             ) -> Program:
    """Any static chain of stored layers: repeats (recursion), skips, reorderings (CoLa). Exits after the steps in
    ``exit_steps`` (default: the last step only)."""
    layer_S = [int(l) for l in layer_S]
    if not layer_S:
        raise ValueError("a layer program needs at least one step")
    if num_layers is not None and not all(0 <= l < num_layers for l in layer_S):
        raise ValueError(f"layer program {layer_S} names layers outside [0, {num_layers=})")
    exit_steps = check_exit_steps([len(layer_S) - 1] if exit_steps is None else exit_steps, len(layer_S))
    return Program(np.asarray(layer_S, np.int32), _repeats(layer_S), np.asarray(exit_steps, np.int32))


def repeat(stored_layers: Sequence[int], times: int, exit_steps: Sequence[int] | None = None) -> Program:
    """Relaxed-Recursive / ALBERT style: the block of ``stored_layers`` looped ``times`` times."""
    if times < 1:
        raise ValueError(f"{times=} must be >= 1")
    return sequence(list(stored_layers) * times, exit_steps)


def row_skip(keep_NxB, exit_layers: Sequence[int]) -> Program:
    """Per-row skip sets over a prefix program: row b runs layer l iff ``keep_NxB[l, b]`` (inference twin of the
    scan path's ``layer_mask_NxB``)."""
    base = prefix(keep_NxB.shape[0], exit_layers)
    return base._replace(row_sub_SxB=jnp.where(keep_NxB, FULL, 0).astype(jnp.int32))


def mlp_skip(skip_mlp_NxB, exit_layers: Sequence[int]) -> Program:
    """FFN-skip programs: row b runs only the attention half of layer l where ``skip_mlp_NxB[l, b]``."""
    base = prefix(skip_mlp_NxB.shape[0], exit_layers)
    return base._replace(row_sub_SxB=jnp.where(skip_mlp_NxB, ATTN, FULL).astype(jnp.int32))


def check_exit_steps(exit_steps: Sequence[int], num_steps: int) -> tuple[int, ...]:
    exit_steps = tuple(int(s) for s in exit_steps)
    if not exit_steps or any(b <= a for a, b in zip(exit_steps, exit_steps[1:])) or exit_steps[0] < 0 \
            or exit_steps[-1] != num_steps - 1:
        raise ValueError(f"exit steps {exit_steps} must be strictly increasing in [0, {num_steps}) and end at the "
                         f"last step {num_steps - 1}")
    return exit_steps


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
        if not layers:
            raise ValueError("exits=[] names no exit; give at least one layer index (the last layer is always an "
                             "exit), or 'all' / 'every:k' / 'from:k'")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"exit layers {bad} outside [0, {num_layers})")
    return tuple(sorted(set(layers) | {num_layers - 1}))


# ------------------------------------------------------------------------------------------------ row helpers


def mask_like(mask_B: jax.Array, x: jax.Array) -> jax.Array:
    """A per-row mask reshaped to broadcast against ``x`` (``B x ...``)."""
    return mask_B.reshape(mask_B.shape + (1,) * (x.ndim - 1))


def where_rows(mask_B, new, old):
    """Row-wise select over matching pytrees: ``new`` where ``mask_B`` is set, ``old`` elsewhere."""
    return jax.tree.map(lambda n, o: jnp.where(mask_like(mask_B, n), n, o), new, old)


def num_layers_of(layers: nnx.Module) -> int:
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def check_exits(layers, heads, exit_layers) -> int:
    """One head per exit and an exit after the last layer; returns the number of layers."""
    num_layers = num_layers_of(layers)
    if len(heads) != len(exit_layers) or exit_layers[-1] != num_layers - 1:
        raise ValueError(f"{len(heads)=} heads for {exit_layers=} with {num_layers=}: need one head per exit and an "
                         "exit after the last layer")
    return num_layers


def _batch(h) -> int:
    return jax.tree.leaves(h)[0].shape[0]


def zeros_from(h) -> jax.Array:
    """``int32[B]`` zeros derived from the data, so loop carries inherit its sharding (needed under shard_map,
    JAX-NOTES §5)."""
    first = jax.tree.leaves(h)[0]
    return (first.reshape(first.shape[0], -1)[:, 0] * 0).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ stop rule


def exit_check(policy, out, state, e, num_exits: int, active_B: jax.Array):
    """THE stop rule, used by every executor: the policy scores the rows at exit ``e``; a still-active row stops
    when the policy fires or ``e`` is the last exit; rows that stopped earlier keep their policy state.
    Returns ``(stop_B, score_B, new_state)``."""
    fire_B, score_B, new_state = policy.decide(out, state, e)
    new_state = where_rows(active_B, new_state, state)
    stop_B = active_B & (fire_B | (e == num_exits - 1))
    return stop_B, score_B, new_state


# ------------------------------------------------------------------------------------------------ segments


class _Runner(NamedTuple):
    """The pieces every executor needs, prepared once per run."""

    layer_def: Any
    stacked: Any
    program: Program
    layer_fn: LayerFn
    has_aux: bool

    def step(self, s, h, aux, run_B):
        """Program step ``s`` on ``h``; rows outside ``run_B`` (or whose sublayer bits are 0) keep their state."""
        p = self.program
        l = jnp.asarray(p.layer_S)[s]
        layer = nnx.merge(self.layer_def, jax.tree.map(lambda x: x[l], self.stacked))
        sub_B = None
        if p.row_sub_SxB is not None:
            sub_B = jnp.asarray(p.row_sub_SxB)[s]
        elif p.sub_S is not None:
            sub_B = jnp.broadcast_to(jnp.asarray(p.sub_S)[s], (_batch(h),))
        if sub_B is not None:
            run_B = run_B & (sub_B > 0)
        res = self.layer_fn(layer, h, StepCtx(s, l, jnp.asarray(p.repeat_S)[s], sub_B, aux, run_B))
        new_h, aux = res if self.has_aux else (res, aux)
        return where_rows(run_B, new_h, h), aux

    def segment(self, e, h, aux, run_B):
        """The steps between exit ``e - 1`` and exit ``e``."""
        ends = jnp.asarray(self.program.exit_step_E) + 1
        start = jnp.where(e == 0, 0, ends[jnp.maximum(e - 1, 0)])
        return jax.lax.fori_loop(start, ends[e], lambda s, c: self.step(s, *c, run_B), (h, aux))


def _runner(layers, program, layer_fn, has_aux) -> _Runner:
    layer_def, stacked = nnx.split(layers)
    return _Runner(layer_def, stacked, program, layer_fn, has_aux)


def _switch_head(heads, e, h):
    return heads[0](h) if len(heads) == 1 else jax.lax.switch(e, list(heads), h)


class LoopCarry(NamedTuple):
    """Carry of the inference loop (over exits)."""

    e: jax.Array           # next exit to evaluate
    h: Any                 # hidden state, frozen for rows that have exited (unless kept running)
    aux: Any               # auxiliary state (written for every row)
    active_B: jax.Array    # rows still running
    exit_B: jax.Array
    out: Any               # head output of the exit each stopped row took
    score_B: jax.Array
    policy_state: Any


# ------------------------------------------------------------------------------------------------ executors


class Masked(NamedTuple):
    """Every row is computed every step; stopped rows are frozen by masked updates. The loop ends when no row is
    active (``keep_running``: rows keep being computed after their exit, the loop runs every exit; the output is
    still the one of the exit taken: CALM's oracle-K/V baseline)."""

    keep_running: bool = False


class Compacted(NamedTuple):
    """Before each exit segment the still-active rows move to the front (a stable permutation) and are gathered
    into a *bucket*: the smallest static size in ``buckets`` (default ``default_buckets(B)``: about B, B/2, B/4,
    B/8) that holds them, picked by ``lax.switch`` on the active count. The segment, the head and the policy run on
    the bucket only; results are scattered back. Needs row-independent layers and heads and no ``aux``."""

    buckets: tuple[int, ...] | None = None


def default_buckets(batch: int, num: int = 4, multiple: int = 8) -> tuple[int, ...]:
    """Bucket sizes ``ceil(batch / 2**i)`` for ``i < num``, rounded up to ``multiple`` (capped at ``batch``)."""
    if batch < 1 or num < 1 or multiple < 1:
        raise ValueError(f"{batch=}, {num=}, {multiple=} must all be >= 1")
    sizes = {min(batch, -(-math.ceil(batch / 2 ** i) // multiple) * multiple) for i in range(num)}
    return tuple(sorted(sizes))


def check_buckets(buckets: Sequence[int] | None, batch: int) -> tuple[int, ...]:
    if buckets is None:
        return default_buckets(batch)
    sizes = sorted({int(s) for s in buckets} | {batch})   # the full batch is always a bucket
    if sizes[0] < 1 or sizes[-1] > batch:
        raise ValueError(f"bucket sizes {sorted(buckets)} must lie in [1, {batch=}]")
    return tuple(sizes)


def _masked_body(r: _Runner, heads, policy, num_exits, keep_running):
    def body(c: LoopCarry) -> LoopCarry:
        run_B = jnp.ones_like(c.active_B) if keep_running else c.active_B
        h, aux = r.segment(c.e, c.h, c.aux, run_B)
        out = _switch_head(heads, c.e, h)
        stop_B, score_B, pstate = exit_check(policy, out, c.policy_state, c.e, num_exits, c.active_B)
        return LoopCarry(e=c.e + 1, h=h, aux=aux, active_B=c.active_B & ~stop_B,
                         exit_B=jnp.where(stop_B, c.e, c.exit_B), out=where_rows(stop_B, out, c.out),
                         score_B=jnp.where(stop_B, score_B, c.score_B), policy_state=pstate)
    return body


def _compacted_body(r: _Runner, heads, policy, num_exits, sizes_K):
    def bucket_step(size: int, c: LoopCarry, perm_B: jax.Array) -> LoopCarry:
        idx_S = perm_B[:size]                      # the active rows first, then stopped rows as padding
        take = lambda x: x.at[idx_S].get(unique_indices=True, mode="promise_in_bounds")  # noqa: E731
        valid_S = take(c.active_B)
        sub = r._replace(program=r.program if r.program.row_sub_SxB is None else r.program._replace(
            row_sub_SxB=jnp.take(r.program.row_sub_SxB, idx_S, axis=1)))
        # No row mask inside the bucket: its padding rows are discarded on scatter.
        h_S, _ = sub.segment(c.e, jax.tree.map(take, c.h), None, jnp.ones_like(valid_S))
        out_S = _switch_head(heads, c.e, h_S)
        stop_S, score_S, pstate_S = exit_check(policy, out_S, jax.tree.map(take, c.policy_state), c.e, num_exits,
                                               valid_S)

        def put(full, new_S, mask_S):
            # Rows of the bucket that are not in ``mask_S`` get their own old value back (indices are unique).
            merged = jnp.where(mask_like(mask_S, new_S), new_S.astype(full.dtype), take(full))
            return full.at[idx_S].set(merged, unique_indices=True, mode="promise_in_bounds")

        puts = lambda full, new, mask: jax.tree.map(lambda f, n: put(f, n, mask), full, new)  # noqa: E731
        return LoopCarry(
            e=c.e + 1, h=puts(c.h, h_S, valid_S), aux=c.aux, active_B=put(c.active_B, valid_S & ~stop_S, valid_S),
            exit_B=put(c.exit_B, jnp.broadcast_to(c.e, stop_S.shape), stop_S), out=puts(c.out, out_S, stop_S),
            score_B=put(c.score_B, score_S, stop_S), policy_state=puts(c.policy_state, pstate_S, valid_S))

    branches = [functools.partial(bucket_step, size) for size in sizes_K]

    def body(c: LoopCarry) -> LoopCarry:
        count = jnp.sum(c.active_B.astype(jnp.int32))
        perm_B = jnp.argsort(~c.active_B, stable=True)          # stable: active rows keep their order
        which = jnp.searchsorted(jnp.asarray(sizes_K, jnp.int32), count)   # smallest bucket >= count
        return jax.lax.switch(jnp.minimum(which, len(sizes_K) - 1), branches, c, perm_B)

    return body


def run(layers: nnx.Module, heads: Sequence[Callable], h0, program: Program, policy=None, executor=Masked(), *,
        layer_fn: LayerFn = call_layer, aux=None) -> DynamicOutputs:
    """Run ``program`` over the stacked ``layers`` from ``h0``, exiting per row as ``policy`` decides, the rows
    laid out as ``executor`` says. ``heads``: one callable per exit (``h -> head output``), picked by
    ``lax.switch``, so only the exit being evaluated runs.

    ``policy=None`` is the static path: every step runs (a ``fori_loop``, no early stop) and only the last head is
    evaluated; ``exit_B`` is then the last exit for every row. Executors other than Masked and Compacted wrap this
    function (``eejax.exits.paths``, ``eejax.exits.continuous``).
    """
    num_exits = program.num_exits
    if len(heads) != num_exits:
        raise ValueError(f"{len(heads)} heads for a program with {num_exits} exits")
    if hasattr(executor, "run"):                 # executors defined outside this module
        return executor.run(layers, heads, h0, program, policy, layer_fn=layer_fn, aux=aux)
    r = _runner(layers, program, layer_fn, aux is not None)
    zero_B = zeros_from(h0)
    last = jnp.asarray(num_exits - 1, jnp.int32)
    if policy is None:
        ones = zero_B == 0
        end = jnp.asarray(program.exit_step_E)[-1]
        h, aux = jax.lax.fori_loop(0, end + 1, lambda s, c: r.step(s, *c, ones), (h0, aux))
        return DynamicOutputs(out=heads[-1](h), exit_B=zero_B + last, exit_layer_B=zero_B + end,
                              score_B=zero_B.astype(jnp.float32), layers_run=end + 1, h=h, aux=aux)

    probe = jax.eval_shape(heads[0], h0)
    if isinstance(executor, Masked):
        body = _masked_body(r, heads, policy, num_exits, executor.keep_running)
        keep = executor.keep_running
    elif isinstance(executor, Compacted):
        if aux is not None:
            raise ValueError("the compacted executor gathers rows; it cannot carry an aux state (use Masked)")
        body = _compacted_body(r, heads, policy, num_exits, check_buckets(executor.buckets, _batch(h0)))
        keep = False
    else:
        raise TypeError(f"unknown executor {executor!r}")

    def cond(c: LoopCarry):
        return (c.e < num_exits) & (jnp.any(c.active_B) | keep)

    init = LoopCarry(
        e=jnp.int32(0), h=h0, aux=aux, active_B=zero_B == 0, exit_B=zero_B,
        out=jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) + mask_like(zero_B, a).astype(a.dtype), probe),
        score_B=zero_B.astype(jnp.float32), policy_state=policy.init(probe, zero_B, h0))
    final = jax.lax.while_loop(cond, body, init)
    ends = jnp.asarray(program.exit_step_E)
    return DynamicOutputs(out=final.out, exit_B=final.exit_B, exit_layer_B=ends[final.exit_B],
                          score_B=final.score_B, layers_run=ends[final.e - 1] + 1, h=final.h, aux=final.aux,
                          policy_state=final.policy_state)


# ------------------------------------------------------------------------------------------------ scan path


def run_layers(layers: nnx.Module, h0, *, layer_fn: LayerFn = call_layer, layer_mask_NxB: jax.Array | None = None,
               program: Program | None = None, remat: bool | str = False, readout: Callable | None = None,
               residual_dtype=None):
    """``lax.scan`` over the program's steps (default: every stored layer once, in order); returns the last hidden
    state and every step's output (leading S). ``layer_mask_NxB``: row b runs step s iff set (a per-row program).

    Training-path options (issue 20: ViT-B/16 with 12 exits stored ~24.7 GB of per-layer residuals per step):

    * ``remat``: what each step keeps for the backward pass (``remat_policy``): ``"none"`` / ``False`` (every
      intermediate), ``"full"`` / ``True`` (only the step's input; everything recomputed), ``"dots_saveable"``
      (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``: the projection GEMM outputs are kept, norms,
      activations and the attention core recomputed).
    * ``readout(h) -> pytree``: what the scan stacks per step instead of the whole ``h`` (e.g. the CLS token and the
      token mean, ``B x D`` each, for heads that read nothing else); the stacked output and its cotangent shrink
      from ``S x B x T x D`` to the readout's size.
    * ``residual_dtype``: the residual stream's dtype: ``h0`` and every step's output are cast to it (e.g.
      ``jnp.bfloat16`` with bf16 layers: without it, a float32 ``h0`` keeps the stream and its saved residuals in
      float32). ``None``: ``h0``'s dtype, untouched.
    """
    layer_def, stacked = nnx.split(layers)
    n = num_layers_of(layers)
    program = prefix(n, [n - 1]) if program is None else program
    steps = program.num_steps
    batch = _batch(h0)
    if layer_mask_NxB is not None:
        program = program._replace(row_sub_SxB=jnp.where(layer_mask_NxB, FULL, 0).astype(jnp.int32))
    if residual_dtype is not None:
        h0 = _cast_floats(h0, residual_dtype)
    emit = (lambda h: h) if readout is None else readout

    def body(h, s):
        r = _Runner(layer_def, stacked, program, layer_fn, False)
        h_new, _ = r.step(s, h, None, jnp.ones((batch,), bool))
        if residual_dtype is not None:
            h_new = _cast_floats(h_new, residual_dtype)
        return h_new, emit(h_new)

    return jax.lax.scan(remat_step(body, remat), h0, jnp.arange(steps))


def scan_exits(layers: nnx.Module, heads: Sequence[Callable[[jax.Array], HeadOut]], h0,
               exit_layers: Sequence[int] | None = None, *, program: Program | None = None,
               layer_fn: LayerFn = call_layer, layer_mask_NxB: jax.Array | None = None,
               remat: bool | str = False, readout: Callable | None = None,
               residual_dtype=None) -> ExitOutputs | StackedExits:
    """Training path: every step under ``lax.scan``; every exit head sees its step's output (``readout(h)`` of
    it when given: the heads must then read that, see ``run_layers``). Heads returning a ``HeadOut`` give
    ``ExitOutputs``; other heads give ``StackedExits``. ``remat`` and ``residual_dtype``: see ``run_layers``."""
    if program is None:
        check_exits(layers, heads, exit_layers)
        program = prefix(num_layers_of(layers), exit_layers)
    exit_steps = [int(s) for s in np.asarray(program.exit_step_E)]
    if len(heads) != len(exit_steps):
        raise ValueError(f"{len(heads)} heads for {len(exit_steps)} exits")
    h_last, y_Sx = run_layers(layers, h0, layer_fn=layer_fn, layer_mask_NxB=layer_mask_NxB, program=program,
                              remat=remat, readout=readout, residual_dtype=residual_dtype)
    outs = [head(jax.tree.map(lambda x: x[s], y_Sx)) for head, s in zip(heads, exit_steps)]
    stacked_out = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    if isinstance(outs[0], HeadOut):
        return ExitOutputs(*stacked_out, h_last=h_last)
    return StackedExits(stacked_out, h_last)


REMAT_POLICIES = ("none", "full", "dots_saveable")


def remat_policy(remat: bool | str) -> str:
    """The policy name of a ``remat`` argument: ``False`` is ``"none"``, ``True`` is ``"full"``."""
    if not isinstance(remat, str):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: use True / False or one of {REMAT_POLICIES}")
    return remat


def remat_step(body: Callable, remat: bool | str) -> Callable:
    """``body`` under ``jax.checkpoint`` with the named policy (``remat_policy``); unchanged for ``"none"``."""
    name = remat_policy(remat)
    if name == "none":
        return body
    if name == "full":
        return jax.checkpoint(body)
    return jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ------------------------------------------------------------------------------------------------ shortcuts


def while_exits(layers: nnx.Module, heads: Sequence[Callable[[jax.Array], HeadOut]], h0,
                exit_layers: Sequence[int], threshold, *, measure: conf_lib.Measure = conf_lib.max_softmax,
                layer_fn: LayerFn = call_layer, executor=Masked()) -> DynamicOutputs:
    """Prefix early exit with a confidence threshold (scalar or one per exit): ``run(prefix, threshold, Masked)``."""
    from eejax.exits import policies   # noqa: PLC0415 (policies imports this module)

    check_exits(layers, heads, exit_layers)
    return run(layers, heads, h0, prefix(num_layers_of(layers), exit_layers),
               policies.threshold(measure, threshold, len(exit_layers)), executor, layer_fn=layer_fn)


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


__all__ = ["ATTN", "MLP", "FULL", "HeadOut", "ExitOutputs", "StackedExits", "DynamicOutputs", "StepCtx", "Program", "LoopCarry",
           "Masked", "Compacted", "call_layer", "prefix", "sequence", "repeat", "row_skip", "mlp_skip",
           "check_exit_steps", "exit_layers_from", "check_exits", "num_layers_of", "where_rows", "mask_like",
           "zeros_from", "exit_check", "default_buckets", "check_buckets", "run", "run_layers", "scan_exits",
           "while_exits", "exits_from_scores", "scores_from_outputs", "take_exit"]
