"""Classifier-feature FID and KID: offline image-quality proxies from a small classifier trained in-repo.

NOT Inception FID. The Fréchet distance (Heusel et al., 2017) and the kernel inception distance (Bińkowski et al.,
2018) are computed exactly as usual, but on the penultimate features (F = 128) of ``SmallCNN``, a two-conv network
trained here on the same dataset (MNIST / Fashion-MNIST), because Inception weights cannot be downloaded. Numbers
are therefore comparable only with each other (same classifier checkpoint, same reference set, same sample count),
never with published FIDs.

Shapes: Q examples, F feature width, HxWxC an image, C classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# --------------------------------------------------------------------------------------------- classifier


class SmallCNN(nnx.Module):
    """conv3x3(32) - relu - avgpool2 - conv3x3(64) - relu - avgpool2 - dense(F) - relu [features] - dense(C)."""

    def __init__(self, channels: int = 1, image_size: int = 28, num_classes: int = 10, features: int = 128, *,
                 rngs: nnx.Rngs):
        if image_size % 4:
            raise ValueError(f"{image_size=} must be divisible by 4 (two 2x2 poolings)")
        self.conv1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.fc = nnx.Linear((image_size // 4) ** 2 * 64, features, rngs=rngs)
        self.cls = nnx.Linear(features, num_classes, rngs=rngs)

    def features(self, x_BxHxWxC: jax.Array) -> jax.Array:
        h = nnx.avg_pool(jax.nn.relu(self.conv1(x_BxHxWxC)), (2, 2), (2, 2))
        h = nnx.avg_pool(jax.nn.relu(self.conv2(h)), (2, 2), (2, 2))
        return jax.nn.relu(self.fc(h.reshape(h.shape[0], -1)))

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        return self.cls(self.features(x_BxHxWxC))


def build_classifier(seed: int = 0, **kw):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: SmallCNN(**kw, rngs=nnx.Rngs(0))))
    params = jax.jit(lambda key: nnx.state(SmallCNN(**kw, rngs=nnx.Rngs(key))))(jax.random.key(seed))
    return graphdef, params


def classifier_loss(graphdef):
    """Cross-entropy ``loss_fn(params, batch, ctx)`` for the Trainer (batch: image in [-1, 1], int label)."""
    def loss_fn(params, batch, ctx):
        del ctx
        logits = nnx.merge(graphdef, params)(batch["image"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        ce = -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None].astype(jnp.int32), axis=-1))
        return ce, {"acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return loss_fn


def apply_batched(fn, params, x_QxHxWxC: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """``fn(params, x)`` over ``x`` in fixed-size chunks (the last padded, so one compile), concatenated."""
    outs, n = [], x_QxHxWxC.shape[0]
    for i in range(0, n, batch_size):
        x = np.asarray(x_QxHxWxC[i:i + batch_size])
        k = x.shape[0]
        if k < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
        outs.append(np.asarray(fn(params, x))[:k])
    return np.concatenate(outs)


def feature_fn(graphdef):
    return jax.jit(lambda params, x: nnx.merge(graphdef, params).features(x))


def logits_fn(graphdef):
    return jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))


# ---------------------------------------------------------------------------------------------- distances


def _sqrtm_psd(m_FxF: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m_FxF + m_FxF.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1_F, cov1_FxF, mu2_F, cov2_FxF) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64.

    ``tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2))``: the eigenvalues of a symmetric PSD matrix, so no
    complex matrix square root is needed.
    """
    mu1, mu2 = np.asarray(mu1_F, np.float64), np.asarray(mu2_F, np.float64)
    c1, c2 = np.asarray(cov1_FxF, np.float64), np.asarray(cov2_FxF, np.float64)
    s1 = _sqrtm_psd(c1)
    eig = np.linalg.eigvalsh(s1 @ c2 @ s1)
    tr_sqrt = np.sum(np.sqrt(np.clip(eig, 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt)


def fid_from_features(feats1_QxF: np.ndarray, feats2_QxF: np.ndarray) -> float:
    """FID between two feature sets (sample covariance with N - 1)."""
    f1, f2 = np.asarray(feats1_QxF, np.float64), np.asarray(feats2_QxF, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two N x F feature sets with N >= 2, got {f1.shape} and {f2.shape}")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def polynomial_mmd2(x_QxF: np.ndarray, y_QxF: np.ndarray) -> float:
    """Unbiased MMD^2 with the KID kernel ``k(a, b) = (a.b / F + 1)^3`` (Bińkowski et al., 2018, Eq. 3)."""
    x, y = np.asarray(x_QxF, np.float64), np.asarray(y_QxF, np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def kid_from_features(feats1_QxF: np.ndarray, feats2_QxF: np.ndarray, *, num_subsets: int = 50,
                      subset_size: int = 500, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of the unbiased polynomial MMD^2 over random subsets (as in torch-fidelity / clean-fid)."""
    f1, f2 = np.asarray(feats1_QxF), np.asarray(feats2_QxF)
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 examples per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    vals = [polynomial_mmd2(f1[rng.choice(len(f1), size, replace=False)], f2[rng.choice(len(f2), size, replace=False)])
            for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


__all__ = ["SmallCNN", "build_classifier", "classifier_loss", "apply_batched", "feature_fn", "logits_fn",
           "frechet_distance", "fid_from_features", "polynomial_mmd2", "kid_from_features"]
