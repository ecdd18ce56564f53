"""Self-speculative decoding on the engine (LayerSkip-style; Elhoushi et al. 2024, arXiv:2404.16710).

Each round, per row: **draft** ``k`` tokens with the model's own first layers and an early exit head (the prefix
program with a ``fixed_exit`` policy: the loop runs only the draft layers), **verify** the last accepted token and
the ``k`` drafts with the full model in one ``kv.extend`` of ``k + 1`` tokens, **accept** the longest prefix of
drafts equal to the full model's greedy tokens plus the full model's next token, and **roll back** the cache to the
accepted length (``kv.rollback``). Rows accept different lengths and keep their own positions, so the batch never
waits on a row's rejection. Greedy output equals plain greedy decoding token for token (tested, batched): every
emitted token is the full model's argmax given the accepted prefix.

The draft writes the cache only for its own layers; verify rewrites every layer at the verified positions, and the
slots of rejected tokens lie past the rolled-back length, invisible until overwritten.

Shapes: B batch, P prompt, G new tokens, K draft length (``k``), V vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eejax.decoding import kv as kv_lib
from eejax.exits import engine, policies
from eejax.models.lm import DecoderLM


class SpecOutputs(NamedTuple):
    tokens_BxG: jax.Array     # the generated tokens (greedy-exact)
    rounds_B: jax.Array       # draft-and-verify rounds each row needed (= verify steps)
    drafted_B: jax.Array      # draft tokens proposed per row
    accepted_B: jax.Array     # draft tokens accepted per row

    @property
    def acceptance_rate(self) -> jax.Array:
        return jnp.sum(self.accepted_B) / jnp.maximum(jnp.sum(self.drafted_B), 1)

    @property
    def tokens_per_verify(self) -> jax.Array:
        """Mean tokens a verify step produced (accepted drafts + the full model's own token)."""
        return (jnp.sum(self.accepted_B) + jnp.sum(self.rounds_B)) / jnp.maximum(jnp.sum(self.rounds_B), 1)


class _Carry(NamedTuple):
    state: kv_lib.DecodeState
    last_B: jax.Array         # the newest emitted token, not yet in the cache
    out_BxG: jax.Array
    count_B: jax.Array        # tokens emitted per row
    rounds_B: jax.Array
    drafted_B: jax.Array
    accepted_B: jax.Array


def draft_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, draft_exit: int):
    """One draft token per row: layers up to exit ``draft_exit`` and its head (prefix program, fixed-exit policy);
    returns ``(logits_BxV, state)``."""
    cfg = model.cfg
    b = tok_B.shape[0]
    out, state = kv_lib.forward(model, tok_B[:, None], state, engine.prefix(cfg.depth, cfg.exit_layers),
                                kv_lib.model_heads(model), policies.fixed_exit(jnp.full((b,), draft_exit, jnp.int32)))
    return out.logits_BxC, state


def self_speculative(model: DecoderLM, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int, *,
                     draft_exit: int, k: int) -> SpecOutputs:
    """Greedy self-speculative decoding of ``num_new`` tokens per row; drafts of ``k`` tokens from exit
    ``draft_exit`` (an index into the model's exits, not the last)."""
    cfg = model.cfg
    if not 0 <= draft_exit < cfg.num_exits - 1:
        raise ValueError(f"{draft_exit=} must name an early exit in [0, {cfg.num_exits - 1})")
    if k < 1 or num_new < 1:
        raise ValueError(f"need {k=} >= 1 and {num_new=} >= 1")
    b, p = prompt_BxP.shape
    logits, state = kv_lib.prefill(model, prompt_BxP, lengths_B, p + num_new + k + 1)
    first_B = jnp.argmax(logits, -1).astype(jnp.int32)
    zero_B = jnp.zeros((b,), jnp.int32)
    out_BxG = jnp.zeros((b, num_new), jnp.int32).at[:, 0].set(first_B)
    rows_B = jnp.arange(b)[:, None]

    def body(c: _Carry) -> _Carry:
        live_B = c.count_B < num_new
        # Draft k tokens with the shallow sub-network (writes the draft layers' cache past the accepted length).
        tok, st, drafts = c.last_B, c.state, []
        for _ in range(k):
            lg, st = draft_step(model, tok, st, draft_exit)
            tok = jnp.argmax(lg, -1).astype(jnp.int32)
            drafts.append(tok)
        d_BxK = jnp.stack(drafts, axis=1)
        # Verify: the last accepted token and the drafts through the full model, from the accepted position.
        logits_BxK1xV, verified = kv_lib.extend(model, jnp.concatenate([c.last_B[:, None], d_BxK], 1), c.state)
        g_BxK1 = jnp.argmax(logits_BxK1xV, -1).astype(jnp.int32)
        n_B = jnp.sum(jnp.cumprod((d_BxK == g_BxK1[:, :k]).astype(jnp.int32), axis=1), axis=1)
        # Emit d_1..d_n and the full model's g_n; the verify step wrote the cache of every verified position.
        j_K1 = jnp.arange(k + 1)[None, :]
        emit_BxK1 = jnp.where(j_K1 < n_B[:, None], jnp.pad(d_BxK, ((0, 0), (0, 1))),
                              jnp.take_along_axis(g_BxK1, n_B[:, None], axis=1))
        dest = jnp.where((j_K1 <= n_B[:, None]) & live_B[:, None], c.count_B[:, None] + j_K1, num_new)
        out_BxG = c.out_BxG.at[rows_B, dest].set(emit_BxK1, mode="drop")
        new_pos = jnp.where(live_B, c.state.pos_B + n_B + 1, c.state.pos_B)
        new_state = kv_lib.rollback(verified, new_pos)
        live = live_B.astype(jnp.int32)
        return _Carry(new_state, jnp.where(live_B, jnp.take_along_axis(g_BxK1, n_B[:, None], 1)[:, 0], c.last_B),
                      out_BxG, jnp.minimum(c.count_B + live * (n_B + 1), num_new), c.rounds_B + live,
                      c.drafted_B + live * k, c.accepted_B + live * n_B)

    init = _Carry(state, first_B, out_BxG, zero_B + 1, zero_B, zero_B, zero_B)
    final = jax.lax.while_loop(lambda c: jnp.any(c.count_B < num_new), body, init)
    return SpecOutputs(final.out_BxG, final.rounds_B, final.drafted_B, final.accepted_B)


__all__ = ["SpecOutputs", "draft_step", "self_speculative"]
