"""Per-row KV cache on the engine: prefill, ``extend`` (K tokens per row in one forward), rollback, sampling.

Layout: cache slot = position. Row b holds its tokens at slots ``0 .. pos_B[b] - 1``; its next token goes to slot
``pos_B[b]``. Prompts are **right-padded** (``pad_prompts``) and prefilled whole; the padding slots past a row's
length are never visible (a query at position p sees slots ``s <= p``) and are overwritten as the row decodes. So
every row has its own position and length, ``extend`` writes K new tokens per row at ``pos_B + 0..K-1`` with one
scatter per layer, and ``rollback`` to a shorter length is just a smaller ``pos_B``: stale slots past it are
invisible and overwritten later (the verify-then-accept step of self-speculative decoding).

Every decode step is an ``engine.run`` over the stacked layers with ``cache_layer`` as the layer function and
``DecodeAux(cache, pos_BxT)`` as the carried auxiliary state: the cache is written for every row at every step the
program runs (rows that exited write from their frozen hidden state: CALM's propagation), the hidden state is
masked per row. ``forward`` is that one entry point; ``prefill``, ``extend`` and the step functions of
``per_token``, ``skipdecode`` and ``speculative`` are programs and policies on it.

Shapes: B batch, P prompt length (padded), T new tokens per row, S cache slots, N layers, G KV heads, K head dim,
D width, V vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eejax.exits import engine
from eejax.models.lm import DecoderLM


class KVCache(NamedTuple):
    k_NxBxSxGxK: jax.Array
    v_NxBxSxGxK: jax.Array


class DecodeState(NamedTuple):
    cache: KVCache
    pos_B: jax.Array   # int32[B]: tokens of row b in the cache = the position (and slot) of its next token


class DecodeAux(NamedTuple):
    """The engine's auxiliary state during a decode forward."""
    cache: KVCache
    pos_BxT: jax.Array   # positions (= slots) of the T tokens being run


def pad_prompts(prompts: Sequence, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-align token lists into ``int32[B, P]`` (right padding); returns ``(tokens_BxP, lengths_B)``."""
    if not prompts or min(len(x) for x in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    p = max(len(x) for x in prompts)
    out = np.full((len(prompts), p), pad_id, np.int32)
    for i, x in enumerate(prompts):
        out[i, :len(x)] = np.asarray(x, np.int32)
    return out, np.asarray([len(x) for x in prompts], np.int32)


def empty_state(model: DecoderLM, batch: int, cache_len: int, dtype=jnp.float32) -> DecodeState:
    cfg = model.cfg
    shape = (cfg.depth, batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
    return DecodeState(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), jnp.zeros((batch,), jnp.int32))


def write_kv(cache: KVCache, l, pos_BxT, k_BxTxGxK, v_BxTxGxK) -> KVCache:
    """Write layer ``l``'s keys/values of T tokens per row at their positions (out-of-range slots are dropped)."""
    b_Bx1 = jnp.arange(pos_BxT.shape[0])[:, None]
    return KVCache(cache.k_NxBxSxGxK.at[l, b_Bx1, pos_BxT].set(k_BxTxGxK.astype(cache.k_NxBxSxGxK.dtype)),
                   cache.v_NxBxSxGxK.at[l, b_Bx1, pos_BxT].set(v_BxTxGxK.astype(cache.v_NxBxSxGxK.dtype)))


def cache_layer(layer, h_BxTxD, ctx: engine.StepCtx):
    """The engine's layer function for decoding: write this layer's K/V for every row (from the layer's *input*),
    then attend over the cache (query at position p sees slots ``s <= p``); honours per-row sublayer bits (the
    cache is written whatever the bits: attention and cache always run in FFN-skip programs)."""
    cache, pos_BxT = ctx.aux
    k, v = layer.kv(h_BxTxD, pos_BxT)
    cache = write_kv(cache, ctx.layer, pos_BxT, k, v)
    slots = cache.k_NxBxSxGxK.shape[2]
    mask_BxTxS = jnp.arange(slots)[None, None, :] <= pos_BxT[:, :, None]
    k_l, v_l = cache.k_NxBxSxGxK[ctx.layer], cache.v_NxBxSxGxK[ctx.layer]
    if ctx.sub_B is None:
        new_h = layer.attend(h_BxTxD, pos_BxT, k_l, v_l, mask_BxTxS)
    else:
        h1 = engine.where_rows((ctx.sub_B & engine.ATTN) > 0,
                               layer.attn_half(h_BxTxD, pos_BxT, k_l, v_l, mask_BxTxS), h_BxTxD)
        new_h = engine.where_rows((ctx.sub_B & engine.MLP) > 0, layer.mlp_half(h1), h1)
    return new_h, DecodeAux(cache, pos_BxT)


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


def forward(model: DecoderLM, tokens_BxT: jax.Array, state: DecodeState, program: engine.Program, heads, policy=None,
            executor=engine.Masked()) -> tuple[engine.DynamicOutputs, DecodeState]:
    """Run T new tokens per row (at positions ``pos_B + 0..T-1``) through ``program`` on the engine, the KV cache
    as carried state; returns the engine's outputs and the state advanced by T."""
    t = tokens_BxT.shape[1]
    if tokens_BxT.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got {tokens_BxT.dtype}")
    pos_BxT = state.pos_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    out = engine.run(model.layers, heads, model.embed_tokens(tokens_BxT), program, policy, executor,
                     layer_fn=cache_layer, aux=DecodeAux(state.cache, pos_BxT))
    return out, DecodeState(out.aux.cache, state.pos_B + t)


def layer_at(model: DecoderLM, l):
    """Stored layer ``l`` (a Python or traced int), ready to call."""
    from flax import nnx   # noqa: PLC0415

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


def prefill(model: DecoderLM, tokens_BxP: jax.Array, lengths_B: jax.Array, cache_len: int
            ) -> tuple[jax.Array, DecodeState]:
    """Full-depth forward of right-padded prompts; returns each row's logits at its last real token and the state
    (``pos_B = lengths_B``)."""
    b, p = tokens_BxP.shape
    if cache_len < p:
        raise ValueError(f"{cache_len=} shorter than the prompt length {p}")
    logits_BxPxV, state = extend(model, tokens_BxP, empty_state(model, b, cache_len))
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BxV, state._replace(pos_B=lengths_B)


def full_step(model: DecoderLM, tok_B: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Full-depth decode of one token per row; returns final logits ``B x V`` and the new state."""
    logits_Bx1xV, state = extend(model, tok_B[:, None], state)
    return logits_Bx1xV[:, 0], state


# ------------------------------------------------------------------------------------------------- sampling


def sample(logits_BxV: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    """Greedy when ``temperature == 0``; otherwise softmax(logits / temperature), optionally over the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
