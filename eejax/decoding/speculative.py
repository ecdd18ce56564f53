"""Self-speculative decoding on the engine: LayerSkip-style static drafting (Elhoushi et al. 2024, arXiv:2404.16710)
and DEL's per-row dynamic exit layer and speculation length (Zarch et al. 2025, arXiv:2504.05598).

Each round, per row: **draft** ``d`` tokens with the model's own first layers and an early exit head (the prefix
program with a ``fixed_exit`` policy: the loop runs only the draft layers), **verify** the last accepted token and
the drafts with the full model in one ``kv.extend``, **accept** the longest prefix of drafts equal to the full
model's greedy tokens plus the full model's next token, and **roll back** the cache to the accepted length
(``kv.rollback``). Rows accept different lengths and keep their own positions, so the batch never waits on a row's
rejection. Greedy output equals plain greedy decoding token for token (tested, batched): every emitted token is the
full model's argmax given the accepted prefix.

Who picks the draft exit and length is a **drafter** (``init(zero_B) -> state``, ``choose(state) -> (exit_B,
d_B)``, ``update(state, shadow_BxCxK1, g_BxK1, n_B, live_B) -> state``, ``lengths``: the verify lengths it may ask
for, ``shadow_exits``: the exits whose tokens the verify pass must record):

* ``static(draft_exit, k)``: every row drafts ``k`` tokens from one exit (LayerSkip; the offline-swept (E, gamma));
* ``dynamic(...)`` (DEL): every verify pass also reads the candidate exits' heads on its hidden states ("shadow
  tokens", ``policies.shadow``); per row and candidate exit, a running acceptance estimate alpha is updated from how
  often the exit's token equals the verified token over the verified positions; each round each row takes the
  (exit l, length d) maximising DEL's tokens per loaded layer ``TPL = (1 - a^(d+1)) / (1 - a) / (d l + L)``.

Per row where the batch allows: exits differ per row (the draft loop runs until the deepest row's exit; shallower
rows are frozen), lengths differ per row (the batch drafts ``max d`` tokens and verifies ``max d + 1``, chosen
among the static ``lengths`` by ``lax.switch``; a row's drafts past its own ``d`` are never accepted). At batch 1
the compute is exactly the row's choice.

The draft writes the cache only for its own layers; verify rewrites every layer at the verified positions (the draft
layers are recomputed, not reused as in LayerSkip's cache reuse), and the slots of rejected tokens lie past the
rolled-back length, invisible until overwritten.

Shapes: B batch, P prompt, G new tokens, K maximum draft length, C candidate (shadow) exits, V vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eejax.decoding import kv as kv_lib
from eejax.exits import engine, policies
from eejax.models.lm import DecoderLM


class SpecOutputs(NamedTuple):
    tokens_BxG: jax.Array     # the generated tokens (greedy-exact)
    rounds_B: jax.Array       # draft-and-verify rounds each row needed (= verify steps)
    drafted_B: jax.Array      # draft tokens proposed per row (its own d summed over rounds)
    accepted_B: jax.Array     # draft tokens accepted per row
    draft_layers_B: jax.Array | None = None   # layers its drafts cost per row: sum over rounds of d x exit layers
    exit_trace_BxG: jax.Array | None = None   # layers of the draft exit chosen at round r (-1 past the last round)
    k_trace_BxG: jax.Array | None = None      # draft length chosen at round r (0 past the last round)

    @property
    def acceptance_rate(self) -> jax.Array:
        return jnp.sum(self.accepted_B) / jnp.maximum(jnp.sum(self.drafted_B), 1)

    @property
    def tokens_per_verify(self) -> jax.Array:
        """Mean tokens a verify step produced (accepted drafts + the full model's own token)."""
        return (jnp.sum(self.accepted_B) + jnp.sum(self.rounds_B)) / jnp.maximum(jnp.sum(self.rounds_B), 1)


# ------------------------------------------------------------------------------------------------- drafters


class Static(NamedTuple):
    """Every row drafts ``k`` tokens from exit ``draft_exit`` every round."""
    draft_exit: int
    k: int

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.k,)

    shadow_exits: tuple = ()

    def init(self, zero_B):
        return zero_B

    def choose(self, state):
        return state + self.draft_exit, state + self.k

    def update(self, state, shadow_BxCxK1, g_BxK1, n_B, live_B):
        return state


class DynamicState(NamedTuple):
    alpha_BxC: jax.Array      # running per-token acceptance estimate of each candidate exit, per row


class Dynamic(NamedTuple):
    """DEL: per row, the (exit, length) maximising tokens per loaded layer under running acceptance estimates."""
    candidates: tuple[int, ...]     # candidate draft exits (indices into the model's exits)
    layers_C: tuple[int, ...]       # layers each candidate runs (its exit layer + 1)
    num_layers: int                 # L
    max_k: int
    decay: float = 0.9              # per verified token: alpha <- decay * alpha + (1 - decay) * hit
    alpha0: tuple[float, ...] | float = 0.5
    verify_per_token: float = 0.0   # verify cost L (1 + this x d): 0 = the paper's memory-bound GPU model

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(range(1, self.max_k + 1))

    @property
    def shadow_exits(self) -> tuple[int, ...]:
        return tuple(self.candidates)

    def init(self, zero_B):
        a_C = jnp.broadcast_to(jnp.asarray(self.alpha0, jnp.float32), (len(self.candidates),))
        return DynamicState(zero_B[:, None].astype(jnp.float32) + a_C[None])

    def tpl_BxCxK(self, alpha_BxC):
        """DEL's tokens per loaded layer of drafting ``d = 1..K`` tokens from each candidate."""
        d_11K = jnp.arange(1, self.max_k + 1, dtype=jnp.float32)[None, None, :]
        a_BxCx1 = jnp.clip(alpha_BxC, 0.0, 1.0)[..., None]
        powers = a_BxCx1 ** jnp.arange(self.max_k + 1, dtype=jnp.float32)[None, None, :]
        expected_BxCxK = jnp.cumsum(powers, -1)[..., 1:]        # sum_{i<=d} a^i = (1 - a^(d+1)) / (1 - a)
        l_1xCx1 = jnp.asarray(self.layers_C, jnp.float32)[None, :, None]
        cost_1xCxK = d_11K * l_1xCx1 + self.num_layers * (1.0 + self.verify_per_token * d_11K)
        return expected_BxCxK / cost_1xCxK

    def choose(self, state: DynamicState):
        tpl = self.tpl_BxCxK(state.alpha_BxC)
        best_B = jnp.argmax(tpl.reshape(tpl.shape[0], -1), -1)
        c_B, d_B = best_B // self.max_k, best_B % self.max_k + 1
        return jnp.asarray(self.candidates, jnp.int32)[c_B], d_B.astype(jnp.int32)

    def update(self, state: DynamicState, shadow_BxCxK1, g_BxK1, n_B, live_B):
        # Positions 0..n of the verify pass had a verified prefix: what each candidate would have drafted there is
        # compared with the full model's token there (the shadow tokens).
        k1 = g_BxK1.shape[1]
        valid_BxK1 = jnp.arange(k1)[None] <= n_B[:, None]
        hits_BxC = jnp.sum((shadow_BxCxK1 == g_BxK1[:, None]) & valid_BxK1[:, None], -1).astype(jnp.float32)
        m_B = (n_B + 1).astype(jnp.float32)
        keep_B = self.decay ** m_B
        alpha = state.alpha_BxC * keep_B[:, None] + (1 - keep_B[:, None]) * hits_BxC / m_B[:, None]
        return DynamicState(jnp.where(live_B[:, None], alpha, state.alpha_BxC))


def static(draft_exit: int, k: int) -> Static:
    return Static(int(draft_exit), int(k))


def dynamic(model_or_cfg, candidates: Sequence[int], max_k: int, *, decay: float = 0.9, alpha0=0.5,
            verify_per_token: float = 0.0) -> Dynamic:
    """DEL over the model's early exits ``candidates`` (indices), lengths ``1..max_k``."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    cands = tuple(int(c) for c in candidates)
    if not cands or any(not 0 <= c < cfg.num_exits - 1 for c in cands):
        raise ValueError(f"candidates {cands} must be early exits in [0, {cfg.num_exits - 1})")
    if max_k < 1 or not 0.0 <= decay < 1.0:
        raise ValueError(f"need {max_k=} >= 1 and 0 <= {decay=} < 1")
    a0 = alpha0 if np.isscalar(alpha0) else tuple(float(a) for a in alpha0)
    return Dynamic(cands, tuple(cfg.exit_layers[c] + 1 for c in cands), cfg.depth, int(max_k), float(decay), a0,
                   float(verify_per_token))


# ------------------------------------------------------------------------------------------------- the loop


class _Carry(NamedTuple):
    state: kv_lib.DecodeState
    last_B: jax.Array         # the newest emitted token, not yet in the cache
    out_BxG: jax.Array
    count_B: jax.Array        # tokens emitted per row
    rounds_B: jax.Array
    drafted_B: jax.Array
    accepted_B: jax.Array
    draft_layers_B: jax.Array
    exit_trace_BxG: jax.Array
    k_trace_BxG: jax.Array
    drafter: object


def draft_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, draft_exit):
    """One draft token per row: layers up to exit ``draft_exit`` (an int or per-row ``int32[B]``) and its head
    (prefix program, fixed-exit policy); returns ``(logits_BxV, state)``."""
    cfg = model.cfg
    b = tok_B.shape[0]
    out, state = kv_lib.forward(model, tok_B[:, None], state, engine.prefix(cfg.depth, cfg.exit_layers),
                                kv_lib.model_heads(model),
                                policies.fixed_exit(jnp.broadcast_to(jnp.asarray(draft_exit, jnp.int32), (b,))))
    return out.logits_BxC, state


def verify(model: DecoderLM, tokens_BxT: jax.Array, state: kv_lib.DecodeState, shadow_exits: Sequence[int] = ()):
    """Full-depth forward of T tokens per row; returns the full model's greedy token at each position
    (``B x T``), the shadow tokens of the early exits ``shadow_exits`` at each position (``B x C x T``; C may be 0)
    and the advanced state. With shadow exits, the prefix program evaluates those exits' heads on the way (the
    ``shadow`` policy runs every exit and records each one's argmax): their LM-head cost is part of the pass."""
    if not shadow_exits:
        logits, state = kv_lib.extend(model, tokens_BxT, state)
        g = jnp.argmax(logits, -1).astype(jnp.int32)
        return g, jnp.zeros((g.shape[0], 0, g.shape[1]), jnp.int32), state
    cfg = model.cfg
    exits = [*shadow_exits, cfg.num_exits - 1]
    program = engine.prefix(cfg.depth, [cfg.exit_layers[e] for e in exits])
    heads = kv_lib.model_heads(model, last_token=False, exits=exits)
    out, state = kv_lib.forward(model, tokens_BxT, state, program, heads, policies.shadow(len(exits)))
    g = jnp.argmax(out.logits_BxC, -1).astype(jnp.int32)
    return g, out.policy_state[:, :-1], state


def self_speculative(model: DecoderLM, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int, *,
                     draft_exit: int | None = None, k: int | None = None, drafter=None) -> SpecOutputs:
    """Greedy self-speculative decoding of ``num_new`` tokens per row: drafts of ``k`` tokens from exit
    ``draft_exit`` (an index into the model's exits, not the last), or as ``drafter`` decides per row and round
    (``static``, ``dynamic``)."""
    cfg = model.cfg
    if drafter is None:
        if draft_exit is None or k is None:
            raise ValueError("give draft_exit and k, or a drafter")
        if not 0 <= draft_exit < cfg.num_exits - 1:
            raise ValueError(f"{draft_exit=} must name an early exit in [0, {cfg.num_exits - 1})")
        if k < 1:
            raise ValueError(f"need {k=} >= 1")
        drafter = static(draft_exit, k)
    if num_new < 1:
        raise ValueError(f"need {num_new=} >= 1")
    lengths = tuple(drafter.lengths)
    kmax = max(lengths)
    b, p = prompt_BxP.shape
    logits, state = kv_lib.prefill(model, prompt_BxP, lengths_B, p + num_new + kmax + 1)
    first_B = jnp.argmax(logits, -1).astype(jnp.int32)
    zero_B = jnp.zeros((b,), jnp.int32)
    out_BxG = jnp.zeros((b, num_new), jnp.int32).at[:, 0].set(first_B)
    rows_B = jnp.arange(b)[:, None]
    layers_E = jnp.asarray(cfg.exit_layers, jnp.int32) + 1
    shadow_exits = tuple(drafter.shadow_exits)

    def verify_len(t):
        def branch(tokens_BxK1, st):
            g, sh, st = verify(model, tokens_BxK1[:, :t + 1], st, shadow_exits)
            pad = kmax - t
            return (jnp.pad(g, ((0, 0), (0, pad)), constant_values=-1),
                    jnp.pad(sh, ((0, 0), (0, 0), (0, pad)), constant_values=-1), st)
        return branch

    branches = [verify_len(t) for t in lengths]

    def body(cr: _Carry) -> _Carry:
        live_B = cr.count_B < num_new
        exit_B, d_B = drafter.choose(cr.drafter)
        d_max = jnp.max(jnp.where(live_B, d_B, 1))
        # Draft d_max tokens with each row's shallow sub-network (writes its layers' cache past the accepted length);
        # a row's drafts past its own d are made but never accepted.
        def draft(i, carry):
            tok, st, d_BxK = carry
            lg, st = draft_step(model, tok, st, exit_B)
            tok = jnp.argmax(lg, -1).astype(jnp.int32)
            return tok, st, d_BxK.at[:, i].set(tok)
        _, _, d_BxK = jax.lax.fori_loop(0, d_max, draft, (cr.last_B, cr.state, jnp.zeros((b, kmax), jnp.int32)))
        # Verify: the last accepted token and the drafts through the full model, from the accepted position, in one
        # extend of the smallest allowed length >= d_max + 1.
        tokens = jnp.concatenate([cr.last_B[:, None], d_BxK], 1)
        which = jnp.searchsorted(jnp.asarray(lengths, jnp.int32), d_max)
        g_BxK1, shadow, verified = (branches[0](tokens, cr.state) if len(branches) == 1
                                    else jax.lax.switch(which, branches, tokens, cr.state))
        j_K = jnp.arange(kmax)[None, :]
        ok_BxK = (d_BxK == g_BxK1[:, :kmax]) & (j_K < d_B[:, None])
        n_B = jnp.sum(jnp.cumprod(ok_BxK.astype(jnp.int32), axis=1), axis=1)
        # Emit d_1..d_n and the full model's g_n; the verify step wrote the cache of every verified position.
        j_K1 = jnp.arange(kmax + 1)[None, :]
        emit_BxK1 = jnp.where(j_K1 < n_B[:, None], jnp.pad(d_BxK, ((0, 0), (0, 1))),
                              jnp.take_along_axis(g_BxK1, n_B[:, None], axis=1))
        dest = jnp.where((j_K1 <= n_B[:, None]) & live_B[:, None], cr.count_B[:, None] + j_K1, num_new)
        out_BxG = cr.out_BxG.at[rows_B, dest].set(emit_BxK1, mode="drop")
        new_pos = jnp.where(live_B, cr.state.pos_B + n_B + 1, cr.state.pos_B)
        new_state = kv_lib.rollback(verified, new_pos)
        live = live_B.astype(jnp.int32)
        trace_at = jnp.where(live_B, cr.rounds_B, num_new)[:, None]
        return _Carry(new_state, jnp.where(live_B, jnp.take_along_axis(g_BxK1, n_B[:, None], 1)[:, 0], cr.last_B),
                      out_BxG, jnp.minimum(cr.count_B + live * (n_B + 1), num_new), cr.rounds_B + live,
                      cr.drafted_B + live * d_B, cr.accepted_B + live * n_B,
                      cr.draft_layers_B + live * d_B * layers_E[exit_B],
                      cr.exit_trace_BxG.at[rows_B, trace_at].set(layers_E[exit_B][:, None], mode="drop"),
                      cr.k_trace_BxG.at[rows_B, trace_at].set(d_B[:, None], mode="drop"),
                      drafter.update(cr.drafter, shadow, g_BxK1, n_B, live_B))

    init = _Carry(state, first_B, out_BxG, zero_B + 1, zero_B, zero_B, zero_B, zero_B,
                  jnp.full((b, num_new), -1, jnp.int32), jnp.zeros((b, num_new), jnp.int32), drafter.init(zero_B))
    final = jax.lax.while_loop(lambda cr: jnp.any(cr.count_B < num_new), body, init)
    return SpecOutputs(final.out_BxG, final.rounds_B, final.drafted_B, final.accepted_B, final.draft_layers_B,
                       final.exit_trace_BxG, final.k_trace_BxG)


__all__ = ["SpecOutputs", "Static", "Dynamic", "DynamicState", "static", "dynamic", "draft_step", "verify",
           "self_speculative"]
