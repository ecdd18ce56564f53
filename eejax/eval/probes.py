"""Per-layer linear probes: which layer of a network holds a feature, read out by a linear map fitted on held-out data.

A linear probe (Alain & Bengio 2016, arXiv:1610.01644) is a linear read-out trained on frozen activations; "How GPT
Learns Layer by Layer" (Du et al. 2025, arXiv:2501.07108) fits one per layer of OthelloGPT to ask at which depth the
board state becomes linearly decodable. The probes here are closed-form: standardised activations, ridge regression
onto the 0/1 targets (all targets of a feature in one solve), and a per-target threshold halfway between the two
classes' mean read-outs on the TRAIN data (the equal-prior linear discriminant rule: least squares onto a binary
target has the discriminant's direction, and the midpoint makes the rule indifferent to how rare a class is, e.g. a
square flipped by ~5% of moves). Nothing is fitted on the data it is scored on: fit on train games, score on others.

The score is the balanced accuracy (the mean of the two classes' recalls: 0.5 = chance whatever the class balance),
averaged over the targets both of whose classes occur often enough in train and test. ``balanced_scores`` returns it
as one number per example whose mean is exactly that average, so ``eejax.eval.bootstrap`` can resample examples (or
whole games) for its interval.

Read-outs come from the model's own forward: ``layer_states`` stacks the embedding and ``DecoderLM.hidden_states``
(every block's output under the engine's scan), so a probe sees exactly the residual stream the exits see.

Letters: N examples, D features (the residual width), C targets, L read-out points (embedding + N_layers blocks).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Probe(NamedTuple):
    """``predict(x) = ((x - mean) / scale) @ w + b >= threshold``, per target."""
    mean_D: np.ndarray
    scale_D: np.ndarray
    w_DxC: np.ndarray
    b_C: np.ndarray
    threshold_C: np.ndarray     # NaN where the train data lack one class (the target is then not scored)


def layer_states(model, tokens_BxT: jax.Array) -> jax.Array:
    """``L x B x T x D``: the residual stream at every read-out point of a ``DecoderLM`` (L = depth + 1: the token
    embedding, then each block's output), from its own teacher-forced forward."""
    h_NxBxTxD = model.hidden_states(tokens_BxT)
    return jnp.concatenate([model.embed_tokens(tokens_BxT)[None], h_NxBxTxD], axis=0)


def _xy(x_NxD, y_NxC):
    x_NxD = np.asarray(x_NxD, np.float64)
    y_NxC = np.asarray(y_NxC)
    if x_NxD.ndim != 2 or x_NxD.shape[0] < 2:
        raise ValueError(f"x_NxD must be N x D with N >= 2, got shape {x_NxD.shape}")
    if y_NxC.ndim != 2 or y_NxC.shape[0] != x_NxD.shape[0]:
        raise ValueError(f"y_NxC must be N x C with N = {x_NxD.shape[0]} (x's rows), got shape {y_NxC.shape}")
    return x_NxD, y_NxC


def fit_linear(x_NxD, y_NxC, *, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(mean_D, scale_D, w_DxC, b_C)``: ridge regression of ``y`` on the standardised ``x`` (the bias is not
    penalised; ``ridge`` is per example, so its strength does not change with N)."""
    x_NxD, y_NxC = _xy(x_NxD, y_NxC)
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge!r} must be >= 0")
    mean_D = x_NxD.mean(0)
    scale_D = x_NxD.std(0)
    scale_D = np.where(scale_D > 0, scale_D, 1.0)
    z_NxD = (x_NxD - mean_D) / scale_D
    y = y_NxC.astype(np.float64)
    y_mean_C = y.mean(0)
    gram_DxD = z_NxD.T @ z_NxD + ridge * len(z_NxD) * np.eye(z_NxD.shape[1])
    w_DxC = np.linalg.solve(gram_DxD, z_NxD.T @ (y - y_mean_C))     # z is centred: the bias is y's mean
    return mean_D, scale_D, w_DxC, y_mean_C


def readout(probe_or_fit, x_NxD) -> np.ndarray:
    """``N x C``: the linear read-out (before any threshold)."""
    mean_D, scale_D, w_DxC, b_C = probe_or_fit[:4]
    return ((np.asarray(x_NxD, np.float64) - mean_D) / scale_D) @ w_DxC + b_C


def fit_probe(x_NxD, y_NxC, *, ridge: float = 1e-3) -> Probe:
    """A linear probe per boolean target column of ``y``, fitted in closed form (see the module)."""
    x_NxD, y_NxC = _xy(x_NxD, y_NxC)
    y_NxC = y_NxC.astype(bool)
    fit = fit_linear(x_NxD, y_NxC, ridge=ridge)
    r_NxC = readout(fit, x_NxD)
    pos_C, neg_C = y_NxC.sum(0), (~y_NxC).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu1 = (r_NxC * y_NxC).sum(0) / pos_C
        mu0 = (r_NxC * ~y_NxC).sum(0) / neg_C
    threshold_C = np.where((pos_C > 0) & (neg_C > 0), (mu0 + mu1) / 2, np.nan)
    return Probe(*fit, threshold_C)


def predict(probe: Probe, x_NxD) -> np.ndarray:
    """Boolean ``N x C``: the probe's decision per target."""
    return readout(probe, x_NxD) >= probe.threshold_C


def balanced_scores(probe: Probe, x_NxD, y_NxC, *, min_count: int = 5,
                    train_counts_Cx2: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(score_N, used_C)``: per-example scores whose mean is the balanced accuracy averaged over the used targets.

    A target is used when each class has at least ``min_count`` examples here (and in ``train_counts_Cx2``, the
    ``[negatives, positives]`` of the probe's train data, when given) and the probe has a threshold. Example n
    scores ``mean_c correct_nc * N / (2 * count of n's class in target c)``."""
    x_NxD, y_NxC = _xy(x_NxD, y_NxC)
    y_NxC = y_NxC.astype(bool)
    counts_Cx2 = np.stack([(~y_NxC).sum(0), y_NxC.sum(0)], 1)
    used_C = (counts_Cx2.min(1) >= min_count) & np.isfinite(probe.threshold_C)
    if train_counts_Cx2 is not None:
        used_C &= np.asarray(train_counts_Cx2).min(1) >= min_count
    if not used_C.any():
        raise ValueError(f"no target has both classes at least min_count={min_count} times")
    correct_NxC = predict(probe, x_NxD) == y_NxC
    weight_NxC = len(y_NxC) / (2.0 * np.take_along_axis(np.maximum(counts_Cx2, 1), y_NxC.astype(int).T, 1).T)
    return (correct_NxC * weight_NxC)[:, used_C].mean(1), used_C


def class_counts(y_NxC) -> np.ndarray:
    """``C x 2``: negatives and positives per target (for ``balanced_scores(train_counts_Cx2=...)``)."""
    y_NxC = np.asarray(y_NxC, bool)
    return np.stack([(~y_NxC).sum(0), y_NxC.sum(0)], 1)


def split_games(num_games: int, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` indices: a random partition of ``num_games`` games, ``num_test`` of them held out. A probe is
    fitted on whole train games and scored on whole test games (positions of one game never on both sides)."""
    if not 1 <= num_test < num_games:
        raise ValueError(f"num_test={num_test} must be in [1, num_games={num_games})")
    order = np.random.default_rng(seed).permutation(num_games)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def layer_scores(h_train_LxNxD, y_train_NxC, h_test_LxMxD, y_test_MxC, *, ridge: float = 1e-3,
                 min_count: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(score_LxM, used_C)``: at each read-out point a probe fitted on the train examples, scored per test
    example (``balanced_scores``); the targets used are those usable at every read-out point (one set for all
    layers, so the layers are compared on the same targets)."""
    h_train_LxNxD, h_test_LxMxD = np.asarray(h_train_LxNxD), np.asarray(h_test_LxMxD)
    if h_train_LxNxD.ndim != 3 or h_test_LxMxD.shape[::2] != h_train_LxNxD.shape[::2]:
        raise ValueError(f"h_train_LxNxD {h_train_LxNxD.shape} and h_test_LxMxD {h_test_LxMxD.shape} must be "
                         "L x N x D and L x M x D with the same L and D")
    counts = class_counts(y_train_NxC)
    fitted = [fit_probe(h, y_train_NxC, ridge=ridge) for h in h_train_LxNxD]
    used_C = np.logical_and.reduce([balanced_scores(p, h, y_test_MxC, min_count=min_count,
                                                    train_counts_Cx2=counts)[1]
                                    for p, h in zip(fitted, h_test_LxMxD)])
    if not used_C.any():
        raise ValueError("no target is usable at every read-out point")
    return np.stack([_scores_on(p, h, y_test_MxC, used_C) for p, h in zip(fitted, h_test_LxMxD)]), used_C


def _scores_on(probe: Probe, x_NxD, y_NxC, used_C) -> np.ndarray:
    kept = Probe(probe.mean_D, probe.scale_D, probe.w_DxC[:, used_C], probe.b_C[used_C], probe.threshold_C[used_C])
    return balanced_scores(kept, x_NxD, np.asarray(y_NxC)[:, used_C], min_count=0)[0]
