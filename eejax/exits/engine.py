"""The dynamic-depth engine: a *layer program* x an *exit policy* x an *executor*, over stacked layer parameters.

One set of layer parameters (leading axis N = stored layer, built with ``nnx.vmap``) runs two ways:

* **training** (``scan_exits`` / ``run_layers``): ``lax.scan`` over every step of the program, every exit head
  evaluated, so a loss at every exit is differentiable. Returns :class:`ExitOutputs` with a leading exit axis E.
* **inference** (``run``): compiled loops over the program's exit *segments* (the steps between two exits). The
  three parts are independent:

  - the **program** (:class:`Program`) says which stored layer runs at each step ``s`` (``layer_S``: prefix exit,
    skip sets, repeats, reorderings), which sublayers (``sub_S``, or per row ``row_sub_SxB``: attention half,
    MLP half, both, or nothing), which repeat of its stored layer a step is (``repeat_S``, for per-loop hooks such as
    per-loop LoRA) and after which steps an exit is evaluated (``exit_step_E``);
  - the **policy** (:mod:`eejax.exits.policies`) decides per row after each exit: a confidence measure against
    per-exit thresholds, a batch-mean rule, a fixed exit, a router that predicts the exit before running;
  - the **executor** says how the rows physically run: :class:`Masked` (rows that stopped are frozen by masked
    updates until the deepest row is done; ``keep_running`` keeps computing them, e.g. for oracle K/V),
    :class:`BucketCascade` (the library's compaction path: a monotone cascade of shrinking buffers, the active rows
    compacted only when they fit the next bucket), :class:`Compacted` (the first compaction executor, kept as a
    benchmark baseline), ``Sharded`` (``eejax.exits.paths``: ``jax.shard_map``, each device stops when its own rows
    are done), ``Continuous`` (``eejax.exits.continuous``: a pool of slots over a queue) and ``GatedKernel``
    (``eejax.exits.paths``: the masked loop with the MLP half in the Pallas gated-step kernel).

  The stop rule is written once, in :func:`exit_check`: a row stops at exit ``e`` when the policy fires or ``e`` is
  the last exit; a stopped row keeps its policy state. Every executor calls it, and :func:`simulate` runs it offline
  over every exit's outputs computed ahead (the scan path, cached scores).

What a GPU pays for, held by ``tests/test_host_stops.py`` (read from the compiled program, ``eejax.exits.hlo``):
a ``while`` whose trip count depends on data and a ``lax.cond`` / ``lax.switch`` each wait for the host once per
execution. So the inference loops have one data-dependent ``while`` per run of equal-length segments
(:func:`exit_runs`) and per bucket, no inner data-dependent loop (one-layer segments inline, longer ones a loop of
known trip count), and the heads indexed by the exit (:func:`head_program`: stacked parameters, a switch only for
heterogeneous heads). The static path (no policy) has no host stop.

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

from eejax import checks
from eejax.exits import confidence as conf_lib

ATTN, MLP, FULL = 1, 2, 3   # sublayer bits of a step: attention (token-mixing) half, MLP half, both
# The FFN variant a routed step runs per row (or per row and token), Duo-LLM's module choice (arXiv:2410.10846):
# no FFN, the layer's small FFN, its big FFN. Attention runs whatever the choice.
FFN_SKIP, FFN_SMALL, FFN_BIG = 0, 1, 2
FFN_VARIANTS = ("skip", "small", "big")


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
    h: Any = None          # final hidden state (frozen at each row's exit unless kept running; None: BucketCascade)
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
    ffn_B: jax.Array | None = None   # int32[B] or [B, T]: FFN variant (FFN_SKIP / SMALL / BIG) per row (and token)


LayerFn = Callable[..., Any]


def call_layer(layer: nnx.Module, h, ctx: StepCtx):
    """Default ``layer_fn``: the whole layer, or its halves (``attn_half`` / ``mlp_half``) under sublayer bits;
    under an FFN route (``ctx.ffn_B``) the MLP half is the layer's ``mlp_routed(h, choice)``."""
    if ctx.sub_B is None and ctx.ffn_B is None:
        return layer(h)
    sub_B = jnp.full((_batch(h),), FULL, jnp.int32) if ctx.sub_B is None else ctx.sub_B
    h = where_rows((sub_B & ATTN) > 0, layer.attn_half(h), h)
    return where_rows((sub_B & MLP) > 0, mlp_step(layer, h, ctx), h)


def step_ctx(program: "Program", s, l, aux, run_B: jax.Array, *, step=None) -> StepCtx:
    """The ``StepCtx`` of program step ``s`` (stored layer ``l``) for the rows ``run_B`` (``bool[B]``): the step's
    sublayer bits (per row, or one value for every row), ``run_B`` narrowed to the rows whose bits are set, the
    step's repeat index and its FFN route. ``step``: the step index the layer function sees (default ``s``). Every
    executor (this module's ``_Runner``, ``kv.Unrolled``) builds its steps' context here."""
    sub_B = None
    if program.row_sub_SxB is not None:
        sub_B = jnp.asarray(program.row_sub_SxB)[s]
    elif program.sub_S is not None:
        sub_B = jnp.broadcast_to(jnp.asarray(program.sub_S)[s], run_B.shape)
    if sub_B is not None:
        run_B = run_B & (sub_B > 0)
    ffn_B = None if program.ffn_SxB is None else jnp.asarray(program.ffn_SxB)[s]
    return StepCtx(s if step is None else step, l, jnp.asarray(program.repeat_S)[s], sub_B, aux, run_B, ffn_B)


def mlp_step(layer, h, ctx: StepCtx):
    """The MLP half of a step: the layer's ``mlp_half``, or under an FFN route (``ctx.ffn_B``, ``ffn_route``) the
    variant each row / token chose (``layer.mlp_routed``). Every layer function that runs MLP halves (this
    module's ``call_layer``, the LM's teacher-forced, KV-cached and pending ones) calls this one."""
    return layer.mlp_half(h) if ctx.ffn_B is None else layer.mlp_routed(h, ctx.ffn_B)


def select_variant(choice, options: Sequence[Any]):
    """``options[choice]`` per row or per row and token: ``choice`` is ``int[B]`` or ``int[B, T]`` (values in
    ``[0, len(options))``), each option an array whose leading axes are ``choice``'s (``B x T x D`` hidden states).
    Every option is computed; the choice selects (the masked form of per-token module choice: its cost is counted
    by the route, ``costs.ffn_route_flops``, not by what the masked program executes)."""
    choice = jnp.asarray(choice)
    out = options[0]
    for k, option in enumerate(options[1:], 1):
        pick = (choice == k).reshape(choice.shape + (1,) * (option.ndim - choice.ndim))
        out = jnp.where(pick, option, out)
    return out


# ------------------------------------------------------------------------------------------------- programs


class Program(NamedTuple):
    """A layer program: what runs at each of S steps and where the E exits sit. Arrays are numpy for static
    programs and may be traced (SkipDecode's per-position budget); ``exit_step_E`` must be static for the scan path.

    ``sub_S`` (all rows) and ``row_sub_SxB`` (per row; 0 = the row skips the step) are None for programs that run
    whole layers; then ``layer_fn`` sees ``ctx.sub_B = None``. ``ffn_SxB`` (``ffn_route``) generalises the on/off
    MLP bit to a small categorical per row (or per row and token): which FFN variant the step runs
    (``FFN_VARIANTS``); ``layer_fn`` sees it as ``ctx.ffn_B``.
    """

    layer_S: jax.Array                 # int32[S] stored layer at step s
    repeat_S: jax.Array                # int32[S] repeat index of that stored layer at step s
    exit_step_E: jax.Array             # int32[E] step after which exit e is evaluated (increasing; last = end)
    sub_S: jax.Array | None = None     # int32[S] sublayer bits of step s for every row
    row_sub_SxB: jax.Array | None = None   # int32[S, B] sublayer bits of step s for row b
    ffn_SxB: jax.Array | None = None   # int32[S, B] or [S, B, T]: FFN variant of step s per row (and token)

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
    keep_NxB = jnp.asarray(keep_NxB)
    base = prefix(keep_NxB.shape[0], exit_layers)
    return base._replace(row_sub_SxB=jnp.where(keep_NxB, FULL, 0).astype(jnp.int32))


def mlp_skip(skip_mlp_NxB, exit_layers: Sequence[int]) -> Program:
    """FFN-skip programs: row b runs only the attention half of layer l where ``skip_mlp_NxB[l, b]``."""
    skip_mlp_NxB = jnp.asarray(skip_mlp_NxB)
    base = prefix(skip_mlp_NxB.shape[0], exit_layers)
    return base._replace(row_sub_SxB=jnp.where(skip_mlp_NxB, ATTN, FULL).astype(jnp.int32))


def ffn_route(route_NxB, exit_layers: Sequence[int] | None = None) -> Program:
    """Duo-LLM's program (Alizadeh et al. 2024, arXiv:2410.10846): every layer in order, its attention always run,
    its FFN chosen per row, or per row and token, among ``FFN_VARIANTS``: ``route_NxB[l, b(, t)]`` is
    ``FFN_SKIP`` (no FFN), ``FFN_SMALL`` or ``FFN_BIG``. Exits after ``exit_layers`` (default: the last layer).
    A route of all ``FFN_BIG`` is the dense model; ``FFN_SKIP`` is ``mlp_skip``'s attention-only step."""
    route_NxB = jnp.asarray(route_NxB)
    if route_NxB.ndim not in (2, 3) or not jnp.issubdtype(route_NxB.dtype, jnp.integer):
        raise ValueError(f"route_NxB must be an integer array N x B or N x B x T, got {route_NxB.dtype} "
                         f"{tuple(route_NxB.shape)}")
    if checks.is_concrete(route_NxB) and not bool(jnp.all((route_NxB >= 0) & (route_NxB < len(FFN_VARIANTS)))):
        raise ValueError(f"route_NxB holds values outside 0..{len(FFN_VARIANTS) - 1} ({FFN_VARIANTS})")
    n = route_NxB.shape[0]
    base = prefix(n, [n - 1] if exit_layers is None else exit_layers)
    return base._replace(ffn_SxB=route_NxB.astype(jnp.int32))


def rows_of(program: Program, idx_S: jax.Array) -> Program:
    """The program of the rows ``idx_S`` (a compacted buffer's): the per-row tables (``row_sub_SxB``,
    ``ffn_SxB``) taken along their row axis; a program without them is returned as it is."""
    take = lambda x: None if x is None else jnp.take(jnp.asarray(x), idx_S, axis=1)   # noqa: E731
    if program.row_sub_SxB is None and program.ffn_SxB is None:
        return program
    return program._replace(row_sub_SxB=take(program.row_sub_SxB), ffn_SxB=take(program.ffn_SxB))


def per_row(program: Program) -> bool:
    """Whether the program holds a per-row table (sublayer bits or FFN routes): executors that move or split rows
    without following them refuse it."""
    return program.row_sub_SxB is not None or program.ffn_SxB is not None


def check_stage_path(num_layers: int, stage_size: int, keep_stages: int, swap_prob: float) -> int:
    """The number of stages of ``stage_path``'s arguments, or a ValueError naming the bad one."""
    for name, v in (("num_layers", num_layers), ("stage_size", stage_size), ("keep_stages", keep_stages)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if num_layers % stage_size:
        raise ValueError(f"stage_size={stage_size} must divide num_layers={num_layers} (stages of equal size)")
    stages = num_layers // stage_size
    if keep_stages > stages:
        raise ValueError(f"keep_stages={keep_stages} exceeds the {stages} stages of {num_layers} layers")
    if not (isinstance(swap_prob, (int, float)) and 0.0 <= swap_prob <= 1.0):
        raise ValueError(f"swap_prob={swap_prob!r} must be a probability in [0, 1]")
    return stages


def stage_path(rng: jax.Array, num_layers: int, stage_size: int, keep_stages: int, swap_prob: float = 0.0
               ) -> Program:
    """One micro-batch's SkipPipe training path (Blagoev, Chen, Ersoy 2025, arXiv:2502.19913), drawn under ``jit``
    (traced ``layer_S``, static length ``keep_stages * stage_size``), for the scan path (``run_layers`` /
    ``DecoderLM.hidden_states(program=...)``).

    The layers form ``num_layers / stage_size`` pipeline stages of consecutive layers. Stage 0 always runs first
    (it holds the embedding in a pipeline); ``keep_stages - 1`` of the other stages, drawn uniformly without
    replacement, follow in their stored order, so the rest are skipped; with probability ``swap_prob`` one adjacent
    pair of those (chosen uniformly; needs at least two) runs in swapped order, SkipPipe's reordering. Each layer
    runs at most once; one exit, after the last step. (SkipPipe's released simulator draws paths from a
    collision-aware scheduler over nodes; a uniform draw is the scheduler-free version of the same training
    signal.)"""
    stages = check_stage_path(num_layers, stage_size, keep_stages, swap_prob)
    k_pick, k_swap, k_where = jax.random.split(rng, 3)
    others = jnp.sort(jax.random.permutation(k_pick, jnp.arange(1, stages))[:keep_stages - 1])
    order_K = jnp.concatenate([jnp.zeros((1,), others.dtype), others]).astype(jnp.int32)
    if keep_stages >= 3 and swap_prob > 0:
        j = 1 + jax.random.randint(k_where, (), 0, keep_stages - 2)        # swap positions j, j + 1 (never stage 0)
        swapped = order_K.at[j].set(order_K[j + 1]).at[j + 1].set(order_K[j])
        order_K = jnp.where(jax.random.uniform(k_swap) < swap_prob, swapped, order_K)
    layer_S = (order_K[:, None] * stage_size + jnp.arange(stage_size)[None, :]).reshape(-1)
    steps = keep_stages * stage_size
    return Program(layer_S.astype(jnp.int32), np.zeros(steps, np.int32), np.asarray([steps - 1], np.int32))


def check_exit_steps(exit_steps: Sequence[int], num_steps: int) -> tuple[int, ...]:
    exit_steps = tuple(int(s) for s in exit_steps)
    if not exit_steps or any(b <= a for a, b in zip(exit_steps, exit_steps[1:])) or exit_steps[0] < 0 \
            or exit_steps[-1] != num_steps - 1:
        raise ValueError(f"exit steps {exit_steps} must be strictly increasing in [0, {num_steps}) and end at the "
                         f"last step {num_steps - 1}")
    return exit_steps


class ExitSpec:
    """Mixin for a model config with fields ``exits`` (an exit spec, ``exit_layers_from``) and ``depth``: the exit
    layers it names, their count and the layer -> exit table, one definition for every model family."""

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return exit_layers_from(self.exits, self.depth)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    @property
    def exit_of_layer(self) -> np.ndarray:
        """``int32[N]``: the exit index after layer l, or -1 where layer l has no exit."""
        table = np.full(self.depth, -1, np.int32)
        table[list(self.exit_layers)] = np.arange(self.num_exits)
        return table


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

    def step(self, s, h, aux, run_B, freeze: bool = True):
        """Program step ``s`` on ``h``. ``freeze``: rows outside ``run_B`` keep their state (a row select over
        ``h``); without it every row's result is kept (the cascade computes on the buffer rows that stopped and
        never reads them again). Rows whose sublayer bits are 0 keep their state either way."""
        p = self.program
        l = jnp.asarray(p.layer_S)[s]
        layer = nnx.merge(self.layer_def, jax.tree.map(lambda x: x[l], self.stacked))
        ctx = step_ctx(p, s, l, aux, run_B)
        res = self.layer_fn(layer, h, ctx)
        new_h, aux = res if self.has_aux else (res, aux)
        if freeze:
            return where_rows(ctx.run_B, new_h, h), aux
        return (new_h if ctx.sub_B is None else where_rows(ctx.sub_B > 0, new_h, h)), aux

    def segment(self, e, h, aux, run_B, length: int | None = None, freeze: bool = True):
        """The steps between exit ``e - 1`` and exit ``e``. ``length``: their number, when it is static (the same
        for every exit of a run, see ``exit_runs``): one step inline, or a loop whose trip count XLA knows. None
        (traced exit steps): a loop over traced bounds, which XLA runs as a data-dependent ``while``."""
        ends = jnp.asarray(self.program.exit_step_E) + 1
        if length is None:
            start = jnp.where(e == 0, 0, ends[jnp.maximum(e - 1, 0)])
            return jax.lax.fori_loop(start, ends[e], lambda s, c: self.step(s, *c, run_B, freeze), (h, aux))
        start = ends[e] - length
        if length == 1:
            return self.step(start, h, aux, run_B, freeze)
        return jax.lax.fori_loop(0, length, lambda i, c: self.step(start + i, *c, run_B, freeze), (h, aux))


def _runner(layers, program, layer_fn, has_aux) -> _Runner:
    layer_def, stacked = nnx.split(layers)
    return _Runner(layer_def, stacked, program, layer_fn, has_aux)


class ExitRun(NamedTuple):
    """Consecutive exits whose segments have the same static length: the inference loops run one ``while`` per
    run, so that a segment needs no data-dependent inner loop."""

    first: int             # first exit of the run
    end: int               # one past its last exit
    length: int | None     # program steps per segment (None: exit steps traced, one run with traced bounds)


def exit_runs(program: Program) -> tuple[ExitRun, ...]:
    """The program's exits as maximal runs of equal segment length: one run for exits after every layer or after
    every k-th, two for ``from:k`` (the first segment is longer). Traced exit steps give one run of unknown
    length."""
    if not checks.is_concrete(program.exit_step_E):
        return (ExitRun(0, program.num_exits, None),)
    ends = np.asarray(program.exit_step_E, np.int64) + 1
    runs: list[ExitRun] = []
    for e, length in enumerate(np.diff(ends, prepend=0).tolist()):
        if runs and runs[-1].length == length:
            runs[-1] = runs[-1]._replace(end=e + 1)
        else:
            runs.append(ExitRun(e, e + 1, int(length)))
    return tuple(runs)


# ------------------------------------------------------------------------------------------------ heads


class Scores(NamedTuple):
    """A score per row, standing in for a head's output: ``simulate`` over cached scores (read by the
    ``confidence.cached_score`` measure, ``policies.score_threshold``)."""

    score_B: jax.Array


class IndexedHeads:
    """Every exit's head as one function of the exit index, ``apply(e, h) -> head output``, ``e`` a traced int32.

    The inference loops call this once per exit decision. One head program indexed by the exit replaces a
    ``lax.switch`` over E heads: a switch is a host round trip per call on a GPU (``eejax.exits.hlo``). Indexing
    with a Python int gives head ``e`` as a plain callable (the scan path and the static path use it).
    """

    def __init__(self, apply: Callable[[Any, Any], Any], num_exits: int):
        if int(num_exits) < 1:
            raise ValueError(f"{num_exits=} must be >= 1")
        self.apply, self.num_exits = apply, int(num_exits)

    def __len__(self) -> int:
        return self.num_exits

    def __getitem__(self, e: int) -> Callable:
        if not -self.num_exits <= e < self.num_exits:
            raise IndexError(f"exit {e} of {self.num_exits}")
        return functools.partial(self.apply, e % self.num_exits)

    def __iter__(self):
        return (self[e] for e in range(self.num_exits))


def _structure(head):
    """What must agree for heads to be stacked: the module graph and each parameter's shape and dtype."""
    graphdef, state = nnx.split(head)
    return graphdef, tuple((np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state))


def stack_heads(heads: Sequence[nnx.Module], call: Callable | None = None) -> IndexedHeads:
    """Heads of one structure (equal ``nnx.graphdef``, parameter shapes and dtypes) as :class:`IndexedHeads`:
    their states stacked on a leading exit axis E, head ``e`` rebuilt from ``state[e]`` (a dynamic slice of each
    parameter). Stacking copies the heads' parameters once per call of the program that does it (E x a head's
    parameters: small beside the layers). ``call(head, e, h)`` (default ``head(h)``) lets the caller use the exit
    index too, e.g. a gate that depends on it."""
    heads = list(heads)
    if not heads or not all(isinstance(h, nnx.Module) for h in heads):
        raise ValueError("stack_heads needs one or more nnx.Module heads")
    graphdef, _ = nnx.split(heads[0])
    if any(_structure(h) != _structure(heads[0]) for h in heads[1:]):
        raise ValueError("stack_heads: the heads differ in structure or parameter shapes; pass them as a list "
                         "(the engine groups them and switches between the groups)")
    state_E = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(h) for h in heads])

    def apply(e, h):
        head = nnx.merge(graphdef, jax.tree.map(lambda x: x[e], state_E))
        return head(h) if call is None else call(head, e, h)

    return IndexedHeads(apply, len(heads))


HEAD_KINDS = ("indexed", "one", "shared", "stacked", "switch")


def head_program(heads) -> tuple[Callable, str]:
    """How the inference loops call the heads: ``(apply(e, h), kind)`` with ``kind`` one of ``HEAD_KINDS``.

    * ``indexed``: an :class:`IndexedHeads` (the caller's own indexed program);
    * ``one`` / ``shared``: a single head, or one callable object repeated for every exit (a shared head);
    * ``stacked``: nnx heads of one structure, stacked (``stack_heads``);
    * ``switch``: heterogeneous heads (LGViT's local / global mix, closures): a ``lax.switch`` over the groups of
      equal structure, each group stacked. Costs one conditional (a host stop on a GPU) per exit decision.
    """
    if isinstance(heads, IndexedHeads):
        return heads.apply, "indexed"
    heads = list(heads)
    if all(h is heads[0] for h in heads):
        return (lambda e, h: heads[0](h)), ("one" if len(heads) == 1 else "shared")
    groups: dict[Any, list[int]] = {}
    for e, head in enumerate(heads):
        key = _structure(head) if isinstance(head, nnx.Module) else ("callable", id(head))
        groups.setdefault(key, []).append(e)
    if len(groups) == 1:
        return stack_heads(heads).apply, "stacked"
    branches, group_E, slot_E = [], np.zeros(len(heads), np.int32), np.zeros(len(heads), np.int32)
    for g, (key, exits) in enumerate(groups.items()):
        group_E[exits], slot_E[exits] = g, np.arange(len(exits))
        if key[0] == "callable" or len(exits) == 1:
            branches.append(lambda i, h, f=heads[exits[0]]: f(h))
        else:
            branches.append(stack_heads([heads[e] for e in exits]).apply)

    def apply(e, h):
        return jax.lax.switch(jnp.asarray(group_E)[e], branches, jnp.asarray(slot_E)[e], h)

    return apply, "switch"


def _fields_kept(policy, fields) -> tuple[str, ...] | None:
    """HeadOut fields the loop carries: those the caller asks for plus those the policy reads (None: all). A
    policy that does not declare ``reads`` sees every field."""
    reads = getattr(policy, "reads", None)
    if fields is None or reads is None:
        return None
    return tuple(f for f in HeadOut._fields if f in fields or f in reads)


def _project(out, keep):
    """A HeadOut with the fields outside ``keep`` set to None: what computes them is then dead code, which XLA
    removes (e.g. the pooled hidden state of a vision head when the policy reads only the logits)."""
    if keep is None or not isinstance(out, HeadOut):
        return out
    return out._replace(**{f: None for f in HeadOut._fields if f not in keep})


class LoopCarry(NamedTuple):
    """Carry of the masked inference loop (over exits)."""

    e: jax.Array           # next exit to evaluate
    h: Any                 # hidden state, frozen for rows that have exited (unless kept running)
    aux: Any               # auxiliary state (written for every row)
    active_B: jax.Array    # rows still running
    exit_B: jax.Array
    out: Any               # head output of the exit each stopped row took
    score_B: jax.Array
    policy_state: Any


class BufferCarry(NamedTuple):
    """Carry of the cascade's loops: ``S`` rows of the batch in one bucket-sized buffer."""

    e: jax.Array           # next exit to evaluate
    h: Any                 # the buffer rows' hidden state (rows that stopped are computed on and never read)
    row_S: jax.Array       # the batch row each buffer row holds
    active_S: jax.Array    # buffer rows still running
    exit_S: jax.Array
    out: Any               # head output of the exit each stopped buffer row took
    score_S: jax.Array
    policy_state: Any


class RowResults(NamedTuple):
    """The cascade's per-row results in batch order, written when rows leave a buffer."""

    exit_B: jax.Array
    out: Any
    score_B: jax.Array
    policy_state: Any


# ------------------------------------------------------------------------------------------------ executors


class Masked(NamedTuple):
    """Every row is computed every step; stopped rows are frozen by masked updates. The loop ends when no row is
    active (``keep_running``: rows keep being computed after their exit, the loop runs every exit with a known trip
    count; the output is still the one of the exit taken: CALM's oracle-K/V baseline).

    One ``while`` per run of equal-length segments (``exit_runs``; one run for exits after every layer): a host
    stop per exit decision plus one per run, no inner data-dependent loop, the heads indexed by the exit
    (``head_program``)."""

    keep_running: bool = False


class BucketCascade(NamedTuple):
    """The monotone bucket cascade: rows never re-activate, so the active count only falls. The batch starts in a
    buffer of its full size; one loop per bucket size (largest first, ``buckets``, default ``default_buckets(B)``:
    about B, B/2, B/4, B/8) runs exits on its buffer while the active rows outnumber the next bucket; then the
    active rows move to the front (a stable partition: a cumulative sum and one scatter, no sort) and the buffer
    shrinks to the next size. A stopped row writes its head output, exit, score and policy state to its buffer slot
    (a row select, fused with the head); those reach batch order (one scatter of the small results) only when the
    row leaves a buffer. The hidden state is never scattered back: ``DynamicOutputs.h`` is None.

    Cost per forward (``tests/test_host_stops.py``): a host stop per exit decision plus one per (bucket, run) loop,
    one gather of the buffer per bucket change. Buffer rows that stopped are computed on until the next bucket
    change (the price of static shapes). Needs row-independent layers and heads and no ``aux``. Batch-wide
    policies (``batch_mean``) see the buffer's rows (the same as the masked executor's while the batch exits
    together, which is what such a policy does)."""

    buckets: tuple[int, ...] | None = None


class Compacted(NamedTuple):
    """BASELINE, kept for side-by-side benchmarks against :class:`BucketCascade` (the library's compaction path): the
    executor as first written and as measured on the H200 (issue 20). Before each exit segment the still-active
    rows move to the front (a stable argsort of the batch) and are gathered into a *bucket*: the smallest static
    size in ``buckets`` (default ``default_buckets(B)``) that holds them, picked by ``lax.switch`` on the active
    count. The segment (a loop over traced bounds), the head (``lax.switch`` over the exits) and the policy run on
    the bucket only; results, the hidden state included, are scattered back every segment. Needs row-independent
    layers and heads and no ``aux``."""

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


def _masked_loops(r: _Runner, head, policy, num_exits, keep_running, runs, c: LoopCarry) -> LoopCarry:
    def body_for(length):
        def body(c: LoopCarry) -> LoopCarry:
            run_B = jnp.ones_like(c.active_B) if keep_running else c.active_B
            h, aux = r.segment(c.e, c.h, c.aux, run_B, length, freeze=not keep_running)
            out = head(c.e, h)
            stop_B, score_B, pstate = exit_check(policy, out, c.policy_state, c.e, num_exits, c.active_B)
            return LoopCarry(e=c.e + 1, h=h, aux=aux, active_B=c.active_B & ~stop_B,
                             exit_B=jnp.where(stop_B, c.e, c.exit_B), out=where_rows(stop_B, out, c.out),
                             score_B=jnp.where(stop_B, score_B, c.score_B), policy_state=pstate)
        return body

    for run_ in runs:
        body = body_for(run_.length)
        if keep_running:     # every exit runs: a loop of known trip count, no host stop
            c = jax.lax.fori_loop(run_.first, run_.end, lambda e, c, body=body: body(c), c)
        else:
            c = jax.lax.while_loop(lambda c, end=run_.end: (c.e < end) & jnp.any(c.active_B), body, c)
    return c


def _cascade_body(r: _Runner, head, policy, num_exits, length):
    def body(c: BufferCarry) -> BufferCarry:
        h, _ = r.segment(c.e, c.h, None, c.active_S, length, freeze=False)
        out = head(c.e, h)
        stop_S, score_S, pstate = exit_check(policy, out, c.policy_state, c.e, num_exits, c.active_S)
        return BufferCarry(e=c.e + 1, h=h, row_S=c.row_S, active_S=c.active_S & ~stop_S,
                           exit_S=jnp.where(stop_S, c.e, c.exit_S), out=where_rows(stop_S, out, c.out),
                           score_S=jnp.where(stop_S, score_S, c.score_S), policy_state=pstate)
    return body


def _flush(res: RowResults, c: BufferCarry) -> RowResults:
    """Write the results of the buffer rows that stopped to their batch rows (rows still running are dropped)."""
    batch, size = res.exit_B.shape[0], c.row_S.shape[0]
    dest_S = jnp.where(c.active_S, batch + jnp.arange(size, dtype=jnp.int32), c.row_S)   # unique; out of range
    put = lambda full, part: full.at[dest_S].set(part.astype(full.dtype), mode="drop",  # noqa: E731
                                                 unique_indices=True)
    return RowResults(exit_B=put(res.exit_B, c.exit_S), out=jax.tree.map(put, res.out, c.out),
                      score_B=put(res.score_B, c.score_S), policy_state=jax.tree.map(put, res.policy_state,
                                                                                     c.policy_state))


def _compact(c: BufferCarry, size: int) -> BufferCarry:
    """The buffer's active rows first (in order), then the stopped ones, cut to ``size`` rows (>= the active
    count). A stable partition by a cumulative sum and one scatter of indices: no sort."""
    act_S = c.active_S.astype(jnp.int32)
    count = jnp.sum(act_S)
    dest_S = jnp.where(c.active_S, jnp.cumsum(act_S) - 1, count + jnp.cumsum(1 - act_S) - 1)
    src_S = jnp.zeros_like(dest_S).at[dest_S].set(jnp.arange(dest_S.shape[0], dtype=jnp.int32),
                                                  unique_indices=True)[:size]
    take = lambda x: x.at[src_S].get(unique_indices=True, mode="promise_in_bounds")  # noqa: E731
    rows = jax.tree.map(take, c._replace(e=None))
    return rows._replace(e=c.e)


def _cascade_loops(r: _Runner, head, policy, num_exits, sizes, runs, c: BufferCarry, res: RowResults):
    sizes = sorted(sizes, reverse=True)     # the full batch first
    for k, size in enumerate(sizes):
        nxt = sizes[k + 1] if k + 1 < len(sizes) else 0
        if k > 0:
            res = _flush(res, c)
            c = _compact(c, size)
        rk = r._replace(program=rows_of(r.program, c.row_S))    # a per-row program follows its rows into the buffer
        for run_ in runs:    # loops of runs already passed (or of a bucket already too big) run no iteration
            c = jax.lax.while_loop(
                lambda c, end=run_.end, nxt=nxt: (c.e < end) & (jnp.sum(c.active_S.astype(jnp.int32)) > nxt),
                _cascade_body(rk, head, policy, num_exits, run_.length), c)
    return _flush(res, c), c.e


def _switch_head(heads, e, h):
    return heads[0](h) if len(heads) == 1 else jax.lax.switch(e, list(heads), h)


def _compacted_body(r: _Runner, heads, policy, num_exits, sizes_K):
    def bucket_step(size: int, c: LoopCarry, perm_B: jax.Array) -> LoopCarry:
        idx_S = perm_B[:size]                      # the active rows first, then stopped rows as padding
        take = lambda x: x.at[idx_S].get(unique_indices=True, mode="promise_in_bounds")  # noqa: E731
        valid_S = take(c.active_B)
        sub = r._replace(program=rows_of(r.program, idx_S))
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


# ------------------------------------------------------------------------------------------------ input checks


def check_h0(h0) -> int:
    """``h0``: an array, or a pytree of arrays, each with the same non-empty leading batch axis; returns B."""
    leaves = jax.tree.leaves(h0)
    if not leaves or not all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves):
        raise ValueError(f"h0 must be an array (or a pytree of arrays) with a leading batch axis; got "
                         f"{type(h0).__name__}{'' if leaves else ' with no arrays'} (convert lists with jnp.asarray)")
    batches = {x.shape[0] if x.ndim else None for x in leaves}
    if len(batches) != 1 or None in batches:
        raise ValueError(f"h0's arrays must share one leading batch axis; got shapes {[x.shape for x in leaves]}")
    batch = batches.pop()
    if batch == 0:
        raise ValueError("h0 has an empty batch (0 rows); run at least one row")
    return batch


def check_program(program: Program, num_layers: int) -> None:
    """A program names only stored layers, and its exits sit after steps it has (checked when concrete)."""
    if not isinstance(program, Program):
        raise ValueError(f"program must be an engine.Program (engine.prefix / sequence / repeat ...); got "
                         f"{type(program).__name__}")
    if checks.is_concrete(program.layer_S):
        layer_S = np.asarray(program.layer_S)
        bad = sorted({int(l) for l in layer_S.reshape(-1) if not 0 <= l < num_layers})
        if bad:
            raise ValueError(f"program runs stored layers {bad}, but the layers hold {num_layers} (0..{num_layers - 1}"
                             f"); build the program for {num_layers} layers (e.g. engine.prefix({num_layers}, ...))")
    if checks.is_concrete(program.exit_step_E):
        check_exit_steps(np.asarray(program.exit_step_E).tolist(), int(np.asarray(program.exit_step_E)[-1]) + 1)
        if int(np.asarray(program.exit_step_E)[-1]) >= program.num_steps:
            raise ValueError(f"program exits after step {int(np.asarray(program.exit_step_E)[-1])} but has "
                             f"{program.num_steps} steps")


# ------------------------------------------------------------------------------------------------ the loop


def run(layers: nnx.Module, heads: Sequence[Callable] | IndexedHeads, h0, program: Program, policy=None,
        executor=Masked(), *, layer_fn: LayerFn = call_layer, aux=None,
        fields: Sequence[str] | None = None) -> DynamicOutputs:
    """Run ``program`` over the stacked ``layers`` from ``h0``, exiting per row as ``policy`` decides, the rows
    laid out as ``executor`` says. ``heads``: one callable per exit (``h -> head output``), or an
    :class:`IndexedHeads`; the loops call them as ``head_program`` says (stacked when they share a structure,
    else a switch), so only the exit being evaluated runs.

    ``fields``: the ``HeadOut`` fields the caller reads from ``out`` (default: all). Fields that neither the
    caller nor the policy (its ``reads``) needs come back as None and cost no work.

    ``policy=None`` is the static path: every step runs (a loop of known trip count for static programs, no early
    stop) and only the last head is evaluated; ``exit_B`` is then the last exit for every row. Executors other
    than Masked, BucketCascade and Compacted wrap this function (``eejax.exits.paths``, ``eejax.exits.continuous``).
    """
    num_exits = program.num_exits if isinstance(program, Program) else None
    check_program(program, num_layers_of(layers))
    if len(heads) != num_exits:
        raise ValueError(f"{len(heads)} heads for a program with {num_exits} exits")
    batch = check_h0(h0)
    if policy is not None and hasattr(policy, "check"):
        policy.check(num_exits, batch)
    if hasattr(executor, "run"):                 # executors defined outside this module
        return executor.run(layers, heads, h0, program, policy, layer_fn=layer_fn, aux=aux, fields=fields)
    r = _runner(layers, program, layer_fn, aux is not None)
    zero_B = zeros_from(h0)
    last = jnp.asarray(num_exits - 1, jnp.int32)
    ends = jnp.asarray(program.exit_step_E)
    if policy is None:
        ones = zero_B == 0
        end = ends[-1]
        h, aux = jax.lax.fori_loop(0, end + 1, lambda s, c: r.step(s, *c, ones, freeze=False), (h0, aux))
        return DynamicOutputs(out=heads[-1](h), exit_B=zero_B + last, exit_layer_B=zero_B + end,
                              score_B=zero_B.astype(jnp.float32), layers_run=end + 1, h=h, aux=aux)

    if isinstance(executor, Compacted):
        return _run_compacted(r, heads, h0, program, policy, executor, aux, zero_B)
    if not isinstance(executor, (Masked, BucketCascade)):
        raise TypeError(f"unknown executor {executor!r}")
    apply, _ = head_program(heads)
    keep = _fields_kept(policy, fields)
    head = lambda e, h: _project(apply(e, h), keep)  # noqa: E731
    probe = jax.eval_shape(lambda h: head(jnp.int32(0), h), h0)
    zeros_out = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) + mask_like(zero_B, a).astype(a.dtype), probe)
    pstate0 = policy.init(probe, zero_B, h0)
    runs = exit_runs(program)
    if isinstance(executor, Masked):
        init = LoopCarry(e=jnp.int32(0), h=h0, aux=aux, active_B=zero_B == 0, exit_B=zero_B, out=zeros_out,
                         score_B=zero_B.astype(jnp.float32), policy_state=pstate0)
        final = _masked_loops(r, head, policy, num_exits, executor.keep_running, runs, init)
        return DynamicOutputs(out=final.out, exit_B=final.exit_B, exit_layer_B=ends[final.exit_B],
                              score_B=final.score_B, layers_run=ends[final.e - 1] + 1, h=final.h, aux=final.aux,
                              policy_state=final.policy_state)
    if aux is not None:
        raise ValueError("the cascade executor moves rows between buffers; it cannot carry an aux state (use "
                         "Masked)")
    init = BufferCarry(e=jnp.int32(0), h=h0, row_S=zero_B + jnp.arange(batch, dtype=jnp.int32),
                       active_S=zero_B == 0, exit_S=zero_B, out=zeros_out, score_S=zero_B.astype(jnp.float32),
                       policy_state=pstate0)
    res0 = RowResults(exit_B=zero_B, out=zeros_out, score_B=zero_B.astype(jnp.float32), policy_state=pstate0)
    res, e = _cascade_loops(r, head, policy, num_exits, check_buckets(executor.buckets, batch), runs, init, res0)
    return DynamicOutputs(out=res.out, exit_B=res.exit_B, exit_layer_B=ends[res.exit_B], score_B=res.score_B,
                          layers_run=ends[e - 1] + 1, policy_state=res.policy_state)


def _run_compacted(r: _Runner, heads, h0, program, policy, executor: Compacted, aux, zero_B) -> DynamicOutputs:
    """The baseline compacted executor (see :class:`Compacted`), unchanged from its first version."""
    num_exits = program.num_exits
    if aux is not None:
        raise ValueError("the compacted executor gathers rows; it cannot carry an aux state (use Masked)")
    heads = list(heads)
    probe = jax.eval_shape(heads[0], h0)
    body = _compacted_body(r, heads, policy, num_exits, check_buckets(executor.buckets, _batch(h0)))

    def cond(c: LoopCarry):
        return (c.e < num_exits) & jnp.any(c.active_B)

    init = LoopCarry(
        e=jnp.int32(0), h=h0, aux=aux, active_B=zero_B == 0, exit_B=zero_B,
        out=jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) + mask_like(zero_B, a).astype(a.dtype), probe),
        score_B=zero_B.astype(jnp.float32), policy_state=policy.init(probe, zero_B, h0))
    final = jax.lax.while_loop(cond, body, init)
    ends = jnp.asarray(program.exit_step_E)
    return DynamicOutputs(out=final.out, exit_B=final.exit_B, exit_layer_B=ends[final.exit_B],
                          score_B=final.score_B, layers_run=ends[final.e - 1] + 1, h=final.h, aux=final.aux,
                          policy_state=final.policy_state)


# ------------------------------------------------------------------------------------------------ simulation


class Simulated(NamedTuple):
    """What ``simulate`` says each row would do on the engine."""

    exit_B: jax.Array      # exit index taken (0..E-1)
    score_B: jax.Array     # the policy's score at the exit taken
    policy_state: Any      # the policy's final state


def simulate(policy, outputs, *, h0=None) -> Simulated:
    """THE stop rule (``exit_check``) run offline over every exit's outputs computed ahead: the exit each row
    would take on the engine with ``policy``, the engine's own decisions (tested against it for every policy kind).

    ``outputs``: the scan path's ``ExitOutputs`` / ``StackedExits``, any head-output pytree whose leaves carry a
    leading exit axis E (``E x B x ...``), or cached scores ``score_ExB`` (an array; use a policy that reads
    :class:`Scores`, e.g. ``policies.score_threshold``). ``h0``: the loop's input, for policies that read it
    (``router``, ``saturation(first=...)``). Scores are compared in float32, as on the engine.
    """
    if isinstance(outputs, ExitOutputs):
        outputs = HeadOut(*outputs[:4])
    elif isinstance(outputs, StackedExits):
        outputs = outputs.out
    elif not isinstance(outputs, tuple) and not isinstance(outputs, dict):
        outputs = Scores(jnp.asarray(outputs, jnp.float32))
    leaves = jax.tree.leaves(outputs)
    if not leaves or any(np.ndim(x) < 2 for x in leaves):
        raise ValueError("outputs must be stacked per exit: every leaf E x B x ... (scores: score_ExB)")
    num_exits, batch = np.shape(leaves[0])[:2]
    if batch == 0:
        raise ValueError("outputs hold an empty batch (0 rows)")
    if hasattr(policy, "check"):
        policy.check(num_exits, batch)
    at = lambda e: jax.tree.map(lambda x: jnp.asarray(x)[e], outputs)  # noqa: E731
    zero_B = jnp.zeros((batch,), jnp.int32)
    state = policy.init(at(0), zero_B, h0)
    active_B, exit_B, score_B = zero_B == 0, zero_B + num_exits - 1, zero_B.astype(jnp.float32)
    for e in range(num_exits):
        stop_B, s_B, state = exit_check(policy, at(e), state, e, num_exits, active_B)
        exit_B = jnp.where(stop_B & active_B, e, exit_B)
        score_B = jnp.where(stop_B & active_B, s_B, score_B)
        active_B = active_B & ~stop_B
    return Simulated(exit_B, score_B, state)


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


__all__ = ["ATTN", "MLP", "FULL", "FFN_SKIP", "FFN_SMALL", "FFN_BIG", "FFN_VARIANTS", "HeadOut", "ExitOutputs",
           "StackedExits", "DynamicOutputs", "StepCtx", "Program", "LoopCarry", "BufferCarry", "RowResults", "Masked",
           "BucketCascade", "Compacted", "ExitRun", "exit_runs", "Scores", "IndexedHeads", "stack_heads",
           "head_program", "HEAD_KINDS", "call_layer", "step_ctx", "mlp_step", "select_variant", "prefix", "sequence",
           "repeat", "row_skip", "mlp_skip", "ffn_route", "rows_of", "per_row", "stage_path", "check_stage_path",
           "check_exit_steps", "ExitSpec", "exit_layers_from", "check_exits", "check_h0", "check_program",
           "num_layers_of", "where_rows", "mask_like", "zeros_from", "exit_check", "default_buckets", "check_buckets",
           "run", "Simulated", "simulate", "run_layers", "REMAT_POLICIES", "remat_policy", "remat_step", "scan_exits",
           "while_exits", "scores_from_outputs", "take_exit"]
