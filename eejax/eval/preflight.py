"""Preflight gates for a depth-allocation comparison on a generative model (DeeDiff's, arXiv:2309.17074).

An exit policy can only beat "the same number of layers for every step" when (a) the full-depth model works and
(b) depth matters: a truncated model is clearly worse. The first DeeDiff run in eejax met neither (its base labelled
24% of its own samples with their class, and uniform truncation at 3 of 7 layers equalled full depth), so its policy
comparison carried no evidence either way. These checks are computed from the run and printed before any policy
comparison; a failed one turns every verdict into "inconclusive at this scale" (``gated_verdict``).

* ``depth_preflight``: (a) class accuracy of full-depth class-conditional samples (a classifier trained on the real
  data labels them) >= ``min_acc``; (b) ``cFID(uniform truncation at ratio r) >= min_cfid_ratio x cFID(full)``.
  The thresholds (90%, r = 0.4, 1.2x) are the re-plan in the project's PAPERS-WAVE4 notes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

INCONCLUSIVE = "inconclusive at this scale"


class Preflight(NamedTuple):
    full_class_acc: float   # fraction of full-depth samples the classifier labels with their conditioning class
    cfid_full: float
    cfid_truncated: float   # cFID of uniform truncation at ``truncated_ratio`` of the depth
    truncated_ratio: float
    cfid_ratio: float       # cfid_truncated / cfid_full (inf when cfid_full is 0 and truncation is worse)
    min_acc: float
    min_cfid_ratio: float
    acc_ok: bool
    depth_ok: bool
    passed: bool
    line: str               # one plain line for the top of a report

    def as_dict(self) -> dict:
        return self._asdict()


def depth_preflight(full_class_acc: float, cfid_full: float, cfid_truncated: float, *,
                    truncated_ratio: float = 0.4, min_acc: float = 0.9, min_cfid_ratio: float = 1.2) -> Preflight:
    """Both gates and the line that states them (``preflight passed: ...`` or ``preflight failed: ...; the policy
    comparison below is not evidence``)."""
    acc = float(full_class_acc)
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"full_class_acc must be a fraction in [0, 1], got {full_class_acc!r}")
    for name, v in (("cfid_full", cfid_full), ("cfid_truncated", cfid_truncated)):
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
    if not 0.0 < truncated_ratio < 1.0:
        raise ValueError(f"truncated_ratio must be in (0, 1), got {truncated_ratio!r}")
    if not 0.0 < min_acc <= 1.0:
        raise ValueError(f"min_acc must be in (0, 1], got {min_acc!r}")
    if not min_cfid_ratio >= 1.0:
        raise ValueError(f"min_cfid_ratio must be >= 1, got {min_cfid_ratio!r}")
    cfid_full, cfid_truncated = float(cfid_full), float(cfid_truncated)
    if cfid_full > 0:
        ratio = cfid_truncated / cfid_full
    else:
        ratio = math.inf if cfid_truncated > 0 else 1.0
    acc_ok, depth_ok = acc >= min_acc, ratio >= min_cfid_ratio
    a = f"(a) full-depth samples labelled with their class {100 * acc:.1f}% (need >= {100 * min_acc:g}%)"
    b = (f"(b) cFID(uniform @{truncated_ratio:g}) / cFID(full) = {cfid_truncated:.3g} / {cfid_full:.3g} = "
         f"{ratio:.2f} (need >= {min_cfid_ratio:g}: depth must matter)")
    if acc_ok and depth_ok:
        line = f"preflight passed: {a}; {b}."
    else:
        failed = [s for s, ok in ((a, acc_ok), (b, depth_ok)) if not ok]
        passed_too = [s + " ok" for s, ok in ((a, acc_ok), (b, depth_ok)) if ok]
        line = ("preflight failed: " + "; ".join(failed + passed_too)
                + "; the policy comparison below is not evidence.")
    return Preflight(acc, cfid_full, cfid_truncated, float(truncated_ratio), ratio, float(min_acc),
                     float(min_cfid_ratio), acc_ok, depth_ok, acc_ok and depth_ok, line)


def gated_verdict(preflight: Preflight, verdict: str) -> str:
    """``verdict`` when the preflight passed, else ``inconclusive at this scale`` (whatever the comparison said)."""
    return verdict if preflight.passed else INCONCLUSIVE
