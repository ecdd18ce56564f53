"""A plain segmentation ViT with a per-token head after each stage: DToP's backbone (arXiv:2308.01045) at toy scale.

Patch embedding (no CLS token), N pre-LN blocks (``eejax.nn.Block``), and after each exit layer a per-token head
(LayerNorm + linear classifier over C classes, background included). DToP's stage heads are ATM decoders (three
attention layers with class queries); a per-token linear head keeps the exit rule the same (a token's top class
score against a threshold) at a fraction of the cost.

Paths over the same parameters (``eejax.exits.tokens``):

* ``all_exits(x)``: teacher-forced, every token to the last layer, every head on every token (the auxiliary-loss
  training path, and the "fewer layers for every token" baseline: head e on all tokens);
* ``token_exit(x, policy, executor)``: tokens exit per row as the policy decides (DToP's inference);
* ``scan(x, exit_BxT)``: teacher-forced with a given token schedule (the simulation an executed run must equal).

Shapes: B batch, T = gh*gw tokens, D width, C classes, E exits, N layers.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.exits import costs, engine, tokens
from eejax.nn.layers import Block, build as nn_build, stacked


@dataclasses.dataclass(frozen=True)
class SegViTConfig:
    image_size: int = 56
    channels: int = 1
    patch_size: int = 4
    d_model: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 11                     # the digit classes and background
    exits: Sequence[int] = (1, 3, 5)          # 0-based layers followed by a head (the last layer always is)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.image_size=} not divisible by {self.patch_size=}")
        if self.d_model % self.num_heads:
            raise ValueError(f"{self.d_model=} not divisible by {self.num_heads=}")
        if self.num_classes < 2:
            raise ValueError(f"{self.num_classes=} must be >= 2")
        self.exit_layers  # validates the exits  # noqa: B018

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid ** 2

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return engine.exit_layers_from(list(self.exits), self.depth)

    @property
    def program(self) -> engine.Program:
        return engine.prefix(self.depth, self.exit_layers)


class TokenHead(nnx.Module):
    """LayerNorm + linear classifier on every token."""

    def __init__(self, d_model: int, num_classes: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.fc = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, h_BxQxD, view=None) -> tokens.TokenHeadOut:
        del view
        return tokens.TokenHeadOut(self.fc(self.norm(h_BxQxD)))


class SegViT(nnx.Module):
    def __init__(self, cfg: SegViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch = nnx.Linear(cfg.patch_size ** 2 * cfg.channels, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.tokens, cfg.d_model)))
        self.layers = stacked(lambda r: Block(cfg.d_model, cfg.num_heads, cfg.mlp_dim, rngs=r), cfg.depth, rngs)
        self.heads = nnx.List([TokenHead(cfg.d_model, cfg.num_classes, rngs=rngs) for _ in cfg.exit_layers])

    def embed(self, x_BxHxWxC: jax.Array) -> jax.Array:
        cfg = self.cfg
        checks.images(x_BxHxWxC, (cfg.image_size, cfg.image_size, cfg.channels), name="images")
        p = cfg.patch_size
        patches = einops.rearrange(x_BxHxWxC, "b (gh p) (gw q) c -> b (gh gw) (p q c)", p=p, q=p)
        return self.patch(patches) + self.pos[...]

    def scan(self, x_BxHxWxC, exit_BxT, *, mode: str = "drop", remat: bool = False) -> tokens.TokenScan:
        """Teacher-forced: token t of row b updated through exit ``exit_BxT[b, t]``; every head on every token."""
        return tokens.scan(self.layers, list(self.heads), self.embed(x_BxHxWxC), self.cfg.program, exit_BxT,
                           mode=mode, remat=remat)

    def all_exits(self, x_BxHxWxC, *, remat: bool = False) -> jax.Array:
        """``E x B x T x C`` logits of every head, every token running every layer (auxiliary-loss training)."""
        b = x_BxHxWxC.shape[0]
        last = jnp.full((b, self.cfg.tokens), len(self.cfg.exit_layers) - 1, jnp.int32)
        return self.scan(x_BxHxWxC, last, remat=remat).out_E.logits_BxQxC

    def token_exit(self, x_BxHxWxC, policy, executor=tokens.Masked(), *, mode: str = "drop"
                   ) -> tokens.TokenOutputs:
        """DToP's inference: tokens exit per row at the heads as ``policy`` decides (``tokens.confidence``)."""
        return tokens.run(self.layers, list(self.heads), self.embed(x_BxHxWxC), self.cfg.program, policy, executor,
                          mode=mode)


def build(cfg: SegViTConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``SegViT`` (``eejax.nn.build``)."""
    return nn_build(lambda rngs: SegViT(cfg, rngs=rngs), seed)


def embed_flops(cfg: SegViTConfig) -> float:
    return float(costs.patch_embed_flops(cfg.tokens, cfg.patch_size ** 2 * cfg.channels, cfg.d_model))


def head_flops(cfg: SegViTConfig) -> float:
    """One token through one head (the linear classifier; the LayerNorm is not counted, as in ``costs``)."""
    return float(costs.linear_head_flops(cfg.d_model, cfg.num_classes))


def run_flops(cfg: SegViTConfig, queries_SxB, keys_SxB) -> np.ndarray:
    """``float64[B]``: FLOPs of each row of a token-exit run: embedding, the layers on the tokens each step
    updated, and every head on the tokens it scored (those updated in the segment that ends at its exit)."""
    q = np.asarray(queries_SxB)
    layers = costs.token_exit_flops(q, keys_SxB, cfg.d_model, cfg.mlp_dim, cfg.num_heads)
    heads = q[list(cfg.exit_layers)].sum(0) * head_flops(cfg)
    return embed_flops(cfg) + layers + heads


def static_flops(cfg: SegViTConfig, exit_index: int) -> float:
    """Every token through layers 0..exit_layers[e] and head e only ("fewer layers for every token")."""
    t = cfg.tokens
    n = cfg.exit_layers[exit_index] + 1
    layer = costs.transformer_layer_flops(t, cfg.d_model, cfg.mlp_dim, cfg.num_heads)
    return embed_flops(cfg) + n * layer + t * head_flops(cfg)


__all__ = ["SegViTConfig", "SegViT", "TokenHead", "build", "embed_flops", "head_flops", "run_flops",
           "static_flops"]
