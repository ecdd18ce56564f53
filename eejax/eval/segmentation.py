"""Semantic segmentation metrics over per-image confusion matrices: mIoU and its paired bootstrap.

IoU of class c = TP / (TP + FP + FN) over the whole test set (the confusion matrices summed over images, as
mmsegmentation computes it); mIoU averages over the classes present in the labels or the predictions. Keeping one
matrix per image lets the paired bootstrap (``eejax.eval.paired``) resample images.

Letters: N images, P pixels or tokens per image, C classes.
"""
from __future__ import annotations

import numpy as np

from eejax.eval import paired


def confusion_matrices(pred_NxP, label_NxP, num_classes: int) -> np.ndarray:
    """``int64[N, C, C]``: entry ``[n, i, j]`` counts image n's pixels of label i predicted as j."""
    pred, label = np.asarray(pred_NxP), np.asarray(label_NxP)
    if pred.shape != label.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and label {label.shape} must both be N x P")
    if pred.size and (min(pred.min(), label.min()) < 0 or max(pred.max(), label.max()) >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes=})")
    n = pred.shape[0]
    flat = (np.arange(n)[:, None] * num_classes * num_classes + label * num_classes + pred).ravel()
    return np.bincount(flat, minlength=n * num_classes ** 2).reshape(n, num_classes, num_classes)


def iou_per_class(conf_CxC) -> np.ndarray:
    """IoU of each class (NaN for a class neither labelled nor predicted)."""
    conf = np.asarray(conf_CxC, np.float64)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def miou(conf_CxC) -> float:
    """Mean IoU over the classes that occur (labelled or predicted)."""
    return float(np.nanmean(iou_per_class(conf_CxC)))


def miou_difference(conf_a_NxCxC, conf_b_NxCxC, **kw) -> paired.PairedDifference:
    """mIoU(A) - mIoU(B) on the same images, with the paired bootstrap over images (``paired``)."""
    return paired.paired_bootstrap_sums(miou, conf_a_NxCxC, conf_b_NxCxC, **kw)


def miou_interval(conf_NxCxC, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
                  ) -> tuple[float, float, float]:
    """``(mIoU, lo, hi)``: the test set's mIoU and its percentile bootstrap interval over images."""
    conf = np.asarray(conf_NxCxC)
    n = conf.shape[0]
    rng = np.random.default_rng(seed)
    boot = [miou(np.tensordot(np.bincount(rng.integers(0, n, n), minlength=n), conf, axes=(0, 0)))
            for _ in range(resamples)]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return miou(conf.sum(0)), float(lo), float(hi)


__all__ = ["confusion_matrices", "iou_per_class", "miou", "miou_difference", "miou_interval"]
