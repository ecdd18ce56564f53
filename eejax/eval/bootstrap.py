"""Uncertainty of a comparison "A beats B": the difference of a statistic and its bootstrap interval.

A result table that says "A beats B" without an interval cannot tell a win from noise. Two cases:

* ``paired_bootstrap``: A and B measured on the SAME examples (one test set, one set of prompts): resample the
  examples (the same indices for both arms) and take the percentile interval of statistic(A*) - statistic(B*)
  (Efron & Tibshirani 1993, ch. 13). Pairing removes the example-to-example variance both arms share, so it is the
  test to use whenever per-example metrics of both arms exist. ``groups_N`` resamples whole groups (a window's
  tokens, a prompt's tokens) instead of single examples, for metrics that are correlated within a group.
* ``bootstrap_difference``: A and B measured on different examples (accepted vs rejected drafts): each resampled on
  its own.
* ``proportion_difference``: only the two accuracies and the number of examples are known (old results that kept no
  per-example predictions): the normal interval of two independent proportions. On a shared test set it is
  CONSERVATIVE (the paired variance is var A + var B - 2 cov, and two classifiers' errors correlate positively): a
  difference outside it is a difference; one inside it may still be one a paired test would separate.

``transform`` maps a resampled mean to the reported statistic, e.g. ``np.exp`` on per-window mean NLL gives
perplexity. Every function returns a ``Difference``; ``Difference.separated`` says whether the interval excludes 0
and ``Difference.reading`` words it ("A above B" or "no difference at this scale").

Letters: N examples of the paired arms (M for the second arm when unpaired), R resamples.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.stats

_CHUNK = 256   # resamples per vectorised block (R x N indices held at once)


class Difference(NamedTuple):
    """``diff`` = statistic(A) - statistic(B) on the full sample; ``[lo, hi]`` its ``level`` interval."""
    diff: float
    lo: float
    hi: float
    level: float
    n: int            # examples (or groups) resampled; for unpaired: those of A
    method: str       # "paired bootstrap (R resamples)", "bootstrap (...)", "normal, two proportions"

    @property
    def separated(self) -> bool:
        """True when the interval excludes 0: A and B differ at this scale."""
        return self.lo > 0 or self.hi < 0

    def reading(self, a: str = "A", b: str = "B") -> str:
        """``"A above B"`` / ``"A below B"``, or ``"no difference at this scale"`` when the interval holds 0."""
        if not self.separated:
            return "no difference at this scale"
        return f"{a} {'above' if self.diff > 0 else 'below'} {b}"

    def text(self, fmt: str = ".3g") -> str:
        """``"+0.85 [+0.31, +1.40]"``: the difference and its interval."""
        return f"{self.diff:+{fmt}} [{self.lo:+{fmt}}, {self.hi:+{fmt}}]"


def _vec(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty vector, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds non-finite values")
    return x


def _check(level: float, resamples: int):
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a percentile interval, got {resamples}")


def _group_sums(x_N: np.ndarray, inverse_N: np.ndarray, g: int) -> np.ndarray:
    return np.bincount(inverse_N, weights=x_N, minlength=g)


def _resampled_means(rng, sums_G: np.ndarray, counts_G: np.ndarray, resamples: int) -> np.ndarray:
    """Means of ``resamples`` bootstrap samples that draw G groups with replacement (sum of values / sum of
    counts), in blocks of ``_CHUNK`` so R x G indices never sit in memory at once."""
    g = sums_G.shape[0]
    out = np.empty((resamples, sums_G.shape[1]) if sums_G.ndim == 2 else resamples)
    for s in range(0, resamples, _CHUNK):
        idx_RxG = rng.integers(0, g, (min(_CHUNK, resamples - s), g))
        tot = counts_G[idx_RxG].sum(1)
        out[s:s + idx_RxG.shape[0]] = (sums_G[idx_RxG].sum(1) / (tot[:, None] if sums_G.ndim == 2 else tot))
    return out


def paired_bootstrap(a_N, b_N, *, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                     groups_N=None, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Difference:
    """statistic(A) - statistic(B) over the same N examples, with its paired percentile bootstrap interval.

    ``a_N``, ``b_N``: per-example metrics of the two arms, example i the same input in both (accuracy as 0/1,
    per-token NLL, per-prompt agreement). The statistic is ``transform(mean)`` (the mean when ``transform`` is
    None). ``groups_N``: a group id per example; whole groups are resampled (the mean is then over the examples of
    the drawn groups), for examples correlated within a group (the tokens of one window).
    """
    _check(level, resamples)
    a_N, b_N = _vec(a_N, "a_N"), _vec(b_N, "b_N")
    if a_N.shape != b_N.shape:
        raise ValueError(f"paired arms must have the same examples: {a_N.shape=} != {b_N.shape=}")
    if groups_N is None:
        inverse_N = np.arange(a_N.size)
    else:
        groups_N = np.asarray(groups_N)
        if groups_N.shape != a_N.shape:
            raise ValueError(f"groups_N must give one group per example: {groups_N.shape=} != {a_N.shape=}")
        inverse_N = np.unique(groups_N, return_inverse=True)[1].ravel()
    g = int(inverse_N.max()) + 1
    sums_Gx2 = np.stack([_group_sums(a_N, inverse_N, g), _group_sums(b_N, inverse_N, g)], 1)
    counts_G = np.bincount(inverse_N, minlength=g).astype(np.float64)
    f = transform or (lambda m: m)
    means_Rx2 = _resampled_means(np.random.default_rng(seed), sums_Gx2, counts_G, resamples)
    diff_R = f(means_Rx2[:, 0]) - f(means_Rx2[:, 1])
    lo, hi = np.quantile(diff_R, [(1 - level) / 2, (1 + level) / 2])
    diff = float(f(np.asarray(a_N.mean())) - f(np.asarray(b_N.mean())))
    return Difference(diff, float(lo), float(hi), level, g, f"paired bootstrap ({resamples} resamples"
                      + (f", {g} groups)" if groups_N is not None else ")"))


def bootstrap_difference(a_N, b_M, *, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                         level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Difference:
    """statistic(A) - statistic(B) for two independent samples (different examples), each resampled on its own."""
    _check(level, resamples)
    a_N, b_M = _vec(a_N, "a_N"), _vec(b_M, "b_M")
    rng = np.random.default_rng(seed)
    f = transform or (lambda m: m)
    ma = _resampled_means(rng, a_N, np.ones_like(a_N), resamples)
    mb = _resampled_means(rng, b_M, np.ones_like(b_M), resamples)
    diff_R = f(ma) - f(mb)
    lo, hi = np.quantile(diff_R, [(1 - level) / 2, (1 + level) / 2])
    diff = float(f(np.asarray(a_N.mean())) - f(np.asarray(b_M.mean())))
    return Difference(diff, float(lo), float(hi), level, a_N.size, f"bootstrap of independent samples "
                      f"({resamples} resamples, {a_N.size} vs {b_M.size})")


def expand_histogram(counts_K, centres_K) -> np.ndarray:
    """The sample a histogram stands for: ``centres_K[k]`` repeated ``counts_K[k]`` times (bin-centre values)."""
    counts_K = np.asarray(counts_K)
    if counts_K.shape != np.shape(centres_K) or np.any(counts_K < 0):
        raise ValueError(f"counts_K must be non-negative counts, one per bin centre: {counts_K.shape=}, "
                         f"{np.shape(centres_K)=}")
    return np.repeat(np.asarray(centres_K, np.float64), counts_K.astype(np.int64))


def proportion_difference(p_a: float, p_b: float, n: int, *, n_b: int | None = None,
                          level: float = 0.95) -> Difference:
    """p_a - p_b with the normal interval of two independent proportions over n (and n_b) examples: the
    conservative bound for two accuracies on one test set when no per-example predictions were kept."""
    for name, p in (("p_a", p_a), ("p_b", p_b)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a proportion in [0, 1], got {p}")
    n_b = n if n_b is None else n_b
    if n < 1 or n_b < 1:
        raise ValueError(f"n and n_b must be >= 1, got {n=}, {n_b=}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    z = float(scipy.stats.norm.ppf((1 + level) / 2))
    se = math.sqrt(p_a * (1 - p_a) / n + p_b * (1 - p_b) / n_b)
    d = p_a - p_b
    return Difference(d, d - z * se, d + z * se, level, n, "normal, two independent proportions (conservative "
                      "when paired)")


__all__ = ["Difference", "paired_bootstrap", "bootstrap_difference", "expand_histogram", "proportion_difference"]
