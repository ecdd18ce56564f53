"""Dynamic Perceiver (Han et al., ICCV 2023, arXiv:2306.11248) over stacked stages, and its feature-exit twin.

Two branches run side by side, one *stage* per engine step:

* the **feature branch**: a small CNN (a strided stem, then ``depth`` residual 3x3-conv stages at one resolution,
  so the stages stack: one parameter tree with a leading stage axis);
* the **latent branch** (``latent_tokens > 0``): a few learned latent tokens. In every stage the latents read the
  features (cross-attention, x2z), mix among themselves (a transformer block), and the features read the latents
  back (cross-attention, z2x), as in the paper's Fig. 2.

Exits sit on the latent branch only (a linear classifier on the pooled latents); the last exit merges both branches
(pooled latents and pooled features, concatenated). With ``latent_tokens = 0`` the model is the *feature-exit
baseline* (and a BranchyNet-style multi-exit CNN): the same feature branch, a linear exit on the pooled features
after every stage.

The two-branch state is the engine's carry (:class:`PerceiverCarry`, like the U-ViT's ``UViTCarry``), so the scan
path (training) and every executor of ``engine.run`` (Masked, BucketCascade) run the same stages.

Shapes: B batch, G feature grid side (G x G positions), C feature channels, L latent tokens, D latent width,
K classes, E exits (= stages, one exit after each), N stages.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from eejax import checks
from eejax.exits import costs, engine, policies
from eejax.nn.layers import Block, build as nn_build, stacked


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    image_size: int = 28
    channels: int = 1
    width: int = 48            # C: feature channels of every stage
    depth: int = 4             # N stages (one exit after each)
    latent_tokens: int = 8     # L; 0 = the feature-exit baseline (no latent branch)
    latent_dim: int = 64       # D
    num_heads: int = 4         # of the cross-attentions and the latent block
    mlp_dim: int = 128         # of the latent block
    num_classes: int = 10

    def __post_init__(self):
        checks.config_ints(self, image_size=1, channels=1, width=1, depth=1, latent_tokens=0, latent_dim=1,
                           num_heads=1, mlp_dim=1, num_classes=2)
        if self.image_size % 4:
            raise ValueError(f"{self.image_size=} must be divisible by 4 (the stem has two stride-2 convs)")
        if self.width % 2:
            raise ValueError(f"{self.width=} must be even (the stem's first conv has width / 2 channels)")
        if self.depth < 1 or self.latent_tokens < 0:
            raise ValueError(f"need {self.depth=} >= 1 and {self.latent_tokens=} >= 0")
        if self.latent_tokens and self.latent_dim % self.num_heads:
            raise ValueError(f"{self.latent_dim=} not divisible by {self.num_heads=}")

    @property
    def grid(self) -> int:
        return self.image_size // 4

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return tuple(range(self.depth))

    @property
    def has_latent(self) -> bool:
        return self.latent_tokens > 0


class PerceiverCarry(NamedTuple):
    """The engine's per-row state: both branches travel with their row through every executor."""
    feat_BxGxGxC: jax.Array
    latent_BxLxD: jax.Array | None   # None for the feature-exit baseline


class CrossAttention(nnx.Module):
    """Multi-head cross-attention with pre-norms: queries from ``q`` (width Q), keys/values from ``kv`` (width V),
    computed at width D, projected back to width Q."""

    def __init__(self, q_dim: int, kv_dim: int, d: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.ln_q = nnx.LayerNorm(q_dim, rngs=rngs)
        self.ln_kv = nnx.LayerNorm(kv_dim, rngs=rngs)
        self.q = nnx.Linear(q_dim, d, rngs=rngs)
        self.kv = nnx.Linear(kv_dim, 2 * d, rngs=rngs)
        self.out = nnx.Linear(d, q_dim, rngs=rngs)

    def __call__(self, q_BxTxQ: jax.Array, kv_BxSxV: jax.Array) -> jax.Array:
        b, t, _ = q_BxTxQ.shape
        s = kv_BxSxV.shape[1]
        q = self.q(self.ln_q(q_BxTxQ))
        d = q.shape[-1]
        h, k = self.num_heads, d // self.num_heads
        q_BxTxHxK = q.reshape(b, t, h, k)
        kv = self.kv(self.ln_kv(kv_BxSxV)).reshape(b, s, 2, h, k)
        logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, kv[:, :, 0]) / jnp.sqrt(k)
        probs = jax.nn.softmax(logits_BxHxTxS.astype(jnp.float32), axis=-1)
        o_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs, kv[:, :, 1])
        return self.out(o_BxTxHxK.reshape(b, t, d))


class PerceiverStage(nnx.Module):
    """One stage: a residual conv block on the features, then (latent branch) x2z, the latent block, z2x."""

    def __init__(self, cfg: PerceiverConfig, *, rngs: nnx.Rngs):
        c = cfg.width
        self.ln = nnx.LayerNorm(c, rngs=rngs)
        self.conv1 = nnx.Conv(c, c, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c, c, (3, 3), padding="SAME", rngs=rngs)
        self.has_latent = cfg.has_latent
        if cfg.has_latent:
            d = cfg.latent_dim
            self.x2z = CrossAttention(d, c, d, cfg.num_heads, rngs=rngs)
            self.latent_block = Block(d, cfg.num_heads, cfg.mlp_dim, rngs=rngs)
            self.z2x = CrossAttention(c, d, d, cfg.num_heads, rngs=rngs)

    def __call__(self, carry: PerceiverCarry) -> PerceiverCarry:
        x = carry.feat_BxGxGxC
        x = x + self.conv2(jax.nn.gelu(self.conv1(self.ln(x))))
        if not self.has_latent:
            return PerceiverCarry(x, None)
        b, g, _, c = x.shape
        tokens_BxTxC = x.reshape(b, g * g, c)
        z = carry.latent_BxLxD
        z = self.latent_block(z + self.x2z(z, tokens_BxTxC))     # the latents read the features, then mix
        tokens_BxTxC = tokens_BxTxC + self.z2x(tokens_BxTxC, z)   # the features read the latents back
        return PerceiverCarry(tokens_BxTxC.reshape(x.shape), z)


class PerceiverHead(nnx.Module):
    """Exit classifier. ``source``: ``"latent"`` (pooled latents: the Dyn-Perceiver's early exits), ``"merged"``
    (pooled latents and pooled features: its last exit) or ``"feature"`` (pooled features: the baseline's exits)."""

    def __init__(self, cfg: PerceiverConfig, source: str, *, rngs: nnx.Rngs):
        if source not in ("latent", "merged", "feature"):
            raise ValueError(f"head source {source!r}: use latent, merged or feature")
        self.source = source
        self.ln_z = nnx.LayerNorm(cfg.latent_dim, rngs=rngs) if source != "feature" else None
        self.ln_x = nnx.LayerNorm(cfg.width, rngs=rngs) if source != "latent" else None
        dim = {"latent": cfg.latent_dim, "feature": cfg.width, "merged": cfg.latent_dim + cfg.width}[source]
        self.fc = nnx.Linear(dim, cfg.num_classes, rngs=rngs)

    def __call__(self, carry: PerceiverCarry) -> engine.HeadOut:
        parts = []
        if self.ln_z is not None:
            parts.append(self.ln_z(carry.latent_BxLxD.mean(axis=1)))
        if self.ln_x is not None:
            parts.append(self.ln_x(carry.feat_BxGxGxC.mean(axis=(1, 2))))
        logits_BxK = self.fc(jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0])
        pooled_BxD = parts[0]   # the latents (the features for the baseline): one width for every exit
        return engine.HeadOut(logits_BxK, pooled_BxD, pooled_BxD, jnp.zeros(logits_BxK.shape[:1], logits_BxK.dtype))


def head_sources(cfg: PerceiverConfig) -> tuple[str, ...]:
    if not cfg.has_latent:
        return ("feature",) * cfg.depth
    return ("latent",) * (cfg.depth - 1) + ("merged",)


class DynPerceiver(nnx.Module):
    def __init__(self, cfg: PerceiverConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.width
        self.stem1 = nnx.Conv(cfg.channels, c // 2, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.stem2 = nnx.Conv(c // 2, c, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.latent0 = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.latent_tokens, cfg.latent_dim)))
                        if cfg.has_latent else None)
        self.layers = stacked(lambda r: PerceiverStage(cfg, rngs=r), cfg.depth, rngs)
        self.heads = nnx.List([PerceiverHead(cfg, s, rngs=rngs) for s in head_sources(cfg)])

    def embed(self, x_BxHxWxC: jax.Array) -> PerceiverCarry:
        cfg = self.cfg
        checks.batch_array(x_BxHxWxC, "images")
        checks.images(x_BxHxWxC, (cfg.image_size, cfg.image_size, cfg.channels), name="images")
        x = jax.nn.gelu(self.stem2(jax.nn.gelu(self.stem1(x_BxHxWxC))))
        z = None
        if cfg.has_latent:
            z = jnp.broadcast_to(self.latent0[...], (x.shape[0],) + self.latent0.shape[1:]).astype(x.dtype)
        return PerceiverCarry(x, z)

    @staticmethod
    def layer_fn(layer: PerceiverStage, carry: PerceiverCarry, ctx: engine.StepCtx) -> PerceiverCarry:
        del ctx
        return layer(carry)

    def all_exits(self, x_BxHxWxC) -> engine.ExitOutputs:
        """Training path: every stage under ``lax.scan``, every exit's ``HeadOut`` (leading E)."""
        return engine.scan_exits(self.layers, list(self.heads), self.embed(x_BxHxWxC), self.cfg.exit_layers,
                                 layer_fn=self.layer_fn)

    def dynamic(self, x_BxHxWxC, threshold=None, *, policy=None, executor=engine.Masked()) -> engine.DynamicOutputs:
        """Inference path: the engine's prefix program over the stages; by default a max-softmax threshold (a scalar
        or one per exit, e.g. from the MSDNet budgeted protocol)."""
        cfg = self.cfg
        if policy is None:
            policy = policies.threshold("max_softmax", threshold, cfg.depth)
        return engine.run(self.layers, list(self.heads), self.embed(x_BxHxWxC),
                          engine.prefix(cfg.depth, cfg.exit_layers), policy, executor, layer_fn=self.layer_fn)

    def static(self, x_BxHxWxC, exit_index: int) -> jax.Array:
        """A truncated model: the stages up to exit ``exit_index`` and only that exit's head."""
        trunc = jax.tree.map(lambda p: p[:exit_index + 1], self.layers)
        last, _ = engine.run_layers(trunc, self.embed(x_BxHxWxC), layer_fn=self.layer_fn)
        return self.heads[exit_index](last).logits_BxC


def build(cfg: PerceiverConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``DynPerceiver`` (``eejax.nn.build``)."""
    return nn_build(lambda rngs: DynPerceiver(cfg, rngs=rngs), seed)


def cross_attention_flops(q_tokens: int, q_dim: int, kv_tokens: int, kv_dim: int, d: int) -> int:
    """Q/K/V projections, scores, mixing and the output projection of :class:`CrossAttention`."""
    return (2 * q_tokens * q_dim * d + 2 * kv_tokens * kv_dim * 2 * d + 2 * 2 * q_tokens * kv_tokens * d
            + 2 * q_tokens * d * q_dim)


def flops(cfg: PerceiverConfig) -> costs.ExitCosts:
    """Analytic FLOPs per exit (eejax.exits.costs conventions: matmuls and convs, 2 per multiply-add; every head
    evaluated on the way is counted in ``cum_flops_E``)."""
    g, c, half = cfg.grid, cfg.width, cfg.width // 2
    stem = 2 * (2 * g) ** 2 * 9 * cfg.channels * half + 2 * g * g * 9 * half * c
    stage = 2 * 2 * g * g * 9 * c * c
    if cfg.has_latent:
        t, l, d = g * g, cfg.latent_tokens, cfg.latent_dim
        stage += (cross_attention_flops(l, d, t, c, d) + costs.transformer_layer_flops(l, d, cfg.mlp_dim, cfg.num_heads)
                  + cross_attention_flops(t, c, l, d, d))
    dims = {"latent": cfg.latent_dim, "feature": cfg.width, "merged": cfg.latent_dim + cfg.width}
    heads = [costs.linear_head_flops(dims[s], cfg.num_classes) for s in head_sources(cfg)]
    return costs.exit_costs(stem, [stage] * cfg.depth, cfg.exit_layers, heads)


__all__ = ["PerceiverConfig", "PerceiverCarry", "CrossAttention", "PerceiverStage", "PerceiverHead", "DynPerceiver",
           "head_sources", "build", "flops", "cross_attention_flops"]
