"""Machine-proof comparisons for the tests: XLA's CPU code generation differs between CPUs (and under
``--xla_cpu_max_isa``), so a score computed on two paths, or on two machines, differs in its last bits.

* ``threshold_between``: a threshold in a gap between observed scores near a quantile, the half-gap above a margin,
  so that no row sits on (or near) the threshold;
* ``clear_rows``: the rows whose every score (before the last exit) is at least a margin away from the threshold:
  only their exits can be compared with a recording made elsewhere;
* ``float_tol``: an ``assert_allclose`` tolerance from the computation's depth and dtype.
"""
from __future__ import annotations

import numpy as np

MARGIN = 1e-4   # score distance from a threshold that no float difference between paths or machines reaches


def threshold_between(scores, q: float, margin: float = MARGIN) -> float:
    """A threshold halfway across a gap between distinct observed ``scores``: the gap nearest the ``q`` quantile
    (in rank) whose half-width exceeds ``margin`` (asserted to exist)."""
    s = np.unique(np.asarray(scores, np.float64).ravel())
    assert len(s) >= 2, "need two distinct scores to put a threshold between"
    half_gaps = (s[1:] - s[:-1]) / 2
    target = q * (len(s) - 2)
    wide = np.flatnonzero(half_gaps > margin)
    assert wide.size, f"no gap between the scores wider than {2 * margin}"
    j = int(wide[np.argmin(np.abs(wide - target))])
    return float((s[j] + s[j + 1]) / 2)


def clear_rows(score_ExB, thr, margin: float = MARGIN) -> np.ndarray:
    """``bool[B]``: rows whose scores at every exit but the last lie at least ``margin`` from the threshold (scalar
    or one per exit), so that their exits are the same on any machine."""
    score_ExB = np.asarray(score_ExB, np.float64)
    thr_E = np.broadcast_to(np.asarray(thr, np.float64), score_ExB.shape[:1])
    dist_ExB = np.abs(score_ExB - thr_E[:, None])
    return np.all(dist_ExB[:-1] >= margin, axis=0)


def float_tol(depth: int, dtype=np.float32) -> dict:
    """``rtol`` / ``atol`` for outputs after ``depth`` layers in ``dtype``: ~200 ulps per layer (1.2e-4 for five
    float32 layers, 3e-4 for twelve; the issue saw 1.7e-5 between CPUs on five), capped for low precision."""
    tol = min(200 * depth * float(np.finfo(dtype).eps), 0.05)
    return dict(rtol=tol, atol=tol)
