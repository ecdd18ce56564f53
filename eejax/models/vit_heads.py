"""Exit heads. Each maps backbone tokens ``h_BxTxD`` (CLS first, then a ``gh x gw`` patch grid) to a HeadOut.

* ``LinearHead``: LayerNorm, CLS or mean pooling, linear classifier (DeeBERT/BranchyNet-style baseline).
* ``LocalPerceptionHead`` (LGViT, Xu et al. ACM MM'23, Sec. 3.2): on the patch grid, 1x1 conv -> depthwise 3x3 conv
  -> 1x1 conv with a residual, adding the local (convolutional) features that shallow ViT layers lack.
* ``GlobalAggregationHead`` (LGViT Sec. 3.2): the patch grid average-pooled by ``pool x pool``, then one multi-head
  self-attention over the pooled tokens, aggregating global context cheaply for deeper exits.
* ``ViTEEHead`` (ViT-EE, Bakhtiarnia et al. 2021): one transformer block plus a classifier on CLS.

Every head also has a tiny learned exit gate (a linear map of its pooled feature to one logit) used by the
``learned`` confidence measure; it costs ``D`` FLOPs and is ignored by the other measures.

A ``LinearHead`` reads only a :class:`TokenSummary` of the tokens (the CLS token and the token mean, ``B x D``):
``head(h) == head.from_summary(summarize(h))``. The training scan can then stack the summary per layer instead of
every layer's ``B x T x D`` hidden state (``engine.scan_exits(readout=summarize)``; ``ViT.all_exits`` does it when
every head is a summary head).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from eejax.exits.engine import HeadOut
from eejax.nn.layers import Block, SelfAttention

HEAD_TYPES = ("linear", "local", "global", "vitee")


class _Classifier(nnx.Module):
    """LayerNorm + linear classifier + exit gate on a pooled feature."""

    def __init__(self, d_model: int, num_classes: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.fc = nnx.Linear(d_model, num_classes, rngs=rngs)
        self.gate = nnx.Linear(d_model, 1, rngs=rngs)

    def __call__(self, feat_BxD, h_BxTxD) -> HeadOut:
        return self.classify(feat_BxD, h_BxTxD.mean(axis=1))

    def classify(self, feat_BxD, hidden_BxD) -> HeadOut:
        """``hidden_BxD``: the backbone tokens' mean (``HeadOut.hidden_BxD``)."""
        feat_BxD = self.norm(feat_BxD)
        return HeadOut(logits_BxC=self.fc(feat_BxD), feat_BxD=feat_BxD, hidden_BxD=hidden_BxD,
                       gate_B=self.gate(jax.lax.stop_gradient(feat_BxD))[:, 0])


class TokenSummary(NamedTuple):
    """What a summary head reads of ``h_BxTxD``."""

    cls_BxD: jax.Array    # the CLS token (position 0)
    mean_BxD: jax.Array   # the mean over all T tokens


def summarize(h_BxTxD: jax.Array) -> TokenSummary:
    return TokenSummary(cls_BxD=h_BxTxD[:, 0], mean_BxD=h_BxTxD.mean(axis=1))


def reads_summary(head) -> bool:
    """Whether ``head`` can run from a ``TokenSummary`` (has ``from_summary``)."""
    return callable(getattr(head, "from_summary", None))


def _grid(h_BxTxD, grid):
    b, _, d = h_BxTxD.shape
    return h_BxTxD[:, 1:].reshape(b, grid[0], grid[1], d)


class LinearHead(nnx.Module):
    def __init__(self, d_model: int, num_classes: int, *, pool: str = "cls", rngs: nnx.Rngs):
        if pool not in ("cls", "mean"):
            raise ValueError(f"{pool=} must be 'cls' or 'mean'")
        self.pool = pool
        self.cls = _Classifier(d_model, num_classes, rngs=rngs)

    def __call__(self, h_BxTxD):
        return self.from_summary(summarize(h_BxTxD))

    def from_summary(self, s: TokenSummary) -> HeadOut:
        return self.cls.classify(s.cls_BxD if self.pool == "cls" else s.mean_BxD, s.mean_BxD)


class LocalPerceptionHead(nnx.Module):
    def __init__(self, d_model: int, num_classes: int, *, grid: tuple[int, int], hidden: int, rngs: nnx.Rngs):
        self.grid = tuple(grid)
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.pw1 = nnx.Conv(d_model, hidden, (1, 1), rngs=rngs)
        self.dw = nnx.Conv(hidden, hidden, (3, 3), padding="SAME", feature_group_count=hidden, rngs=rngs)
        self.pw2 = nnx.Conv(hidden, d_model, (1, 1), rngs=rngs)
        self.cls = _Classifier(d_model, num_classes, rngs=rngs)

    def __call__(self, h_BxTxD):
        x = _grid(self.norm(h_BxTxD), self.grid)
        y = self.pw2(jax.nn.gelu(self.dw(jax.nn.gelu(self.pw1(x)))))
        return self.cls((x + y).mean(axis=(1, 2)), h_BxTxD)


class GlobalAggregationHead(nnx.Module):
    def __init__(self, d_model: int, num_classes: int, *, grid: tuple[int, int], pool: int, num_heads: int,
                 rngs: nnx.Rngs):
        if grid[0] % pool or grid[1] % pool:
            raise ValueError(f"patch {grid=} not divisible by {pool=}")
        self.grid, self.pool = tuple(grid), pool
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = SelfAttention(d_model, num_heads, rngs=rngs)
        self.cls = _Classifier(d_model, num_classes, rngs=rngs)

    def __call__(self, h_BxTxD):
        x = _grid(h_BxTxD, self.grid)
        b, gh, gw, d = x.shape
        p = self.pool
        pooled_BxSxD = x.reshape(b, gh // p, p, gw // p, p, d).mean(axis=(2, 4)).reshape(b, -1, d)
        y = pooled_BxSxD + self.attn(self.norm(pooled_BxSxD))
        return self.cls(y.mean(axis=1), h_BxTxD)


class ViTEEHead(nnx.Module):
    def __init__(self, d_model: int, num_classes: int, *, num_heads: int, mlp_dim: int, rngs: nnx.Rngs):
        self.block = Block(d_model, num_heads, mlp_dim, rngs=rngs)
        self.cls = _Classifier(d_model, num_classes, rngs=rngs)

    def __call__(self, h_BxTxD):
        return self.cls(self.block(h_BxTxD)[:, 0], h_BxTxD)


def make_head(kind: str, d_model: int, num_classes: int, *, grid, num_heads: int, mlp_dim: int,
              local_hidden: int, global_pool: int, pool: str, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "linear":
        return LinearHead(d_model, num_classes, pool=pool, rngs=rngs)
    if kind == "local":
        return LocalPerceptionHead(d_model, num_classes, grid=grid, hidden=local_hidden, rngs=rngs)
    if kind == "global":
        return GlobalAggregationHead(d_model, num_classes, grid=grid, pool=global_pool, num_heads=num_heads,
                                     rngs=rngs)
    if kind == "vitee":
        return ViTEEHead(d_model, num_classes, num_heads=num_heads, mlp_dim=mlp_dim, rngs=rngs)
    raise ValueError(f"unknown exit head {kind!r}; choose from {HEAD_TYPES}")


def lgvit_head_types(num_exits: int) -> tuple[str, ...]:
    """LGViT's placement: local-perception heads on the shallower half of the early exits, global-aggregation heads
    on the deeper half; the final exit is the backbone's own linear classifier."""
    early = num_exits - 1
    n_local = (early + 1) // 2
    return ("local",) * n_local + ("global",) * (early - n_local) + ("linear",)
