"""A KV cache for token exit inside a sequence (F6): each (layer, row, slot) knows whether its key is visible.

When a token group exits after layer k of a row (DyVTE, arXiv:2411.19628: the image tokens), layers 0..k hold its
keys / values and later layers never computed them. The cache records that per layer: ``visible_NxBxS[l, b, s]``
is set exactly where layer l of row b wrote slot s. A prefill under ``eejax.exits.tokens.run`` writes the keys of the
slots each step updates (``prefill_layer_fn``, any executor: the slots' original positions say where), and a decode
step on the engine (``decode``: ``engine.run`` with ``decode_layer_fn`` and the cache as ``aux``) writes its own
token at every layer and attends over the visible slots at or before its position. So decoding after the prefill
equals the teacher-forced forward of the whole sequence under the same token schedule (``tokens.scan``; tested).

Layout: slot = position, as in ``eejax.decoding.kv``; the layers are ``eejax.nn.Block`` (absolute positions, added
at the embedding; no RoPE).

Shapes: N layers, B batch, S slots, H heads, K head dim, Q slots of a token-exit step, T new tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eejax.exits import engine, tokens
from eejax.nn.layers import require_pre_ln


class TokenCache(NamedTuple):
    k_NxBxSxHxK: jax.Array
    v_NxBxSxHxK: jax.Array
    visible_NxBxS: jax.Array   # bool: layer l of row b holds a key at slot s


class DecodeAux(NamedTuple):
    """The engine's auxiliary state during a decode step."""

    cache: TokenCache
    pos_BxT: jax.Array         # slots (= positions) of the T new tokens


def empty(num_layers: int, batch: int, slots: int, num_heads: int, head_dim: int, dtype=jnp.float32) -> TokenCache:
    if min(num_layers, batch, slots, num_heads, head_dim) < 1:
        raise ValueError(f"every cache dimension must be >= 1, got {num_layers=}, {batch=}, {slots=}, "
                         f"{num_heads=}, {head_dim=}")
    shape = (num_layers, batch, slots, num_heads, head_dim)
    return TokenCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape[:3], bool))


def write(cache: TokenCache, layer, pos_BxQ, k_BxQxHxK, v_BxQxHxK, mask_BxQ) -> TokenCache:
    """Layer ``layer``'s keys / values of the slots in ``mask_BxQ`` at their positions (others untouched)."""
    b = jnp.arange(pos_BxQ.shape[0])[:, None]
    m = mask_BxQ[..., None, None]
    k_old, v_old = cache.k_NxBxSxHxK[layer, b, pos_BxQ], cache.v_NxBxSxHxK[layer, b, pos_BxQ]
    return TokenCache(
        cache.k_NxBxSxHxK.at[layer, b, pos_BxQ].set(jnp.where(m, k_BxQxHxK.astype(k_old.dtype), k_old)),
        cache.v_NxBxSxHxK.at[layer, b, pos_BxQ].set(jnp.where(m, v_BxQxHxK.astype(v_old.dtype), v_old)),
        cache.visible_NxBxS.at[layer, b, pos_BxQ].set(cache.visible_NxBxS[layer, b, pos_BxQ] | mask_BxQ))


def prefill_layer_fn(layer, h_BxQxD, ctx: engine.StepCtx):
    """``tokens.run``'s layer function for a causal ``eejax.nn.Block`` stack that fills the cache: the key slots'
    keys / values are written at their positions, then the slots attend causally among the key slots."""
    require_pre_ln(layer, "the token cache")
    view, cache = ctx.aux.view, ctx.aux.aux
    q, k, v = layer.attn.project(layer.ln1(h_BxQxD))
    cache = write(cache, ctx.layer, view.pos_BxQ, k, v, view.key_BxQ)
    h_BxQxD = h_BxQxD + layer.attn.mix(q, k, v, tokens.attention_mask(view, causal=True))
    return layer.mlp_half(h_BxQxD), cache


def decode_layer_fn(layer, h_BxTxD, ctx: engine.StepCtx):
    """The engine's layer function for a decode step: write the new tokens' keys / values (visible), then attend
    over the slots this layer holds at or before each token's position."""
    require_pre_ln(layer, "the token cache")
    cache, pos_BxT = ctx.aux
    q, k, v = layer.attn.project(layer.ln1(h_BxTxD))
    cache = write(cache, ctx.layer, pos_BxT, k, v, jnp.ones(pos_BxT.shape, bool))
    slots = cache.visible_NxBxS.shape[2]
    mask_BxTxS = cache.visible_NxBxS[ctx.layer][:, None, :] & (
        jnp.arange(slots)[None, None, :] <= pos_BxT[:, :, None])
    h_BxTxD = h_BxTxD + layer.attn.mix(q, cache.k_NxBxSxHxK[ctx.layer], cache.v_NxBxSxHxK[ctx.layer], mask_BxTxS)
    return layer.mlp_half(h_BxTxD), DecodeAux(cache, pos_BxT)


def decode(layers, h_BxTxD, cache: TokenCache, pos_BxT) -> tuple[jax.Array, TokenCache]:
    """Every layer for T new tokens per row at slots ``pos_BxT`` (``engine.run``, static path, the cache as
    ``aux``); returns their final hidden states and the cache holding them."""
    num_layers = cache.visible_NxBxS.shape[0]
    pos_BxT = jnp.asarray(pos_BxT, jnp.int32)
    if pos_BxT.shape != h_BxTxD.shape[:2]:
        raise ValueError(f"pos_BxT {pos_BxT.shape} must match the new tokens {h_BxTxD.shape[:2]}")
    out = engine.run(layers, [lambda h: h], h_BxTxD, engine.prefix(num_layers, [num_layers - 1]), None,
                     layer_fn=decode_layer_fn, aux=DecodeAux(cache, pos_BxT))
    return out.h, out.aux.cache


__all__ = ["TokenCache", "DecodeAux", "empty", "write", "prefill_layer_fn", "decode_layer_fn", "decode"]
