"""Whole-layer skipping in batched, KV-cached decoding: a static skip set (Unified Layer Skipping) and per-sequence
skip sets chosen from the prompt by small routers (FiRST).

* **Unified Layer Skipping** (Liu, Meng, Zhou 2024, arXiv:2404.06954): the number of layers to skip depends only on
  the target speed-up r, k = round(N (1 - 1/r)); the k skipped layers are *intermediate* ones spread evenly (the
  first and last layers always run), and every token of every row runs the same layers, so batching and the KV cache
  need nothing special. ``uls_layers`` gives the kept layers; the decode step is the engine's static path over a
  layer table (``table_program``), skipped layers cost nothing. With a static layer count (an ``int``) the table's
  loop has a known trip count (no host round trip on a GPU; one compiled program per count, the table itself may
  stay traced); with a traced count one compiled step serves skip sets of any length (CPU sweeps) at the price of
  a data-dependent loop (a host round trip per layer on a GPU).
* **FiRST** (Jain et al. 2024, arXiv:2410.12513): a router per layer reads the prompt (here the prefill's mean-pooled
  input of that layer) and decides once per sequence whether the decode skips the layer; a skipped layer is skipped
  for every generated token, so no later token reads K/V it did not write. The prefill runs at full depth
  (``prefill_pooled`` returns the pooled inputs of every layer beside the cache); the decode runs a per-row skip
  program (``row_program``: ``engine.row_skip``, or its compaction to the union of the rows' kept layers, which
  costs only the layers some row keeps). ``first_generate`` reads the union's size on the host once per batch,
  after the prefill, so the decode loop has a static layer count. ``gated_continuation_logits`` is the
  differentiable twin used to train the routers: the continuation tokens run in one forward over the cached
  prompt K/V, layer l of row b scaled by a gate ``g[l, b]`` (hard gates give exactly the decode's logits;
  tested).

Shapes: B batch, P prompt length, T tokens run at once, G generated tokens, N layers, D width, V vocabulary,
S program steps, J KV heads, K head dim.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eejax import checks
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.decoding.per_token import StepStats
from eejax.exits import engine
from eejax.models.lm import DecoderLM

# ------------------------------------------------------------------------------------------- static skip sets


def uls_skip_count(num_layers: int, speedup: float) -> int:
    """ULS's rule: k = round(N (1 - 1/r)) layers skipped for a target speed-up r (layers only: the embedding and
    the LM head still run, so the measured speed-up is lower; report it)."""
    if not speedup >= 1.0:
        raise ValueError(f"{speedup=} must be >= 1")
    return int(round(num_layers * (1.0 - 1.0 / speedup)))


def uls_layers(num_layers: int, speedup: float | None = None, *, skip: int | None = None, keep_first: int = 1,
               keep_last: int = 1) -> np.ndarray:
    """``int32[N - k]``: the layers ULS keeps, in order. The k skipped layers (``skip``, or from ``speedup``) are
    the centres of k equal bins over the intermediate layers ``[keep_first, N - keep_last)``: evenly spread."""
    if (speedup is None) == (skip is None):
        raise ValueError("give exactly one of speedup= and skip=")
    k = uls_skip_count(num_layers, speedup) if skip is None else int(skip)
    mid = np.arange(keep_first, num_layers - keep_last)
    if not 0 <= k <= mid.size:
        raise ValueError(f"cannot skip {k} of the {mid.size} intermediate layers of {num_layers} "
                         f"({keep_first=}, {keep_last=})")
    skipped = mid[np.floor((np.arange(k) + 0.5) * mid.size / k).astype(int)] if k else np.zeros(0, int)
    return np.setdiff1d(np.arange(num_layers), skipped).astype(np.int32)


def layer_table(layers, num_layers: int) -> tuple[np.ndarray, int]:
    """A chain of layers as a fixed-size table (padded with the last layer) and its length, so skip sets of any
    length share one compiled program."""
    layers = np.asarray(layers, np.int32).reshape(-1)
    if layers.size == 0 or layers.min() < 0 or layers.max() >= num_layers:
        raise ValueError(f"layer table {layers.tolist()} must name 1..{num_layers} layers in [0, {num_layers})")
    table = np.full(num_layers, layers[-1], np.int32)
    table[:layers.size] = layers
    return table, int(layers.size)


def table_program(layer_S, count) -> engine.Program:
    """``engine.sequence`` with a (possibly traced) table: steps ``0..count-1`` run ``layer_S[s]``, one exit (the
    final norm and head) after the last. A static ``count`` (``int``) gives a loop with a known trip count."""
    layer_S = jnp.asarray(layer_S, jnp.int32)
    if isinstance(count, (int, np.integer)):
        if not 1 <= count <= layer_S.shape[0]:
            raise ValueError(f"{count=} must lie in [1, {layer_S.shape[0]}] (the table's length)")
        return engine.Program(layer_S[:count], jnp.zeros((count,), jnp.int32), np.asarray([count - 1], np.int32))
    return engine.Program(layer_S, jnp.zeros_like(layer_S), jnp.reshape(jnp.asarray(count, jnp.int32) - 1, (1,)))


def union_count(keep_NxB) -> int:
    """The number of layers some row keeps (read on the host: FiRST's static layer count after the prefill)."""
    return int(np.sum(np.any(np.asarray(keep_NxB, bool), axis=1)))


def row_program(keep_NxB, *, compact: bool = True, count: int | None = None) -> engine.Program:
    """Per-row skip sets: row b runs layer l iff ``keep_NxB[l, b]``. ``compact=False`` is ``engine.row_skip`` (all N
    steps, skipping rows masked); ``compact=True`` runs only the union of the rows' kept layers (a traced table, the
    per-row bits on it), which gives the same outputs at the cost of the union. ``count``: the union's size as a
    static ``int`` (``union_count``; must be exact), so the compacted loop has a known trip count; ``None``: traced."""
    keep_NxB = jnp.asarray(keep_NxB, bool)
    n = keep_NxB.shape[0]
    if not compact:
        return engine.row_skip(keep_NxB, [n - 1])
    union_N = jnp.any(keep_NxB, axis=1)
    order_S = jnp.argsort(~union_N, stable=True).astype(jnp.int32)    # kept layers first, in order
    row_sub_SxB = jnp.where(keep_NxB[order_S], engine.FULL, 0).astype(jnp.int32)
    if count is None:
        return table_program(order_S, jnp.sum(union_N.astype(jnp.int32)))._replace(row_sub_SxB=row_sub_SxB)
    if checks.is_concrete(keep_NxB) and count != union_count(keep_NxB):
        raise ValueError(f"{count=} but the rows keep {union_count(keep_NxB)} layers between them")
    return table_program(order_S, count)._replace(row_sub_SxB=row_sub_SxB[:count])


# ------------------------------------------------------------------------------------------- decode steps


def table_step(model: DecoderLM, tok_B, state: kv_lib.DecodeState, i, layer_S, count):
    """One token per row through the layer table (shared by the batch), then the final head; ``per_token``'s
    step interface. ``count`` static (``int``: one compiled program per count) or traced (``table_program``)."""
    del i
    out, state = kv_lib.forward(model, tok_B[:, None], state, table_program(layer_S, count), kv_lib.final_head(model))
    b = tok_B.shape[0]
    count_ = jnp.asarray(count, jnp.int32)
    stats = StepStats(jnp.full((b,), jnp.asarray(layer_S, jnp.int32)[count_ - 1]), jnp.full((b,), count_),
                      jnp.zeros((b,), jnp.float32), count_, out.out.hidden_BxD)
    return out.logits_BxC, stats, state


def row_step(model: DecoderLM, tok_B, state: kv_lib.DecodeState, i, keep_NxB, *, compact: bool = True,
             count: int | None = None):
    """One token per row through that row's kept layers (``row_program``; ``count``: the union's static size),
    then the final head."""
    del i
    prog = row_program(keep_NxB, compact=compact, count=count)
    out, state = kv_lib.forward(model, tok_B[:, None], state, prog, kv_lib.final_head(model))
    n = keep_NxB.shape[0]
    layers_B = jnp.sum(jnp.asarray(keep_NxB, jnp.int32), axis=0)
    stats = StepStats(jnp.full(tok_B.shape, n - 1, jnp.int32), layers_B, jnp.zeros(tok_B.shape, jnp.float32),
                      (jnp.asarray(prog.exit_step_E)[-1] + 1).astype(jnp.int32), out.out.hidden_BxD)
    return out.logits_BxC, stats, state


# ------------------------------------------------------------------------------------------- prefill + decode


class Prefilled(NamedTuple):
    logits_BxV: jax.Array        # full-depth logits at each row's last prompt token
    state: kv_lib.DecodeState    # the cache after the prompt (pos_B = lengths)
    pooled_NxBxD: jax.Array      # mean over each row's prompt tokens of the input of layer l


def prefill_pooled(model: DecoderLM, tokens_BxP, lengths_B, cache_len: int) -> Prefilled:
    """``kv.prefill`` (full depth, on the engine) that also returns the mean-pooled input of every layer over the
    real prompt tokens: what FiRST's routers read."""
    b, p = tokens_BxP.shape
    if cache_len < p:
        raise ValueError(f"{cache_len=} shorter than the prompt length {p}")
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    state = kv_lib.empty_state(model, b, cache_len)
    pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
    w_BxPx1 = (pos_BxP < lengths_B[:, None]).astype(jnp.float32)[..., None]
    n, d = model.cfg.depth, model.cfg.d_model

    def layer_fn(layer, h, ctx):
        dec, pooled = ctx.aux
        mean_BxD = jnp.sum(h.astype(jnp.float32) * w_BxPx1, axis=1) / jnp.sum(w_BxPx1, axis=1)
        pooled = pooled.at[ctx.layer].set(mean_BxD)
        h, dec = kv_lib.cache_layer(layer, h, ctx._replace(aux=dec))
        return h, (dec, pooled)

    out = engine.run(model.layers, kv_lib.final_head(model, last_token=False), model.embed_tokens(tokens_BxP),
                     kv_lib.full_program(model), None, layer_fn=layer_fn,
                     aux=(kv_lib.DecodeAux(state.cache, pos_BxP), jnp.zeros((n, b, d), jnp.float32)))
    dec, pooled = out.aux
    last_BxV = jnp.take_along_axis(out.logits_BxC, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return Prefilled(last_BxV, kv_lib.DecodeState(dec.cache, lengths_B), pooled)


# ------------------------------------------------------------------------------------------- FiRST routers


class Routers(NamedTuple):
    """One linear router per layer on the RMS-normalised pooled input x of that layer:
    ``keep logit = w_l . x / sqrt(D) + b_l`` (the 1/sqrt(D) keeps an Adam step's change of ``w_l . x`` comparable
    to the bias's)."""
    w_NxD: jax.Array
    b_N: jax.Array


def init_routers(num_layers: int, d_model: int, keep_bias: float = 2.0) -> Routers:
    """Zero weights and a positive bias: every layer kept at the start of training."""
    return Routers(jnp.zeros((num_layers, d_model), jnp.float32), jnp.full((num_layers,), keep_bias, jnp.float32))


def router_logits(routers: Routers, pooled_NxBxD) -> jax.Array:
    """``float[N, B]`` keep logits."""
    x = pooled_NxBxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
    return jnp.einsum("nbd,nd->nb", x, routers.w_NxD) / np.sqrt(x.shape[-1]) + routers.b_N[:, None]


def routable(num_layers: int, keep_first: int = 1, keep_last: int = 1) -> np.ndarray:
    """``bool[N]``: the layers a router may skip (the first and last ones always run, as in ULS)."""
    l_N = np.arange(num_layers)
    return (l_N >= keep_first) & (l_N < num_layers - keep_last)


def hard_keep(logit_NxB, routable_N) -> jax.Array:
    """FiRST's decision: keep layer l for the whole decode iff its router says keep (logit > 0)."""
    return (logit_NxB > 0) | ~jnp.asarray(routable_N)[:, None]


def topk_keep(logit_NxB, routable_N, skip: int) -> jax.Array:
    """A fixed budget per row: skip the ``skip`` routable layers with the lowest keep logits of that row."""
    routable_N = jnp.asarray(routable_N)
    score = jnp.where(routable_N[:, None], logit_NxB, jnp.inf)
    rank_NxB = jnp.argsort(jnp.argsort(score, axis=0), axis=0)
    return rank_NxB >= skip


def straight_through(logit_NxB, routable_N) -> tuple[jax.Array, jax.Array]:
    """``(gate, p_keep)``: the hard keep decision in the forward pass, the sigmoid's gradient in the backward."""
    p = jax.nn.sigmoid(logit_NxB)
    hard = hard_keep(logit_NxB, routable_N).astype(jnp.float32)
    gate = hard + p - jax.lax.stop_gradient(p)
    return jnp.where(jnp.asarray(routable_N)[:, None], gate, 1.0), p


def first_generate(model: DecoderLM, routers: Routers, prompt_BxP, lengths_B, num_new: int, *,
                   decide: Callable | None = None, compact: bool = True, force_BxG=None
                   ) -> tuple[per_token.Generation, jax.Array]:
    """FiRST: a full-depth prefill, the routers read its pooled layer inputs once and fix each row's kept layers
    (``decide(logit_NxB) -> keep_NxB``, default ``hard_keep``), then every generated token runs those layers only.
    Returns the decode and ``keep_NxB``. Called eagerly, the union of the kept layers is read on the host once
    after the prefill and the decode has a static layer count (one compiled decode per count); under ``jit`` the
    count stays traced."""
    n = model.cfg.depth
    pre = prefill_pooled(model, prompt_BxP, lengths_B, prompt_BxP.shape[1] + num_new)
    logit_NxB = router_logits(routers, pre.pooled_NxBxD)
    keep_NxB = hard_keep(logit_NxB, routable(n)) if decide is None else decide(logit_NxB)
    count = union_count(keep_NxB) if compact and checks.is_concrete(keep_NxB) else None
    dec = per_token.decode(model, pre.logits_BxV, pre.state, num_new,
                           lambda m, t, s, i: row_step(m, t, s, i, keep_NxB, compact=compact, count=count),
                           force_BxG=force_BxG)
    return dec, keep_NxB


def gated_continuation_logits(model: DecoderLM, prompt_k_NxBxJxPxK, prompt_v_NxBxJxPxK, cont_BxT, gate_NxB, *,
                              remat: bool = True) -> jax.Array:
    """Final logits ``B x T x V`` of T continuation tokens (positions ``P..P+T-1``) run in one forward over the
    full-depth prompt K/V, layer l of row b mixed as ``h + g[l, b] (layer(h) - h)`` (the engine's scan path, so it
    is differentiable in ``g``). With 0/1 gates it equals teacher-forced decoding with those skip sets after a
    full-depth prefill (prompts of full length P)."""
    b, t = cont_BxT.shape
    p = prompt_k_NxBxJxPxK.shape[3]
    pos_BxT = jnp.broadcast_to(p + jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    mask_BxTxS = jnp.concatenate([jnp.ones((b, t, p), bool), jnp.broadcast_to(
        jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))], axis=2)

    def layer_fn(layer, h, ctx):
        q, k_new, v_new = layer.project(h, pos_BxT)
        k = jnp.concatenate([prompt_k_NxBxJxPxK[ctx.layer].astype(k_new.dtype), k_new], axis=2)
        v = jnp.concatenate([prompt_v_NxBxJxPxK[ctx.layer].astype(v_new.dtype), v_new], axis=2)
        out = layer.mlp_half(layer.attn_out(h, q, k, v, mask_BxTxS))
        g = gate_NxB[ctx.layer].astype(h.dtype)[:, None, None]
        return h + g * (out - h)

    h_last, _ = engine.run_layers(model.layers, model.embed_tokens(cont_BxT), layer_fn=layer_fn, remat=remat)
    return model.exit_logits(h_last, model.cfg.num_exits - 1)


__all__ = ["uls_skip_count", "uls_layers", "layer_table", "table_program", "union_count", "row_program", "table_step",
           "row_step", "Prefilled", "prefill_pooled", "first_generate", "Routers",
           "init_routers", "router_logits", "routable", "hard_keep", "topk_keep", "straight_through",
           "gated_continuation_logits"]
