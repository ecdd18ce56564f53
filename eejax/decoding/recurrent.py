"""Early-exit decoding with a per-row recurrent state on the engine: a Mamba LM (each layer's conv window and SSM
state, no KV cache), and stateful exit classifiers (DYNAMAX's linear / MLP / Mamba-block gates,
``eejax.models.exit_classifier``) on that Mamba LM or on the KV-cached transformer LM.

Every forward (prefill of P tokens, a decode step of one token) is ONE ``engine.run`` over the model's stacked
layers, with ``StepAux(base, gates, valid_BxT)`` as the carried auxiliary state: ``base`` is the Mamba LM's
per-layer ``SSMState`` (leading axis N) or the transformer's ``kv.DecodeAux``; ``gates`` the exit classifiers' states
(leading axis E - 1; None for stateless classifiers). The engine's hidden state is ``Gated(h_BxTxD, gate_B)``: the
backbone's, and the logit of the exit classifier of the last exit passed (the ``learned`` confidence measure reads
it through the head's ``gate_B``). A Mamba layer runs its parallel scan when T > 1 (prefill) and the one-token
recurrence when T = 1 (decode); each exit classifier runs right after its exit's layer, on that layer's output.

**State of the layers a row skipped** (``mode``; DYNAMAX, arXiv:2504.20922, updates them "by a partial forward"
or leaves them unchanged [2nd]). After a row exits at layer k, the layers above k (and the classifiers of the exits
above k) still see the token, or not:

* ``"propagate"`` (default): CALM's state propagation (Schuster et al. 2022, arXiv:2207.07061) carried over to
  the recurrent state: every skipped layer advances its state by the token with the row's frozen exit hidden state
  as its input (the "partial forward": the state update without the output), exactly as the KV cache of a skipped
  transformer layer is written from that state. Inside the masked loop this happens by itself (an exited row's
  hidden state is frozen and the state is written for every row); the layers no row reached are filled after the
  loop (``fill_skipped``). It keeps every layer's conv window and state advancing one step per token, so the
  position structure the layer was trained on holds; it costs the state-update part of each skipped layer (for a
  Mamba block: the input projection's x half, conv, x_proj, dt_proj and the update, about 40% of the block at
  expand 2; for a GQA transformer only the K/V projections, about 14%), which cost accounting must charge.
* ``"freeze"``: skipped layers' states stay as they were (the token never happened for them): free, but the
  layer's conv window then joins non-adjacent tokens and its SSM state skips a step. A KV cache has no such
  mode here (the slot would hold stale keys): ``freeze`` is refused for the transformer.
* ``"oracle"``: every row runs every layer (the full model's states), only the output is taken at the exit: the
  comparison baseline, costing full depth.

Why propagate is the default: it is the one rule under which the state every layer holds is a function of the
tokens alone (never of which rows shared a batch or how deep the loop ran), it is what the engine already does for
KV, and the paper names it first. Both are measured (experiments/dynamax.py).

Invariants (tests/test_recurrent.py): a prefill of P tokens then G decode steps equals one full-depth forward of
P + G tokens; a policy that exits every row at exit e equals the static truncated model at that exit; per-row exits
in a batch equal running each row alone (the state of a row never depends on the other rows).

Shapes: B batch, P prompt length, T tokens in a forward, G generated tokens, N layers, E exits, D width, V
vocabulary.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.decoding import kv as kv_lib
from eejax.decoding.per_token import StepStats
from eejax.exits import confidence as conf_lib
from eejax.exits import engine, policies
from eejax.models.mamba_lm import MambaLM

STATE_MODES = ("propagate", "freeze", "oracle")
EXECUTORS = ("unrolled", "masked")


class Gated(NamedTuple):
    """The engine's hidden state: the backbone's and the last exit classifier's gate logit."""
    h_BxTxD: jax.Array
    gate_B: jax.Array


class DecodeState(NamedTuple):
    """Between forwards: the backbone's state and the exit classifiers' (None without stateful classifiers)."""
    base: Any     # MambaLM: SSMState with leading layer axis N; transformer: kv.DecodeState (cache, pos_B)
    gates: Any    # the classifiers' SSMState with leading axis E - 1, or None


class StepAux(NamedTuple):
    """The engine's auxiliary state during a forward."""
    base: Any             # MambaLM: SSMState (N leading); transformer: kv.DecodeAux(cache, pos_BxT)
    gates: Any
    valid_BxT: Any        # real tokens of a right-padded prefill (None: all)


def is_recurrent(model) -> bool:
    """True for the Mamba LM (state per layer), False for the KV-cached transformer."""
    return isinstance(model, MambaLM)


def check_mode(model, mode: str) -> None:
    if mode not in STATE_MODES:
        raise ValueError(f"mode={mode!r}: use one of {STATE_MODES}")
    if mode == "freeze" and not is_recurrent(model):
        raise ValueError("mode='freeze' leaves skipped layers' state unchanged, which a KV cache cannot do (the "
                         "slot would hold stale keys); use 'propagate' or 'oracle' for a transformer")


def _at(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _put(tree, i, new):
    return jax.tree.map(lambda x, n: x.at[i].set(n.astype(x.dtype)), tree, new)


def layer_at(layers: nnx.Module, l) -> nnx.Module:
    """Stored layer ``l`` (a Python or traced int) of stacked layers, ready to call."""
    layer_def, stacked = nnx.split(layers)
    return nnx.merge(layer_def, _at(stacked, l))


# ------------------------------------------------------------------------------------------------ layer functions


def _ssm_base(layer, h_BxTxD, ctx: engine.StepCtx, keep_B):
    """One Mamba layer from its stored state; the state written for ``keep_B`` rows (None: every row)."""
    aux: StepAux = ctx.aux
    st = _at(aux.base, ctx.layer)
    if h_BxTxD.shape[1] == 1:
        new_h, new_st = layer.step(h_BxTxD[:, 0], st)
        new_h = new_h[:, None]
    else:
        new_h, new_st = layer(h_BxTxD, st, aux.valid_BxT)
    if keep_B is not None:
        new_st = engine.where_rows(keep_B, new_st, st)
    return new_h, _put(aux.base, ctx.layer, new_st)


def _kv_base(layer, h_BxTxD, ctx: engine.StepCtx, keep_B):
    del keep_B   # a KV cache is written for every row (no freeze mode)
    return kv_lib.cache_layer(layer, h_BxTxD, ctx._replace(aux=ctx.aux.base))


def layer_fn(model, classifiers=None, mode: str = "propagate") -> Callable:
    """The engine's layer function: the backbone's layer (its state in ``aux.base``), then, at a layer with an
    early exit, that exit's classifier on the layer's output (its state in ``aux.gates``).

    The classifier runs at every step on the exit index of the step's layer, clipped, and its result is kept only
    at exit layers: one small classifier per layer instead of a ``lax.cond`` (a host round trip on a GPU)."""
    check_mode(model, mode)
    base_fn = _ssm_base if is_recurrent(model) else _kv_base
    cfg = model.cfg
    exit_of_layer_N = jnp.asarray(cfg.exit_of_layer)
    num_clf = cfg.num_exits - 1

    def fn(layer, h: Gated, ctx: engine.StepCtx):
        keep_B = ctx.run_B if mode == "freeze" else None
        new_h, base = base_fn(layer, h.h_BxTxD, ctx, keep_B)
        gate_B, gates = h.gate_B, ctx.aux.gates
        if classifiers is not None and num_clf > 0:
            e = exit_of_layer_N[ctx.layer]
            is_clf = (e >= 0) & (e < num_clf)
            e_c = jnp.clip(e, 0, num_clf - 1)
            clf = classifiers.at(e_c)
            st = None if gates is None else _at(gates, e_c)
            # The classifier reads the exit's hidden state: for a row that already left, its frozen state (what
            # the engine keeps for it), as fill_skipped does after the loop.
            x = new_h if ctx.run_B is None else engine.where_rows(ctx.run_B, new_h, h.h_BxTxD)
            if x.shape[1] == 1:
                g_B, new_st = clf.step(x[:, 0], st)
            else:
                g_BxT, new_st = clf(x, st, ctx.aux.valid_BxT)
                g_B = _last_real(g_BxT, ctx.aux.valid_BxT)
            gate_B = jnp.where(is_clf, g_B.astype(gate_B.dtype), gate_B)
            if gates is not None:
                write_B = is_clf & (jnp.ones_like(gate_B, bool) if keep_B is None else keep_B)
                gates = _put(gates, e_c, engine.where_rows(write_B, new_st, st))
        return Gated(new_h, gate_B), StepAux(base, gates, ctx.aux.valid_BxT)

    return fn


def _last_real(x_BxT, valid_BxT):
    if valid_BxT is None:
        return x_BxT[:, -1]
    last_B = jnp.sum(valid_BxT.astype(jnp.int32), axis=1) - 1
    return jnp.take_along_axis(x_BxT, jnp.maximum(last_B, 0)[:, None], axis=1)[:, 0]


# ------------------------------------------------------------------------------------------------ heads


def heads(model, *, vocab_at_exits: bool = True) -> list:
    """One engine head per exit, ``Gated -> HeadOut`` at the last of the T positions. ``vocab_at_exits=False``:
    heads give a dummy ``B x 1`` logit (a gate-driven policy needs no vocabulary before its exit; the step projects
    the vocabulary once, at the exit taken: ``taken_logits``)."""

    def make(e):
        def head(h: Gated):
            x_BxD = h.h_BxTxD[:, -1]
            logits = model.exit_logits(x_BxD, e) if vocab_at_exits else jnp.zeros((x_BxD.shape[0], 1), jnp.float32)
            return engine.HeadOut(logits_BxC=logits, feat_BxD=x_BxD, hidden_BxD=x_BxD, gate_B=h.gate_B)
        return head

    return [make(e) for e in range(model.cfg.num_exits)]


def taken_logits(model, h_BxD: jax.Array, exit_B: jax.Array) -> jax.Array:
    """Each row's logits at its own exit (traced ``exit_B``), the vocabulary projected once when the model can
    (``taken_logits``); otherwise every exit's logits, each row keeping its own."""
    if hasattr(model, "taken_logits"):
        return model.taken_logits(h_BxD, exit_B)
    every_ExBxV = jnp.stack([model.exit_logits(h_BxD, e) for e in range(model.cfg.num_exits)])
    return engine.take_exit(every_ExBxV, exit_B)


# ------------------------------------------------------------------------------------------------ forwards


def empty_state(model, batch: int, cache_len: int, classifiers=None) -> DecodeState:
    """The state before the first token (``cache_len``: KV slots per row; unused by the Mamba LM)."""
    base = model.empty_state(batch) if is_recurrent(model) else kv_lib.empty_state(model, batch, cache_len)
    return DecodeState(base, None if classifiers is None else classifiers.empty_state(batch))


def forward(model, tokens_BxT: jax.Array, state: DecodeState, program: engine.Program, heads_, policy=None,
            executor=engine.Masked(), *, classifiers=None, mode: str = "propagate",
            valid_BxT: jax.Array | None = None) -> tuple[engine.DynamicOutputs, DecodeState]:
    """T new tokens per row through ``program`` on the engine, the recurrent (or KV) and classifier states as
    carried state; returns the engine's outputs and the state advanced by T (by each row's real tokens under
    ``valid_BxT``, a prefix per row)."""
    if tokens_BxT.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got {tokens_BxT.dtype}")
    b, t = tokens_BxT.shape
    if is_recurrent(model):
        base_aux = state.base
    else:
        pos_BxT = state.base.pos_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        base_aux = kv_lib.DecodeAux(state.base.cache, pos_BxT)
    h0 = Gated(model.embed_tokens(tokens_BxT), jnp.zeros((b,), jnp.float32))
    out = engine.run(model.layers, heads_, h0, program, policy, executor,
                     layer_fn=layer_fn(model, classifiers, mode), aux=StepAux(base_aux, state.gates, valid_BxT))
    if is_recurrent(model):
        base = out.aux.base
    else:
        adv_B = t if valid_BxT is None else jnp.sum(valid_BxT.astype(jnp.int32), axis=1)
        base = kv_lib.DecodeState(out.aux.base.cache, state.base.pos_B + adv_B)
    return out, DecodeState(base, out.aux.gates)


def _fill(model, base, gates, h_BxD: jax.Array, first_layer, classifiers=None):
    """State propagation of layers ``first_layer .. N-1`` (and of the classifiers of the exits after them) from
    each row's frozen hidden state ``h_BxD``: ``base`` is the Mamba LM's per-layer ``SSMState`` or, for the
    transformer, ``kv.DecodeAux(cache, pos_Bx1)`` at the token's position. A Python-int ``first_layer`` gives loops
    with a known trip count (no host round trip); a traced one, loops with traced bounds."""
    cfg = model.cfg
    n = cfg.depth
    if is_recurrent(model):
        def body(l, states):
            _, st = layer_at(model.layers, l).step(h_BxD, _at(states, l))
            return _put(states, l, st)
    else:
        def body(l, aux):
            ctx = engine.StepCtx(l, l, jnp.int32(0), None, aux)
            return kv_lib.cache_layer(layer_at(model.layers, l), h_BxD[:, None], ctx)[1]
    base = jax.lax.fori_loop(first_layer, n, body, base)
    if classifiers is not None and gates is not None:
        exit_layers = cfg.exit_layers[:-1]
        if isinstance(first_layer, (int, np.integer)):
            first_exit = int(np.sum(np.asarray(exit_layers) < first_layer))
        else:
            first_exit = jnp.sum((jnp.asarray(exit_layers, jnp.int32) < first_layer).astype(jnp.int32))

        def gbody(e, gates):
            _, st = classifiers.at(e).step(h_BxD, _at(gates, e))
            return _put(gates, e, st)
        gates = jax.lax.fori_loop(first_exit, cfg.num_exits - 1, gbody, gates)
    return base, gates


def fill_skipped(model, state: DecodeState, h_BxD: jax.Array, first_layer, classifiers=None) -> DecodeState:
    """State propagation for the layers ``first_layer .. N-1`` that no row ran this step (traced
    ``first_layer``): each advances its state by the token with ``h`` (each row's frozen exit hidden state) as its
    input; so do the classifiers of the exits after those layers. The layers' outputs are discarded (XLA drops
    them: only the state update is computed)."""
    if is_recurrent(model):
        base, gates = _fill(model, state.base, state.gates, h_BxD, first_layer, classifiers)
        return DecodeState(base, gates)
    pos_Bx1 = state.base.pos_B[:, None] - 1   # the token just run (forward advanced pos)
    aux, gates = _fill(model, kv_lib.DecodeAux(state.base.cache, pos_Bx1), state.gates, h_BxD, first_layer,
                       classifiers)
    return DecodeState(state.base._replace(cache=aux.cache), gates)


def unrolled(model, mode: str, classifiers=None) -> kv_lib.Unrolled:
    """The decode executor of ``exit_step``: ``kv.Unrolled`` (each exit segment traced once, one ``lax.cond`` per
    exit decision, so at most one host round trip per decision point on a GPU). Under ``propagate`` its stop branch
    fills the state of the layers not run from each row's frozen hidden state, over a static layer range (the
    masked executor's ``fill_skipped`` after the loop, without a traced loop bound); ``freeze`` fills nothing;
    ``oracle`` runs every layer for every row (no decision stops the batch)."""
    if mode == "oracle":
        return kv_lib.Unrolled(keep_running=True)
    if mode == "freeze":
        return kv_lib.Unrolled()
    n = model.cfg.depth

    def on_stop(layers_S, h: Gated, aux: StepAux) -> StepAux:
        first = int(layers_S[0])
        if not np.array_equal(np.asarray(layers_S), np.arange(first, n)):
            raise ValueError(f"state propagation fills a suffix of the layers, got {list(layers_S)}")
        base, gates = _fill(model, aux.base, aux.gates, h.h_BxTxD[:, -1], first, classifiers)
        return StepAux(base, gates, aux.valid_BxT)

    return kv_lib.Unrolled(on_stop=on_stop)


def prefill(model, tokens_BxP: jax.Array, lengths_B: jax.Array, cache_len: int, *, classifiers=None
            ) -> tuple[jax.Array, DecodeState]:
    """Full-depth forward of right-padded prompts (each row's real tokens first); returns each row's final-exit
    logits at its last real token and the state after it."""
    b, p = tokens_BxP.shape
    if not is_recurrent(model) and cache_len < p:
        raise ValueError(f"{cache_len=} shorter than the prompt length {p}")
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    valid_BxP = jnp.arange(p)[None, :] < lengths_B[:, None]
    state = empty_state(model, b, cache_len, classifiers)
    n = model.cfg.depth
    out, state = forward(model, tokens_BxP, state, engine.prefix(n, [n - 1]), heads(model)[-1:], None,
                         classifiers=classifiers, valid_BxT=valid_BxP)
    last_BxD = jnp.take_along_axis(out.h.h_BxTxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    if not is_recurrent(model):
        state = state._replace(base=state.base._replace(pos_B=lengths_B))
    return model.exit_logits(last_BxD, model.cfg.num_exits - 1), state


def exit_step(model, tok_B: jax.Array, state: DecodeState, i, threshold, *,
              measure: conf_lib.Measure = conf_lib.max_softmax, mode: str = "propagate", classifiers=None,
              tau: float = 0.0, horizon: int = 1, executor: str = "unrolled"
              ) -> tuple[jax.Array, StepStats, DecodeState]:
    """One token per row with per-row early exit: the prefix program over the model's exits x a (CALM-decayed)
    threshold policy on ``measure`` x the ``unrolled`` executor (at most one host stop per decision point;
    ``executor="masked"``: ``engine.Masked``, the while loop over exits and a traced fill loop after it, kept as
    the comparison variant; both give the same tokens and states, tested).

    With ``measure=confidence.learned`` the classifiers' gates decide and the vocabulary is projected once per
    row, at its exit; with a softmax measure every exit passed projects it. ``threshold``: scalar or ``float[E]``;
    a row leaves at exit e when ``score >= threshold[e]``; the last exit takes every row still running."""
    check_mode(model, mode)
    cfg = model.cfg
    gate_driven = measure is conf_lib.learned
    if gate_driven and classifiers is None:
        raise ValueError("measure=learned reads the exit classifiers' gates: pass classifiers=")
    policy = policies.threshold(measure, policies.calm_threshold(threshold, i, tau, horizon), cfg.num_exits)
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}: use one of {EXECUTORS}")
    ex = (unrolled(model, mode, classifiers) if executor == "unrolled"
          else engine.Masked(keep_running=mode == "oracle"))
    out, new_state = forward(model, tok_B[:, None], state, engine.prefix(cfg.depth, cfg.exit_layers),
                             heads(model, vocab_at_exits=not gate_driven), policy, ex, classifiers=classifiers,
                             mode=mode)
    if mode == "propagate" and executor == "masked":   # the layers the loop never reached (a traced count)
        new_state = fill_skipped(model, new_state, out.h.h_BxTxD[:, -1], out.layers_run, classifiers)
    hidden_BxD = out.out.hidden_BxD
    logits = taken_logits(model, hidden_BxD, out.exit_B) if gate_driven else out.logits_BxC
    stats = StepStats(out.exit_layer_B, out.exit_layer_B + 1, out.score_B, out.layers_run, hidden_BxD)
    return logits, stats, new_state


def full_step(model, tok_B: jax.Array, state: DecodeState, i, *, classifiers=None
              ) -> tuple[jax.Array, StepStats, DecodeState]:
    """Plain full-depth decoding of one token per row (classifier states, if any, advanced too)."""
    del i
    n = model.cfg.depth
    out, new_state = forward(model, tok_B[:, None], state, engine.prefix(n, [n - 1]), heads(model)[-1:], None,
                             classifiers=classifiers)
    b = tok_B.shape[0]
    stats = StepStats(jnp.full((b,), n - 1, jnp.int32), jnp.full((b,), n, jnp.int32), jnp.zeros((b,), jnp.float32),
                      jnp.int32(n), out.out.hidden_BxD)
    return out.logits_BxC, stats, new_state


# ------------------------------------------------------------------------------------------------ generation


class Decoded(NamedTuple):
    tokens_BxG: jax.Array        # generated (or forced) tokens
    logprob_BxG: jax.Array       # log-prob of each token under the logits that produced it
    argmax_BxG: jax.Array        # argmax of those logits (the greedy choice, also under teacher forcing)
    exit_layer_BxG: jax.Array    # exit layer of the step that produced token g's logits (prefill: N - 1)
    score_BxG: jax.Array         # the policy's score at that exit (prefill: 0)
    layers_run_G: jax.Array      # layers the batch loop ran for token g (the deepest row; prefill: N)


StepFn = Callable[[Any, jax.Array, DecodeState, jax.Array], tuple[jax.Array, StepStats, DecodeState]]


def generate(model, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int, step_fn: StepFn, *,
             classifiers=None, force_BxG: jax.Array | None = None) -> Decoded:
    """Greedy decoding: prefill (full depth), then ``num_new`` tokens, token 0 from the prefill logits and token
    g > 0 from ``step_fn`` on token g - 1. ``force_BxG`` feeds the given tokens instead (teacher forcing through
    the real decode path: the log-probs give a validation loss with exactly the decode's state semantics)."""
    if np.ndim(prompt_BxP) != 2 or not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"prompt_BxP of shape {np.shape(prompt_BxP)} must be B x P and {num_new=} >= 1")
    checks.token_ids(prompt_BxP, model.cfg.vocab_size, name="prompt_BxP")
    if force_BxG is not None:
        checks.token_ids(force_BxG, model.cfg.vocab_size, name="force_BxG")
    b, p = prompt_BxP.shape
    logits, state = prefill(model, prompt_BxP, lengths_B, p + num_new, classifiers=classifiers)
    n = model.cfg.depth

    def body(carry, xs):
        logits_BxV, state, exit_B, score_B, run = carry
        i, forced_B = xs
        pred_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        tok_B = pred_B if force_BxG is None else forced_B
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32), -1), tok_B[:, None],
                                     axis=-1)[:, 0]
        new_logits, stats, state = step_fn(model, tok_B, state, i)
        return ((new_logits, state, stats.exit_layer_B, stats.score_B, stats.layers_run),
                (tok_B, logp_B, pred_B, exit_B, score_B, run))

    forced = jnp.zeros((num_new, b), jnp.int32) if force_BxG is None else jnp.asarray(force_BxG, jnp.int32).T
    init = (logits, state, jnp.full((b,), n - 1, jnp.int32), jnp.zeros((b,), jnp.float32), jnp.int32(n))
    _, (tok, logp, pred, exit_l, score, run) = jax.lax.scan(body, init, (jnp.arange(num_new), forced))
    return Decoded(tok.T, logp.T, pred.T, exit_l.T, score.T, run)


__all__ = ["STATE_MODES", "EXECUTORS", "Gated", "DecodeState", "StepAux", "is_recurrent", "check_mode",
           "layer_at", "layer_fn", "heads", "taken_logits", "empty_state", "forward", "fill_skipped", "unrolled",
           "prefill", "exit_step", "full_step", "Decoded", "generate"]
