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
(stopped rows are computed and ignored). Decoding is the one speculative loop (``speculative.self_speculative``)
with this drafter (``drafter``: the draft model, its own KV cache as the drafter's state, the threshold as its
keep-drafting rule): **verify** the last emitted token and the ``k`` = (longest row's) drafts in one full-depth
``kv.extend`` of ``k + 1`` tokens (one compiled branch per ``k``, picked by ``lax.switch``), accept per row the
longest prefix of its own drafts equal to the full model's greedy tokens, emit the full model's next token, and roll
both caches back (``kv.rollback``). Greedy output equals plain greedy decoding token for token (tested, batched, rows
stopping at different lengths).

Draft cache bookkeeping: every round's first draft step runs two tokens, the token before the last emitted one and
the last emitted one (positions ``pos - 1, pos``), so the draft cache also holds the last accepted draft token,
which the draft never ran when a round accepts all its drafts. Rewriting a slot with the same token and prefix gives
the same K/V.

Shapes: B batch, P prompt, G new tokens, R = gamma (the draft buffer), V vocabulary, D width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.decoding import kv as kv_lib
from eejax.decoding import speculative
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
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, (int, np.integer)) \
            or not 1 <= exit_layer < model.cfg.depth:
        raise ValueError(f"exit_layer={exit_layer!r} (the layers the Kangaroo drafter keeps) must be an int in "
                         f"[1, {model.cfg.depth})")
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


class KangarooState(NamedTuple):
    """The drafter's own state in the speculative loop."""
    cache: kv_lib.DecodeState    # the draft model's KV cache (its own layers 0..l; rolled back every round)
    prev_B: jax.Array            # the token at position pos - 1 of the target (the round's first draft input)
    conf_BxR: jax.Array          # top-1 probability of each draft token of the current round
    hist_2xC: jax.Array          # counts of draft top-1 probability in CONF_BINS bins: [accepted, first rejected]


def _bins(conf):
    return jnp.clip((conf * CONF_BINS).astype(jnp.int32), 0, CONF_BINS - 1)


class Drafter(NamedTuple):
    """Kangaroo as a drafter of ``speculative.self_speculative`` (the protocol is documented there): the draft
    model (``make_draft``) with its own KV cache, and the double early exit as the keep-drafting rule: a row keeps
    drafting while its newest draft's top-1 probability is at least ``eta``, at most ``gamma`` tokens (at least one
    is always drafted; the batch drafts while any row does). Build it with ``drafter``."""
    draft: DecoderLM        # the drafter model (first l layers of the target + the adapter + the shared head)
    exit_layer: int         # l
    eta: Any = 0.6          # may be traced (one compiled program for a sweep)
    gamma: int = 6

    shadow_exits = ()
    stops_early = True

    @property
    def plans(self) -> tuple[speculative.Plan, ...]:
        return (speculative.Plan(self.exit_layer, self.gamma),)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(range(1, self.gamma + 1))

    def check(self, model: DecoderLM) -> None:
        if self.draft.cfg.vocab_size != model.cfg.vocab_size or self.draft.cfg.d_model != model.cfg.d_model:
            raise ValueError("the Kangaroo draft model was built from another model (vocabulary or width differs)")

    def forward(self, tokens_BxT: jax.Array, cache: kv_lib.DecodeState):
        """T tokens per row through the draft model at its cache's positions; logits at the last (``B x V``)."""
        return draft_forward(self.draft, tokens_BxT, cache, self.exit_layer)

    def init(self, model, prompt_BxP, lengths_B, cache_len) -> KangarooState:
        """The draft model's cache over the prompts (right-padded; ``pos_B = lengths_B``)."""
        b = prompt_BxP.shape[0]
        _, cache = self.forward(prompt_BxP, kv_lib.empty_state(self.draft, b, cache_len))
        prev_B = jnp.take_along_axis(jnp.asarray(prompt_BxP, jnp.int32), (lengths_B - 1)[:, None], 1)[:, 0]
        return KangarooState(kv_lib.rollback(cache, lengths_B), prev_B, jnp.zeros((b, self.gamma), jnp.float32),
                             jnp.zeros((2, CONF_BINS), jnp.int32))

    def propose(self, tok_B: jax.Array, state: KangarooState):
        """The draft model's logits for the next token after ``tok_B`` (one token per row, its cache advanced by
        one): what SpecEE reads its candidates from. Returns ``(logits_BxV, state)``."""
        logits, cache = self.forward(tok_B[:, None], state.cache)
        return logits, state._replace(cache=cache)

    def plan(self, model, state: KangarooState, live_B):
        full_B = jnp.full(live_B.shape, self.gamma, jnp.int32)
        return speculative.Choice(jnp.int32(0), full_B, full_B * 0 + self.exit_layer + 1), state

    def step(self, model, plan, j: int, tok_B, target: kv_lib.DecodeState, state: KangarooState):
        if j == 0:
            # [prev, last] at positions pos-1, pos: re-writes slot pos-1 and fills a fully accepted round's last draft
            # token (which the draft never ran) into the draft cache. The same token and prefix give the same K/V.
            cache = kv_lib.rollback(state.cache, target.pos_B - 1)
            logits, cache = self.forward(jnp.stack([state.prev_B, tok_B], 1), cache)
            return logits, target, state._replace(cache=cache)
        logits, state = self.propose(tok_B, state)
        return logits, target, state

    def keep(self, plan, j: int, logits_BxV, state: KangarooState):
        conf_B = jnp.max(jax.nn.softmax(logits_BxV.astype(jnp.float32), -1), -1)
        return conf_B >= self.eta, state._replace(conf_BxR=state.conf_BxR.at[:, j].set(conf_B))

    def observe(self, state: KangarooState, v: speculative.Verified) -> KangarooState:
        n_B, j_R = v.accepted_B, jnp.arange(self.gamma)[None]
        prev_B = jnp.where(n_B > 0, jnp.take_along_axis(v.drafts_BxK, jnp.maximum(n_B - 1, 0)[:, None], 1)[:, 0],
                           v.last_B)
        # Top-1 probability of accepted drafts and of the first rejected one (it saw the right context).
        acc_BxR = (j_R < n_B[:, None]) & v.live_B[:, None]
        rej_BxR = (j_R == n_B[:, None]) & (j_R < v.drafted_B[:, None]) & v.live_B[:, None]
        hist = jnp.stack([jnp.zeros((CONF_BINS,), jnp.int32).at[_bins(state.conf_BxR)].add(m.astype(jnp.int32))
                          for m in (acc_BxR, rej_BxR)])
        return state._replace(prev_B=jnp.where(v.live_B, prev_B, state.prev_B), hist_2xC=state.hist_2xC + hist)


def drafter(model: DecoderLM, adapter: dict, exit_layer: int, *, eta=0.6, gamma: int = 6) -> Drafter:
    """The Kangaroo drafter of ``model`` with ``adapter`` after its first ``exit_layer`` layers (works under ``jit``
    with a traced ``adapter`` and ``eta``)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, np.integer)) or gamma < 1:
        raise ValueError(f"gamma={gamma!r} must be an int >= 1 (the most draft tokens per round)")
    if checks.is_concrete(eta) and (np.ndim(eta) != 0 or not 0.0 <= float(eta) <= 1.0):
        raise ValueError(f"eta={eta!r} must be a top-1 probability threshold in [0, 1]")
    return Drafter(make_draft(model, adapter, exit_layer), int(exit_layer), eta, int(gamma))


class KangarooOutputs(NamedTuple):
    tokens_BxG: jax.Array      # generated tokens (greedy-exact)
    rounds_B: jax.Array        # verify steps per row
    drafted_B: jax.Array       # draft tokens proposed per row (each row's own double-early-exit length)
    accepted_B: jax.Array      # draft tokens accepted per row
    draft_steps: jax.Array     # int32[]: draft forwards the batch ran (rows wait for the longest draft)
    verify_tokens: jax.Array   # int32[]: tokens per row the verify steps ran, summed over rounds (k + 1 each)
    batch_rounds: jax.Array    # int32[]: verify steps the batch ran
    conf_hist_2xC: jax.Array   # counts of draft top-1 probability in CONF_BINS bins: [accepted, first rejected]

    acceptance_rate = property(speculative.acceptance_rate)
    tokens_per_verify = property(speculative.tokens_per_verify)


def kangaroo(model: DecoderLM, adapter: dict, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int, *,
             exit_layer: int, eta=0.6, gamma: int = 6) -> KangarooOutputs:
    """Greedy Kangaroo decoding of ``num_new`` tokens per row (right-padded prompts, ``lengths_B`` each): the
    speculative loop (``speculative.self_speculative``) with the Kangaroo ``drafter``."""
    if isinstance(num_new, bool) or not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"num_new={num_new!r} must be an int >= 1")
    if isinstance(gamma, (int, np.integer)) and gamma > num_new:
        raise ValueError(f"gamma={gamma} > num_new={num_new}: a round emits at most num_new tokens, so longer drafts "
                         "only grow the caches and the compiled program; use gamma <= num_new")
    kv_lib.check_prompts(prompt_BxP, lengths_B, model.cfg.vocab_size)   # before the draft model is built
    out = speculative.self_speculative(model, prompt_BxP, lengths_B, num_new,
                                       drafter=drafter(model, adapter, exit_layer, eta=eta, gamma=gamma))
    return KangarooOutputs(out.tokens_BxG, out.rounds_B, out.drafted_B, out.accepted_B, out.draft_steps,
                           out.verify_tokens, out.batch_rounds, out.drafter_state.hist_2xC)


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
           "draft_forward", "KangarooState", "Drafter", "drafter", "KangarooOutputs", "kangaroo", "kangaroo_fn",
           "layer_params", "cost_speedup"]
