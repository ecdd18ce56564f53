"""Token exit inside a sequence (engine feature F6): from an exit on, the tokens a policy lets go stop being updated
while the rest of the sequence goes deeper.

Two papers define it:

* DToP (Tang et al., ICCV 2023, arXiv:2308.01045): a segmentation ViT cut into stages at its auxiliary heads; after
  each stage a token whose top class score passes a threshold is finalised (its prediction kept from that head)
  and leaves the later layers, except the ``k`` most confident tokens of each class, which stay as context.
* DyVTE (arXiv:2411.19628): in a multimodal decoder, a per-layer gate reads the text tokens and, at the first layer
  where it fires, removes *all* image tokens of that row from every later layer (a token *group* exits together);
  the KV cache keeps them for the earlier layers.

The pieces mirror the engine's (``eejax.exits.engine``): a layer **program** (``engine.Program``: the stored layer of
each step and after which steps an exit is evaluated), one **head** per exit, a token **policy**, an **executor**,
and the engine's ``layer_fn(layer, h, ctx)`` convention (``ctx`` an ``engine.StepCtx`` whose ``aux`` is a
:class:`TokenAux`: which slots are updated and which are visible as keys, their original positions, and the
caller's own auxiliary state, e.g. a KV cache).

* **heads**: ``head(h_BxQxD, view) -> out``, per-token outputs (every leaf ``B x Q x ...``) for the Q slots of
  ``view``; every head returns the same structure (the output a token exits with is stored per token).
* **policy**: ``policy.decide(out, view, eligible_BxQ, e) -> (fire_BxQ, score_BxQ)``; only eligible slots (tokens
  still active and allowed to exit, ``exitable_BxT``) may fire. :func:`confidence` is DToP's rule (max softmax
  against a threshold per exit, top-``k`` per predicted class kept), :func:`group_gate` DyVTE's (a per-row gate
  broadcast to the row's exitable tokens). At the last exit every active token exits.
* **mode**: ``"drop"`` (an exited token is no longer a key of any later layer: DToP's and DyVTE's rule) or
  ``"freeze"`` (it stays a key, from its frozen state: context kept, no longer updated).
* **executor**: :class:`Masked` computes every token at every step with masked updates and masked keys (the
  reference; any mode); :class:`Compacted` gathers, before each exit segment, each row's active tokens to the front
  of a bucket of static size Q, the smallest of ``buckets`` that holds the batch's largest active count (one
  ``lax.switch`` per segment after the first: one host stop each on a GPU), runs the segment and the head on the Q
  slots only and scatters the results back (``"drop"`` only: a frozen token would have to stay in the bucket).

:func:`scan` is the teacher-forced path: every token at every step under ``lax.scan``, with a GIVEN token schedule
(``exit_BxT``: the exit each token takes); it returns every exit's head output on every token. It is the
simulation an executed run must equal (the executed schedule fed back reproduces the executed outputs, and the
policy on its heads reproduces the schedule) and, being differentiable, the training path (all tokens to the end:
DToP's auxiliary-loss training; image tokens dropped after layer l: DyVTE's label runs).

Accounting (``TokenOutputs``): ``queries_SxB`` (tokens updated at step s of row b), ``keys_SxB`` (tokens visible as
keys there) and ``slots_S`` (slots computed per row at step s: T under Masked, the bucket under Compacted);
``eejax.exits.costs.token_layer_flops`` turns them into FLOPs.

Shapes: B batch, T tokens, Q slots (T under Masked, a bucket under Compacted), D width, S program steps, E exits,
C classes.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.exits import engine, policies

MODES = ("drop", "freeze")


class TokenView(NamedTuple):
    """The slots a layer or head sees: each slot's token and its role at this step."""

    pos_BxQ: jax.Array       # int32: original position (index along T) of the token in slot q
    query_BxQ: jax.Array     # bool: the token is updated at this step (active)
    key_BxQ: jax.Array       # bool: the token is visible as a key (active; or frozen, in freeze mode)
    exitable_BxQ: jax.Array  # bool: the token may exit (DToP: every patch; DyVTE: the image tokens)


class TokenAux(NamedTuple):
    """``StepCtx.aux`` of a token-exit step: the view and the caller's own auxiliary state (None without one)."""

    view: TokenView
    aux: Any = None


class TokenOutputs(NamedTuple):
    """An executed (or simulated) token-exit run, every per-token array in original positions."""

    out: Any                 # the head output each token exited with, leaves ``B x T x ...``
    exit_BxT: jax.Array      # int32: exit each token took (E-1 for tokens that ran to the end; -1 for padding)
    score_BxT: jax.Array     # float32: the policy's score at that exit
    h: jax.Array             # ``B x T x D`` final hidden state (each token frozen at its exit)
    queries_SxB: jax.Array   # int32: tokens updated at step s of row b
    keys_SxB: jax.Array      # int32: tokens visible as keys at step s of row b
    slots_S: jax.Array       # int32: slots computed per row at step s (T under Masked, the bucket under Compacted)
    aux: Any = None          # the caller's final auxiliary state


class TokenHeadOut(NamedTuple):
    """A per-token classifier head's output (DToP's stage heads)."""

    logits_BxQxC: jax.Array


class GateOut(NamedTuple):
    """A group gate's output: the row's gate score broadcast to every slot (DyVTE's router)."""

    gate_BxQ: jax.Array


class Masked(NamedTuple):
    """Every token computed at every step; updates and keys masked per token (the reference executor)."""


class Compacted(NamedTuple):
    """Active tokens gathered per segment into the smallest static bucket that holds them (``buckets``: sizes
    along T; default ``default_buckets(T)``). Drop mode only."""

    buckets: tuple[int, ...] | None = None


def default_buckets(tokens: int, num: int = 6, multiple: int = 8) -> tuple[int, ...]:
    """Bucket sizes ``ceil(T / 2**i)`` for ``i < num``, rounded up to ``multiple`` and capped at T (T included)."""
    if tokens < 1 or num < 1 or multiple < 1:
        raise ValueError(f"{tokens=}, {num=}, {multiple=} must all be >= 1")
    return tuple(sorted({min(tokens, -(-math.ceil(tokens / 2 ** i) // multiple) * multiple) for i in range(num)}))


def check_buckets(buckets: Sequence[int] | None, tokens: int) -> tuple[int, ...]:
    """Sorted bucket sizes along T; sizes above T are capped at T, and T itself is always a bucket."""
    if buckets is None:
        return default_buckets(tokens)
    sizes = sorted({min(int(s), tokens) for s in buckets} | {tokens})
    if sizes[0] < 1:
        raise ValueError(f"bucket sizes {sorted(buckets)} must be >= 1")
    return tuple(sizes)


# ------------------------------------------------------------------------------------------------ policies


class Confidence(NamedTuple):
    """DToP's exit rule: a token exits at exit e when its head's max softmax is >= ``threshold_E[e]``, except the
    ``top_k`` most confident exiting tokens of each predicted class, which stay (context kept, arXiv:2308.01045
    Sec. 3.3). Ties in confidence go to the earlier position, so every executor keeps the same tokens."""

    threshold_E: jax.Array
    top_k: int = 0

    def decide(self, out, view: TokenView, eligible_BxQ, e):
        probs = jax.nn.softmax(out.logits_BxQxC.astype(jnp.float32), axis=-1)
        score_BxQ, cls_BxQ = probs.max(-1), probs.argmax(-1)
        fire_BxQ = eligible_BxQ & (score_BxQ >= self.threshold_E[e])
        if self.top_k > 0:
            fire_BxQ = fire_BxQ & ~top_k_per_class(score_BxQ, cls_BxQ, fire_BxQ, view.pos_BxQ, self.top_k)
        return fire_BxQ, score_BxQ


class GroupGate(NamedTuple):
    """DyVTE's exit rule: the head's per-row gate score (``out.gate_BxQ``, the same for every slot of a row) fires
    the row's whole exitable group at once when it is >= ``threshold_E[e]`` (arXiv:2411.19628: the router's exit
    logit minus its keep logit, threshold 0)."""

    threshold_E: jax.Array

    def decide(self, out, view: TokenView, eligible_BxQ, e):
        score_BxQ = out.gate_BxQ.astype(jnp.float32)
        return eligible_BxQ & (score_BxQ >= self.threshold_E[e]), score_BxQ


def confidence(threshold, num_exits: int, top_k: int = 0) -> Confidence:
    """DToP's rule; ``threshold`` a scalar or one per exit (probabilities; +inf: never exit early)."""
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0: keep no token per class)")
    return Confidence(policies.thresholds(threshold, num_exits), int(top_k))


def group_gate(threshold, num_exits: int) -> GroupGate:
    """DyVTE's rule; ``threshold`` a scalar or one per exit on the gate score (+inf: the group never exits)."""
    return GroupGate(policies.thresholds(threshold, num_exits))


def top_k_per_class(score_BxQ, cls_BxQ, fire_BxQ, pos_BxQ, k: int) -> jax.Array:
    """``bool[B, Q]``: among the firing slots of each row, the ``k`` with the highest score in each class (ties to
    the lower original position). Quadratic in Q per row (each slot counts the firing slots of its class ranked
    above it), which is cheap next to a layer's Q x Q attention."""
    same = (cls_BxQ[:, :, None] == cls_BxQ[:, None, :]) & fire_BxQ[:, None, :]
    above = (score_BxQ[:, None, :] > score_BxQ[:, :, None]) | (
        (score_BxQ[:, None, :] == score_BxQ[:, :, None]) & (pos_BxQ[:, None, :] < pos_BxQ[:, :, None]))
    rank_BxQ = jnp.sum(same & above, axis=-1)
    return fire_BxQ & (rank_BxQ < k)


# ------------------------------------------------------------------------------------------------ layer functions


def attention_mask(view: TokenView, causal: bool = False) -> jax.Array:
    """Which slots each slot attends to: the key slots (``B x Q``), and with ``causal`` only those at an original
    position no later than the query's (``B x Q x Q``)."""
    if not causal:
        return view.key_BxQ
    return view.key_BxQ[:, None, :] & (view.pos_BxQ[:, None, :] <= view.pos_BxQ[:, :, None])


def block_layer_fn(causal: bool = False) -> Callable:
    """The ``layer_fn`` of an ``eejax.nn.Block`` stack under token exit: the block with its attention restricted
    to the key slots (``attention_mask``)."""

    def layer_fn(layer, h_BxQxD, ctx: engine.StepCtx):
        return layer(h_BxQxD, attention_mask(ctx.aux.view, causal))

    return layer_fn


# ------------------------------------------------------------------------------------------------ executors


class _Carry(NamedTuple):
    h: jax.Array
    active_BxT: jax.Array
    key_BxT: jax.Array
    exit_BxT: jax.Array
    out: Any
    score_BxT: jax.Array
    aux: Any


def _check_program(program: engine.Program, heads) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        layer_S, repeat_S, ends_E = (np.asarray(x) for x in (program.layer_S, program.repeat_S, program.exit_step_E))
    except jax.errors.TracerArrayConversionError:
        raise ValueError("token exit needs a static program (numpy layer_S / exit_step_E), got a traced one") \
            from None
    if program.sub_S is not None or engine.per_row(program):
        raise ValueError("token exit runs whole layers: the program must not carry sublayer bits (sub_S / "
                         "row_sub_SxB) or FFN routes (ffn_SxB)")
    if len(heads) != ends_E.shape[0]:
        raise ValueError(f"{len(heads)} heads for a program with {ends_E.shape[0]} exits")
    return layer_S, repeat_S, ends_E


def _check_inputs(h0, valid_BxT, exitable_BxT, mode: str):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    if h0.ndim != 3:
        raise ValueError(f"token exit needs h0 of shape B x T x D, got {h0.shape}")
    b, t = h0.shape[:2]
    valid_BxT = jnp.ones((b, t), bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
    exitable_BxT = jnp.ones((b, t), bool) if exitable_BxT is None else jnp.asarray(exitable_BxT, bool)
    for name, m in (("valid_BxT", valid_BxT), ("exitable_BxT", exitable_BxT)):
        if m.shape != (b, t):
            raise ValueError(f"{name} must have shape {(b, t)} (B x T of h0), got {m.shape}")
    return valid_BxT, exitable_BxT


def _take(x, idx_BxQ):
    """Gather slots along axis 1 of a ``B x T x ...`` leaf."""
    return jnp.take_along_axis(x, idx_BxQ.reshape(idx_BxQ.shape + (1,) * (x.ndim - 2)), axis=1)


def _put(full, idx_BxQ, new):
    """Scatter slots back along axis 1 (indices unique per row)."""
    b = jnp.arange(full.shape[0])[:, None]
    return full.at[b, idx_BxQ].set(new.astype(full.dtype), unique_indices=True)


def _where_tokens(mask_BxQ, new, old):
    return jax.tree.map(lambda n, o: jnp.where(mask_BxQ.reshape(mask_BxQ.shape + (1,) * (n.ndim - 2)), n, o),
                        new, old)


class _Stack(NamedTuple):
    layer_def: Any
    stacked: Any
    layer_fn: Callable
    has_aux: bool
    layer_S: np.ndarray
    repeat_S: np.ndarray

    def segment(self, start: int, end: int, h, view: TokenView, aux):
        """Steps ``start .. end - 1`` (static bounds: a loop of known trip count, no host stop) with a fixed view."""
        return jax.lax.fori_loop(start, end, lambda s, c: self._step(s, *c, view), (h, aux))

    def _step(self, s, h, aux, view: TokenView):
        l = jnp.asarray(self.layer_S)[s]
        layer = nnx.merge(self.layer_def, jax.tree.map(lambda x: x[l], self.stacked))
        ctx = engine.StepCtx(step=s, layer=l, repeat=jnp.asarray(self.repeat_S)[s], sub_B=None,
                             aux=TokenAux(view, aux))
        res = self.layer_fn(layer, h, ctx)
        new_h, aux = res if self.has_aux else (res, aux)
        return _where_tokens(view.query_BxQ, new_h, h), aux


def _decide(policy, out, view: TokenView, e: int, last: bool):
    eligible = view.query_BxQ & view.exitable_BxQ
    fire, score = policy.decide(out, view, eligible, e)
    if last:                       # every token still active exits at the last exit
        fire = view.query_BxQ
    return fire & view.query_BxQ, score.astype(jnp.float32)


def _update(c: _Carry, fire_BxT, out_full, score_BxT, e: int, mode: str) -> _Carry:
    return c._replace(active_BxT=c.active_BxT & ~fire_BxT,
                      key_BxT=c.key_BxT & ~fire_BxT if mode == "drop" else c.key_BxT,
                      exit_BxT=jnp.where(fire_BxT, e, c.exit_BxT),
                      out=_where_tokens(fire_BxT, out_full, c.out),
                      score_BxT=jnp.where(fire_BxT, score_BxT, c.score_BxT))


def run(layers: nnx.Module, heads: Sequence[Callable], h0, program: engine.Program, policy, executor=Masked(), *,
        mode: str = "drop", layer_fn: Callable = block_layer_fn(), valid_BxT=None, exitable_BxT=None,
        aux=None) -> TokenOutputs:
    """Run ``program`` over the stacked ``layers`` from ``h0`` (``B x T x D``), tokens exiting as ``policy``
    decides at each exit, laid out as ``executor`` says.

    ``valid_BxT``: real tokens (padding is never a query nor a key; exit -1); ``exitable_BxT``: tokens the policy
    may let go (default: every token). ``aux``: the caller's state, carried through the steps; ``layer_fn`` then
    returns ``(h, aux)`` and reads its state at ``ctx.aux.aux`` (under Compacted the slots' original positions,
    ``ctx.aux.view.pos_BxQ``, say where to write).
    """
    layer_S, repeat_S, ends_E = _check_program(program, heads)
    valid_BxT, exitable_BxT = _check_inputs(h0, valid_BxT, exitable_BxT, mode)
    if isinstance(executor, Compacted) and mode != "drop":
        raise ValueError("the compacted token executor runs mode='drop' only (a frozen token stays a key, so it "
                         "would stay in the bucket); use executor=Masked() for mode='freeze'")
    if not isinstance(executor, (Masked, Compacted)):
        raise TypeError(f"unknown token executor {executor!r}: use tokens.Masked() or tokens.Compacted()")
    b, t, _ = h0.shape
    num_exits = ends_E.shape[0]
    layer_def, stacked = nnx.split(layers)
    stack = _Stack(layer_def, stacked, layer_fn, aux is not None, layer_S, repeat_S)
    pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    full_view = TokenView(pos_BxT, valid_BxT, valid_BxT, exitable_BxT)
    probe = jax.eval_shape(heads[0], h0, full_view)
    zero = jnp.zeros((b, t), jnp.int32)
    carry = _Carry(h0, valid_BxT, valid_BxT, jnp.where(valid_BxT, num_exits - 1, -1).astype(jnp.int32),
                   jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), probe), zero.astype(jnp.float32), aux)
    queries, keys, slots = [], [], []
    starts = np.concatenate([[0], ends_E[:-1] + 1])
    for e in range(num_exits):
        start, end = int(starts[e]), int(ends_E[e]) + 1
        n = end - start
        queries.append(jnp.broadcast_to(jnp.sum(carry.active_BxT, 1, dtype=jnp.int32), (n, b)))
        keys.append(jnp.broadcast_to(jnp.sum(carry.key_BxT, 1, dtype=jnp.int32), (n, b)))
        last = e == num_exits - 1
        if isinstance(executor, Masked) or e == 0:
            carry = _masked_segment(stack, heads[e], policy, carry, pos_BxT, exitable_BxT, e, start, end, last, mode)
            slots.append(jnp.full((n,), t, jnp.int32))
        else:
            carry, size = _compacted_segment(stack, heads[e], policy, carry, exitable_BxT, e, start, end, last,
                                             check_buckets(executor.buckets, t))
            slots.append(jnp.broadcast_to(size, (n,)))
    return TokenOutputs(carry.out, carry.exit_BxT, carry.score_BxT, carry.h, jnp.concatenate(queries),
                        jnp.concatenate(keys), jnp.concatenate(slots), carry.aux)


def _masked_segment(stack: _Stack, head, policy, c: _Carry, pos_BxT, exitable_BxT, e, start, end, last, mode):
    view = TokenView(pos_BxT, c.active_BxT, c.key_BxT, exitable_BxT)
    h, aux = stack.segment(start, end, c.h, view, c.aux)
    out = head(h, view)
    fire, score = _decide(policy, out, view, e, last)
    return _update(c._replace(h=h, aux=aux), fire, out, score, e, mode)


def _compacted_segment(stack: _Stack, head, policy, c: _Carry, exitable_BxT, e, start, end, last, sizes):
    """Gather each row's active tokens (stable: in position order) into the smallest bucket that holds the batch's
    largest count, run the segment and the head there, scatter back. A batch with no active token skips it."""
    perm_BxT = jnp.argsort(~c.active_BxT, axis=1, stable=True).astype(jnp.int32)   # active tokens first

    def bucket(size: int, c: _Carry) -> _Carry:
        idx = perm_BxT[:, :size]
        query = _take(c.active_BxT, idx)
        view = TokenView(idx, query, query, _take(exitable_BxT, idx))
        h_q, aux = stack.segment(start, end, _take(c.h, idx), view, c.aux)
        out = head(h_q, view)
        fire, score = _decide(policy, out, view, e, last)
        put = functools.partial(_put, idx_BxQ=idx)
        fire_BxT = put(jnp.zeros_like(c.active_BxT), new=fire)
        out_full = jax.tree.map(lambda full, new: put(full, new=new), c.out, out)
        return _update(c._replace(h=put(c.h, new=h_q), aux=aux), fire_BxT, out_full,
                       put(c.score_BxT, new=score), e, "drop")

    branches = [lambda c: c] + [functools.partial(bucket, s) for s in sizes]
    count = jnp.max(jnp.sum(c.active_BxT, axis=1, dtype=jnp.int32))
    which = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count))
    size = jnp.where(count == 0, 0, jnp.asarray(sizes, jnp.int32)[jnp.clip(which - 1, 0, len(sizes) - 1)])
    return jax.lax.switch(which, branches, c), size


# ------------------------------------------------------------------------------------------------ teacher forcing


class TokenScan(NamedTuple):
    """The teacher-forced path's result."""

    out_E: Any             # every exit's head output on every token, leaves ``E x B x T x ...``
    h: jax.Array           # final hidden state (each token frozen at its scheduled exit)


def schedule_masks(exit_BxT, program: engine.Program, valid_BxT=None, mode: str = "drop"):
    """``(query_SxBxT, key_SxBxT)``: the tokens updated and the tokens visible as keys at every step when token
    ``t`` exits at exit ``exit_BxT[b, t]`` (-1: padding). Drop: keys are the updated tokens; freeze: every real
    token."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    ends_E = jnp.asarray(np.asarray(program.exit_step_E), jnp.int32)
    exit_BxT = jnp.asarray(exit_BxT, jnp.int32)
    valid_BxT = exit_BxT >= 0 if valid_BxT is None else jnp.asarray(valid_BxT, bool) & (exit_BxT >= 0)
    last_step_BxT = jnp.where(valid_BxT, ends_E[jnp.clip(exit_BxT, 0, ends_E.shape[0] - 1)], -1)
    steps = jnp.arange(program.num_steps, dtype=jnp.int32)[:, None, None]
    query = steps <= last_step_BxT[None]
    key = query if mode == "drop" else jnp.broadcast_to(valid_BxT[None], query.shape)
    return query, key


def scan(layers: nnx.Module, heads: Sequence[Callable], h0, program: engine.Program, exit_BxT, *,
         mode: str = "drop", layer_fn: Callable = block_layer_fn(), exitable_BxT=None, remat: bool = False
         ) -> TokenScan:
    """Teacher-forced token exit: every token computed at every step (``lax.scan`` per segment), with the token
    schedule given: token t of row b is updated through exit ``exit_BxT[b, t]`` (-1: padding) and, in drop mode,
    is a key only while it is updated. Every exit's head sees every token (its view: the tokens updated in the
    segment that ends there). Differentiable; ``remat`` recomputes each step in the backward pass."""
    layer_S, repeat_S, ends_E = _check_program(program, heads)
    valid_BxT, exitable_BxT = _check_inputs(h0, jnp.asarray(exit_BxT) >= 0, exitable_BxT, mode)
    b, t, _ = h0.shape
    query_SxBxT, key_SxBxT = schedule_masks(exit_BxT, program, valid_BxT, mode)
    layer_def, stacked = nnx.split(layers)
    pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def body(h, s):
        view = TokenView(pos_BxT, query_SxBxT[s], key_SxBxT[s], exitable_BxT)
        l = jnp.asarray(layer_S)[s]
        layer = nnx.merge(layer_def, jax.tree.map(lambda x: x[l], stacked))
        ctx = engine.StepCtx(step=s, layer=l, repeat=jnp.asarray(repeat_S)[s], sub_B=None, aux=TokenAux(view))
        return _where_tokens(view.query_BxQ, layer_fn(layer, h, ctx), h), None

    body = engine.remat_step(body, remat)
    outs, h = [], h0
    starts = np.concatenate([[0], ends_E[:-1] + 1])
    for e, head in enumerate(heads):
        h, _ = jax.lax.scan(body, h, jnp.arange(int(starts[e]), int(ends_E[e]) + 1))
        s = int(ends_E[e])
        outs.append(head(h, TokenView(pos_BxT, query_SxBxT[s], key_SxBxT[s], exitable_BxT)))
    return TokenScan(jax.tree.map(lambda *xs: jnp.stack(xs), *outs), h)


def take_exit(out_E, exit_BxT) -> Any:
    """Each token's head output at the exit it took, from ``scan``'s ``E x B x T x ...`` leaves (padding: exit 0)."""
    idx = jnp.clip(jnp.asarray(exit_BxT, jnp.int32), 0)
    return jax.tree.map(lambda x: jnp.take_along_axis(x, idx.reshape((1,) + idx.shape + (1,) * (x.ndim - 3)),
                                                      axis=0)[0], out_E)


def replay(policy, scan_out: TokenScan, exit_BxT, program: engine.Program, *, exitable_BxT=None, mode="drop"):
    """The exits ``policy`` takes when it decides on the heads of a teacher-forced run (``scan`` with schedule
    ``exit_BxT``): equal to ``exit_BxT`` exactly when the schedule is self-consistent, i.e. when it is the
    schedule an executed run took (tests hold this)."""
    exit_BxT = jnp.asarray(exit_BxT, jnp.int32)
    num_exits = len(np.asarray(program.exit_step_E))
    b, t = exit_BxT.shape
    valid = exit_BxT >= 0
    exitable_BxT = jnp.ones((b, t), bool) if exitable_BxT is None else jnp.asarray(exitable_BxT, bool)
    pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    active, key = valid, valid
    taken = jnp.where(valid, num_exits - 1, -1)
    for e in range(num_exits):
        out = jax.tree.map(lambda x: x[e], scan_out.out_E)
        view = TokenView(pos_BxT, active, key, exitable_BxT)
        fire, _ = _decide(policy, out, view, e, e == num_exits - 1)
        taken = jnp.where(fire, e, taken)
        active = active & ~fire
        key = key & ~fire if mode == "drop" else key
    return taken


def token_layers(out: TokenOutputs) -> jax.Array:
    """``int32[B]``: token-layers each row ran (sum over steps of its updated tokens): the count FLOPs follow."""
    return jnp.sum(out.queries_SxB, axis=0)


__all__ = ["MODES", "TokenView", "TokenAux", "TokenOutputs", "TokenScan", "TokenHeadOut", "GateOut", "Masked", "Compacted", "Confidence",
           "GroupGate", "confidence", "group_gate", "top_k_per_class", "attention_mask", "block_layer_fn",
           "default_buckets", "check_buckets", "run", "scan", "schedule_masks", "take_exit", "replay",
           "token_layers"]
