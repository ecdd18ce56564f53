"""Threshold calibration with Learn-then-Test (Angelopoulos et al. 2021, arXiv:2110.01052), as CALM uses it.

Goal (CALM, Schuster et al. 2022, Sec. 3): pick the smallest exit threshold lambda such that the risk of textual
inconsistency with the full model is at most ``epsilon`` with probability at least ``1 - delta`` over the draw of
the calibration set. Each calibration sequence gives a bounded loss in [0, 1] (here: 1 - fraction of generated
tokens equal to the full model's); for every candidate lambda, the null hypothesis "risk(lambda) > epsilon" gets a
Hoeffding-Bentkus p-value; candidates are tested in a fixed sequence from the most conservative (highest
threshold) down, and the procedure stops at the first one it cannot reject. Fixed-sequence testing controls the
family-wise error at ``delta`` without a multiplicity correction.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (no scipy needed)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    i = np.arange(k + 1)
    logs = (np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in i])
            + i * math.log(p) + (n - i) * math.log1p(-p))
    m = logs.max()
    return float(min(1.0, math.exp(m) * np.exp(logs - m).sum()))


def hoeffding_bentkus_pvalue(risk_hat: float, n: int, epsilon: float) -> float:
    """p-value of H0: risk > epsilon, given the mean ``risk_hat`` of ``n`` i.i.d. losses in [0, 1]
    (Bates et al. 2021, RCPS, Prop. 3 / Eq. 12: the minimum of the Hoeffding and Bentkus p-values)."""
    if not 0 < epsilon < 1:
        raise ValueError(f"{epsilon=} must lie in (0, 1)")
    r = min(max(risk_hat, 0.0), epsilon)
    if r <= 0:
        h1 = -math.log1p(-epsilon)     # h1(0, eps) = log(1 / (1 - eps))
    else:
        h1 = r * math.log(r / epsilon) + (1 - r) * math.log((1 - r) / (1 - epsilon))
    hoeffding = math.exp(-n * h1)
    bentkus = math.e * _binom_cdf(math.ceil(n * risk_hat), n, epsilon)
    return min(hoeffding, bentkus, 1.0)


class LTTResult(NamedTuple):
    threshold: float | None      # the smallest certified threshold (None: not even the first could be certified)
    certified: list[float]       # thresholds certified, in test order
    p_values: list[float]        # p-value of every candidate, in test order
    risks: list[float]           # empirical risk of every candidate, in test order


def learn_then_test(thresholds: Sequence[float], losses_per_threshold: Sequence[np.ndarray], epsilon: float,
                    delta: float) -> LTTResult:
    """Fixed-sequence LTT. ``losses_per_threshold[j]``: the per-example losses (in [0, 1]) at ``thresholds[j]``.

    Candidates are tested from the highest threshold (safest) to the lowest; the returned threshold is the last one
    rejected before the first failure.
    """
    if len(thresholds) != len(losses_per_threshold):
        raise ValueError(f"{len(thresholds)} thresholds but {len(losses_per_threshold)} loss arrays")
    order = np.argsort(-np.asarray(thresholds, np.float64), kind="stable")
    certified, pvals, risks, stopped = [], [], [], False
    for j in order:
        loss = np.asarray(losses_per_threshold[j], np.float64)
        if loss.min() < 0 or loss.max() > 1:
            raise ValueError("losses must lie in [0, 1]")
        risk = float(loss.mean())
        p = hoeffding_bentkus_pvalue(risk, loss.size, epsilon)
        risks.append(risk)
        pvals.append(p)
        if not stopped and p <= delta:
            certified.append(float(thresholds[j]))
        else:
            stopped = True
    return LTTResult(certified[-1] if certified else None, certified, pvals, risks)
