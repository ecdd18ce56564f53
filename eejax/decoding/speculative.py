"""Speculative decoding with the model's own early layers: ONE draft / verify / accept loop (``self_speculative``)
and its drafters: LayerSkip-style static drafting (Elhoushi et al. 2024, arXiv:2404.16710), DEL's per-row dynamic
exit layer and speculation length (Zarch et al. 2025, arXiv:2504.05598) and Kangaroo's adapter drafter with its
double early exit (Liu et al. 2024, arXiv:2404.18911; ``eejax.decoding.kangaroo``).

Each round, per row: **draft** up to ``K`` tokens, **verify** the last emitted token and the drafts with the full
model in one ``kv.extend``, **accept** the longest prefix of drafts equal to the full model's greedy tokens plus the
full model's next token, and **roll back** the cache to the accepted length (``kv.rollback``). Rows accept different
lengths and keep their own positions, so the batch never waits on a row's rejection. Greedy output equals plain
greedy decoding token for token (tested, batched): every emitted token is the full model's argmax given the accepted
prefix. The acceptance rule, the emission and the statistics are written here once, for every drafter.

**Drafters** (the protocol; ``Static``, ``Dynamic`` here, ``kangaroo.Drafter``). A drafter is a NamedTuple of its
settings (and weights, for Kangaroo) with:

* ``plans``: static draft plans (``Plan(exit, length)``); a round runs one, picked by ``lax.switch`` when there are
  several (DEL: one per (candidate exit, length)), so inside a plan every shape and layer count is static;
* ``stops_early``: whether ``keep`` is a data-dependent rule; ``lengths``: the batch draft lengths a round can end
  with (the verify pass is one ``extend`` of ``length + 1`` tokens, picked by ``lax.switch`` when several);
  ``shadow_exits``: early exits whose tokens the verify pass records (DEL);
* ``init(model, prompt_BxP, lengths_B, cache_len) -> state``: the drafter-owned state (DEL's acceptance estimates,
  Kangaroo's own KV cache);
* ``plan(model, state, live_B) -> (Choice, state)``: this round's plan index, each row's draft cap and the layers one
  of its draft tokens costs;
* ``step(model, plan, j, tok_B, target, state) -> (logits_BxV, target, state)``: draft token ``j`` per row (the loop
  takes the argmax: sampling is written once, here). Self-drafters run the target's own stored layers and write its
  cache past the accepted length (the verify pass rewrites those slots); a drafter with a keep rule must leave
  ``target`` as it is (its steps sit in conditionals that do not carry the target cache);
* ``keep(plan, j, logits_BxV, state) -> (still_B or None, state)``: the per-step keep-drafting rule (Kangaroo: the
  draft's top-1 probability >= eta); ``None`` = no rule, the plan's length;
* ``observe(state, Verified) -> state``: what the round's verification says (DEL's acceptance update, Kangaroo's
  confidence histograms and the token before the next round's first).

**Host round trips.** On a GPU every data-dependent ``while`` iteration and every conditional waits on the host
(issue 20). Here: the round loop is the only data-dependent loop (one stop per round); a static plan drafts in a
loop with a known trip count (no stop), through a **static truncated model**: stored layers ``0..l`` of its exit and
that exit's head only (``draft_step``), not the engine's exit loop with every exit's head (``masked_draft_step``,
kept as the reference it equals); a keep rule adds one conditional per draft step (a nested ``lax.cond``: once every
row stopped, nothing more is evaluated); several plans or lengths add one switch each. Counted from the compiled
program in ``tests/test_spec_budgets.py``.

Per row where the batch allows: DEL's exits differ per row (the plan runs the deepest live row's layers; shallower
rows are frozen at their own exit, and each row reads its own exit's head: one vocabulary projection), lengths
differ per row (the batch drafts the plan's length and verifies one more; a row's drafts past its own cap are never
accepted). At batch 1 the compute is exactly the row's choice.

Shapes: B batch, P prompt, G new tokens, K maximum draft length, C candidate (shadow) exits, V vocabulary, D width.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eejax.decoding import kv as kv_lib
from eejax.exits import engine, policies
from eejax.models.lm import DecoderLM


def acceptance_rate(out) -> jax.Array:
    """Accepted over drafted tokens, over the batch (``out``: any output with ``accepted_B`` and ``drafted_B``)."""
    return jnp.sum(out.accepted_B) / jnp.maximum(jnp.sum(out.drafted_B), 1)


def tokens_per_verify(out) -> jax.Array:
    """Mean tokens a verify step produced (accepted drafts + the full model's own token; Kangaroo's CR)."""
    return (jnp.sum(out.accepted_B) + jnp.sum(out.rounds_B)) / jnp.maximum(jnp.sum(out.rounds_B), 1)


class SpecOutputs(NamedTuple):
    tokens_BxG: jax.Array     # the generated tokens (greedy-exact)
    rounds_B: jax.Array       # draft-and-verify rounds each row needed (= verify steps)
    drafted_B: jax.Array      # draft tokens proposed per row (its own length summed over rounds)
    accepted_B: jax.Array     # draft tokens accepted per row
    draft_layers_B: jax.Array | None = None   # layers its drafts cost per row: sum over rounds of drafts x layers
    exit_trace_BxG: jax.Array | None = None   # layers one draft token of round r cost (-1 past the last round)
    k_trace_BxG: jax.Array | None = None      # drafts proposed at round r (0 past the last round)
    draft_steps: jax.Array | None = None      # int32[]: draft forwards the batch ran (rows wait for the longest)
    verify_tokens: jax.Array | None = None    # int32[]: tokens per row the verify passes ran (length + 1 each)
    batch_rounds: jax.Array | None = None     # int32[]: verify passes the batch ran
    drafter_state: Any = None                 # the drafter's final state (e.g. Kangaroo's confidence histograms)

    acceptance_rate = property(acceptance_rate)
    tokens_per_verify = property(tokens_per_verify)


class Plan(NamedTuple):
    """A static draft plan: at most ``length`` draft tokens per row, from ``exit`` (an index into the model's exits
    for self-drafters; the drafter's own reading otherwise)."""
    exit: int
    length: int


class Choice(NamedTuple):
    """A drafter's decision for one round."""
    plan: jax.Array       # int32[]: index into ``drafter.plans``
    cap_B: jax.Array      # int32[B]: drafts row b may propose this round
    layers_B: jax.Array   # int32[B]: stored layers one draft token of row b runs


class Verified(NamedTuple):
    """What a round's verification tells the drafter (``observe``)."""
    drafts_BxK: jax.Array        # the round's draft tokens (the batch's; a row's own are its first drafted_B)
    g_BxK1: jax.Array            # the full model's greedy token at each verified position (-1 past the pass)
    shadow_BxCxK1: jax.Array     # the shadow exits' tokens there (C may be 0)
    accepted_B: jax.Array        # drafts accepted per row
    drafted_B: jax.Array         # drafts proposed per row
    last_B: jax.Array            # the token the pass verified first (emitted by the previous round)
    live_B: jax.Array            # rows that were still generating


def _exit_index(cfg, draft_exit, name: str = "draft_exit") -> int:
    """An early exit of the model as a Python int (the last exit is the full model: no draft)."""
    if isinstance(draft_exit, bool) or not isinstance(draft_exit, (int, np.integer)):
        raise ValueError(f"{name}={draft_exit!r} must be an int naming one of the model's early exits")
    if not 0 <= draft_exit < cfg.num_exits - 1:
        raise ValueError(f"{name}={draft_exit} must name an early exit in [0, {cfg.num_exits - 1}) (the model has "
                         f"{cfg.num_exits} exits after layers {list(cfg.exit_layers)}; the last is the full model)")
    return int(draft_exit)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    return int(value)


# ------------------------------------------------------------------------------------------------- draft steps


def draft_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, draft_exit: int):
    """One draft token per row from the **static truncated model** of exit ``draft_exit`` (a Python int): stored
    layers ``0..l`` (``l`` its layer) in a loop with a known trip count, then that exit's head only; no exit
    decision, no other head. Writes the cache of layers ``0..l`` at each row's position. Returns
    ``(logits_BxV, state)``; equals ``masked_draft_step`` (tested)."""
    e = _exit_index(model.cfg, draft_exit)
    layer = model.cfg.exit_layers[e]
    out, state = kv_lib.forward(model, tok_B[:, None], state, engine.prefix(layer + 1, [layer]),
                                kv_lib.model_heads(model, exits=[e]))
    return out.logits_BxC, state


def rows_draft_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, exit_B: jax.Array,
                    deepest: int):
    """One draft token per row from each row's own early exit ``exit_B[b]`` (traced): stored layers up to the
    layer of exit ``deepest`` (static; no row's exit is deeper) in a loop with a known trip count, each row frozen
    after its own exit's layer, then each row's own exit head with one vocabulary projection
    (``DecoderLM.taken_logits``). Returns ``(logits_BxV, state)``."""
    cfg = model.cfg
    layer = cfg.exit_layers[_exit_index(cfg, deepest, "deepest")]
    layer_B = jnp.asarray(cfg.exit_layers, jnp.int32)[exit_B]
    program = engine.row_skip(jnp.arange(layer + 1)[:, None] <= layer_B[None, :], [layer])
    head = kv_lib.gate_heads(model, exits=[cfg.num_exits - 1])   # the hidden state only: no vocabulary here
    out, state = kv_lib.forward(model, tok_B[:, None], state, program, head)
    return model.taken_logits(out.out.hidden_BxD, exit_B), state


def masked_draft_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, draft_exit):
    """The reference draft step (and the old one, kept for the benchmarks' side-by-side rows): the prefix program
    over every layer with a ``fixed_exit`` policy on the engine's masked executor, every exit's head switched in.
    ``draft_exit`` may be traced or per row (``int32[B]``). Returns ``(logits_BxV, state)``."""
    cfg = model.cfg
    b = tok_B.shape[0]
    out, state = kv_lib.forward(model, tok_B[:, None], state, engine.prefix(cfg.depth, cfg.exit_layers),
                                kv_lib.model_heads(model),
                                policies.fixed_exit(jnp.broadcast_to(jnp.asarray(draft_exit, jnp.int32), (b,))))
    return out.logits_BxC, state


# ------------------------------------------------------------------------------------------------- drafters


class Static(NamedTuple):
    """LayerSkip: every row drafts ``k`` tokens from exit ``draft_exit`` every round (the offline-swept (E, k)).
    Drafts run the static truncated model (``draft_step``)."""
    draft_exit: int
    k: int

    shadow_exits = ()
    stops_early = False

    @property
    def plans(self) -> tuple[Plan, ...]:
        return (Plan(self.draft_exit, self.k),)

    @property
    def lengths(self) -> tuple[int, ...]:
        return (self.k,)

    def check(self, model: DecoderLM) -> None:
        _exit_index(model.cfg, self.draft_exit)

    def init(self, model, prompt_BxP, lengths_B, cache_len):
        return jnp.zeros(prompt_BxP.shape[:1], jnp.int32)

    def plan(self, model, state, live_B):
        layers = model.cfg.exit_layers[self.draft_exit] + 1
        return Choice(jnp.int32(0), state + self.k, state + layers), state

    def step(self, model, plan: Plan, j, tok_B, target, state):
        logits, target = draft_step(model, tok_B, target, plan.exit)
        return logits, target, state

    def keep(self, plan, j, logits_BxV, state):
        return None, state

    def observe(self, state, v: Verified):
        return state


class DynamicState(NamedTuple):
    alpha_BxC: jax.Array              # running per-token acceptance estimate of each candidate exit, per row
    exit_B: jax.Array | None = None   # the exit each row drafts from this round


class Dynamic(NamedTuple):
    """DEL: per row, the (exit, length) maximising tokens per loaded layer under running acceptance estimates."""
    candidates: tuple[int, ...]     # candidate draft exits (indices into the model's exits)
    layers_C: tuple[int, ...]       # layers each candidate runs (its exit layer + 1)
    num_layers: int                 # L
    max_k: int
    decay: float = 0.9              # per verified token: alpha <- decay * alpha + (1 - decay) * hit
    alpha0: tuple[float, ...] | float = 0.5
    verify_per_token: float = 0.0   # verify cost L (1 + this x d): 0 = the paper's memory-bound GPU model

    stops_early = False

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(range(1, self.max_k + 1))

    @property
    def shadow_exits(self) -> tuple[int, ...]:
        return tuple(self.candidates)

    @property
    def plans(self) -> tuple[Plan, ...]:
        """One plan per (deepest candidate of the round, longest length of the round)."""
        return tuple(Plan(c, d) for c in self.candidates for d in range(1, self.max_k + 1))

    def check(self, model: DecoderLM) -> None:
        if model.cfg.depth != self.num_layers or any(
                model.cfg.exit_layers[c] + 1 != l for c, l in zip(self.candidates, self.layers_C)):
            raise ValueError(f"drafter built for a {self.num_layers}-layer model with candidate exits "
                             f"{self.candidates}; this model has {model.cfg.depth} layers, exits after "
                             f"{list(model.cfg.exit_layers)}")

    def init(self, model, prompt_BxP, lengths_B, cache_len):
        zero_B = jnp.zeros(prompt_BxP.shape[:1], jnp.int32)
        a_C = jnp.broadcast_to(jnp.asarray(self.alpha0, jnp.float32), (len(self.candidates),))
        return DynamicState(zero_B[:, None].astype(jnp.float32) + a_C[None], zero_B + self.candidates[0])

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
        """DEL's rule: per row, the (exit, length) of the best TPL. Returns ``(exit_B, d_B)``."""
        tpl = self.tpl_BxCxK(state.alpha_BxC)
        best_B = jnp.argmax(tpl.reshape(tpl.shape[0], -1), -1)
        c_B, d_B = best_B // self.max_k, best_B % self.max_k + 1
        return jnp.asarray(self.candidates, jnp.int32)[c_B], d_B.astype(jnp.int32)

    def update(self, state: DynamicState, shadow_BxCxK1, g_BxK1, n_B, live_B) -> DynamicState:
        """DEL's acceptance update. Positions 0..n of the verify pass had a verified prefix: what each candidate
        would have drafted there is compared with the full model's token there (the shadow tokens)."""
        k1 = g_BxK1.shape[1]
        valid_BxK1 = jnp.arange(k1)[None] <= n_B[:, None]
        hits_BxC = jnp.sum((shadow_BxCxK1 == g_BxK1[:, None]) & valid_BxK1[:, None], -1).astype(jnp.float32)
        m_B = (n_B + 1).astype(jnp.float32)
        keep_B = self.decay ** m_B
        alpha = state.alpha_BxC * keep_B[:, None] + (1 - keep_B[:, None]) * hits_BxC / m_B[:, None]
        return state._replace(alpha_BxC=jnp.where(live_B[:, None], alpha, state.alpha_BxC))

    def plan(self, model, state: DynamicState, live_B):
        exit_B, d_B = self.choose(state)
        cands_C = jnp.asarray(self.candidates, jnp.int32)
        c_B = jnp.argmax(cands_C[None, :] == exit_B[:, None], -1)             # candidate index per row
        layers_B = jnp.asarray(self.layers_C, jnp.int32)[c_B]
        deepest = c_B[jnp.argmax(jnp.where(live_B, layers_B, -1))]            # the deepest live row's candidate
        d_max = jnp.max(jnp.where(live_B, d_B, 1))
        return (Choice(deepest * self.max_k + d_max - 1, d_B, layers_B),
                state._replace(exit_B=jnp.where(live_B, exit_B, cands_C[deepest])))

    def step(self, model, plan: Plan, j, tok_B, target, state: DynamicState):
        if tok_B.shape[0] == 1:   # the row's own exit is the plan's: the static truncated model
            logits, target = draft_step(model, tok_B, target, plan.exit)
        else:
            logits, target = rows_draft_step(model, tok_B, target, state.exit_B, plan.exit)
        return logits, target, state

    def keep(self, plan, j, logits_BxV, state):
        return None, state

    def observe(self, state: DynamicState, v: Verified) -> DynamicState:
        return self.update(state, v.shadow_BxCxK1, v.g_BxK1, v.accepted_B, v.live_B)


def static(draft_exit: int, k: int) -> Static:
    """LayerSkip's drafter: ``k`` tokens per round from early exit ``draft_exit``."""
    if isinstance(draft_exit, bool) or not isinstance(draft_exit, (int, np.integer)) or draft_exit < 0:
        raise ValueError(f"draft_exit={draft_exit!r} must be an int naming an early exit (>= 0)")
    return Static(int(draft_exit), _positive_int(k, "k"))


def dynamic(model_or_cfg, candidates: Sequence[int], max_k: int, *, decay: float = 0.9, alpha0=0.5,
            verify_per_token: float = 0.0) -> Dynamic:
    """DEL over the model's early exits ``candidates`` (indices), lengths ``1..max_k``."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    cands = tuple(int(c) for c in candidates)
    if not cands or any(not 0 <= c < cfg.num_exits - 1 for c in cands) or len(set(cands)) != len(cands):
        raise ValueError(f"candidates {cands} must be distinct early exits in [0, {cfg.num_exits - 1})")
    max_k = _positive_int(max_k, "max_k")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay!r} must lie in [0, 1)")
    a0 = np.asarray(alpha0, np.float64)
    if a0.shape not in ((), (len(cands),)) or not ((a0 >= 0) & (a0 <= 1)).all():
        raise ValueError(f"alpha0={alpha0!r} must be one acceptance estimate in [0, 1] or one per candidate")
    if not verify_per_token >= 0.0:
        raise ValueError(f"verify_per_token={verify_per_token!r} must be >= 0")
    a0 = float(alpha0) if np.isscalar(alpha0) else tuple(float(a) for a in alpha0)
    return Dynamic(cands, tuple(cfg.exit_layers[c] + 1 for c in cands), cfg.depth, max_k, float(decay), a0,
                   float(verify_per_token))


# ------------------------------------------------------------------------------------------------- verify


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


# ------------------------------------------------------------------------------------------------- the loop


class _Draft(NamedTuple):
    """Carry of one round's drafting."""
    tok_B: jax.Array          # the newest draft token (the input of the next draft step)
    target: kv_lib.DecodeState
    dstate: Any               # the drafter's state
    d_BxK: jax.Array          # draft tokens so far
    drafted_B: jax.Array      # drafts each row proposed so far
    still_B: jax.Array        # rows still drafting
    steps: jax.Array          # int32[]: draft forwards the batch ran


class _Round(NamedTuple):
    """Carry of the round loop."""
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
    draft_steps: jax.Array
    verify_tokens: jax.Array
    batch_rounds: jax.Array
    dstate: Any


def _draft_plan(model, drafter, plan: Plan, c: _Draft, cap_B) -> _Draft:
    """Draft up to ``plan.length`` tokens per row. Without a keep rule: a loop with a known trip count. With one:
    one ``lax.cond`` after each step on "is any row still drafting?", nested, so the steps after the batch stopped
    are neither run nor decided."""

    def one(j, c: _Draft) -> _Draft:
        logits, target, dstate = drafter.step(model, plan, j, c.tok_B, c.target, c.dstate)
        tok_B = jnp.argmax(logits, -1).astype(jnp.int32)
        keep_B, dstate = drafter.keep(plan, j, logits, dstate)
        still_B = c.still_B & (j + 1 < cap_B)
        if keep_B is not None:
            still_B = still_B & keep_B
        return _Draft(tok_B, target, dstate, c.d_BxK.at[:, j].set(tok_B), c.drafted_B + c.still_B.astype(jnp.int32),
                      still_B, c.steps + 1)

    if not drafter.stops_early:
        return jax.lax.fori_loop(0, plan.length, one, c)

    target = c.target       # read only: not carried through the conditionals

    def from_step(j, c: _Draft) -> _Draft:
        new = one(j, c._replace(target=target))
        if new.target is not target:
            raise ValueError(f"{type(drafter).__name__} has a keep rule but wrote the target state in step(): a "
                             "drafter that stops early drafts on its own state only")
        new = new._replace(target=None)
        if j + 1 == plan.length:
            return new
        return jax.lax.cond(jnp.any(new.still_B), functools.partial(from_step, j + 1), lambda c: c, new)

    return from_step(0, c._replace(target=None))._replace(target=target)


def self_speculative(model: DecoderLM, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int, *,
                     draft_exit: int | None = None, k: int | None = None, drafter=None) -> SpecOutputs:
    """Greedy speculative decoding of ``num_new`` tokens per row: drafts of ``k`` tokens from exit ``draft_exit``
    (an index into the model's exits, not the last), or as ``drafter`` decides per row and round (``static``,
    ``dynamic``, ``kangaroo.drafter``)."""
    if drafter is None:
        if draft_exit is None or k is None:
            raise ValueError("give draft_exit and k, or a drafter")
        drafter = static(draft_exit, k)
    elif draft_exit is not None or k is not None:
        raise ValueError("give draft_exit and k, or a drafter, not both")
    num_new = _positive_int(num_new, "num_new")
    drafter.check(model)
    kv_lib.check_prompts(prompt_BxP, lengths_B, model.cfg.vocab_size)
    lengths = tuple(sorted(set(int(t) for t in drafter.lengths)))
    kmax = max(lengths)
    if kmax > num_new:
        raise ValueError(f"the drafter drafts up to {kmax} tokens a round (its k / max_k / gamma) but num_new="
                         f"{num_new}: a round emits at most num_new tokens, so a longer draft only grows the cache "
                         "and the compiled program; draft at most num_new")
    b, p = prompt_BxP.shape
    cache_len = p + num_new + kmax + 1
    logits, state = kv_lib.prefill(model, prompt_BxP, lengths_B, cache_len)
    first_B = jnp.argmax(logits, -1).astype(jnp.int32)
    zero_B = jnp.zeros((b,), jnp.int32)
    rows_Bx1 = jnp.arange(b)[:, None]
    shadow_exits = tuple(drafter.shadow_exits)
    plans = tuple(drafter.plans)

    def verify_len(t):
        def branch(tokens_BxK1, st):
            g, sh, st = verify(model, tokens_BxK1[:, :t + 1], st, shadow_exits)
            pad = kmax - t
            return (jnp.pad(g, ((0, 0), (0, pad)), constant_values=-1),
                    jnp.pad(sh, ((0, 0), (0, 0), (0, pad)), constant_values=-1), st)
        return branch

    verifies = [verify_len(t) for t in lengths]
    drafts = [functools.partial(_draft_plan, model, drafter, pl) for pl in plans]

    def body(cr: _Round) -> _Round:
        live_B = cr.count_B < num_new
        choice, dstate = drafter.plan(model, cr.dstate, live_B)
        start = _Draft(cr.last_B, cr.state, dstate, jnp.zeros((b, kmax), jnp.int32), zero_B, live_B, jnp.int32(0))
        dr = (drafts[0](start, choice.cap_B) if len(drafts) == 1
              else jax.lax.switch(choice.plan, drafts, start, choice.cap_B))
        # Verify the last emitted token and the drafts through the full model, from the accepted position (the
        # draft's own cache writes past it are rewritten), in one extend of the smallest allowed length >= steps + 1.
        tokens_BxK1 = jnp.concatenate([cr.last_B[:, None], dr.d_BxK], 1)
        from_B = kv_lib.rollback(dr.target, cr.state.pos_B)
        g_BxK1, shadow, verified = (verifies[0](tokens_BxK1, from_B) if len(verifies) == 1 else jax.lax.switch(
            jnp.searchsorted(jnp.asarray(lengths, jnp.int32), dr.steps), verifies, tokens_BxK1, from_B))
        # Accept the longest prefix of each row's own drafts equal to the full model's tokens.
        ok_BxK = (dr.d_BxK == g_BxK1[:, :kmax]) & (jnp.arange(kmax)[None, :] < dr.drafted_B[:, None])
        n_B = jnp.sum(jnp.cumprod(ok_BxK.astype(jnp.int32), axis=1), axis=1)
        # Emit d_1..d_n and the full model's g_n; the verify pass wrote the cache of every verified position.
        j_K1 = jnp.arange(kmax + 1)[None, :]
        bonus_B = jnp.take_along_axis(g_BxK1, n_B[:, None], axis=1)[:, 0]
        emit_BxK1 = jnp.where(j_K1 < n_B[:, None], jnp.pad(dr.d_BxK, ((0, 0), (0, 1))), bonus_B[:, None])
        dest = jnp.where((j_K1 <= n_B[:, None]) & live_B[:, None], cr.count_B[:, None] + j_K1, num_new)
        new_pos = jnp.where(live_B, cr.state.pos_B + n_B + 1, cr.state.pos_B)
        live = live_B.astype(jnp.int32)
        trace_at = jnp.where(live_B, cr.rounds_B, num_new)[:, None]
        seen = Verified(dr.d_BxK, g_BxK1, shadow, n_B, dr.drafted_B, cr.last_B, live_B)
        return _Round(
            state=kv_lib.rollback(verified, new_pos), last_B=jnp.where(live_B, bonus_B, cr.last_B),
            out_BxG=cr.out_BxG.at[rows_Bx1, dest].set(emit_BxK1, mode="drop"),
            count_B=jnp.minimum(cr.count_B + live * (n_B + 1), num_new), rounds_B=cr.rounds_B + live,
            drafted_B=cr.drafted_B + live * dr.drafted_B, accepted_B=cr.accepted_B + live * n_B,
            draft_layers_B=cr.draft_layers_B + live * dr.drafted_B * choice.layers_B,
            exit_trace_BxG=cr.exit_trace_BxG.at[rows_Bx1, trace_at].set(choice.layers_B[:, None], mode="drop"),
            k_trace_BxG=cr.k_trace_BxG.at[rows_Bx1, trace_at].set(dr.drafted_B[:, None], mode="drop"),
            draft_steps=cr.draft_steps + dr.steps, verify_tokens=cr.verify_tokens + dr.steps + 1,
            batch_rounds=cr.batch_rounds + 1, dstate=drafter.observe(dr.dstate, seen))

    init = _Round(state, first_B, jnp.zeros((b, num_new), jnp.int32).at[:, 0].set(first_B), zero_B + 1, zero_B,
                  zero_B, zero_B, zero_B, jnp.full((b, num_new), -1, jnp.int32), jnp.zeros((b, num_new), jnp.int32),
                  jnp.int32(0), jnp.int32(0), jnp.int32(0),
                  drafter.init(model, prompt_BxP, jnp.asarray(lengths_B, jnp.int32), cache_len))
    f = jax.lax.while_loop(lambda cr: jnp.any(cr.count_B < num_new), body, init)
    return SpecOutputs(f.out_BxG, f.rounds_B, f.drafted_B, f.accepted_B, f.draft_layers_B, f.exit_trace_BxG,
                       f.k_trace_BxG, f.draft_steps, f.verify_tokens, f.batch_rounds, f.dstate)


__all__ = ["SpecOutputs", "Plan", "Choice", "Verified", "Static", "Dynamic", "DynamicState", "static",
           "dynamic", "draft_step", "rows_draft_step", "masked_draft_step", "verify", "self_speculative"]
