"""Per-token early exit in batched, KV-cached decoding, and THE generation loop shared by every decoding policy.

Each generated token is one ``engine.run``: the prefix program x a threshold policy x the ``kv.Unrolled`` executor,
with the KV cache as the carried state (``kv.forward``). Every row has its own active mask; at each exit its
confidence (any ``eejax.exits.confidence`` measure, read through a ``HeadOut``) is compared with the threshold,
optionally decayed with the token's index as in CALM (Schuster et al. 2022, arXiv:2207.07061, Eq. 5:
``clip(0.9 * lambda + 0.1 * exp(-tau * i / horizon), 0, 1)``). The step stops when every row has exited: one
``lax.cond`` per exit decision, so at most one host round trip per decision point on a GPU.

What an exit decision reads (``heads=``):

* ``"every"``: the vocabulary logits at every exit (softmax response, entropy, margin): a ``D x V`` projection per
  exit reached, which costs ~3.5 decode layers at GPT-2-small shape and ~7-8 of SmolLM2's 30 (issue 20 cause 4),
  so it cannot pay as a decision rule on a GPU; kept as the reference variant.
* ``"taken"``: a cheap gate on the hidden state: CALM's hidden-state saturation (``confidence.cosine`` of
  consecutive exits' states) or CALM's learned classifier (``confidence.learned`` on ``lm.classifier_gate``: a dot
  product over D); the vocabulary is projected once, at the exit each row took (``DecoderLM.taken_logits``).
* ``"auto"`` (default): ``"taken"`` for the hidden-state measures, ``"every"`` for the others.

``forced_step`` (every row leaves at one static exit) runs the truncated program with that exit's head only: no
decision, no host round trip.

KV of the layers a row skipped (``kv=``):

* ``"propagate"`` (CALM's state propagation): from the hidden state at the layer where *that row* exited. Inside the
  step an exited row's state is frozen by the masked update, so writing every row's K/V at every layer already
  propagates it; the layers no row reached get their K/V from the same frozen states in one batched computation
  (``kv.propagate``, in the branch where the batch stops). (CALM's public t5x code copies the state of the first
  segment instead; we do not.)
* ``"oracle"``: every row keeps running the remaining layers for real K/V (the full model's cache); only the output
  is taken at the exit. It costs full depth and is the comparison baseline.

``decode`` is the one generation loop (a ``lax.scan`` with a named carry) from a prefilled state; ``generate`` is
full-depth prefill + ``decode``. Every decoder of this package (SkipDecode, ULS / FiRST, FFN-SkipLLM, LAC) is a
step function of it.

Shapes: B batch, P prompt length, G generated tokens, V vocabulary, D width, N layers, E exits.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.decoding import kv as kv_lib
from eejax.exits import confidence as conf_lib
from eejax.exits import engine, policies
from eejax.models.lm import DecoderLM

KV_MODES = ("propagate", "oracle")
HEADS = ("auto", "every", "taken")
EXECUTORS = ("unrolled", "masked")   # kv.Unrolled (one cond per decision) | engine.Masked (the while loop)
HIDDEN_MEASURES = (conf_lib.cosine, conf_lib.learned)   # measures that read no vocabulary logits
# The range of each measure's score: a finite threshold outside it can never fire (or always fires) and is refused.
MEASURE_RANGES = {conf_lib.max_softmax: (0.0, 1.0), conf_lib.margin: (0.0, 1.0), conf_lib.learned: (0.0, 1.0),
                  conf_lib.neg_entropy: (None, 0.0), conf_lib.cosine: (-1.0, 1.0), conf_lib.patience: (0.0, None)}


class StepStats(NamedTuple):
    exit_layer_B: jax.Array   # 0-based layer whose exit produced the row's logits
    layers_B: jax.Array       # layers this row's token ran (exit depth; a SkipDecode budget; N at full depth)
    score_B: jax.Array        # confidence at that exit
    layers_run: jax.Array     # layers the batch loop executed (the deepest row), int32[]
    h_BxD: jax.Array          # the row's hidden state at its exit


def full_depth_stats(cfg, skipped_NxB: jax.Array) -> StepStats:
    """Stats of a step whose every row runs to the last layer and reads the final head, with ``layers_B`` = the
    layers (or sublayers) the row did not skip (``skipped_NxB``: bool per layer and row; FFN-skip, LAC)."""
    n, b = skipped_NxB.shape
    return StepStats(jnp.full((b,), n - 1, jnp.int32), n - jnp.sum(skipped_NxB, axis=0).astype(jnp.int32),
                     jnp.zeros((b,), jnp.float32), jnp.int32(n), jnp.zeros((b, cfg.d_model), jnp.float32))


decayed_threshold = policies.calm_threshold


def static_thresholds(num_exits: int, exit_index: int) -> jax.Array:
    """Per-exit thresholds that make every row leave at exit ``exit_index`` (the static truncated model)."""
    return jnp.full((num_exits,), jnp.inf).at[exit_index].set(-jnp.inf)


def check_threshold(threshold, measure, num_exits: int) -> None:
    """A scalar or one value per exit, no NaN, and finite values inside the measure's range (negative entropy
    ``<= 0``, cosine in ``[-1, 1]``, probabilities in ``[0, 1]``): a threshold that can never fire is a ValueError
    naming it, as on the ViT path (``policies.thresholds``). ``+-inf`` (never / always exit) stay allowed."""
    lo, hi = MEASURE_RANGES.get(measure, (None, None))
    checks.thresholds(threshold, num_exits, name="threshold", lo=lo, hi=hi)


def exit_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, i, threshold, *,
              measure: conf_lib.Measure | str = conf_lib.max_softmax, kv: str = "propagate", tau: float = 0.0,
              horizon: int = 1, classifier: dict | None = None, heads: str = "auto", executor: str = "unrolled"
              ) -> tuple[jax.Array, StepStats, kv_lib.DecodeState]:
    """One token per row with per-row early exit: the prefix program x a (CALM-decayed) threshold policy x the
    ``kv.Unrolled`` executor (``executor="masked"``: ``engine.Masked``, the while loop over exits, kept as the
    comparison variant). ``threshold``: scalar or ``float[E]``; a row exits at exit e when
    ``score >= threshold[e]``; the last exit takes every row still running. ``heads``: what the decision reads
    (module docstring)."""
    if kv not in KV_MODES:
        raise ValueError(f"kv={kv!r}: use one of {KV_MODES}")
    if heads not in HEADS:
        raise ValueError(f"heads={heads!r}: use one of {HEADS}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}: use one of {EXECUTORS}")
    measure = conf_lib.get_measure(measure) if isinstance(measure, str) else measure
    cfg = model.cfg
    check_threshold(threshold, measure, cfg.num_exits)
    taken = heads == "taken" or (heads == "auto" and measure in HIDDEN_MEASURES)
    if taken and measure not in HIDDEN_MEASURES:
        raise ValueError(f"heads='taken' projects no vocabulary before the exit, but measure {measure.__name__} "
                         "reads vocabulary logits: use confidence.cosine or confidence.learned, or heads='every'")
    policy = policies.threshold(measure, decayed_threshold(threshold, i, tau, horizon), cfg.num_exits)
    hs = (kv_lib.gate_heads(model, classifier=classifier) if taken
          else kv_lib.model_heads(model, classifier=classifier))
    if executor == "unrolled":
        ex = kv_lib.Unrolled(keep_running=True) if kv == "oracle" else kv_lib.propagating(model)
    else:
        ex = engine.Masked(keep_running=kv == "oracle")
    out, new_state = kv_lib.forward(model, tok_B[:, None], state, engine.prefix(cfg.depth, cfg.exit_layers), hs,
                                    policy, ex)
    if kv == "propagate" and executor == "masked":   # the layers the loop never reached (a traced count)
        new_state = new_state._replace(cache=kv_lib.propagate(model, new_state.cache, out.h, state.pos_B[:, None],
                                                              out.layers_run))
    h_BxD = out.out.hidden_BxD
    logits = model.taken_logits(h_BxD, out.exit_B) if taken else out.logits_BxC
    stats = StepStats(out.exit_layer_B, out.exit_layer_B + 1, out.score_B, out.layers_run, h_BxD)
    return logits, stats, new_state


def forced_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, i, exit_index: int
                ) -> tuple[jax.Array, StepStats, kv_lib.DecodeState]:
    """Every row leaves at exit ``exit_index`` (static): the truncated program (the layers up to that exit, then
    only that exit's head: one vocabulary projection), the K/V of the layers after it propagated from the exit
    state in one batched computation. No decision, so no host round trip; equals ``exit_step`` with
    ``static_thresholds`` (tested)."""
    del i
    cfg = model.cfg
    if not isinstance(exit_index, (int, np.integer)) or not 0 <= exit_index < cfg.num_exits:
        raise ValueError(f"{exit_index=} must be a static exit index in [0, {cfg.num_exits})")
    last = cfg.exit_layers[exit_index]
    pos_Bx1 = state.pos_B[:, None]
    head = kv_lib.gate_heads(model, exits=[exit_index])
    out, new_state = kv_lib.forward(model, tok_B[:, None], state, engine.prefix(last + 1, [last]), head)
    cache = kv_lib.propagate(model, new_state.cache, out.h, pos_Bx1, last + 1)
    h_BxD = out.out.hidden_BxD
    b = tok_B.shape[0]
    stats = StepStats(jnp.full((b,), last, jnp.int32), jnp.full((b,), last + 1, jnp.int32),
                      jnp.zeros((b,), jnp.float32), jnp.int32(last + 1), h_BxD)
    return model.exit_logits(h_BxD, exit_index), stats, new_state._replace(cache=cache)


def full_depth_step(model: DecoderLM, tok_B, state, i):
    """``exit_step``'s interface for the plain full-depth step (``kv.full_step``)."""
    del i
    logits, new_state = kv_lib.full_step(model, tok_B, state)
    n = model.cfg.depth
    b = tok_B.shape[0]
    stats = StepStats(jnp.full((b,), n - 1, jnp.int32), jnp.full((b,), n, jnp.int32), jnp.zeros((b,), jnp.float32),
                      jnp.int32(n), jnp.zeros((b, model.cfg.d_model), jnp.float32))
    return logits, stats, new_state


# ------------------------------------------------------------------------------------------------ generation


class Generation(NamedTuple):
    tokens_BxG: jax.Array        # generated (or forced) tokens
    logprob_BxG: jax.Array       # log-prob of each token under the logits that produced it
    exit_layer_BxG: jax.Array    # exit layer of the step that produced token g's logits (prefill: N-1)
    layers_BxG: jax.Array        # layers that step ran for the row (prefill: N)
    layers_run_G: jax.Array      # layers the batch loop ran to produce token g's logits (prefill: N)


class TokenRecord(NamedTuple):
    """What the generation loop records per step (stacked over the G steps by ``lax.scan``)."""
    tok_B: jax.Array
    logprob_B: jax.Array
    exit_layer_B: jax.Array
    layers_B: jax.Array
    layers_run: jax.Array


class DecodeCarry(NamedTuple):
    """The generation loop's carry: what produced the next token."""
    logits_BxV: jax.Array        # logits the next token is taken from
    state: kv_lib.DecodeState
    exit_layer_B: jax.Array      # their exit layer
    layers_B: jax.Array          # layers each row ran for them
    layers_run: jax.Array        # layers the batch ran for them


StepFn = Callable[[DecoderLM, jax.Array, kv_lib.DecodeState, jax.Array],
                  tuple[jax.Array, StepStats, kv_lib.DecodeState]]


def _check_num_new(num_new) -> None:
    if isinstance(num_new, bool) or not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"{num_new=} must be an integer >= 1 (tokens to generate)")


def phases_of(step_fn: StepFn | Sequence[tuple[int, StepFn]], num_new: int) -> list[tuple[int, StepFn]]:
    """``step_fn`` as a list of ``(steps, step_fn)`` phases that sum to ``num_new`` (one function: one phase)."""
    if callable(step_fn):
        return [(num_new, step_fn)]
    phases = [(int(k), f) for k, f in step_fn]
    if any(k < 1 or not callable(f) for k, f in phases) or sum(k for k, _ in phases) != num_new:
        raise ValueError(f"step_fn phases {[k for k, _ in phases]} must be (steps >= 1, step function) pairs summing "
                         f"to {num_new=}")
    return phases


def decode(model: DecoderLM, logits_BxV: jax.Array, state: kv_lib.DecodeState, num_new: int,
           step_fn: StepFn | Sequence[tuple[int, StepFn]], *,
           rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
           force_BxG: jax.Array | None = None) -> Generation:
    """``num_new`` tokens from a prefilled state: token 0 from ``logits_BxV`` (the prefill's, at each row's last
    prompt token), token g > 0 from ``step_fn(model, token g-1, state, g-1)``. Sampling: greedy at
    ``temperature == 0``, else softmax(logits / temperature) over the ``top_k`` best (0: all). With ``force_BxG``
    the loop feeds the given tokens instead of sampled ones (teacher forcing through the real decode path, so the
    log-probs give a validation loss with exactly the decode's KV cache semantics).

    ``step_fn`` may also be a list of ``(steps, step_fn)`` phases run in order, each its own ``lax.scan`` with a
    known trip count (SkipDecode's grouped schedule: a static layer count per group instead of a traced one)."""
    _check_num_new(num_new)
    phases = phases_of(step_fn, num_new)
    b = logits_BxV.shape[0]
    kv_lib.check_sampling(temperature, top_k, logits_BxV.shape[-1])
    if force_BxG is not None:
        checks.token_ids(force_BxG, model.cfg.vocab_size, name="force_BxG")
        if np.shape(force_BxG) != (b, num_new):
            raise ValueError(f"force_BxG has shape {np.shape(force_BxG)}; want (batch, num_new) = {(b, num_new)}")
    rng = jax.random.key(0) if rng is None else rng
    n = model.cfg.depth

    def body_of(step):
        def body(c: DecodeCarry, xs):
            i, forced_B = xs
            sampled = kv_lib.sample(c.logits_BxV, jax.random.fold_in(rng, i), temperature, top_k)
            tok_B = sampled if force_BxG is None else forced_B
            logp = jax.nn.log_softmax(c.logits_BxV.astype(jnp.float32), -1)
            logp_B = jnp.take_along_axis(logp, tok_B[:, None], axis=-1)[:, 0]
            new_logits, stats, state = step(model, tok_B, c.state, i)
            nxt = DecodeCarry(new_logits.astype(c.logits_BxV.dtype), state, stats.exit_layer_B, stats.layers_B,
                              jnp.asarray(stats.layers_run, jnp.int32))
            return nxt, TokenRecord(tok_B, logp_B, c.exit_layer_B, c.layers_B, c.layers_run)
        return body

    forced_GxB = jnp.zeros((num_new, b), jnp.int32) if force_BxG is None else jnp.asarray(force_BxG, jnp.int32).T
    carry = DecodeCarry(logits_BxV, state, jnp.full((b,), n - 1, jnp.int32), jnp.full((b,), n, jnp.int32),
                        jnp.int32(n))
    parts, start = [], 0
    for steps, step in phases:
        carry, ys = jax.lax.scan(body_of(step), carry, (jnp.arange(start, start + steps),
                                                        forced_GxB[start:start + steps]))
        parts.append(ys)
        start += steps
    rec = TokenRecord(*(jnp.concatenate(x) for x in zip(*parts)))    # leading axis G
    return Generation(rec.tok_B.T, rec.logprob_B.T, rec.exit_layer_B.T, rec.layers_B.T, rec.layers_run)


def generate(model: DecoderLM, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int,
             step_fn: StepFn | Sequence[tuple[int, StepFn]], *,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             force_BxG: jax.Array | None = None, cache_dtype=None) -> Generation:
    """Prefill (full depth) then ``decode`` ``num_new`` tokens (see there).

    Prompts are right-padded (``kv.pad_prompts``) with per-row ``lengths_B`` in ``[1, P]``. ``cache_dtype``: the
    KV cache's dtype (default the model's compute dtype, ``kv.compute_dtype``)."""
    _check_num_new(num_new)
    kv_lib.check_prompts(prompt_BxP, lengths_B, model.cfg.vocab_size)
    kv_lib.check_sampling(temperature, top_k, model.cfg.vocab_size)
    logits, state = kv_lib.prefill(model, prompt_BxP, lengths_B, prompt_BxP.shape[1] + num_new, dtype=cache_dtype)
    return decode(model, logits, state, num_new, step_fn, rng=rng, temperature=temperature, top_k=top_k,
                  force_BxG=force_BxG)


def decode_fn(graphdef, step_fn: StepFn, num_new: int, **kw):
    """``jit``-ready ``f(params, prompt_BxP, lengths_B, *step_args[, force_BxG])`` over an ``nnx.split`` model;
    ``step_args`` are passed to ``step_fn`` after ``(model, tok, state, i)`` (e.g. a traced threshold);
    ``step_fn`` may be a list of phases (``decode``) when there are none. ``kw`` go to ``generate``."""

    def f(params, prompt_BxP, lengths_B, *step_args, force_BxG=None):
        model = nnx.merge(graphdef, params)
        steps = step_fn if not step_args else (lambda m, t, s, i: step_fn(m, t, s, i, *step_args))
        return generate(model, prompt_BxP, lengths_B, num_new, steps, force_BxG=force_BxG, **kw)

    return f
