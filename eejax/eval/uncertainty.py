"""Uncertainty metrics: calibration (ECE), split-conformal prediction sets, selective classification (risk and
coverage) and OOD detection (FPR at a TPR). Everything is numpy over cached per-example arrays.

* ``ece``: expected calibration error with equal-width confidence bins (Guo et al. 2017; JEI-DNN reports it).
* ``conformal_quantile`` / ``lac_sets``: split conformal prediction (Vovk; Angelopoulos & Bates 2021, the
  "LAC"/"THR" score 1 - p_y): calibrated on one split, sets ``{c : p_c >= 1 - q}`` cover the label with probability
  >= 1 - alpha on exchangeable data. JEI-DNN's selling point is smaller sets at the same coverage.
* ``coverage_at_risk`` / ``risk_at_coverage`` / ``fpr_at_tpr``: the window-based cascades paper's metrics (Xia &
  Bouganis, arXiv:2303.08010): Cov@5 (the largest fraction accepted with selective risk <= 5%), Risk@80 (the error
  rate among the 80% most confident), FPR@95 (OOD samples accepted when 95% of in-distribution ones are).

Letters: N examples, C classes. Scores are oriented "larger = more confident / more in-distribution".
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.stats


def _vec(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty vector, got shape {x.shape}")
    return x


def ece(conf_N, correct_N, num_bins: int = 15) -> float:
    """Sum over equal-width bins of (bin weight) x |accuracy - mean confidence| (bins (i/M, (i+1)/M])."""
    conf_N, correct_N = _vec(conf_N, "conf_N").astype(np.float64), _vec(correct_N, "correct_N").astype(np.float64)
    if conf_N.shape != correct_N.shape:
        raise ValueError(f"{conf_N.shape=} != {correct_N.shape=}")
    bin_N = np.clip(np.ceil(conf_N * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        m = bin_N == b
        if m.any():
            total += m.mean() * abs(correct_N[m].mean() - conf_N[m].mean())
    return float(total)


def conformal_quantile(scores_N, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n+1)(1-alpha))-th smallest calibration score (+inf if that
    exceeds n, i.e. every label set must be the full set)."""
    scores_N = np.sort(_vec(scores_N, "scores_N").astype(np.float64))
    if not 0 < alpha < 1:
        raise ValueError(f"{alpha=} must lie in (0, 1)")
    n = scores_N.size
    k = math.ceil((n + 1) * (1 - alpha))
    return float(scores_N[k - 1]) if k <= n else float("inf")


def lac_sets(probs_NxC, qhat: float) -> np.ndarray:
    """LAC prediction sets, ``bool[N, C]``: class c is in the set iff its nonconformity 1 - p_c <= qhat."""
    return (1.0 - np.asarray(probs_NxC, np.float64)) <= qhat


class SetStats(NamedTuple):
    coverage: float    # fraction of sets holding the label
    mean_size: float   # mean number of classes per set
    qhat: float


def conformal_lac(probs_cal_NxC, labels_cal_N, probs_test_NxC, labels_test_N, alpha: float) -> SetStats:
    """Calibrate LAC on one split, evaluate coverage and set size on another."""
    probs_cal = np.asarray(probs_cal_NxC, np.float64)
    labels_cal = _vec(labels_cal_N, "labels_cal_N")
    qhat = conformal_quantile(1.0 - probs_cal[np.arange(len(labels_cal)), labels_cal], alpha)
    sets = lac_sets(probs_test_NxC, qhat)
    labels_test = _vec(labels_test_N, "labels_test_N")
    return SetStats(float(sets[np.arange(len(labels_test)), labels_test].mean()), float(sets.sum(1).mean()), qhat)


def _order(conf_N, correct_N):
    conf_N, correct_N = _vec(conf_N, "conf_N").astype(np.float64), _vec(correct_N, "correct_N").astype(bool)
    if conf_N.shape != correct_N.shape:
        raise ValueError(f"{conf_N.shape=} != {correct_N.shape=}")
    order = np.argsort(-conf_N, kind="stable")
    return conf_N[order], correct_N[order]


def risk_coverage(conf_N, correct_N) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, coverage, risk)`` for accepting ``conf >= t`` at every distinct confidence t (ties are
    accepted or rejected together)."""
    conf, correct = _order(conf_N, correct_N)
    n = conf.size
    errors = np.cumsum(~correct)
    last = np.r_[conf[1:] != conf[:-1], True]      # the last index of each run of equal confidences
    k = np.flatnonzero(last) + 1                   # accepted count at each distinct threshold
    return conf[last], k / n, errors[last] / k


def coverage_at_risk(conf_N, correct_N, risk: float) -> tuple[float, float]:
    """``(coverage, threshold)``: the largest coverage whose selective risk is <= ``risk`` (0 and +inf if none)."""
    t, cov, r = risk_coverage(conf_N, correct_N)
    ok = np.flatnonzero(r <= risk + 1e-12)
    if ok.size == 0:
        return 0.0, float("inf")
    best = ok[np.argmax(cov[ok])]
    return float(cov[best]), float(t[best])


def risk_at_coverage(conf_N, correct_N, coverage: float) -> float:
    """The error rate among the ``ceil(coverage * N)`` most confident examples."""
    conf, correct = _order(conf_N, correct_N)
    k = max(1, math.ceil(coverage * conf.size - 1e-9))
    return float(np.mean(~correct[:k]))


def fpr_at_tpr(score_id_N, score_ood_M, tpr: float) -> float:
    """Fraction of OOD examples accepted (score >= t) at the largest t that accepts >= ``tpr`` of the ID ones."""
    s_id = np.sort(_vec(score_id_N, "score_id_N").astype(np.float64))[::-1]
    s_ood = _vec(score_ood_M, "score_ood_M").astype(np.float64)
    t = s_id[max(1, math.ceil(tpr * s_id.size - 1e-9)) - 1]
    return float(np.mean(s_ood >= t))


def auroc(score_id_N, score_ood_M) -> float:
    """Probability that an ID example scores above an OOD one (ties count one half)."""
    s_id = _vec(score_id_N, "score_id_N").astype(np.float64)
    s_ood = _vec(score_ood_M, "score_ood_M").astype(np.float64)
    ranks = scipy.stats.rankdata(np.concatenate([s_id, s_ood]))   # ties get their average rank
    u = ranks[:s_id.size].sum() - s_id.size * (s_id.size + 1) / 2
    return float(u / (s_id.size * s_ood.size))


__all__ = ["ece", "conformal_quantile", "lac_sets", "SetStats", "conformal_lac", "risk_coverage",
           "coverage_at_risk", "risk_at_coverage", "fpr_at_tpr", "auroc"]
