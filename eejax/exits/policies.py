"""Exit policies: after each exit, decide per row whether it stops there.

A policy has ``init(probe, zero_B, h0) -> state`` (``probe``: the head output's shapes; ``zero_B``: data-derived
int32 zeros; ``h0``: the loop's input) and ``decide(out, state, e) -> (fire_B, score_B, new_state)``. The engine's
one stop rule (``engine.exit_check``) turns ``fire_B`` into stops: a row stops when the policy fires *or* the exit is
the last, and a stopped row keeps its state. States carry a leading batch axis.

* ``threshold(measure, thr)``: a confidence measure (``eejax.exits.confidence``) against a threshold per exit
  (BranchyNet, MSDNet, LGViT, DeeBERT with ``neg_entropy``, PABEE with ``patience``, CALM with a decayed threshold
  from ``calm_threshold``).
* ``batch_mean(measure, thr)``: every row gets the batch mean of the score, so the batch exits together (DeeDiff's
  public code).
* ``fixed_exit(exit_B)``: each row stops at a given exit (static truncation, a budget, a draft depth).
* ``router(predict)``: ``predict(h0) -> exit_B`` decides the depth before anything runs (ECO-M2F-style gates,
  depth-grouped batching), then acts as ``fixed_exit``.
* ``saturation(thr, first=...)``: MuE (Tang et al., CVPR 2023, arXiv:2211.11152): a row stops when the cosine
  similarity of its hidden state with the previous exit's reaches the threshold; no classifier takes part in the
  decision. ``first(h0)`` gives the state the first exit is compared with (MuE: the layer's input).
* ``uncertainty_gate(w_ExF, b_E)``: JEI-DNN (Regol et al., ICLR 2024, arXiv:2310.09163): a gate per exit, a
  logistic map of the exit's uncertainty features (``confidence.uncertainty_features``: max prob, entropy, margin,
  squared-softmax entropy); a row stops at the first exit whose gate probability is >= ``thr`` (0.5 in the paper).
  The gates are trained jointly with the exit classifiers (experiments/jei_dnn.py).
* ``window(measure, lo, hi)``: window-based early-exit cascades (Xia & Bouganis, ICCV 2023, arXiv:2303.08010): a
  row goes on past exit e only while its score lies in ``[lo_E[e], hi_E[e])``, a window around the operating
  threshold; rows outside it are decided (accepted or rejected) at that exit. ``lo = -inf`` is the plain threshold
  cascade (``threshold`` with ``thr = hi``).
* ``agreement(thr, max_exit)``: DeeR-VLA (Yue et al., NeurIPS 2024, arXiv:2411.02359): a row stops when consecutive
  exits' outputs agree, ``||softmax_e - softmax_{e-1}||_2 < thr_E[e]``, and at ``max_exit`` at the latest (the peak
  compute cap); the first exit has nothing to agree with and never fires below the cap.
* ``shadow(num_exits)``: never stops a row before the last exit and records every exit's greedy token at every
  position (``B x E x T``): DEL's "shadow tokens" (Zarch et al., arXiv:2504.05598), read from a verify pass.
* ``score_threshold(thr)``: a threshold on scores computed ahead (``engine.Scores``): ``engine.simulate`` over
  cached scores (budgeted curves, threshold sweeps) with the engine's own stop rule.

Every policy also says which head-output fields it reads (``reads``; the engine computes no others unless the
caller asks for them) and checks itself against the program it runs on (``check(num_exits, batch)``: per-exit
values for that many exits, exit indices in range), so that a policy built for another program is a ValueError
naming the argument instead of an index that JAX clamps.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eejax import checks
from eejax.exits import confidence as conf_lib


def _check_per_exit(name: str, arr, num_exits: int) -> None:
    if np.shape(arr)[:1] != (num_exits,):
        raise ValueError(f"the policy's {name} hold {np.shape(arr)[0] if np.ndim(arr) else 1} values (one per exit) "
                         f"but the program has {num_exits} exits; build the policy for {num_exits} exits")


def _check_exit_index(name: str, exit_B, num_exits: int, batch: int) -> None:
    shape = np.shape(exit_B)
    if shape not in ((), (batch,)):
        raise ValueError(f"{name} has shape {shape}; want one exit index for every row, shape () or ({batch},)")
    if checks.is_concrete(exit_B) and np.size(exit_B):
        e = np.asarray(exit_B)
        if not np.issubdtype(e.dtype, np.integer):
            raise ValueError(f"{name} must hold integer exit indices, got dtype {e.dtype}")
        if e.min() < 0 or e.max() >= num_exits:
            raise ValueError(f"{name} holds exits in [{e.min()}, {e.max()}]; the program has exits 0..{num_exits - 1}")


class Threshold(NamedTuple):
    measure: conf_lib.Measure
    thr_E: jax.Array

    @property
    def reads(self):
        return getattr(self.measure, "reads", None)

    def check(self, num_exits: int, batch: int) -> None:
        _check_per_exit("thresholds", self.thr_E, num_exits)

    def init(self, probe, zero_B, h0=None):
        return conf_lib.init_state(probe, zero_B)

    def decide(self, out, state, e):
        score_B, new = self.measure(out, state)
        return score_B >= self.thr_E[e], score_B, new


class BatchMean(Threshold):
    """``Threshold`` on the batch mean of the score (every row gets it)."""

    def decide(self, out, state, e):
        score_B, new = self.measure(out, state)
        score_B = jnp.broadcast_to(jnp.mean(score_B), score_B.shape)
        return score_B >= self.thr_E[e], score_B, new


class FixedExit(NamedTuple):
    exit_B: jax.Array
    reads = ()

    def check(self, num_exits: int, batch: int) -> None:
        _check_exit_index("fixed_exit's exit_B", self.exit_B, num_exits, batch)

    def init(self, probe, zero_B, h0=None):
        return zero_B + jnp.asarray(self.exit_B, jnp.int32)

    def decide(self, out, state, e):
        return e >= state, jnp.zeros(state.shape, jnp.float32), state


class Shadow(NamedTuple):
    """Runs every exit; the state is each exit's argmax token per row and position (``int32[B, E, T]``, heads whose
    logits are ``B x T x V``; ``B x E x 1`` for ``B x V``)."""
    num_exits: int
    reads = ("logits_BxC",)

    def check(self, num_exits: int, batch: int) -> None:
        if self.num_exits != num_exits:
            raise ValueError(f"shadow(num_exits={self.num_exits}) on a program with {num_exits} exits")

    def init(self, probe, zero_B, h0=None):
        t = probe.logits_BxC.shape[1] if len(probe.logits_BxC.shape) == 3 else 1
        return jnp.zeros((zero_B.shape[0], self.num_exits, t), jnp.int32) + zero_B[:, None, None]

    def decide(self, out, state, e):
        logits = out.logits_BxC if out.logits_BxC.ndim == 3 else out.logits_BxC[:, None]
        pred_BxT = jnp.argmax(logits, -1).astype(jnp.int32)
        new = jnp.where((jnp.arange(self.num_exits) == e)[None, :, None], pred_BxT[:, None, :], state)
        return jnp.zeros(state.shape[:1], bool), jnp.zeros(state.shape[:1], jnp.float32), new


class Router(NamedTuple):
    predict: Callable[[Any], jax.Array]
    reads = ()

    def init(self, probe, zero_B, h0=None):
        return zero_B + jnp.asarray(self.predict(h0), jnp.int32)

    def decide(self, out, state, e):
        return e >= state, jnp.zeros(state.shape, jnp.float32), state


class Saturation(NamedTuple):
    thr_E: jax.Array
    first: Callable[[Any], jax.Array] | None = None   # h0 -> float[B, D'] compared with the first exit's state
    reads = ("hidden_BxD",)

    def check(self, num_exits: int, batch: int) -> None:
        _check_per_exit("thresholds", self.thr_E, num_exits)

    def init(self, probe, zero_B, h0=None):
        state = conf_lib.init_state(probe, zero_B)
        if self.first is None:     # the cosine measure's convention: score 0 at the first exit
            return state
        prev = jnp.asarray(self.first(h0), jnp.float32)
        if prev.shape != probe.hidden_BxD.shape:
            raise ValueError(f"saturation: first(h0) has shape {prev.shape} but the heads report hidden states of "
                             f"shape {probe.hidden_BxD.shape}; they are compared by cosine similarity")
        return state._replace(prev_hidden_BxD=prev)

    def decide(self, out, state, e):
        score_B, new = conf_lib.cosine(out, state)
        return score_B >= self.thr_E[e], score_B, new


class UncertaintyGate(NamedTuple):
    w_ExF: jax.Array     # gate weights per exit over the uncertainty features
    b_E: jax.Array       # gate biases
    thr_E: jax.Array     # fire when sigmoid(gate logit) >= thr_E[e]
    reads = ("logits_BxC",)

    def check(self, num_exits: int, batch: int) -> None:
        _check_per_exit("gate weights", self.w_ExF, num_exits)

    def init(self, probe, zero_B, h0=None):
        return zero_B

    def decide(self, out, state, e):
        feats_BxF = conf_lib.uncertainty_features(out.logits_BxC)
        prob_B = jax.nn.sigmoid(feats_BxF @ self.w_ExF[e] + self.b_E[e])
        return prob_B >= self.thr_E[e], prob_B, state


class Window(NamedTuple):
    measure: conf_lib.Measure
    lo_E: jax.Array      # a row goes on past exit e iff lo_E[e] <= score < hi_E[e]
    hi_E: jax.Array

    @property
    def reads(self):
        return getattr(self.measure, "reads", None)

    def check(self, num_exits: int, batch: int) -> None:
        _check_per_exit("lower edges", self.lo_E, num_exits)
        _check_per_exit("upper edges", self.hi_E, num_exits)

    def init(self, probe, zero_B, h0=None):
        return conf_lib.init_state(probe, zero_B)

    def decide(self, out, state, e):
        score_B, new = self.measure(out, state)
        return (score_B < self.lo_E[e]) | (score_B >= self.hi_E[e]), score_B, new


class AgreementState(NamedTuple):
    prev_BxC: jax.Array   # softmax of the previous exit
    seen_B: jax.Array     # whether a previous exit exists


class Agreement(NamedTuple):
    thr_E: jax.Array       # exit e fires when the distance to exit e-1's softmax is below thr_E[e]
    max_exit: jax.Array    # int32[]: every row stops at this exit at the latest (DeeR's max_layer)
    reads = ("logits_BxC",)

    def check(self, num_exits: int, batch: int) -> None:
        _check_per_exit("thresholds", self.thr_E, num_exits)

    def init(self, probe, zero_B, h0=None):
        return AgreementState(jnp.zeros(probe.logits_BxC.shape, jnp.float32) + zero_B[:, None], zero_B > 0)

    def decide(self, out, state, e):
        p_BxC = jax.nn.softmax(out.logits_BxC.astype(jnp.float32), axis=-1)
        dist_B = jnp.linalg.norm(p_BxC - state.prev_BxC, axis=-1)
        # Score oriented like every measure (larger = surer): minus the distance, -inf with nothing to compare.
        score_B = jnp.where(state.seen_B, -dist_B, -jnp.inf)
        fire_B = (state.seen_B & (dist_B < self.thr_E[e])) | (e >= self.max_exit)
        return fire_B, score_B, AgreementState(p_BxC, jnp.ones_like(state.seen_B))


def thresholds(threshold, num_exits: int, measure=None) -> jax.Array:
    """A scalar or one value per exit, as ``float32[E]``; a wrong shape, NaN or (for a probability measure named
    by string) a finite value outside [0, 1] is a ValueError naming it (values are checked when concrete)."""
    if isinstance(num_exits, bool) or not isinstance(num_exits, (int, np.integer)) or num_exits < 1:
        raise ValueError(f"{num_exits=} must be a positive number of exits")
    prob = isinstance(measure, str) and measure in conf_lib.PROBABILITY_MEASURES
    checks.thresholds(threshold, num_exits, lo=0.0 if prob else None, hi=1.0 if prob else None)
    return jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (num_exits,))


def _measure(measure):
    return conf_lib.get_measure(measure) if isinstance(measure, str) else measure


def threshold(measure: str | conf_lib.Measure, thr, num_exits: int) -> Threshold:
    return Threshold(_measure(measure), thresholds(thr, num_exits, measure))


def score_threshold(thr, num_exits: int) -> Threshold:
    """A threshold on cached scores (``engine.Scores``; ``engine.simulate(policy, score_ExB)``): the offline twin
    of ``threshold(measure, thr)``, the same stop rule."""
    return Threshold(conf_lib.cached_score, thresholds(thr, num_exits))


def batch_mean(measure: str | conf_lib.Measure, thr, num_exits: int) -> BatchMean:
    return BatchMean(_measure(measure), thresholds(thr, num_exits, measure))


def fixed_exit(exit_B) -> FixedExit:
    """Each row stops at ``exit_B`` (one index for all rows, or one per row; checked against the program when the
    engine runs it)."""
    exit_B = exit_B if isinstance(exit_B, jax.Array) else np.asarray(exit_B)
    if checks.is_concrete(exit_B) and np.size(exit_B):
        e = np.asarray(exit_B)
        if not np.issubdtype(e.dtype, np.integer) or e.min() < 0:
            raise ValueError(f"fixed_exit: exit_B must hold exit indices >= 0, got {e.tolist()}")
    return FixedExit(exit_B)


def shadow(num_exits: int) -> Shadow:
    if int(num_exits) < 1:
        raise ValueError(f"{num_exits=} must be a positive number of exits")
    return Shadow(int(num_exits))


def router(predict: Callable[[Any], jax.Array]) -> Router:
    return Router(predict)


def saturation(thr, num_exits: int, first: Callable[[Any], jax.Array] | None = None) -> Saturation:
    """MuE's exit: cosine similarity of consecutive hidden states (the heads' ``hidden_BxD``) >= ``thr``."""
    return Saturation(thresholds(thr, num_exits), first)


def uncertainty_gate(w_ExF, b_E, thr=0.5) -> UncertaintyGate:
    """JEI-DNN's learned gates: exit e fires when ``sigmoid(features_e . w_ExF[e] + b_E[e]) >= thr``."""
    w_ExF = jnp.asarray(w_ExF, jnp.float32)
    b_E = jnp.asarray(b_E, jnp.float32)
    if w_ExF.ndim != 2 or w_ExF.shape[1] != conf_lib.NUM_UNCERTAINTY_FEATURES or b_E.shape != w_ExF.shape[:1]:
        raise ValueError(f"uncertainty_gate: want w [E, {conf_lib.NUM_UNCERTAINTY_FEATURES}] and b [E], got "
                         f"{w_ExF.shape=} {b_E.shape=}")
    return UncertaintyGate(w_ExF, b_E, thresholds(thr, w_ExF.shape[0], "learned"))


def window(measure: str | conf_lib.Measure, lo, hi, num_exits: int) -> Window:
    """Window cascade: go on past exit e iff ``lo[e] <= score < hi[e]`` (scalars or one value per exit)."""
    lo_E, hi_E = thresholds(lo, num_exits), thresholds(hi, num_exits)
    if checks.is_concrete(lo) and checks.is_concrete(hi) and bool(np.any(np.asarray(lo) > np.asarray(hi))):
        raise ValueError(f"window: every lower edge must be <= its upper edge, got lo={lo_E} hi={hi_E}")
    return Window(_measure(measure), lo_E, hi_E)


def agreement(thr, num_exits: int, max_exit: int | None = None) -> Agreement:
    """DeeR's exit: ``||softmax_e - softmax_{e-1}||_2 < thr_E[e]`` (distances: thresholds >= 0, +inf allowed), or
    exit ``max_exit`` reached (default: the last)."""
    thr_E = thresholds(thr, num_exits)
    checks.thresholds(thr, num_exits, lo=0.0)
    max_exit = num_exits - 1 if max_exit is None else int(max_exit)
    if not 0 <= max_exit < num_exits:
        raise ValueError(f"{max_exit=} must be an exit index in [0, {num_exits=})")
    return Agreement(thr_E, jnp.asarray(max_exit, jnp.int32))


def calm_threshold(threshold, i, tau: float, horizon: int):
    """CALM's position-dependent threshold (Schuster et al. 2022, Eq. 5): ``clip(0.9 lambda + 0.1 exp(-tau i /
    horizon), 0, 1)`` for the token at index ``i``; ``tau = 0`` leaves it unchanged."""
    if tau == 0:
        return threshold
    decay = jnp.exp(-tau * jnp.asarray(i, jnp.float32) / horizon)
    return jnp.clip(0.9 * jnp.asarray(threshold, jnp.float32) + 0.1 * decay, 0.0, 1.0)


__all__ = ["Threshold", "BatchMean", "FixedExit", "Shadow", "shadow", "Router", "Saturation", "UncertaintyGate",
           "Window", "Agreement", "AgreementState", "thresholds", "threshold", "score_threshold", "batch_mean",
           "fixed_exit", "router", "saturation", "uncertainty_gate", "window", "agreement", "calm_threshold"]
