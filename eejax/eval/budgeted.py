"""Budgeted batch classification (MSDNet, Huang et al., ICLR 2018, Sec. 5), simulated from cached softmaxes.

Every exit's softmax is cached for every example once; exit policies are then simulated offline here. For a prior
p, the target fraction of examples leaving at exit k (k = 1..E) is q_k proportional to p^k: small p puts almost all
examples at the first exit (low budget), large p moves them towards the last (high budget). Per-exit confidence
thresholds that realise q on the VALIDATION split are then applied to the TEST split, giving one (FLOPs, accuracy)
point per prior. Confidence is the max softmax probability. Accuracies are fractions in [0, 1].

Letters: E exits, N examples, C classes, P priors. Everything is numpy (the arrays are tiny) but the exit rule:
``simulate_exits`` runs the engine's one stop rule (``engine.simulate``) over the cached confidences.
"""
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from eejax.exits import engine, policies


class BudgetPoint(NamedTuple):
    """One operating point. ``prior`` is NaN for points that do not come from a prior (sweeps, static exits);
    ``exit_fractions_E`` are the realised fractions of evaluated examples leaving at each exit."""
    prior: float
    accuracy: float
    expected_flops: float
    exit_fractions_E: np.ndarray
    thresholds_E: np.ndarray


class _Scores(NamedTuple):
    conf_ExN: np.ndarray  # max softmax probability of each exit
    correct_ExN: np.ndarray  # argmax == label


def _scores(probs_ExNxC, labels_N) -> _Scores:
    probs_ExNxC, labels_N = np.asarray(probs_ExNxC), np.asarray(labels_N)
    if probs_ExNxC.ndim != 3 or labels_N.shape != probs_ExNxC.shape[1:2]:
        raise ValueError(f"want probs [E, N, C] and labels [N], got {probs_ExNxC.shape=} {labels_N.shape=}")
    return _Scores(probs_ExNxC.max(-1), probs_ExNxC.argmax(-1) == labels_N[None, :])


def _check_flops(flops_E, num_exits: int) -> np.ndarray:
    flops_E = np.asarray(flops_E, np.float64)
    if flops_E.shape != (num_exits,):
        raise ValueError(f"{flops_E.shape=} does not match {num_exits=}")
    return flops_E


def priors() -> np.ndarray:
    """The 39 priors p = 0.05, 0.10, ..., 1.95 of MSDNet's reference code (``for p in range(1, 40): p / 20``)."""
    return np.arange(1, 40) / 20


def target_fractions(prior: float, num_exits: int) -> np.ndarray:
    """q_k proportional to prior^k for k = 1..E, normalised to sum to 1."""
    if prior <= 0:
        raise ValueError(f"{prior=} must be positive")
    q_E = float(prior) ** np.arange(1, num_exits + 1)
    return q_E / q_E.sum()


def select_thresholds(conf_ExN: np.ndarray, fractions_E: np.ndarray) -> np.ndarray:
    """Per-exit thresholds under which a fraction ``fractions_E[k]`` of these examples exits at k.

    Follows MSDNet's reference ``dynamic_eval_find_threshold`` (kalviny/MSDNet-PyTorch, adaptive_inference.py):
    exit k < E-1 takes n_k = floor(N * q_k) examples (floor of the fraction of ALL N, not of those left); among the
    examples still running, the threshold is the confidence of the n_k-th most confident one (+inf when n_k = 0,
    so nobody leaves); the last exit takes everyone left (threshold -inf), so the floors' remainders land there.
    With ties at the threshold, every tied example leaves (confidence >= threshold).
    """
    conf_ExN = np.asarray(conf_ExN, np.float64)
    num_exits, n = conf_ExN.shape
    if np.shape(fractions_E) != (num_exits,):
        raise ValueError(f"{np.shape(fractions_E)=} does not match {conf_ExN.shape=}")
    # The tiny epsilon keeps e.g. 12 * (1/3) = 3.9999999 from flooring to 3.
    take_E = np.floor(n * np.asarray(fractions_E, np.float64) + 1e-9).astype(np.int64)
    thresholds_E = np.full(num_exits, np.inf)
    running_N = np.ones(n, bool)
    for k in range(num_exits - 1):
        left_desc = np.sort(conf_ExN[k, running_N])[::-1]
        if 0 < take_E[k] <= len(left_desc):
            thresholds_E[k] = left_desc[take_E[k] - 1]
        running_N &= conf_ExN[k] < thresholds_E[k]
    thresholds_E[-1] = -np.inf
    return thresholds_E


def simulate_exits(conf_ExN: np.ndarray, thresholds_E: np.ndarray) -> np.ndarray:
    """Exit index of each example: the first exit whose confidence >= its threshold, else the last exit. This is
    the engine's own stop rule run over the cached confidences (``engine.simulate`` with
    ``policies.score_threshold``), in float32 as on the engine."""
    conf_ExN, thresholds_E = np.asarray(conf_ExN), np.asarray(thresholds_E)
    if conf_ExN.ndim != 2 or thresholds_E.shape != conf_ExN.shape[:1]:
        raise ValueError(f"want conf [E, N] and thresholds [E], got {conf_ExN.shape=} {thresholds_E.shape=}")
    policy = policies.score_threshold(thresholds_E, conf_ExN.shape[0])
    return np.asarray(engine.simulate(policy, conf_ExN).exit_B)


def _point(scores: _Scores, thresholds_E, cum_flops_E, prior=float("nan")) -> BudgetPoint:
    num_exits, n = scores.conf_ExN.shape
    exit_idx_N = simulate_exits(scores.conf_ExN, thresholds_E)
    return BudgetPoint(
        prior=float(prior),
        accuracy=float(scores.correct_ExN[exit_idx_N, np.arange(n)].mean()),
        expected_flops=float(cum_flops_E[exit_idx_N].mean()),
        exit_fractions_E=np.bincount(exit_idx_N, minlength=num_exits) / n,
        thresholds_E=np.asarray(thresholds_E, np.float64))


def budgeted_curve(probs_val_ExNxC, labels_val_N, probs_test_ExNxC, labels_test_N,
                   cum_flops_E) -> list[BudgetPoint]:
    """One test-set point per prior in ``priors()``, with thresholds chosen on the validation split."""
    val, test = _scores(probs_val_ExNxC, labels_val_N), _scores(probs_test_ExNxC, labels_test_N)
    num_exits = val.conf_ExN.shape[0]
    if test.conf_ExN.shape[0] != num_exits:
        raise ValueError(f"validation has {num_exits} exits but test has {test.conf_ExN.shape[0]}")
    cum_flops_E = _check_flops(cum_flops_E, num_exits)
    return [_point(test, select_thresholds(val.conf_ExN, target_fractions(p, num_exits)), cum_flops_E, p)
            for p in priors()]


def threshold_sweep(probs_ExNxC, labels_N, cum_flops_E, thresholds: Sequence[float]) -> list[BudgetPoint]:
    """One point per global threshold t shared by all exits (the last exit still takes everyone left)."""
    scores = _scores(probs_ExNxC, labels_N)
    num_exits = scores.conf_ExN.shape[0]
    cum_flops_E = _check_flops(cum_flops_E, num_exits)
    return [_point(scores, np.full(num_exits, float(t)), cum_flops_E) for t in thresholds]


def static_points(probs_ExNxC, labels_N, static_flops_E) -> list[BudgetPoint]:
    """Each exit used alone, as a model truncated at that exit, at its static cost."""
    scores = _scores(probs_ExNxC, labels_N)
    num_exits = scores.conf_ExN.shape[0]
    static_flops_E = _check_flops(static_flops_E, num_exits)
    return [BudgetPoint(prior=float("nan"), accuracy=float(scores.correct_ExN[e].mean()),
                        expected_flops=float(static_flops_E[e]),
                        exit_fractions_E=np.eye(num_exits)[e],
                        # Thresholds that route every example to exit e: nobody leaves before, all leave at e.
                        thresholds_E=np.where(np.arange(num_exits) == e, -np.inf, np.inf))
            for e in range(num_exits)]


def static_mix(per_depth, static_flops_E, target: float):
    """"Fewer layers for every example" at any compute: the per-example expectation of running fixed depth i with
    probability w and depth i + 1 otherwise, w chosen so that the mean FLOPs equal ``target``. ``per_depth[e]``:
    depth e's per-example metric (an array, or anything that scales and adds, e.g. confusion counts). None when
    ``target`` lies outside ``[static_flops_E[0], static_flops_E[-1]]``."""
    s = _check_flops(static_flops_E, len(static_flops_E))
    if len(s) < 2:
        raise ValueError(f"a mixture needs at least two static depths, got {len(s)}")
    if target < s[0] - 1e-6 or target > s[-1] + 1e-6:
        return None
    i = int(np.clip(np.searchsorted(s, target) - 1, 0, len(s) - 2))
    w = float(np.clip((s[i + 1] - target) / (s[i + 1] - s[i]), 0, 1))
    return w * per_depth[i] + (1 - w) * per_depth[i + 1]
