"""Kangaroo: self-speculative decoding with a double early exit (Liu et al., NeurIPS 2024, arXiv:2404.18911).

**Drafter.** The first ``l`` layers of the frozen model, then an *adapter* (RMSNorm -> one self-attention block with
no FFN -> RMSNorm), then the frozen shared LM head. On the engine it is an ordinary ``DecoderLM`` of depth ``l + 1``
(``make_draft``): stored layers ``0..l-1`` are the frozen model's, stored layer ``l`` is the adapter's attention
block, which the draft program (``draft_program``) runs with the sublayer bits ``ATTN`` only (its first RMSNorm is
the block's pre-attention norm; the MLP half never runs), and the draft model's final norm is the adapter's second
RMSNorm before the tied head. So the adapter's attention has its own KV cache: the draft model's cache layer ``l``,
kept by ``eejax.decoding.kv`` like any other layer (written, rolled back).

**Double early exit** (Kangaroo's code: threshold ``eta`` = 0.6, at most ``gamma`` = 6 steps). Per row: draft
tokens with the drafter until a draft token's top-1 probability is below ``eta`` (that token is still proposed; at
least one token is always drafted) or ``gamma`` tokens are drafted. The batch drafts while any row still does
(stopped rows are computed and ignored). **Verify** the last emitted token and the ``k`` = (longest row's) drafts in
one full-depth ``kv.extend`` of ``k + 1`` tokens (one compiled branch per ``k``, picked by ``lax.switch``), accept
per row the longest prefix of its own drafts equal to the full model's greedy tokens, emit the full model's next
token, and roll both caches back (``kv.rollback``). Greedy output equals plain greedy decoding token for token
(tested, batched, rows stopping at different lengths).

Draft cache bookkeeping: every round's first draft step runs two tokens, the token before the last emitted one and
the last emitted one (positions ``pos - 1, pos``), so the draft cache also holds the last accepted draft token,
which the draft never ran when a round accepts all its drafts. Rewriting a slot with the same token and prefix gives
the same K/V.

Shapes: B batch, P prompt, G new tokens, R = gamma (the draft buffer), V vocabulary, D width.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.decoding import kv as kv_lib
from eejax.exits import engine
from eejax.models.lm import DecoderLM

ADAPTER_KEYS = ("norm1", "qkv", "o")   # the adapter's trained part of its Block (no MLP, no norm2)
CONF_BINS = 10                                 # histogram bins of draft top-1 probabilities


# ------------------------------------------------------------------------------------------------ the drafter


def draft_program(exit_layer: int) -> engine.Program:
    """Layers ``0..l-1`` whole, then stored layer ``l`` (the adapter) with its attention half only."""
    prog = engine.sequence(range(exit_layer + 1))
    return prog._replace(sub_S=np.asarray([engine.FULL] * exit_layer + [engine.ATTN], np.int32))


def _draft_cfg(model: DecoderLM, exit_layer: int):
    if not 1 <= exit_layer < model.cfg.depth:
        raise ValueError(f"Kangaroo exit layer {exit_layer} must lie in [1, {model.cfg.depth}) (layers kept)")
    return dataclasses.replace(model.cfg, depth=exit_layer + 1, exits=[exit_layer], exit_head="shared")


def init_adapter(model: DecoderLM, exit_layer: int) -> dict:
    """Adapter parameters (pure dict) initialised from the frozen model: the attention part of stored layer ``l``
    (the layer the drafter replaces) and the final RMSNorm."""
    block = nnx.to_pure_dict(nnx.state(kv_lib.layer_at(model, exit_layer)))
    return {"attn": {k: block[k] for k in ADAPTER_KEYS}, "norm": nnx.to_pure_dict(nnx.state(model.final_norm))}


def make_draft(model: DecoderLM, adapter: dict, exit_layer: int) -> DecoderLM:
    """The drafter as a ``DecoderLM`` of depth ``l + 1`` sharing the frozen model's embedding / head and first ``l``
    layers (works under ``jit`` with a traced ``adapter``)."""
    cfg = _draft_cfg(model, exit_layer)
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    full = nnx.to_pure_dict(nnx.state(model))
    filler = jax.tree.map(lambda x: x[exit_layer], full["layers"])     # the unused MLP half of the adapter layer
    adapter_layer = {**filler, **adapter["attn"]}
    layers = jax.tree.map(lambda stack, one: jnp.concatenate([stack[:exit_layer], one[None].astype(stack.dtype)]),
                          full["layers"], adapter_layer)
    pure = {"embed": full["embed"], "layers": layers, "final_norm": adapter["norm"]}
    if "unembed" in full:
        pure["unembed"] = full["unembed"]
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def adapter_logits(model: DecoderLM, adapter: dict, h_BxTxD: jax.Array, valid_BxT: jax.Array | None = None,
                   vocab_U: jax.Array | None = None):
    """Training path: the adapter over a causal window of layer-``l`` hidden states, then the tied head
    (``B x T x V``). Equals the drafter's logits at every position (tested). ``vocab_U``: only these rows of a tied
    head (``B x T x U``; a restricted softmax for cheap training)."""
    from eejax.models import lm as lm_lib   # noqa: PLC0415

    b, t, _ = h_BxTxD.shape
    valid_BxT = jnp.ones((b, t), bool) if valid_BxT is None else valid_BxT
    block = kv_lib.layer_at(model, 0)
    gdef, st = nnx.split(block)
    pure = nnx.to_pure_dict(st)
    nnx.replace_by_pure_dict(st, {**pure, **adapter["attn"]})
    block = nnx.merge(gdef, st)
    pos_BxT = model.positions(valid_BxT)
    k, v = block.kv(h_BxTxD, pos_BxT)
    x = block.attn_half(h_BxTxD, pos_BxT, k, v, lm_lib.causal_mask(valid_BxT))
    norm_def, norm_st = nnx.split(model.final_norm)
    nnx.replace_by_pure_dict(norm_st, adapter["norm"])
    x = nnx.merge(norm_def, norm_st)(x)
    if vocab_U is None:
        return model.shared_head(x)
    if not model.cfg.tie_embeddings:
        raise ValueError("a restricted vocabulary needs a tied head")
    return x @ model.embed.embedding[...][vocab_U].T


def draft_forward(draft: DecoderLM, tokens_BxT: jax.Array, state: kv_lib.DecodeState, exit_layer: int):
    """T tokens per row through the drafter (its KV cache advanced by T); logits at the last token (``B x V``)."""
    out, state = kv_lib.forward(draft, tokens_BxT, state, draft_program(exit_layer), kv_lib.final_head(draft))
    return out.logits_BxC, state


# ------------------------------------------------------------------------------------------------ decoding


class KangarooOutputs(NamedTuple):
    tokens_BxG: jax.Array      # generated tokens (greedy-exact)
    rounds_B: jax.Array        # verify steps per row
    drafted_B: jax.Array       # draft tokens proposed per row (each row's own double-early-exit length)
    accepted_B: jax.Array      # draft tokens accepted per row
    draft_steps: jax.Array     # int32[]: draft forwards the batch ran (rows wait for the longest draft)
    verify_tokens: jax.Array   # int32[]: tokens per row the verify steps ran, summed over rounds (k + 1 each)
    batch_rounds: jax.Array    # int32[]: verify steps the batch ran
    conf_hist_2xC: jax.Array   # counts of draft top-1 probability in CONF_BINS bins: [accepted, first rejected]

    @property
    def acceptance_rate(self) -> jax.Array:
        return jnp.sum(self.accepted_B) / jnp.maximum(jnp.sum(self.drafted_B), 1)

    @property
    def tokens_per_verify(self) -> jax.Array:
        """CR: mean tokens a verify step produced (accepted drafts + the full model's own token)."""
        return (jnp.sum(self.accepted_B) + jnp.sum(self.rounds_B)) / jnp.maximum(jnp.sum(self.rounds_B), 1)


class _Carry(NamedTuple):
    state: kv_lib.DecodeState
    dstate: kv_lib.DecodeState
    prev_B: jax.Array          # the token at position pos - 1 (in the target cache)
    last_B: jax.Array          # the newest emitted token (position pos, not yet in the target cache)
    out_BxG: jax.Array
    count_B: jax.Array
    rounds_B: jax.Array
    drafted_B: jax.Array
    accepted_B: jax.Array
    draft_steps: jax.Array
    verify_tokens: jax.Array
    batch_rounds: jax.Array
    hist_2xC: jax.Array


def _bins(conf):
    return jnp.clip((conf * CONF_BINS).astype(jnp.int32), 0, CONF_BINS - 1)


def kangaroo(model: DecoderLM, adapter: dict, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int, *,
             exit_layer: int, eta: float = 0.6, gamma: int = 6) -> KangarooOutputs:
    """Greedy Kangaroo decoding of ``num_new`` tokens per row (right-padded prompts, ``lengths_B`` each)."""
    if gamma < 1 or num_new < 1:
        raise ValueError(f"need {gamma=} >= 1 and {num_new=} >= 1")
    draft = make_draft(model, adapter, exit_layer)
    b, p = prompt_BxP.shape
    cache_len = p + num_new + gamma + 2
    logits, state = kv_lib.prefill(model, prompt_BxP, lengths_B, cache_len)
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    _, dstate = kv_lib.forward(draft, prompt_BxP, kv_lib.empty_state(draft, b, cache_len), draft_program(exit_layer),
                               kv_lib.final_head(draft))
    dstate = dstate._replace(pos_B=lengths_B)
    first_B = jnp.argmax(logits, -1).astype(jnp.int32)
    prev_B = jnp.take_along_axis(jnp.asarray(prompt_BxP, jnp.int32), (lengths_B - 1)[:, None], 1)[:, 0]
    zero_B = jnp.zeros((b,), jnp.int32)
    rows_Bx1 = jnp.arange(b)[:, None]
    j_R = jnp.arange(gamma)

    def verify_branch(k):
        def f(toks_BxR1, st):
            logits_BxK1xV, st = kv_lib.extend(model, toks_BxR1[:, :k + 1], st)
            g = jnp.argmax(logits_BxK1xV, -1).astype(jnp.int32)
            return jnp.pad(g, ((0, 0), (0, gamma - k)), constant_values=-1), st
        return f

    branches = [verify_branch(k) for k in range(1, gamma + 1)]

    def body(c: _Carry) -> _Carry:
        live_B = c.count_B < num_new
        pos_B = c.state.pos_B
        # Draft step 0: [prev, last] at positions pos-1, pos (re-writes slot pos-1, fills a fully accepted round's
        # last draft token into the draft cache).
        ds = kv_lib.rollback(c.dstate, pos_B - 1)
        lg, ds = draft_forward(draft, jnp.stack([c.prev_B, c.last_B], 1), ds, exit_layer)
        p0 = jax.nn.softmax(lg.astype(jnp.float32), -1)
        d_BxR = jnp.zeros((b, gamma), jnp.int32).at[:, 0].set(jnp.argmax(lg, -1).astype(jnp.int32))
        conf_BxR = jnp.zeros((b, gamma), jnp.float32).at[:, 0].set(jnp.max(p0, -1))
        still_B = live_B & (conf_BxR[:, 0] >= eta)

        def draft_cond(dc):
            j, _, _, _, still, _ = dc
            return (j < gamma) & jnp.any(still)

        def draft_body(dc):
            j, ds, d, conf, still, n = dc
            lg, ds = draft_forward(draft, d[:, j - 1][:, None], ds, exit_layer)
            pj = jax.nn.softmax(lg.astype(jnp.float32), -1)
            d = d.at[:, j].set(jnp.argmax(lg, -1).astype(jnp.int32))
            conf = conf.at[:, j].set(jnp.max(pj, -1))
            n = n + still.astype(jnp.int32)
            return j + 1, ds, d, conf, still & (conf[:, j] >= eta), n

        j_end, ds, d_BxR, conf_BxR, _, ndraft_B = jax.lax.while_loop(
            draft_cond, draft_body, (jnp.int32(1), ds, d_BxR, conf_BxR, still_B, zero_B + 1))
        k = jnp.max(jnp.where(live_B, ndraft_B, 1))
        # Verify [last, d_0..d_{k-1}] with the full model in one extend from the accepted position.
        toks = jnp.concatenate([c.last_B[:, None], d_BxR], 1)
        g_BxR1, verified = jax.lax.switch(k - 1, branches, toks, c.state)
        match_BxR = (d_BxR == g_BxR1[:, :gamma]) & (j_R[None] < ndraft_B[:, None])
        n_B = jnp.sum(jnp.cumprod(match_BxR.astype(jnp.int32), axis=1), axis=1)
        j_R1 = jnp.arange(gamma + 1)[None, :]
        bonus_B = jnp.take_along_axis(g_BxR1, n_B[:, None], axis=1)[:, 0]
        emit = jnp.where(j_R1 < n_B[:, None], jnp.pad(d_BxR, ((0, 0), (0, 1))), bonus_B[:, None])
        dest = jnp.where((j_R1 <= n_B[:, None]) & live_B[:, None], c.count_B[:, None] + j_R1, num_new)
        out_BxG = c.out_BxG.at[rows_Bx1, dest].set(emit, mode="drop")
        new_pos = jnp.where(live_B, pos_B + n_B + 1, pos_B)
        new_prev = jnp.where(n_B > 0, jnp.take_along_axis(d_BxR, jnp.maximum(n_B - 1, 0)[:, None], 1)[:, 0],
                             c.last_B)
        # Top-1 probability of accepted drafts and of the first rejected one (it saw the right context).
        acc_BxR = (j_R[None] < n_B[:, None]) & live_B[:, None]
        rej_BxR = (j_R[None] == n_B[:, None]) & (j_R[None] < ndraft_B[:, None]) & live_B[:, None]
        hist = jnp.stack([jnp.zeros((CONF_BINS,), jnp.int32).at[_bins(conf_BxR)].add(m.astype(jnp.int32))
                          for m in (acc_BxR, rej_BxR)])
        live = live_B.astype(jnp.int32)
        return _Carry(
            state=kv_lib.rollback(verified, new_pos), dstate=ds, prev_B=jnp.where(live_B, new_prev, c.prev_B),
            last_B=jnp.where(live_B, bonus_B, c.last_B), out_BxG=out_BxG,
            count_B=jnp.minimum(c.count_B + live * (n_B + 1), num_new), rounds_B=c.rounds_B + live,
            drafted_B=c.drafted_B + live * ndraft_B, accepted_B=c.accepted_B + live * n_B,
            draft_steps=c.draft_steps + j_end, verify_tokens=c.verify_tokens + k + 1,
            batch_rounds=c.batch_rounds + 1, hist_2xC=c.hist_2xC + hist)

    init = _Carry(state, dstate, prev_B, first_B, jnp.zeros((b, num_new), jnp.int32).at[:, 0].set(first_B),
                  zero_B + 1, zero_B, zero_B, zero_B, jnp.int32(0), jnp.int32(0), jnp.int32(0),
                  jnp.zeros((2, CONF_BINS), jnp.int32))
    f = jax.lax.while_loop(lambda c: jnp.any(c.count_B < num_new), body, init)
    return KangarooOutputs(f.out_BxG, f.rounds_B, f.drafted_B, f.accepted_B, f.draft_steps, f.verify_tokens,
                           f.batch_rounds, f.hist_2xC)


def kangaroo_fn(graphdef, num_new: int, *, exit_layer: int, gamma: int = 6):
    """``jit``-ready ``f(params, adapter, prompt_BxP, lengths_B, eta)`` over an ``nnx.split`` model (``eta`` may be
    traced: one compile serves every threshold)."""

    def f(params, adapter, prompt_BxP, lengths_B, eta=0.6):
        return kangaroo(nnx.merge(graphdef, params), adapter, prompt_BxP, lengths_B, num_new,
                        exit_layer=exit_layer, eta=eta, gamma=gamma)

    return f


# ------------------------------------------------------------------------------------------------ cost model


def layer_params(cfg) -> dict:
    """Parameters read per token (memory-bound decoding): one layer, its attention half, the LM head."""
    d, f, kv = cfg.d_model, cfg.mlp_dim, cfg.num_kv_heads * cfg.head_dim
    attn = 2 * d * d + 2 * d * kv + 2 * d
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * f
    return {"layer": attn + mlp, "attn": attn, "head": cfg.vocab_size * d}


def cost_speedup(cfg, *, exit_layer: int, tokens: float, draft_steps: float, rounds: float) -> float:
    """Cost-model speed-up over plain greedy, counting parameters read (the memory-bound GPU regime at batch 1, in
    which verifying k + 1 tokens costs one forward): greedy reads ``N layers + head`` per token; Kangaroo reads
    ``l layers + adapter + head`` per draft step and ``N layers + head`` per verify step."""
    c = layer_params(cfg)
    full = cfg.depth * c["layer"] + c["head"]
    draft = exit_layer * c["layer"] + c["attn"] + c["head"]
    return tokens * full / (draft_steps * draft + rounds * full)


__all__ = ["ADAPTER_KEYS", "CONF_BINS", "draft_program", "init_adapter", "make_draft", "adapter_logits",
           "draft_forward", "KangarooOutputs", "kangaroo", "kangaroo_fn", "layer_params", "cost_speedup"]
