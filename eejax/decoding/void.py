"""Voids in language models: L2 Adaptive Computation (LAC), Shemiranifar, arXiv:2505.14467.

Per token, layer l is *activated* unless it is a *void*. With ``h_l`` the residual stream after layer l (``h_{-1}``
the embedding) and ``Delta_l = ||h_l||_2 - ||h_{l-1}||_2`` (the change of the L2 norm the layer makes):

    void_l  <=>  Delta_l < alpha * (max_{j<l} Delta_j - min_{j<l} Delta_j)       (layer 0: the range of {Delta_0})

so layer 0 is a void iff it shrinks the norm (range 0). This is the released code's rule
(``manishemirani/void_in_language_models``, ``lac.py``; alpha = 0.8 by default there).

What "skipping voids" means there (``lac.py`` with ``skip_layers=True``): every layer still runs and feeds the
next layer its real output; a second state follows the layers and keeps the output of the last activated layer
(the embedding if none), and the model's final norm and head read that state. So the decision is taken *after*
running the layer (run-and-discard) and there is no speed-up; the KV cache is the full model's. ``mode="official"``
is that. ``mode="carry"`` discards a void layer's output from the stream itself: the next layer reads the carried
state, and the norm chain continues from it (still decided after running the layer).

Both are an engine layer function (``lac_layer``) around ``kv.cache_layer``, with the per-token LAC state carried
next to the KV cache as the engine's auxiliary state; ``voids`` is the vectorised rule over a full model's norms
(``official`` mode needs only the full model's hidden states, so one forward serves every alpha).

Shapes: B batch, T tokens, N layers, D width, V vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eejax.decoding import kv as kv_lib
from eejax.decoding.per_token import full_depth_stats
from eejax.exits import engine
from eejax.models.lm import DecoderLM

MODES = ("official", "carry")


def voids(norm_in_BxT: jax.Array, norm_NxBxT: jax.Array, alpha) -> jax.Array:
    """``bool[N, B, T]``: LAC's void map from the norms of the embedding and of every layer's output."""
    prev = jnp.concatenate([norm_in_BxT[None], norm_NxBxT[:-1]], axis=0)
    delta = (norm_NxBxT - prev).astype(jnp.float32)
    hi = jax.lax.cummax(delta, axis=0)
    lo = jax.lax.cummin(delta, axis=0)
    # Range over j < l (layer 0: over {Delta_0}, i.e. 0).
    rng = jnp.concatenate([jnp.zeros_like(delta[:1]), (hi - lo)[:-1]], axis=0)
    return delta < jnp.asarray(alpha, jnp.float32) * rng


def last_active(void_NxBxT: jax.Array) -> jax.Array:
    """``int32[B, T]``: the last activated layer per token (-1: none, the embedding is kept)."""
    n = void_NxBxT.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)[:, None, None]
    return jnp.max(jnp.where(void_NxBxT, -1, idx), axis=0)


class LACState(NamedTuple):
    prev_norm_BxT: jax.Array
    hi_BxT: jax.Array            # max of Delta over the layers so far
    lo_BxT: jax.Array            # min of Delta over the layers so far
    kept_BxTxD: jax.Array        # the state the head reads: the last activated layer's output
    void_NxBxT: jax.Array
    norm_NxBxT: jax.Array        # ||h_l|| of the stream (official: the full model's)


class LACAux(NamedTuple):
    decode: kv_lib.DecodeAux
    lac: LACState


def _norm(h_BxTxD):
    return jnp.linalg.norm(h_BxTxD.astype(jnp.float32), axis=-1)


def init_state(num_layers: int, h0_BxTxD: jax.Array) -> LACState:
    b, t, _ = h0_BxTxD.shape
    z = jnp.zeros((b, t), jnp.float32)
    return LACState(_norm(h0_BxTxD), z, z, h0_BxTxD, jnp.zeros((num_layers, b, t), bool),
                    jnp.zeros((num_layers, b, t), jnp.float32))


def lac_layer(alpha, mode: str = "official"):
    """The engine's layer function: the whole layer with the KV cache (``kv.cache_layer``), then LAC's decision."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")

    def layer_fn(layer, h_BxTxD, ctx: engine.StepCtx):
        aux: LACAux = ctx.aux
        s = aux.lac
        out, dec = kv_lib.cache_layer(layer, h_BxTxD, ctx._replace(aux=aux.decode))
        norm = _norm(out)
        delta = norm - s.prev_norm_BxT
        first = ctx.layer == 0
        void = delta < jnp.asarray(alpha, jnp.float32) * jnp.where(first, 0.0, s.hi_BxT - s.lo_BxT)
        hi = jnp.where(first, delta, jnp.maximum(s.hi_BxT, delta))
        lo = jnp.where(first, delta, jnp.minimum(s.lo_BxT, delta))
        kept = jnp.where(void[..., None], s.kept_BxTxD, out)
        nxt = out if mode == "official" else kept
        nxt_norm = norm if mode == "official" else _norm(kept)
        s = LACState(nxt_norm, hi, lo, kept, s.void_NxBxT.at[ctx.layer].set(void),
                     s.norm_NxBxT.at[ctx.layer].set(nxt_norm))
        return nxt, LACAux(dec, s)

    return layer_fn


class LACForward(NamedTuple):
    logits: jax.Array            # B x V (last token) or B x T x V: the final head on the kept state
    state: kv_lib.DecodeState
    lac: LACState


def _dummy_head(h_BxTxD):
    z = h_BxTxD[:, -1, :1]
    return engine.HeadOut(z, z, z, z[:, 0])


def forward(model: DecoderLM, tokens_BxT: jax.Array, state: kv_lib.DecodeState, alpha, *, mode: str = "official",
            last_token: bool = False) -> LACForward:
    """T new tokens per row through every layer (``engine.run``, static full program) under LAC; the model's final
    norm and head read each token's kept state."""
    b, t = tokens_BxT.shape
    pos_BxT = state.pos_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    h0 = model.embed_tokens(tokens_BxT)
    aux = LACAux(kv_lib.DecodeAux(state.cache, pos_BxT), init_state(model.cfg.depth, h0))
    out = engine.run(model.layers, [_dummy_head], h0, kv_lib.full_program(model), None,
                     layer_fn=lac_layer(alpha, mode), aux=aux)
    kept = out.aux.lac.kept_BxTxD
    kept = kept[:, -1] if last_token else kept
    logits = model.exit_logits(kept, model.cfg.num_exits - 1)
    return LACForward(logits, kv_lib.DecodeState(out.aux.decode.cache, state.pos_B + t), out.aux.lac)


def lac_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, i, alpha, mode: str = "official"):
    """``per_token.generate``'s step function under LAC (response generation); ``StepStats.layers_B`` counts the
    activated layers of the token."""
    del i
    res = forward(model, tok_B[:, None], state, alpha, mode=mode, last_token=True)
    return res.logits, full_depth_stats(model.cfg, res.lac.void_NxBxT[:, :, 0]), res.state


__all__ = ["MODES", "voids", "last_active", "LACState", "LACAux", "LACForward", "init_state", "lac_layer", "forward",
           "lac_step"]
