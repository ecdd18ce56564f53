"""A progressive image enhancer with an image exit after every stage (RBQE-style, arXiv:2006.16581).

RBQE enhances a compressed image with one network whose outputs are nested: output k uses the first k stages and
adds its correction to the input (``out_k = OutConv_k(x_0k) + input``), and the blind exit rule stops at the first
output whose no-reference quality reaches a threshold (``eejax.exits.image_quality``). The released network is a
6-scale UNet++ with ECA attention; this one is the small version that a 2-core CPU trains in minutes and the engine
runs over stacked parameters: a stem convolution, ``stages`` identical residual blocks of ``convs_per_stage``
``k x k`` convolutions at full resolution (a DnCNN-like chain), and after each stage a head, one convolution back to
the image channels plus the input (:class:`ImageHead`, zero-initialised, so every exit starts as the identity).

The engine's hidden state is :class:`EnhancerState`: the input image travels with the features so that each head
adds to it, through every executor (the masked loop, compaction).

Shapes: B batch, H height, W width, C image channels, D feature channels, E exits (= stages).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
from flax import nnx

from eejax import checks
from eejax.exits import costs, engine, policies
from eejax.exits import image_quality as iq
from eejax.nn.layers import build as nn_build, stacked


@dataclasses.dataclass(frozen=True)
class EnhancerConfig:
    image_size: int = 28
    channels: int = 1
    width: int = 16           # D, feature channels
    stages: int = 5           # one image exit after each
    convs_per_stage: int = 2
    kernel: int = 3

    def __post_init__(self):
        for name in ("image_size", "channels", "width", "stages", "convs_per_stage", "kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel} must be odd ('same' padding keeps the image size)")

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return tuple(range(self.stages))


class EnhancerState(NamedTuple):
    """The engine's per-row state."""

    x_BxHxWxC: jax.Array    # the compressed input (what every head adds its correction to)
    h_BxHxWxD: jax.Array    # features


class Stage(nnx.Module):
    """A residual block: ``h + conv(relu(conv(... relu(h))))`` with ``convs_per_stage`` convolutions."""

    def __init__(self, width: int, convs: int, kernel: int, *, rngs: nnx.Rngs):
        self.convs = nnx.List([nnx.Conv(width, width, (kernel, kernel), padding="SAME", rngs=rngs)
                               for _ in range(convs)])

    def __call__(self, state: EnhancerState) -> EnhancerState:
        r = state.h_BxHxWxD
        for conv in self.convs:
            r = conv(jax.nn.relu(r))
        return state._replace(h_BxHxWxD=state.h_BxHxWxD + r)


class ImageHead(nnx.Module):
    """An exit: one ``k x k`` convolution from the features to the image channels, added to the input."""

    def __init__(self, width: int, channels: int, kernel: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(width, channels, (kernel, kernel), padding="SAME", rngs=rngs,
                             kernel_init=nnx.initializers.zeros)

    def __call__(self, state: EnhancerState) -> iq.ImageOut:
        h = state.h_BxHxWxD
        return iq.ImageOut(image_BxHxWxC=state.x_BxHxWxC + self.conv(jax.nn.relu(h)),
                           hidden_BxD=h.mean(axis=(1, 2)))


class Enhancer(nnx.Module):
    def __init__(self, cfg: EnhancerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        k = (cfg.kernel, cfg.kernel)
        self.stem = nnx.Conv(cfg.channels, cfg.width, k, padding="SAME", rngs=rngs)
        self.layers = stacked(lambda r: Stage(cfg.width, cfg.convs_per_stage, cfg.kernel, rngs=r), cfg.stages, rngs)
        self.heads = nnx.List([ImageHead(cfg.width, cfg.channels, cfg.kernel, rngs=rngs)
                               for _ in range(cfg.stages)])

    def embed(self, x_BxHxWxC: jax.Array) -> EnhancerState:
        cfg = self.cfg
        checks.images(x_BxHxWxC, (cfg.image_size, cfg.image_size, cfg.channels), name="images")
        return EnhancerState(x_BxHxWxC, self.stem(x_BxHxWxC))

    def program(self) -> engine.Program:
        return engine.prefix(self.cfg.stages, self.cfg.exit_layers)

    def all_exits(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Training path: every exit's image, ``E x B x H x W x C`` (``engine.scan_exits``)."""
        res = engine.scan_exits(self.layers, list(self.heads), self.embed(x_BxHxWxC), self.cfg.exit_layers)
        return res.out.image_BxHxWxC

    def dynamic(self, x_BxHxWxC: jax.Array, threshold=None, *, policy=None,
                executor=engine.Masked()) -> engine.DynamicOutputs:
        """Inference: exit at the first stage whose output's blockiness quality is >= ``threshold`` (RBQE's blind
        rule), or as ``policy`` says."""
        if policy is None:
            policy = policies.threshold(iq.blockiness, threshold, self.cfg.stages)
        return engine.run(self.layers, list(self.heads), self.embed(x_BxHxWxC), self.program(), policy, executor)

    def static(self, x_BxHxWxC: jax.Array, exit_index: int) -> jax.Array:
        """A truncated model: stages up to ``exit_index`` and only that exit's head (the fixed-depth baseline)."""
        if not 0 <= exit_index < self.cfg.stages:
            raise ValueError(f"{exit_index=} outside [0, {self.cfg.stages})")
        trunc = jax.tree.map(lambda p: p[:exit_index + 1], self.layers)
        h_last, _ = engine.run_layers(trunc, self.embed(x_BxHxWxC))
        return self.heads[exit_index](h_last).image_BxHxWxC


def build(cfg: EnhancerConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``Enhancer``."""
    return nn_build(lambda rngs: Enhancer(cfg, rngs=rngs), seed)


def flops(cfg: EnhancerConfig, *, iqa: bool = True) -> costs.ExitCosts:
    """FLOPs per exit (``costs.exit_costs``): the stem, each stage's convolutions, each exit's head and, with
    ``iqa``, the blockiness score evaluated on each exit's output (the blind rule pays it at every exit reached;
    the static model, which scores nothing, is charged it too when ``iqa`` is set: pass ``iqa=False`` for it)."""
    s, c, d, k = cfg.image_size, cfg.channels, cfg.width, cfg.kernel
    stage = cfg.convs_per_stage * costs.conv2d_flops(s, s, k, d, d)
    head = costs.conv2d_flops(s, s, k, d, c) + (iq.blockiness_flops(s, s, c) if iqa else 0)
    return costs.exit_costs(costs.conv2d_flops(s, s, k, c, d), [stage] * cfg.stages, cfg.exit_layers,
                            [head] * cfg.stages)


__all__ = ["EnhancerConfig", "EnhancerState", "Stage", "ImageHead", "Enhancer", "build", "flops"]
