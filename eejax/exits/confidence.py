"""Exit confidence measures, one signature: ``measure(out: HeadOut, state) -> (score_B, new_state)``.

A row exits when ``score >= threshold``: every measure is oriented so that larger means "more sure".

* ``max_softmax``: the largest class probability (BranchyNet, MSDNet, LGViT).
* ``margin``: top-1 minus top-2 probability (CALM's "softmax response" variant).
* ``neg_entropy``: minus the entropy of the softmax (DeeBERT exits when entropy < S, i.e. -entropy > -S).
* ``cosine``: cosine similarity of this exit's pooled hidden state with the previous exit's (CALM's hidden-state
  saturation; MuE). At the first exit the previous state is zero, so the score is 0.
* ``learned``: ``sigmoid`` of a gate the head computes from its features (CALM's learned classifier, JEI-DNN).
* ``uncertainty_features(logits)``: not a measure but the 4 features JEI-DNN's learned gates read (max prob,
  entropy, top-2 margin, entropy of the squared-and-renormalised softmax); ``policies.uncertainty_gate`` maps them
  to an exit decision.
* ``image_measure(score_fn)``: a measure built from a no-reference quality score of an image head's output
  (``out.image_BxHxWxC``): the exit measure of image-output exits (RBQE, arXiv:2006.16581; see
  ``eejax.exits.image_quality``).
* ``patience(k)``: PABEE (Zhou et al., 2020), the number of consecutive exits, ending at this one, whose argmax equals
  the previous exit's; threshold = patience.
* ``cached_score``: a score computed ahead (``engine.Scores``), for ``engine.simulate`` over cached scores.

All measures advance the same ``MeasureState`` so stateful ones (cosine, patience) compose with any policy. Each
measure says which head-output fields its score reads (``measure.reads``); the engine drops the others from the
heads' outputs so that they cost no work (a head output without ``hidden_BxD`` leaves ``prev_hidden_BxD`` as is).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class MeasureState(NamedTuple):
    prev_pred_B: jax.Array    # argmax at the previous exit (-1 before the first)
    unchanged_B: jax.Array    # consecutive exits with an unchanged argmax (PABEE's counter)
    prev_hidden_BxD: jax.Array


Measure = Callable[..., tuple[jax.Array, MeasureState]]


def init_state(probe, zero_B: jax.Array) -> MeasureState:
    """Initial state for a batch; ``probe`` is a HeadOut (or its shapes), ``zero_B`` an int zero per row. A probe
    without a hidden state (dropped by the engine, or cached scores) gives ``prev_hidden_BxD=None``."""
    hidden = getattr(probe, "hidden_BxD", None)
    return MeasureState(prev_pred_B=zero_B - 1, unchanged_B=zero_B,
                        prev_hidden_BxD=None if hidden is None else
                        jnp.zeros(hidden.shape, jnp.float32) + zero_B[:, None])


def _advance(out, state: MeasureState) -> MeasureState:
    """The state after this exit; heads without class logits (a diffusion head, cached scores) leave the argmax
    history as is, heads without a hidden state the previous hidden state."""
    hidden = getattr(out, "hidden_BxD", None)
    prev_hidden = state.prev_hidden_BxD if hidden is None else hidden.astype(jnp.float32)
    logits = getattr(out, "logits_BxC", None)
    if logits is None:
        return state._replace(prev_hidden_BxD=prev_hidden)
    pred_B = jnp.argmax(logits, axis=-1).astype(state.prev_pred_B.dtype)
    unchanged_B = jnp.where(pred_B == state.prev_pred_B, state.unchanged_B + 1, 0)
    return MeasureState(pred_B, unchanged_B, prev_hidden)


def _reads(*fields: str):
    """Declare the head-output fields a measure's score reads (``measure.reads``)."""
    def mark(measure):
        measure.reads = fields
        return measure
    return mark


@_reads("logits_BxC")
def max_softmax(out, state):
    return jax.nn.softmax(out.logits_BxC.astype(jnp.float32), axis=-1).max(-1), _advance(out, state)


@_reads("logits_BxC")
def margin(out, state):
    top2 = jax.lax.top_k(jax.nn.softmax(out.logits_BxC.astype(jnp.float32), axis=-1), 2)[0]
    return top2[..., 0] - top2[..., 1], _advance(out, state)


@_reads("logits_BxC")
def neg_entropy(out, state):
    logp = jax.nn.log_softmax(out.logits_BxC.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * logp, axis=-1), _advance(out, state)


@_reads("hidden_BxD")
def cosine(out, state):
    a, b = out.hidden_BxD.astype(jnp.float32), state.prev_hidden_BxD
    denom = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.maximum(denom, 1e-9), _advance(out, state)


@_reads("gate_B")
def learned(out, state):
    return jax.nn.sigmoid(out.gate_B.astype(jnp.float32)), _advance(out, state)


@_reads("logits_BxC")
def patience(out, state):
    new = _advance(out, state)
    return new.unchanged_B.astype(jnp.float32), new


@_reads("score_B")
def cached_score(out, state):
    """The score computed ahead (``engine.Scores``), in float32 as every measure's."""
    return out.score_B.astype(jnp.float32), _advance(out, state)


def image_measure(score_fn: Callable[[jax.Array], jax.Array]) -> Measure:
    """A measure from a no-reference image quality score: ``score_fn(out.image_BxHxWxC) -> score_B`` (larger =
    better), for heads whose output is an image (``eejax.exits.image_quality.ImageOut``). The state advances as
    for any head without class logits (the pooled hidden state only)."""
    @_reads("image_BxHxWxC")
    def measure(out, state):
        return score_fn(out.image_BxHxWxC).astype(jnp.float32), _advance(out, state)
    return measure


NUM_UNCERTAINTY_FEATURES = 4


def uncertainty_features(logits_BxC: jax.Array) -> jax.Array:
    """JEI-DNN's gate inputs (Regol et al., ICLR 2024, arXiv:2310.09163; networkslab/dynn ``LearnableUncGate``):
    ``[max prob, entropy, top-2 margin, entropy of p^2 / sum(p^2)]`` of the softmax, ``float32[B, 4]``."""
    logp = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    top2 = jax.lax.top_k(p, 2)[0]
    entropy = -jnp.sum(p * logp, axis=-1)
    logp2 = jax.nn.log_softmax(2.0 * logp, axis=-1)       # p^2 renormalised, in log space
    entropy2 = -jnp.sum(jnp.exp(logp2) * logp2, axis=-1)
    return jnp.stack([top2[..., 0], entropy, top2[..., 0] - top2[..., 1], entropy2], axis=-1)


MEASURES: dict[str, Measure] = {"max_softmax": max_softmax, "margin": margin, "neg_entropy": neg_entropy,
                                "cosine": cosine, "learned": learned, "patience": patience}


PROBABILITY_MEASURES = ("max_softmax", "margin", "learned")   # scores in [0, 1], so are their finite thresholds


def get_measure(name: str) -> Measure:
    if name not in MEASURES:
        raise ValueError(f"unknown confidence measure {name!r}; choose from {sorted(MEASURES)}")
    return MEASURES[name]
