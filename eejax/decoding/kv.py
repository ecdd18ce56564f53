"""KV cache, prefill, a full-depth decode step, and sampling.

Padding: prompts are **left-padded** (right-aligned). Every row then writes its next token into the same cache slot,
so one ``dynamic_update_slice`` serves the batch; each row keeps its own *position* (``slot - pad``, used by RoPE
and by CALM's position-dependent threshold), and ``valid_BxS`` hides the padding slots from attention.

Shapes: B batch, P prompt length (padded), S cache slots, N layers, G KV heads, K head dim, D width, V vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.models.lm import DecoderLM, causal_mask


class KVCache(NamedTuple):
    k_NxBxSxGxK: jax.Array
    v_NxBxSxGxK: jax.Array
    valid_BxS: jax.Array   # slot holds a real, already written token


class DecodeState(NamedTuple):
    cache: KVCache
    slot: jax.Array    # int32[]: the cache slot the next token is written to (the same for every row)
    pos_B: jax.Array   # int32[B]: the position of the next token of each row


def left_pad(prompts: list, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-align token lists into ``int32[B, P]``; returns ``(tokens_BxP, lengths_B)``."""
    p = max(len(x) for x in prompts)
    if min(len(x) for x in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    out = np.full((len(prompts), p), pad_id, np.int32)
    for i, x in enumerate(prompts):
        out[i, p - len(x):] = np.asarray(x, np.int32)
    return out, np.asarray([len(x) for x in prompts], np.int32)


def prefill(model: DecoderLM, tokens_BxP: jax.Array, lengths_B: jax.Array, cache_len: int
            ) -> tuple[jax.Array, DecodeState]:
    """Full-depth causal forward over left-padded prompts; returns the last position's logits and the state.

    The cache is filled from each layer's *input* hidden state (``Block.kv``), exactly what the layer attended to.
    """
    b, p = tokens_BxP.shape
    if cache_len < p:
        raise ValueError(f"{cache_len=} shorter than the prompt length {p}")
    valid_BxP = jnp.arange(p)[None, :] >= (p - lengths_B)[:, None]
    pos_BxP = model.positions(valid_BxP)
    mask_BxPxP = causal_mask(valid_BxP)
    layer_def, stacked = nnx.split(model.layers)

    def body(h, state_l):
        layer = nnx.merge(layer_def, state_l)
        k, v = layer.kv(h, pos_BxP)
        return layer.attend(h, pos_BxP, k, v, mask_BxPxP), (k, v)

    h_BxPxD, (k_NxBxPxGxK, v_NxBxPxGxK) = jax.lax.scan(body, model.embed_tokens(tokens_BxP), stacked)
    pad = [(0, 0), (0, 0), (0, cache_len - p), (0, 0), (0, 0)]
    cache = KVCache(jnp.pad(k_NxBxPxGxK, pad), jnp.pad(v_NxBxPxGxK, pad),
                    jnp.pad(valid_BxP, [(0, 0), (0, cache_len - p)]))
    logits_BxV = model.exit_logits(h_BxPxD[:, -1], model.cfg.num_exits - 1)
    return logits_BxV, DecodeState(cache, jnp.int32(p), lengths_B.astype(jnp.int32))


def write_kv(cache: KVCache, l, slot, k_BxGxK, v_BxGxK) -> KVCache:
    """Write layer ``l``'s key/value of the current token of every row into ``slot``."""
    idx = (l, 0, slot, 0, 0)
    return cache._replace(
        k_NxBxSxGxK=jax.lax.dynamic_update_slice(cache.k_NxBxSxGxK, k_BxGxK[None, :, None].astype(
            cache.k_NxBxSxGxK.dtype), idx),
        v_NxBxSxGxK=jax.lax.dynamic_update_slice(cache.v_NxBxSxGxK, v_BxGxK[None, :, None].astype(
            cache.v_NxBxSxGxK.dtype), idx))


def layer_at(model: DecoderLM, l):
    """Layer ``l`` (a Python or traced int) of the stacked layers, ready to call."""
    layer_def, stacked = nnx.split(model.layers)
    return nnx.merge(layer_def, jax.tree.map(lambda p: p[l], stacked))


def run_layer(model: DecoderLM, l, h_BxD, state: DecodeState) -> tuple[jax.Array, KVCache]:
    """One layer for the current token: write its K/V at ``state.slot``, attend over the cache, return new h."""
    layer = layer_at(model, l)
    pos_Bx1 = state.pos_B[:, None]
    k, v = layer.kv(h_BxD[:, None], pos_Bx1)
    cache = write_kv(state.cache, l, state.slot, k[:, 0], v[:, 0])
    new_h = layer.attend(h_BxD[:, None], pos_Bx1, cache.k_NxBxSxGxK[l], cache.v_NxBxSxGxK[l],
                         cache.valid_BxS[:, None, :])
    return new_h[:, 0], cache


def mark_written(state: DecodeState, cache: KVCache) -> DecodeState:
    """After a token: its slot becomes visible to later tokens; advance slot and positions."""
    valid = jax.lax.dynamic_update_slice(cache.valid_BxS, jnp.ones((cache.valid_BxS.shape[0], 1), bool),
                                         (0, state.slot))
    return DecodeState(cache._replace(valid_BxS=valid), state.slot + 1, state.pos_B + 1)


def with_current_slot(state: DecodeState) -> DecodeState:
    """The current token attends to itself: its slot is valid while its layers run."""
    valid = jax.lax.dynamic_update_slice(state.cache.valid_BxS,
                                         jnp.ones((state.cache.valid_BxS.shape[0], 1), bool), (0, state.slot))
    return state._replace(cache=state.cache._replace(valid_BxS=valid))


def full_step(model: DecoderLM, tok_B: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Full-depth decode of one token per row (``lax.scan`` over layers); returns final logits and the new state."""
    state = with_current_slot(state)
    num_layers = model.cfg.depth

    def body(carry, l):
        h, cache = carry
        h, cache = run_layer(model, l, h, state._replace(cache=cache))
        return (h, cache), None

    (h_BxD, cache), _ = jax.lax.scan(body, (model.embed_tokens(tok_B), state.cache), jnp.arange(num_layers))
    return model.exit_logits(h_BxD, model.cfg.num_exits - 1), mark_written(state, cache)


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
