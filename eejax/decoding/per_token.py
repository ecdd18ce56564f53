"""Per-token early exit in batched, KV-cached decoding, and the generation loop shared by every decoding policy.

Each generated token is one ``engine.run``: the prefix program x a threshold policy x the masked executor, with the
KV cache as the carried state (``kv.forward``). Every row has its own active mask; at each exit its confidence (any ``eejax.exits.confidence`` measure, read through a ``HeadOut``) is compared with
the threshold, optionally decayed with the token's index as in CALM (Schuster et al. 2022, Eq. 5:
``clip(0.9 * lambda + 0.1 * exp(-tau * i / horizon), 0, 1)``). The loop stops when every row has exited.

KV of the layers a row skipped (``kv=``):

* ``"propagate"`` (CALM's state propagation): from the hidden state at the layer where *that row* exited. Inside the
  loop an exited row's state is frozen by the masked update, so writing every row's K/V at every layer already
  propagates it; after the loop, the layers no row reached get their K/V from the same frozen states. (CALM's public
  t5x code copies the state of the first segment instead; we do not.)
* ``"oracle"``: every row keeps running the remaining layers for real K/V (the full model's cache); only the output
  is taken at the exit. It costs full depth and is the comparison baseline.

Shapes: B batch, G generated tokens, V vocabulary, D width, N layers, E exits.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

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


class StepStats(NamedTuple):
    exit_layer_B: jax.Array   # 0-based layer whose exit produced the row's logits
    layers_B: jax.Array       # layers this row's token ran (exit depth; a SkipDecode budget; N at full depth)
    score_B: jax.Array        # confidence at that exit
    layers_run: jax.Array     # layers the batch loop executed (the deepest row), int32[]
    h_BxD: jax.Array          # the row's hidden state at its exit


decayed_threshold = policies.calm_threshold


def static_thresholds(num_exits: int, exit_index: int) -> jax.Array:
    """Per-exit thresholds that make every row leave at exit ``exit_index`` (the static truncated model)."""
    return jnp.full((num_exits,), jnp.inf).at[exit_index].set(-jnp.inf)


def exit_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, i, threshold, *,
              measure: conf_lib.Measure = conf_lib.max_softmax, kv: str = "propagate", tau: float = 0.0,
              horizon: int = 1, classifier: dict | None = None) -> tuple[jax.Array, StepStats, kv_lib.DecodeState]:
    """One token per row with per-row early exit: the prefix program x a (CALM-decayed) threshold policy x the
    masked executor (``keep_running`` for oracle K/V). ``threshold``: scalar or ``float[E]``; a row exits at exit
    e when ``score >= threshold[e]``; the last exit takes every row still running."""
    if kv not in KV_MODES:
        raise ValueError(f"kv={kv!r}: use one of {KV_MODES}")
    cfg = model.cfg
    num_layers = cfg.depth
    policy = policies.threshold(measure, decayed_threshold(threshold, i, tau, horizon), cfg.num_exits)
    out, new_state = kv_lib.forward(model, tok_B[:, None], state, engine.prefix(num_layers, cfg.exit_layers),
                                    kv_lib.model_heads(model, classifier=classifier), policy,
                                    engine.Masked(keep_running=kv == "oracle"))
    cache = new_state.cache
    if kv == "propagate":
        # State propagation for the layers the loop never reached: K/V from each row's frozen exit state.
        pos_Bx1 = state.pos_B[:, None]

        def fill(l, cache):
            k, v = kv_lib.layer_at(model, l).kv(out.h, pos_Bx1)
            return kv_lib.write_kv(cache, l, pos_Bx1, k, v)

        cache = jax.lax.fori_loop(out.layers_run, num_layers, fill, cache)
    stats = StepStats(out.exit_layer_B, out.exit_layer_B + 1, out.score_B, out.layers_run, out.out.hidden_BxD)
    return out.logits_BxC, stats, new_state._replace(cache=cache)


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


StepFn = Callable[[DecoderLM, jax.Array, kv_lib.DecodeState, jax.Array],
                  tuple[jax.Array, StepStats, kv_lib.DecodeState]]


def generate(model: DecoderLM, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int, step_fn: StepFn, *,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             force_BxG: jax.Array | None = None) -> Generation:
    """Prefill (full depth) then ``num_new`` tokens, each from the previous step's logits.

    Prompts are right-padded (``kv.pad_prompts``) with per-row ``lengths_B``. Token 0 comes from the prefill
    logits; token g > 0 from ``step_fn`` run on token g-1. With ``force_BxG`` the loop feeds the given tokens
    instead of sampled ones (teacher forcing through the real decode path, so the log-probs give a validation loss
    with exactly the decode's KV cache semantics).
    """
    if np.ndim(prompt_BxP) != 2 or not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"prompt_BxP of shape {np.shape(prompt_BxP)} must be B x P and {num_new=} >= 1")
    checks.token_ids(prompt_BxP, model.cfg.vocab_size, name="prompt_BxP")
    if force_BxG is not None:
        checks.token_ids(force_BxG, model.cfg.vocab_size, name="force_BxG")
    b, p = prompt_BxP.shape
    rng = jax.random.key(0) if rng is None else rng
    logits, state = kv_lib.prefill(model, prompt_BxP, lengths_B, p + num_new)
    n = model.cfg.depth

    def body(carry, xs):
        logits_BxV, state, exit_B, layers_B, run = carry
        i, forced_B = xs
        sampled = kv_lib.sample(logits_BxV, jax.random.fold_in(rng, i), temperature, top_k)
        tok_B = sampled if force_BxG is None else forced_B
        logp = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), -1)
        logp_B = jnp.take_along_axis(logp, tok_B[:, None], axis=-1)[:, 0]
        new_logits, stats, state = step_fn(model, tok_B, state, i)
        return ((new_logits, state, stats.exit_layer_B, stats.layers_B, stats.layers_run),
                (tok_B, logp_B, exit_B, layers_B, run))

    forced = jnp.zeros((num_new, b), jnp.int32) if force_BxG is None else force_BxG.T.astype(jnp.int32)
    init = (logits, state, jnp.full((b,), n - 1, jnp.int32), jnp.full((b,), n, jnp.int32), jnp.int32(n))
    _, (tok_GxB, logp_GxB, exit_GxB, layers_GxB, run_G) = jax.lax.scan(body, init, (jnp.arange(num_new), forced))
    return Generation(tok_GxB.T, logp_GxB.T, exit_GxB.T, layers_GxB.T, run_G)


def decode_fn(graphdef, step_fn: StepFn, num_new: int, **kw):
    """``jit``-ready ``f(params, prompt_BxP, lengths_B, *step_args[, force_BxG])`` over an ``nnx.split`` model;
    ``step_args`` are passed to ``step_fn`` after ``(model, tok, state, i)`` (e.g. a traced threshold)."""

    def f(params, prompt_BxP, lengths_B, *step_args, force_BxG=None):
        model = nnx.merge(graphdef, params)
        return generate(model, prompt_BxP, lengths_B, num_new,
                        lambda m, t, s, i: step_fn(m, t, s, i, *step_args), force_BxG=force_BxG, **kw)

    return f
