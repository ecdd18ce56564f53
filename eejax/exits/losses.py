"""Multi-exit training losses. Shapes: E exits, B batch, C classes, D feature width.

* ``multi_exit_ce``: weighted cross-entropy over all exits with ``exit_weights`` uniform / linear-in-depth /
  geometric (the "weighted" strategy of SDN and DeeBERT-style training).
* ``lgvit_stage1_weights``: LGViT's "alternating_weighted" stage 1 (Xu et al. 2023, official code): even steps train
  the final classifier only; odd steps train every exit with weights proportional to its depth.
* ``kd_loss``: Hinton distillation, ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, teacher stop-gradient.
* ``lgvit_stage2_loss``: LGViT stage 2 on a frozen backbone: ``(1-alpha) * mean CE + alpha * mean KD`` from the final
  exit, plus heterogeneous feature distillation (each head's feature towards the final layer's) and homogeneous
  distillation (each head towards the deepest head of its own family), both weighted 0.01 in the paper.
* ``gate_loss``: trains the learned exit gate to predict "this exit's argmax is correct" (binary cross-entropy).
* ``info_nce``: in-batch contrastive retrieval loss (query i's positive is key i, the other keys are negatives).
* ``similarity_distill``: a shallow exit's query-key similarity distribution pulled towards a deeper exit's
  (teacher stop-gradient): the "higher layers guide earlier layers" self-distillation of MODULARSTARENCODER.
* ``ponder_loss``: PonderNet / PALBERT (arXiv:2204.03276): expected task loss under the halting distribution
  ``p_ExB`` plus ``beta * KL(p || truncated geometric prior)``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Mean CE with integer labels (log_softmax + take_along_axis: shards cleanly, see JAX-NOTES §5)."""
    logp = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels_B[:, None].astype(jnp.int32), axis=-1))


def exit_weights(exit_layers: Sequence[int], kind: str = "uniform", gamma: float = 2.0) -> np.ndarray:
    """Per-exit loss weights summing to 1: ``uniform``, ``linear`` (proportional to depth), ``geometric``, or
    ``decaying`` (falling linearly with the exit's position, E for the first of E exits down to 1 for the last:
    DYNAMAX, arXiv:2504.20922, weights its exit classifiers' losses so)."""
    depth = np.asarray(exit_layers, np.float64) + 1
    if kind == "uniform":
        w = np.ones_like(depth)
    elif kind == "linear":
        w = depth
    elif kind == "geometric":
        w = gamma ** np.arange(len(depth), dtype=np.float64)
    elif kind == "decaying":
        w = np.arange(len(depth), 0, -1, dtype=np.float64)
    else:
        raise ValueError(f"unknown exit weighting {kind!r}; choose from uniform, linear, geometric, decaying")
    return w / w.sum()


def per_exit_ce(logits_ExBxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    return jax.vmap(cross_entropy, in_axes=(0, None))(logits_ExBxC, labels_B)


def multi_exit_ce(logits_ExBxC, labels_B, weights_E) -> tuple[jax.Array, jax.Array]:
    """Weighted CE over exits; returns (loss, ce per exit)."""
    ce_E = per_exit_ce(logits_ExBxC, labels_B)
    return jnp.sum(jnp.asarray(weights_E, jnp.float32) * ce_E), ce_E


def lgvit_stage1_weights(step: jax.Array, exit_layers: Sequence[int]) -> jax.Array:
    """Even steps: final exit only. Odd steps: all exits, weight proportional to depth (layer index + 1)."""
    final_only = jnp.zeros(len(exit_layers)).at[-1].set(1.0)
    weighted = jnp.asarray(exit_weights(exit_layers, "linear"), jnp.float32)
    return jnp.where(step % 2 == 0, final_only, weighted)


def kd_loss(student_logits_BxC, teacher_logits_BxC, temperature: float) -> jax.Array:
    t = temperature
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_BxC).astype(jnp.float32) / t, axis=-1)
    student = jax.nn.log_softmax(student_logits_BxC.astype(jnp.float32) / t, axis=-1)
    return t * t * jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1))


def feature_mse(feat_BxD, target_BxD) -> jax.Array:
    return jnp.mean((feat_BxD.astype(jnp.float32) - jax.lax.stop_gradient(target_BxD).astype(jnp.float32)) ** 2)


class Stage2Terms(NamedTuple):
    ce: jax.Array
    kd: jax.Array
    hetero: jax.Array
    homo: jax.Array
    total: jax.Array


def lgvit_stage2_loss(logits_ExBxC, feat_ExBxD, final_feat_BxD, labels_B, head_kinds: Sequence[str], *,
                      temperature: float = 2.0, alpha: float = 0.3, hetero_weight: float = 0.01,
                      homo_weight: float = 0.01) -> Stage2Terms:
    """LGViT stage 2 (backbone frozen): exits learn from labels, the final exit's logits, and features."""
    num_early = logits_ExBxC.shape[0] - 1
    ce = jnp.mean(per_exit_ce(logits_ExBxC, labels_B))
    kd = jnp.mean(jnp.stack([kd_loss(logits_ExBxC[e], logits_ExBxC[-1], temperature) for e in range(num_early)]))
    hetero = jnp.mean(jnp.stack([feature_mse(feat_ExBxD[e], final_feat_BxD) for e in range(num_early)]))
    homo_terms = []
    for kind in set(head_kinds[:num_early]):
        members = [e for e in range(num_early) if head_kinds[e] == kind]
        homo_terms += [feature_mse(feat_ExBxD[e], feat_ExBxD[members[-1]]) for e in members[:-1]]
    homo = jnp.mean(jnp.stack(homo_terms)) if homo_terms else jnp.float32(0)
    total = (1 - alpha) * ce + alpha * kd + hetero_weight * hetero + homo_weight * homo
    return Stage2Terms(ce, kd, hetero, homo, total)


def gate_loss(gate_ExB, logits_ExBxC, labels_B) -> jax.Array:
    correct_ExB = (jnp.argmax(logits_ExBxC, -1) == labels_B[None]).astype(jnp.float32)
    return jnp.mean(jnp.maximum(gate_ExB, 0) - gate_ExB * correct_ExB + jnp.log1p(jnp.exp(-jnp.abs(gate_ExB))))


class PonderTerms(NamedTuple):
    rec: jax.Array    # expected CE under the halting distribution
    kl: jax.Array     # KL(p || geometric prior), mean over the batch
    total: jax.Array


def ponder_loss(logits_ExBxC, p_ExB, labels_B, *, prior_lambda: float, beta: float) -> PonderTerms:
    """PonderNet's loss as PALBERT trains it: ``sum_l p_l CE_l + beta * KL(p || Geometric(prior_lambda))``, the
    prior truncated to the E exits and renormalised."""
    if not 0.0 < prior_lambda < 1.0:
        raise ValueError(f"{prior_lambda=} must be in (0, 1)")
    num_exits = logits_ExBxC.shape[0]
    logp = jax.nn.log_softmax(logits_ExBxC.astype(jnp.float32), axis=-1)
    ce_ExB = -jnp.take_along_axis(logp, labels_B[None, :, None].astype(jnp.int32), axis=-1)[..., 0]
    rec = jnp.mean(jnp.sum(p_ExB * ce_ExB, axis=0))
    prior_E = prior_lambda * (1.0 - prior_lambda) ** np.arange(num_exits)
    prior_E = jnp.asarray(prior_E / prior_E.sum(), jnp.float32)
    kl = jnp.mean(jnp.sum(p_ExB * (jnp.log(p_ExB + 1e-9) - jnp.log(prior_E)[:, None]), axis=0))
    return PonderTerms(rec, kl, rec + beta * kl)


def info_nce(q_BxD, k_BxD, temperature: float) -> jax.Array:
    """Symmetric in-batch InfoNCE on L2-normalised embeddings: row i of ``q`` matches row i of ``k``."""
    q = q_BxD / jnp.linalg.norm(q_BxD, axis=-1, keepdims=True)
    k = k_BxD / jnp.linalg.norm(k_BxD, axis=-1, keepdims=True)
    logits_BxB = (q @ k.T).astype(jnp.float32) / temperature
    labels_B = jnp.arange(q.shape[0])
    return 0.5 * (cross_entropy(logits_BxB, labels_B) + cross_entropy(logits_BxB.T, labels_B))


def similarity_distill(student_q_BxD, student_k_BxD, teacher_q_BxD, teacher_k_BxD, temperature: float) -> jax.Array:
    """KL(teacher || student) between the in-batch retrieval distributions (rows: queries over keys)."""
    def sim(q, k):
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        return (q @ k.T).astype(jnp.float32)
    return kd_loss(sim(student_q_BxD, student_k_BxD) / temperature, sim(teacher_q_BxD, teacher_k_BxD) / temperature,
                   1.0)
