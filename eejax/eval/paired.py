"""Paired bootstrap of a statistic that is a function of per-example SUMS (mIoU of summed confusion matrices, an
accuracy, a ratio of two totals): the difference statistic(A) - statistic(B) over the same N examples, and its
percentile interval from resampling the examples (the same indices for both arms; Efron & Tibshirani 1993, ch. 13).

A mean of per-example scalars is the special case ``stat = lambda s: s[0] / s[1]`` over ``[x_N, ones_N]``; a
segmentation's mIoU is ``stat = miou`` over per-image confusion matrices, which no mean of per-image scalars gives.

Letters: N examples, R resamples, K the trailing shape of each example's contribution.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from eejax.eval.bootstrap import Difference

_CHUNK = 200   # resamples per block: R x N indices are never held at once


# The result type of every interval in eejax.eval (``bootstrap.Difference``), under this module's older name.
PairedDifference = Difference


def paired_bootstrap_sums(stat: Callable[[np.ndarray], float], a_NxK, b_NxK, *, level: float = 0.95,
                          resamples: int = 2000, seed: int = 0) -> PairedDifference:
    """stat(sum of A's rows) - stat(sum of B's rows), with the paired percentile bootstrap over the N rows."""
    a, b = np.asarray(a_NxK, np.float64), np.asarray(b_NxK, np.float64)
    if a.shape != b.shape or a.ndim < 1 or a.shape[0] < 2:
        raise ValueError(f"paired arms need the same N >= 2 examples: {a.shape=} {b.shape=}")
    if not 0 < level < 1 or resamples < 100:
        raise ValueError(f"need 0 < level < 1 and resamples >= 100, got {level=}, {resamples=}")
    n = a.shape[0]
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for s in range(0, resamples, _CHUNK):
        r = min(_CHUNK, resamples - s)
        counts_RxN = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(r)]).astype(np.float64)
        sa = np.tensordot(counts_RxN, a, axes=(1, 0))
        sb = np.tensordot(counts_RxN, b, axes=(1, 0))
        diffs[s:s + r] = [stat(x) - stat(y) for x, y in zip(sa, sb)]
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(float(stat(a.sum(0)) - stat(b.sum(0))), float(lo), float(hi), level, n,
                            f"paired bootstrap ({resamples} resamples of {n} examples)")


def mean_difference(a_N, b_N, **kw) -> PairedDifference:
    """mean(A) - mean(B) over the same N examples (``paired_bootstrap_sums`` of the means)."""
    a, b = np.asarray(a_N, np.float64), np.asarray(b_N, np.float64)
    if a.ndim != 1:
        raise ValueError(f"a_N must be a vector, got shape {a.shape}")
    ones = np.ones_like(a)
    return paired_bootstrap_sums(lambda s: s[0] / s[1], np.stack([a, ones], 1), np.stack([b, ones], 1), **kw)


def mean_interval(x_N, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: a mean and its percentile bootstrap interval."""
    x = np.asarray(x_N, np.float64)
    d = mean_difference(x, np.zeros_like(x), level=level, resamples=resamples, seed=seed)
    return d.diff, d.lo, d.hi


__all__ = ["PairedDifference", "paired_bootstrap_sums", "mean_difference", "mean_interval"]
