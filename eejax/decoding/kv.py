"""Per-row KV cache on the engine: prefill, ``extend`` (T tokens per row in one forward), rollback, state
propagation, sampling, and the decode executor ``Unrolled``.

Layout: cache slot = position. Row b holds its tokens at slots ``0 .. pos_B[b] - 1``; its next token goes to slot
``pos_B[b]``. Prompts are **right-padded** (``pad_prompts``) and prefilled whole; the padding slots past a row's
length are never visible (a query at position p sees slots ``s <= p``) and are overwritten as the row decodes. So
every row has its own position and length, ``extend`` writes T new tokens per row at ``pos_B + 0..T-1`` with one
scatter per layer, and ``rollback`` to a shorter length is just a smaller ``pos_B``: stale slots past it are
invisible and overwritten later (the verify-then-accept step of self-speculative decoding).

The cache is ``N x B x J x S x K`` (head-major, as ``lm.Block.project`` emits keys and values), so a layer's slice
``B x J x S x K`` feeds the attention dots as it lies (the ``S x J`` layout made XLA copy-transpose every layer's
slice, issue 20 cause 5), and it is stored in the model's compute dtype (``compute_dtype``): a float32 cache
under a bfloat16 model promoted attention, the residual and every projection after it to float32 (cause 3).

Every forward is an ``engine.run`` over the stacked layers; ``forward`` is that one entry point, and ``prefill``,
``extend`` and the step functions of ``per_token``, ``skipdecode``, ``layer_skip`` and ``speculative`` are programs
and policies on it. Two layer functions:

* static programs (no policy: prefill, ``extend``, SkipDecode / ULS / FiRST steps): ``cache_layer`` writes each
  layer's K/V into the cache in place (``DecodeAux(cache, pos_BxT)`` carried), then attends over it;
* steps with exits (a policy): ``pending_layer`` reads the cache only and attends to it plus the step's own new
  keys/values, which it collects per layer in ``PendingKV`` (``N x B x J x T x K``, small); ``forward`` writes
  them into the cache in one scatter after the step (``commit``). The whole cache never crosses a ``lax.cond`` or
  a loop carry of the exit loop, so XLA has no reason to copy it (a conditional's branches cannot update their
  operands in place: a cache written inside ``Unrolled``'s conds was copied whole at every decision).

Rows that exited write their K/V from their frozen hidden state at every layer the step still runs (CALM's
propagation); the layers a step never ran get theirs from ``propagate`` (one batched computation over the stacked
layers).

``Unrolled`` is the engine executor for decoding with exits: the program's exit segments are traced once each,
in order, and the only data-dependent control flow is one ``lax.cond`` per exit decision ("does any row go on?"),
so a step costs at most one host round trip per decision point on a GPU (the masked executor's ``while`` over
exits, its segment loop with traced bounds and its head ``switch`` cost about five; issue 20 cause 1).

Shapes: B batch, P prompt length (padded), T new tokens per row, S cache slots, N layers, J KV heads, K head dim,
D width, V vocabulary, E exits.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.exits import engine
from eejax.models.lm import DecoderLM


class KVCache(NamedTuple):
    k_NxBxJxSxK: jax.Array
    v_NxBxJxSxK: jax.Array


class DecodeState(NamedTuple):
    cache: KVCache
    pos_B: jax.Array   # int32[B]: tokens of row b in the cache = the position (and slot) of its next token


class DecodeAux(NamedTuple):
    """The engine's auxiliary state during a decode forward."""
    cache: KVCache
    pos_BxT: jax.Array   # positions (= slots) of the T tokens being run


def check_prompts(prompt_BxP, lengths_B, vocab_size: int) -> None:
    """Right-padded prompts: integer ids ``B x P`` in the vocabulary and one length per row in ``[1, P]`` (values
    checked when concrete; ``kv.pad_prompts`` gives both). A length past P would be clamped by the gather that reads
    each row's last token: a wrong answer, not an error."""
    if np.ndim(prompt_BxP) != 2 or 0 in np.shape(prompt_BxP):
        raise ValueError(f"prompt_BxP of shape {np.shape(prompt_BxP)} must be B x P with B, P >= 1")
    checks.token_ids(prompt_BxP, vocab_size, name="prompt_BxP")
    b, p = np.shape(prompt_BxP)
    if np.shape(lengths_B) != (b,):
        raise ValueError(f"lengths_B has shape {np.shape(lengths_B)}; want one length per prompt row, ({b},)")
    if checks.is_concrete(lengths_B):
        lengths = np.asarray(lengths_B)
        if not np.issubdtype(lengths.dtype, np.integer) or lengths.min() < 1 or lengths.max() > p:
            raise ValueError(f"lengths_B={lengths.tolist()} must be integers in [1, {p}] (the padded prompt length)")


def pad_prompts(prompts: Sequence, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-align token lists into ``int32[B, P]`` (right padding); returns ``(tokens_BxP, lengths_B)``."""
    if not prompts or min(len(x) for x in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    p = max(len(x) for x in prompts)
    out = np.full((len(prompts), p), pad_id, np.int32)
    for i, x in enumerate(prompts):
        out[i, :len(x)] = np.asarray(x, np.int32)
    return out, np.asarray([len(x) for x in prompts], np.int32)


def compute_dtype(model: DecoderLM):
    """The dtype the model's layers compute in: ``cfg.dtype`` when set, else its parameters' (the embedding's)."""
    return model.cfg.compute_dtype or model.embed.embedding[...].dtype


def empty_state(model: DecoderLM, batch: int, cache_len: int, dtype=None) -> DecodeState:
    """An empty cache of ``cache_len`` slots per row; ``dtype`` defaults to the model's ``compute_dtype`` (pass
    ``jnp.float32`` for a float32 cache under a bfloat16 model: the old default, kept as a benchmark variant)."""
    cfg = model.cfg
    shape = (cfg.depth, batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
    dtype = compute_dtype(model) if dtype is None else dtype
    return DecodeState(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), jnp.zeros((batch,), jnp.int32))


def write_kv(cache: KVCache, l, pos_BxT, k_BxJxTxK, v_BxJxTxK) -> KVCache:
    """Write layer ``l``'s keys/values of T tokens per row at their positions (out-of-range slots are dropped)."""
    b_Bx1 = jnp.arange(pos_BxT.shape[0])[:, None]
    # Advanced indices (l, b, pos) around the J slice: the update is laid out B x T x J x K.
    return KVCache(
        cache.k_NxBxJxSxK.at[l, b_Bx1, :, pos_BxT].set(k_BxJxTxK.swapaxes(1, 2).astype(cache.k_NxBxJxSxK.dtype)),
        cache.v_NxBxJxSxK.at[l, b_Bx1, :, pos_BxT].set(v_BxJxTxK.swapaxes(1, 2).astype(cache.v_NxBxJxSxK.dtype)))


def cache_attention(layer, h_BxTxD, ctx: engine.StepCtx):
    """The attention half of ``cache_layer`` with the cache: one projection of this layer's queries, keys and
    values (from the layer's *input*), the keys/values written for every row (whatever the sublayer bits), then the
    queries attend over the cache (a query at position p sees slots ``s <= p``); rows whose ``ATTN`` bit is off keep
    ``h``. Returns ``(h after the attention half, DecodeAux)``."""
    cache, pos_BxT = ctx.aux
    q, k, v = layer.project(h_BxTxD, pos_BxT)
    cache = write_kv(cache, ctx.layer, pos_BxT, k, v)
    slots = cache.k_NxBxJxSxK.shape[3]
    mask_BxTxS = jnp.arange(slots)[None, None, :] <= pos_BxT[:, :, None]
    h1 = layer.attn_out(h_BxTxD, q, cache.k_NxBxJxSxK[ctx.layer], cache.v_NxBxJxSxK[ctx.layer], mask_BxTxS)
    if ctx.sub_B is not None:
        h1 = engine.where_rows((ctx.sub_B & engine.ATTN) > 0, h1, h_BxTxD)
    return h1, DecodeAux(cache, pos_BxT)


def cache_layer(layer, h_BxTxD, ctx: engine.StepCtx):
    """The engine's layer function for decoding: ``cache_attention`` (the cache is written whatever the sublayer
    bits: attention and cache always run in FFN-skip programs), then the MLP half where the ``MLP`` bit is set."""
    h1, aux = cache_attention(layer, h_BxTxD, ctx)
    if ctx.sub_B is None:
        return engine.mlp_step(layer, h1, ctx), aux
    return engine.where_rows((ctx.sub_B & engine.MLP) > 0, engine.mlp_step(layer, h1, ctx), h1), aux


class PendingKV(NamedTuple):
    """The K/V of a step's T new tokens at every layer, written into the cache after the step (``commit``)."""
    k_NxBxJxTxK: jax.Array
    v_NxBxJxTxK: jax.Array


class StepAux(NamedTuple):
    """The engine's auxiliary state of a step with exits (``pending_layer``): the cache itself is read only."""
    pending: PendingKV
    pos_BxT: jax.Array   # positions (= slots) of the T tokens being run


def pending_of(cache: KVCache, pos_BxT: jax.Array) -> PendingKV:
    """What the cache holds now at the T tokens' slots (so layers a step does not run keep it after ``commit``)."""
    b_Bx1 = jnp.arange(pos_BxT.shape[0])[:, None]
    take = lambda c: c[:, b_Bx1, :, pos_BxT].transpose(2, 0, 3, 1, 4)   # noqa: E731  (B x T x N x J x K -> N B J T K)
    return PendingKV(take(cache.k_NxBxJxSxK), take(cache.v_NxBxJxSxK))


def commit(cache: KVCache, pos_BxT: jax.Array, pending: PendingKV) -> KVCache:
    """Write a step's pending K/V of every layer at the T tokens' slots: one scatter per cache tensor."""
    b_Bx1 = jnp.arange(pos_BxT.shape[0])[:, None]
    put = lambda c, x: c.at[:, b_Bx1, :, pos_BxT].set(x.transpose(1, 3, 0, 2, 4).astype(c.dtype))   # noqa: E731
    return KVCache(put(cache.k_NxBxJxSxK, pending.k_NxBxJxTxK), put(cache.v_NxBxJxSxK, pending.v_NxBxJxTxK))


def pending_layer(cache: KVCache, start_B: jax.Array):
    """The engine's layer function of a step with exits: this layer's queries, keys and values from one
    projection of the layer's *input* (every row, exited rows from their frozen state), the keys/values recorded in
    ``StepAux.pending``, and the queries attend to the cache's slots before the step (``s < start_B[b]``, read only)
    and causally to the step's own T tokens; honours per-row sublayer bits like ``cache_layer``."""
    slots = cache.k_NxBxJxSxK.shape[3]

    def layer_fn(layer, h_BxTxD, ctx: engine.StepCtx):
        pending, pos_BxT = ctx.aux
        t = pos_BxT.shape[1]
        q, k, v = layer.project(h_BxTxD, pos_BxT)
        pending = PendingKV(pending.k_NxBxJxTxK.at[ctx.layer].set(k.astype(pending.k_NxBxJxTxK.dtype)),
                            pending.v_NxBxJxTxK.at[ctx.layer].set(v.astype(pending.v_NxBxJxTxK.dtype)))
        old_BxTxS = jnp.broadcast_to((jnp.arange(slots)[None, :] < start_B[:, None])[:, None, :],
                                     (start_B.shape[0], t, slots))
        new_BxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (start_B.shape[0], t, t))
        k_new, v_new = k.astype(cache.k_NxBxJxSxK.dtype), v.astype(cache.v_NxBxJxSxK.dtype)
        h1 = layer.attn_out(h_BxTxD, q, cache.k_NxBxJxSxK[ctx.layer], cache.v_NxBxJxSxK[ctx.layer], old_BxTxS,
                            extra=[(k_new, v_new, new_BxTxT)])
        if ctx.sub_B is None:
            return engine.mlp_step(layer, h1, ctx), StepAux(pending, pos_BxT)
        h1 = engine.where_rows((ctx.sub_B & engine.ATTN) > 0, h1, h_BxTxD)
        h2 = engine.where_rows((ctx.sub_B & engine.MLP) > 0, engine.mlp_step(layer, h1, ctx), h1)
        return h2, StepAux(pending, pos_BxT)

    return layer_fn


def propagate(model: DecoderLM, cache: KVCache, h_BxTxD: jax.Array, pos_BxT: jax.Array, layers, *,
              slots_BxT: jax.Array | None = None) -> KVCache:
    """CALM's state propagation (Schuster et al. 2022, arXiv:2207.07061, Sec. 3.1): the K/V of layers a token never
    ran, at its slots, from its hidden state ``h`` (each row's frozen exit state), as ONE batched computation over
    the stacked layers (a vmap of ``Block.kv``, one scatter), no per-layer loop.

    ``layers``: a static first layer (``int``: layers ``layers .. N-1``), a static sequence of stored layers, or a
    traced first layer (every layer's K/V is computed and only layers ``>= layers`` are written: no data-dependent
    loop, at the price of the layers below). ``slots_BxT``: where to write (default ``pos_BxT``; a ``PendingKV`` seen
    as a cache has slots ``0..T-1``)."""
    n = model.cfg.depth
    slots_BxT = pos_BxT if slots_BxT is None else slots_BxT
    layer_def, stacked = nnx.split(model.layers)
    traced = not isinstance(layers, (int, np.integer)) and not (np.ndim(layers) == 1 and checks.is_concrete(layers))
    if traced:
        ids = np.arange(n)
    elif isinstance(layers, (int, np.integer)):
        if not 0 <= layers <= n:
            raise ValueError(f"propagate from layer {layers}: outside [0, {n}]")
        ids = np.arange(int(layers), n)
    else:
        ids = np.asarray(layers, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"propagate to layers {ids.tolist()}: outside [0, {n})")
    if ids.size == 0:
        return cache
    contiguous = np.array_equal(ids, np.arange(ids[0], ids[0] + ids.size))
    sub = jax.tree.map(lambda p: p[ids[0]:ids[-1] + 1] if contiguous else p[ids], stacked)
    k_MxBxJxTxK, v_MxBxJxTxK = jax.vmap(lambda st: nnx.merge(layer_def, st).kv(h_BxTxD, pos_BxT))(sub)
    b_Bx1 = jnp.arange(pos_BxT.shape[0])[:, None]

    def put(full, new_MxBxJxTxK):
        new = new_MxBxJxTxK.astype(full.dtype)
        if not contiguous:   # advanced indices (layer, b, pos) around the J slice: the update is M x B x T x J x K
            return full.at[ids[:, None, None], b_Bx1[None], :, slots_BxT[None]].set(new.transpose(0, 1, 3, 2, 4))
        idx = slice(int(ids[0]), int(ids[-1]) + 1)
        new = new.transpose(1, 3, 0, 2, 4)   # advanced indices (b, pos) split by the J slice: B x T x M x J x K
        if traced:   # keep what the layers below the first skipped one wrote
            keep = jnp.asarray(ids)[None, None, :, None, None] >= jnp.asarray(layers, jnp.int32)
            new = jnp.where(keep, new, full[idx, b_Bx1, :, slots_BxT])
        return full.at[idx, b_Bx1, :, slots_BxT].set(new)

    return KVCache(put(cache.k_NxBxJxSxK, k_MxBxJxTxK), put(cache.v_NxBxJxSxK, v_MxBxJxTxK))


# ------------------------------------------------------------------------------------------------ executor


class SegmentCarry(NamedTuple):
    """Carry of ``Unrolled``'s loop over the steps of a multi-step segment (a known trip count)."""
    h: Any
    aux: Any


class UnrolledCarry(NamedTuple):
    """State between the exits of ``Unrolled``."""
    h: Any
    aux: Any
    active_B: jax.Array
    exit_B: jax.Array
    out: Any
    score_B: jax.Array
    policy_state: Any


class Unrolled(NamedTuple):
    """An engine executor (``engine.run(..., executor=Unrolled())``) for programs whose exit steps are static: each
    exit segment is traced once, in order (a one-step segment is a plain call on a statically sliced layer, a
    longer one a loop with a known trip count), each exit's head is called directly (no ``switch``), and after
    every exit but the last one ``lax.cond`` on "is any row still running?" either runs the rest or stops. So the
    only host round trips on a GPU are those conds: at most one per exit decision, none when nothing can stop
    (``keep_running``). Rows that stopped are frozen by masked updates, as under ``engine.Masked``, and the
    outputs equal it (tested).

    ``on_stop(layers_S, h, aux) -> aux`` is called in the branch where every row has stopped after an exit, with
    the stored layers (static) of the steps that will not run: the decoder fills their KV cache there
    (``propagate`` over a static range)."""

    keep_running: bool = False
    on_stop: Callable | None = None

    def run(self, layers, heads, h0, program: engine.Program, policy, *, layer_fn, aux,
            fields=None) -> engine.DynamicOutputs:
        """``engine.run``'s executor protocol. ``fields`` (the ``HeadOut`` fields the caller reads) is honoured on
        the static path; with a policy every field of the heads is carried (decode heads compute nothing unread:
        ``gate_heads`` has no vocabulary)."""
        if policy is None:   # the static path: every step, the last head
            return engine.run(layers, heads, h0, program, None, engine.Masked(), layer_fn=layer_fn, aux=aux,
                              fields=fields)
        if not checks.is_concrete(program.exit_step_E):
            raise ValueError("the Unrolled executor needs static exit steps (a traced program: use engine.Masked)")
        ends_E = np.asarray(program.exit_step_E).astype(np.int64) + 1
        num_exits = ends_E.size
        layer_def, stacked = nnx.split(layers)
        static_layers = checks.is_concrete(program.layer_S)
        layer_S = np.asarray(program.layer_S) if static_layers else jnp.asarray(program.layer_S)
        has_aux = aux is not None
        if self.on_stop is not None and not static_layers:
            raise ValueError("Unrolled(on_stop=...) needs a static layer table (the stop branch names the layers)")

        def step(s, h, aux, run_B):
            l = int(layer_S[s]) if static_layers and isinstance(s, int) else jnp.asarray(layer_S)[s]
            layer = nnx.merge(layer_def, jax.tree.map(lambda p: p[l], stacked))
            ctx = engine.step_ctx(program, s, l, aux, run_B, step=jnp.int32(s) if isinstance(s, int) else s)
            res = layer_fn(layer, h, ctx)
            new_h, aux = res if has_aux else (res, aux)
            return engine.where_rows(ctx.run_B, new_h, h), aux

        def segment(e, h, aux, run_B):
            start, end = (0 if e == 0 else int(ends_E[e - 1])), int(ends_E[e])
            if end - start == 1:
                return step(start, h, aux, run_B)
            seg = jax.lax.fori_loop(start, end, lambda s, c: SegmentCarry(*step(s, c.h, c.aux, run_B)),
                                    SegmentCarry(h, aux))
            return seg.h, seg.aux

        def stage(e, c: UnrolledCarry) -> UnrolledCarry:
            run_B = jnp.ones_like(c.active_B) if self.keep_running else c.active_B
            h, aux = segment(e, c.h, c.aux, run_B)
            out = heads[e](h)
            stop_B, score_B, pstate = engine.exit_check(policy, out, c.policy_state, e, num_exits, c.active_B)
            return UnrolledCarry(h, aux, c.active_B & ~stop_B, jnp.where(stop_B, e, c.exit_B),
                                 engine.where_rows(stop_B, out, c.out), jnp.where(stop_B, score_B, c.score_B),
                                 pstate)

        def run_from(e, c: UnrolledCarry):
            c = stage(e, c)
            if e == num_exits - 1:
                return c, jnp.int32(ends_E[e])
            if self.keep_running:
                return run_from(e + 1, c)

            def stop(c):
                if self.on_stop is None:
                    return c, jnp.int32(ends_E[e])
                rest_S = layer_S[int(ends_E[e]):int(ends_E[-1])]
                return c._replace(aux=self.on_stop(rest_S, c.h, c.aux)), jnp.int32(ends_E[e])

            return jax.lax.cond(jnp.any(c.active_B), lambda c: run_from(e + 1, c), stop, c)

        zero_B = engine.zeros_from(h0)
        probe = jax.eval_shape(heads[0], h0)
        init = UnrolledCarry(
            h=h0, aux=aux, active_B=zero_B == 0, exit_B=zero_B,
            out=jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) + engine.mask_like(zero_B, a).astype(a.dtype),
                             probe),
            score_B=zero_B.astype(jnp.float32), policy_state=policy.init(probe, zero_B, h0))
        final, layers_run = run_from(0, init)
        return engine.DynamicOutputs(out=final.out, exit_B=final.exit_B,
                                     exit_layer_B=jnp.asarray(ends_E - 1, jnp.int32)[final.exit_B],
                                     score_B=final.score_B, layers_run=layers_run, h=final.h, aux=final.aux,
                                     policy_state=final.policy_state)


def propagating(model: DecoderLM) -> Unrolled:
    """``Unrolled`` whose stop branch fills the pending K/V of the layers not run from each row's frozen state (for
    ``forward``'s steps with exits: ``StepAux``)."""

    def on_stop(layers_S, h_BxTxD, aux: StepAux) -> StepAux:
        b, t = aux.pos_BxT.shape
        pending = propagate(model, KVCache(*aux.pending), h_BxTxD, aux.pos_BxT, layers_S,
                            slots_BxT=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t)))
        return StepAux(PendingKV(*pending), aux.pos_BxT)

    return Unrolled(on_stop=on_stop)


# ------------------------------------------------------------------------------------------------ heads


def model_heads(model: DecoderLM, *, last_token: bool = True, classifier: dict | None = None,
                exits: Sequence[int] | None = None) -> list:
    """The LM's exit heads as engine heads ``h_BxTxD -> HeadOut`` (vocabulary logits in ``logits_BxC``).

    ``last_token``: heads read the last of the T positions (decode steps); otherwise every position (``extend``,
    logits ``B x T x V``). ``classifier``: CALM's learned exit classifier fills ``gate_B``. ``exits``: which of the
    model's exits (default all), in order.
    """
    from eejax.models import lm as lm_lib   # noqa: PLC0415

    def make(e):
        def head(h_BxTxD):
            h = h_BxTxD[:, -1] if last_token else h_BxTxD
            logits = model.exit_logits(h, e)
            gate = (lm_lib.classifier_gate(classifier, h, e) if classifier is not None
                    else jnp.zeros(h.shape[:-1], jnp.float32))
            return engine.HeadOut(logits_BxC=logits, feat_BxD=h, hidden_BxD=h, gate_B=gate)
        return head

    return [make(e) for e in (range(model.cfg.num_exits) if exits is None else exits)]


def gate_heads(model: DecoderLM, *, classifier: dict | None = None, exits: Sequence[int] | None = None) -> list:
    """Cheap exit heads for decode steps: the last token's hidden state (``hidden_BxD``, read by hidden-state
    measures such as ``confidence.cosine``) and CALM's learned classifier's gate (``gate_B``, read by
    ``confidence.learned``), no vocabulary (``logits_BxC=None``): the decision costs a dot product over D instead of
    a ``D x V`` projection at every exit; ``DecoderLM.taken_logits`` then projects once, at the exit taken."""
    from eejax.models import lm as lm_lib   # noqa: PLC0415

    def make(e):
        def head(h_BxTxD):
            h = h_BxTxD[:, -1]
            gate = (lm_lib.classifier_gate(classifier, h, e) if classifier is not None
                    else jnp.zeros(h.shape[:-1], jnp.float32))
            return engine.HeadOut(logits_BxC=None, feat_BxD=h, hidden_BxD=h, gate_B=gate)
        return head

    return [make(e) for e in (range(model.cfg.num_exits) if exits is None else exits)]


# ------------------------------------------------------------------------------------------------ forward


def forward(model: DecoderLM, tokens_BxT: jax.Array, state: DecodeState, program: engine.Program, heads, policy=None,
            executor=engine.Masked()) -> tuple[engine.DynamicOutputs, DecodeState]:
    """Run T new tokens per row (at positions ``pos_B + 0..T-1``) through ``program`` on the engine; returns the
    engine's outputs (``aux``: the ``DecodeAux`` with the new cache) and the state advanced by T. Without a policy
    the cache is the carried state (``cache_layer``); with one the step reads it and its new K/V are written after
    (``pending_layer``, ``commit``)."""
    t = tokens_BxT.shape[1]
    if tokens_BxT.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got {tokens_BxT.dtype}")
    pos_BxT = state.pos_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    h0 = model.embed_tokens(tokens_BxT)
    if policy is None:   # a static program: the cache written in place, layer by layer
        out = engine.run(model.layers, heads, h0, program, None, executor, layer_fn=cache_layer,
                         aux=DecodeAux(state.cache, pos_BxT))
        return out, DecodeState(out.aux.cache, state.pos_B + t)
    out = engine.run(model.layers, heads, h0, program, policy, executor,
                     layer_fn=pending_layer(state.cache, state.pos_B),
                     aux=StepAux(pending_of(state.cache, pos_BxT), pos_BxT))
    cache = commit(state.cache, pos_BxT, out.aux.pending)
    return out._replace(aux=DecodeAux(cache, pos_BxT)), DecodeState(cache, state.pos_B + t)


def layer_at(model: DecoderLM, l):
    """Stored layer ``l`` (a Python or traced int), ready to call."""
    layer_def, stacked = nnx.split(model.layers)
    return nnx.merge(layer_def, jax.tree.map(lambda p: p[l], stacked))


def full_program(model: DecoderLM) -> engine.Program:
    return engine.prefix(model.cfg.depth, [model.cfg.depth - 1])


def final_head(model: DecoderLM, *, last_token: bool = True) -> list:
    return model_heads(model, last_token=last_token, exits=[model.cfg.num_exits - 1])


def extend(model: DecoderLM, tokens_BxT: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Full-depth forward of T tokens per row appended at each row's position; returns the final logits at every
    one of the T positions (``B x T x V``) and the state with ``pos_B + T``. T single-token steps give the same."""
    out, state = forward(model, tokens_BxT, state, full_program(model), final_head(model, last_token=False))
    return out.out.logits_BxC, state


def rollback(state: DecodeState, pos_B: jax.Array) -> DecodeState:
    """Keep only the first ``pos_B[b]`` tokens of row b (``pos_B`` no larger than the current positions)."""
    return state._replace(pos_B=jnp.minimum(jnp.asarray(pos_B, jnp.int32), state.pos_B))


def prefill(model: DecoderLM, tokens_BxP: jax.Array, lengths_B: jax.Array, cache_len: int, *, dtype=None
            ) -> tuple[jax.Array, DecodeState]:
    """Full-depth forward of right-padded prompts; returns each row's logits at its last real token and the state
    (``pos_B = lengths_B``; the cache in ``dtype``, default the model's compute dtype)."""
    b, p = tokens_BxP.shape
    if cache_len < p:
        raise ValueError(f"{cache_len=} shorter than the prompt length {p}")
    logits_BxPxV, state = extend(model, tokens_BxP, empty_state(model, b, cache_len, dtype))
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BxV, state._replace(pos_B=lengths_B)


def full_step(model: DecoderLM, tok_B: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Full-depth decode of one token per row; returns final logits ``B x V`` and the new state."""
    logits_Bx1xV, state = extend(model, tok_B[:, None], state)
    return logits_Bx1xV[:, 0], state


# ------------------------------------------------------------------------------------------------- sampling


def check_sampling(temperature, top_k, vocab_size: int) -> None:
    """``temperature >= 0`` (0: greedy) and ``0 <= top_k <= vocab_size`` (0: no top-k), as ValueErrors naming them."""
    if not isinstance(temperature, (int, float, np.integer, np.floating)) or not np.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"{temperature=} must be a finite number >= 0 (0 = greedy)")
    if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= vocab_size:
        raise ValueError(f"{top_k=} must be an integer in [0, {vocab_size}] (the vocabulary; 0 = no top-k)")


def sample(logits_BxV: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    """Greedy when ``temperature == 0``; otherwise softmax(logits / temperature), optionally over the top k."""
    check_sampling(temperature, top_k, logits_BxV.shape[-1])
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
