"""Vision Transformer over stacked layers, with an exit head after any set of layers.

``ViT.all_exits`` runs the training path (scan, every exit) and ``ViT.dynamic`` the inference path (while-loop,
per-sample exit) over the same parameters. Shapes: B batch, T = 1 + gh*gw tokens (CLS first), D width, C classes,
E exits, N layers.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from eejax import checks
from eejax.exits import confidence as conf_lib
from eejax.exits import costs
from eejax.exits import engine, policies
from eejax.models import vit_heads as heads_lib
from eejax.nn.layers import NORM_PLACEMENTS, Block, build as nn_build, stacked


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28
    channels: int = 1
    patch_size: int = 7
    d_model: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 10
    exits: str | Sequence[int] = "from:1"     # see engine.exit_layers_from
    head_types: str | Sequence[str] = "lgvit"  # 'lgvit' | 'linear' | 'vitee' | one kind per exit
    pool: str = "cls"                          # pooling of linear heads
    local_hidden: int = 64                     # channels of LGViT's local perception head
    global_pool: int = 2                       # LGViT global head: average-pool the patch grid by this factor
    norm: str = "pre"                          # LayerNorm placement of every block: "pre" | "peri" | "post"

    def __post_init__(self):
        # Sizes first (a classifier needs two classes: the margin measure reads the top two).
        checks.config_ints(self, image_size=1, channels=1, patch_size=1, d_model=1, depth=1, num_heads=1, mlp_dim=1,
                           num_classes=2, local_hidden=1, global_pool=1)
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.image_size=} not divisible by {self.patch_size=}")
        if self.d_model % self.num_heads:
            raise ValueError(f"{self.d_model=} not divisible by {self.num_heads=}")
        if self.norm not in NORM_PLACEMENTS:
            raise ValueError(f"norm={self.norm!r}: use one of {NORM_PLACEMENTS}")
        self.head_kinds  # validates the head spec  # noqa: B018

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    @property
    def tokens(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return engine.exit_layers_from(self.exits, self.depth)

    @property
    def head_kinds(self) -> tuple[str, ...]:
        n = len(self.exit_layers)
        if isinstance(self.head_types, str):
            if self.head_types == "lgvit":
                return heads_lib.lgvit_head_types(n)
            if self.head_types in ("linear", "vitee"):
                return (self.head_types,) * (n - 1) + ("linear",)
            raise ValueError(f"head_types={self.head_types!r}: use 'lgvit', 'linear', 'vitee' or a list per exit")
        kinds = tuple(self.head_types)
        if len(kinds) != n or any(k not in heads_lib.HEAD_TYPES for k in kinds):
            raise ValueError(f"head_types={kinds} must name one of {heads_lib.HEAD_TYPES} for each of {n} exits")
        return kinds


class ViT(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        patch_dim = cfg.patch_size ** 2 * cfg.channels
        self.patch = nnx.Linear(patch_dim, cfg.d_model, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, cfg.d_model)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.tokens, cfg.d_model)))
        self.layers = stacked(lambda r: Block(cfg.d_model, cfg.num_heads, cfg.mlp_dim, rngs=r, norm=cfg.norm),
                              cfg.depth, rngs)
        self.heads = nnx.List([
            heads_lib.make_head(kind, cfg.d_model, cfg.num_classes, grid=cfg.grid, num_heads=cfg.num_heads,
                                mlp_dim=cfg.mlp_dim, local_hidden=cfg.local_hidden, global_pool=cfg.global_pool,
                                pool=cfg.pool, rngs=rngs)
            for kind in cfg.head_kinds])

    def embed(self, x_BxHxWxC: jax.Array) -> jax.Array:
        cfg = self.cfg
        checks.batch_array(x_BxHxWxC, "images")
        checks.images(x_BxHxWxC, (cfg.image_size, cfg.image_size, cfg.channels), name="images")
        p = cfg.patch_size
        patches = einops.rearrange(x_BxHxWxC, "b (gh p) (gw q) c -> b (gh gw) (p q c)", p=p, q=p)
        h_BxTxD = self.patch(patches)
        cls = jnp.broadcast_to(self.cls_token[...], (h_BxTxD.shape[0], 1, cfg.d_model))
        return jnp.concatenate([cls, h_BxTxD], axis=1) + self.pos[...]

    def all_exits(self, x_BxHxWxC, *, layer_mask_NxB=None, remat: bool | str = False, residual_dtype=None,
                  readout: str = "auto") -> engine.ExitOutputs:
        """Training path: every exit's head output (``engine.scan_exits``).

        ``remat``: ``"none"`` / ``"full"`` / ``"dots_saveable"`` (or ``False`` / ``True``), see
        ``engine.run_layers``; ``residual_dtype``: the residual stream's dtype (e.g. ``jnp.bfloat16``);
        ``readout``: ``"auto"`` stacks only each layer's ``TokenSummary`` (CLS token and token mean) when every head
        reads nothing else (linear heads), the whole hidden state otherwise; ``"hidden"`` always stacks the hidden
        state. Both give the same outputs.
        """
        if readout not in ("auto", "hidden"):
            raise ValueError(f"readout={readout!r}: use 'auto' or 'hidden'")
        heads = list(self.heads)
        summary = readout == "auto" and all(heads_lib.reads_summary(h) for h in heads)
        return engine.scan_exits(self.layers, [h.from_summary for h in heads] if summary else heads,
                                 self.embed(x_BxHxWxC), self.cfg.exit_layers, layer_mask_NxB=layer_mask_NxB,
                                 remat=remat, readout=heads_lib.summarize if summary else None,
                                 residual_dtype=residual_dtype)

    def dynamic(self, x_BxHxWxC, threshold=None, measure: str | conf_lib.Measure = "max_softmax", *,
                policy=None, program: engine.Program | None = None, executor=engine.Masked(),
                fields: tuple[str, ...] | None = ("logits_BxC",)) -> engine.DynamicOutputs:
        """Inference: ``engine.run(program, policy, executor)``; by default the prefix program and a confidence
        threshold (scalar or one per exit) on ``measure``. ``fields``: the head outputs returned (default the
        logits; None: every field); what neither they nor the policy read is not computed."""
        cfg = self.cfg
        program = engine.prefix(cfg.depth, cfg.exit_layers) if program is None else program
        if policy is None:
            policy = policies.threshold(measure, threshold, len(cfg.exit_layers))
        return engine.run(self.layers, list(self.heads), self.embed(x_BxHxWxC), program, policy, executor,
                          fields=fields)

    def static(self, x_BxHxWxC, exit_index: int) -> jax.Array:
        """A truncated model: layers up to exit ``exit_index`` and only that exit's head (static-depth baseline)."""
        n = self.cfg.exit_layers[exit_index] + 1
        trunc = jax.tree.map(lambda p: p[:n], self.layers)
        h_last, _ = engine.run_layers(trunc, self.embed(x_BxHxWxC))
        return self.heads[exit_index](h_last).logits_BxC


def build(cfg: ViTConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``ViT`` (``eejax.nn.build``)."""
    return nn_build(lambda rngs: ViT(cfg, rngs=rngs), seed)


def flops(cfg: ViTConfig) -> costs.ExitCosts:
    """Analytic FLOPs per exit of a ViT config, heads included (see eejax.exits.costs)."""
    t, d = cfg.tokens, cfg.d_model
    layer = costs.transformer_layer_flops(t, d, cfg.mlp_dim, cfg.num_heads)
    gh, gw = cfg.grid
    head_flops = []
    for kind in cfg.head_kinds:
        if kind == "linear":
            head_flops.append(costs.linear_head_flops(d, cfg.num_classes))
        elif kind == "local":
            head_flops.append(costs.local_perception_head_flops(gh, gw, d, cfg.local_hidden, cfg.num_classes))
        elif kind == "global":
            head_flops.append(costs.global_aggregation_head_flops(gh, gw, d, cfg.global_pool, cfg.num_heads,
                                                                  cfg.num_classes))
        else:
            head_flops.append(costs.vit_ee_head_flops(t, d, cfg.mlp_dim, cfg.num_heads, cfg.num_classes))
    return costs.exit_costs(costs.patch_embed_flops(t - 1, cfg.patch_size ** 2 * cfg.channels, d),
                            [layer] * cfg.depth, cfg.exit_layers, head_flops)
