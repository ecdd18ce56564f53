"""A toy vision-language decoder for visual-token exit (DyVTE, arXiv:2411.19628) at toy scale.

Image patches (a linear patch embedding) take the places of the ``IMG`` tokens of a short text sequence (their
positions differ per row), learned absolute positions and a modality embedding are added, and N causal pre-LN blocks
(``eejax.nn.Block``) run over the whole sequence; the answer is read at each row's last real token. One router per
layer (DyVTE's ``visual_gates_router``) maps concat[mean of the text states except the last, the last state], 2D
wide, to two logits (keep, exit); at the first layer where exit > keep, every image token of that row leaves all
later layers (``eejax.exits.tokens`` with ``group_gate``, per row; the released code reads batch row 0 only and
hard-codes LLaVA-1.5's image positions 35..611).

Paths over the same parameters:

* ``scan(x, exit_layer_B)``: teacher-forced, the image group of row b kept through layer ``exit_layer_B[b]`` (the
  last layer: never dropped); every layer's states (training, DyVTE's label runs, router features);
* ``visual_exit(x, threshold, executor)``: the routers decide per row (DyVTE's inference);
* ``prefill`` / ``decode_step``: the same with a KV cache that keeps the image tokens for the layers that saw them
  (``eejax.decoding.token_cache``).

Shapes: B batch, T sequence length, P image patches per row, D width, V vocabulary, N layers.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.data import composed
from eejax.decoding import token_cache
from eejax.exits import costs, engine, tokens
from eejax.nn.layers import Block, build as nn_build, stacked


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    image_height: int = 28
    image_width: int = 56
    channels: int = 1
    patch_size: int = 7
    vocab_size: int = composed.VOCAB
    max_len: int = 40
    d_model: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_dim: int = 128
    image_token: int = composed.IMG
    pad_token: int = composed.PAD

    def __post_init__(self):
        if self.image_height % self.patch_size or self.image_width % self.patch_size:
            raise ValueError(f"image {self.image_height}x{self.image_width} not divisible by {self.patch_size=}")
        if self.d_model % self.num_heads:
            raise ValueError(f"{self.d_model=} not divisible by {self.num_heads=}")
        if self.max_len <= self.num_patches:
            raise ValueError(f"{self.max_len=} leaves no room for text beside {self.num_patches} image tokens")

    @property
    def num_patches(self) -> int:
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def program(self) -> engine.Program:
        """Every layer, a router (exit) after each."""
        return engine.prefix(self.depth, range(self.depth))


class VLMInputs(NamedTuple):
    h_BxTxD: jax.Array       # embedded sequence
    valid_BxT: jax.Array     # real tokens
    image_BxT: jax.Array     # image tokens (the exitable group)
    last_B: jax.Array        # position of each row's last real token (where the answer is read)


def hidden_head(h_BxQxD, view=None):
    """A head that returns the states themselves (``scan`` then gives every layer's states)."""
    del view
    return h_BxQxD


def gate_features(h_BxQxD: jax.Array, view: tokens.TokenView) -> jax.Array:
    """DyVTE's router input, ``B x 2D``: concat[mean of the text states before the last, the last text state] over
    the slots of ``view`` (text: key slots outside the image group; the last: the one at the largest position)."""
    text_BxQ = view.key_BxQ & ~view.exitable_BxQ
    last_pos_B = jnp.max(jnp.where(text_BxQ, view.pos_BxQ, -1), axis=1)
    is_last = text_BxQ & (view.pos_BxQ == last_pos_B[:, None])
    rest = (text_BxQ & ~is_last).astype(h_BxQxD.dtype)
    mean_BxD = jnp.einsum("bq,bqd->bd", rest, h_BxQxD) / jnp.maximum(rest.sum(1, keepdims=True), 1.0)
    last_BxD = jnp.einsum("bq,bqd->bd", is_last.astype(h_BxQxD.dtype), h_BxQxD)
    return jnp.concatenate([mean_BxD, last_BxD], axis=-1)


class ToyVLM(nnx.Module):
    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.patch = nnx.Linear(cfg.patch_size ** 2 * cfg.channels, d, rngs=rngs)
        self.embed = nnx.Embed(cfg.vocab_size, d, rngs=rngs, embedding_init=nnx.initializers.normal(stddev=0.02))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.max_len, d)))
        self.modality = nnx.Param(jnp.zeros((2, d)))
        self.layers = stacked(lambda r: Block(d, cfg.num_heads, cfg.mlp_dim, rngs=r), cfg.depth, rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, cfg.vocab_size, rngs=rngs)
        self.routers = nnx.List([nnx.Linear(2 * d, 2, rngs=rngs) for _ in range(cfg.depth)])

    # ---------------------------------------------------------------------------------------------- inputs

    def inputs(self, images_BxHxWxC, tokens_BxT) -> VLMInputs:
        """Embed a batch: row b's image patches (row-major) fill its ``IMG`` positions in order."""
        cfg = self.cfg
        checks.images(images_BxHxWxC, (cfg.image_height, cfg.image_width, cfg.channels), name="images")
        checks.token_ids(tokens_BxT, cfg.vocab_size)
        b, t = tokens_BxT.shape
        if t > cfg.max_len:
            raise ValueError(f"sequences of {t} tokens exceed {cfg.max_len=}")
        image_BxT = tokens_BxT == cfg.image_token
        if checks.is_concrete(tokens_BxT):
            counts = np.asarray(image_BxT).sum(1)
            if np.any(counts != cfg.num_patches):
                raise ValueError(f"every row needs exactly {cfg.num_patches} image tokens, got {sorted(set(counts))}")
        p = cfg.patch_size
        patches = einops.rearrange(images_BxHxWxC, "b (gh p) (gw q) c -> b (gh gw) (p q c)", p=p, q=p)
        idx_BxP = jnp.argsort(~image_BxT, axis=1, stable=True)[:, :cfg.num_patches]
        h = self.embed(tokens_BxT)
        h = h.at[jnp.arange(b)[:, None], idx_BxP].set(self.patch(patches).astype(h.dtype))
        h = h + self.pos[0, :t][None] + self.modality[...][image_BxT.astype(jnp.int32)]
        valid_BxT = tokens_BxT != cfg.pad_token
        last_B = jnp.sum(valid_BxT, axis=1, dtype=jnp.int32) - 1
        return VLMInputs(h, valid_BxT, image_BxT, last_B)

    def embed_tokens(self, tokens_BxT, pos_BxT) -> jax.Array:
        """Text tokens at given positions (decode steps)."""
        checks.token_ids(tokens_BxT, self.cfg.vocab_size)
        return self.embed(tokens_BxT) + self.pos[0][pos_BxT] + self.modality[0][None, None]

    def answer_logits(self, h_BxTxD, last_B) -> jax.Array:
        """``B x V``: the head on each row's state at position ``last_B``."""
        h_BxD = jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)[:, 0]
        return self.head(self.norm(h_BxD))

    def gate_score(self, feat_Bx2D, layer) -> jax.Array:
        """Router ``layer``'s exit logit minus its keep logit (``layer`` a Python int)."""
        logits = self.routers[layer](feat_Bx2D)
        return logits[:, 1] - logits[:, 0]

    # ---------------------------------------------------------------------------------------------- paths

    def schedule(self, x: VLMInputs, exit_layer_B) -> jax.Array:
        """``int32[B, T]`` token schedule: image tokens exit after layer ``exit_layer_B[b]``, text runs every layer,
        padding -1."""
        last = self.cfg.depth - 1
        e = jnp.broadcast_to(jnp.asarray(exit_layer_B, jnp.int32)[:, None], x.valid_BxT.shape)
        return jnp.where(x.valid_BxT, jnp.where(x.image_BxT, e, last), -1)

    def scan(self, x: VLMInputs, exit_layer_B=None, *, remat: bool = False) -> tokens.TokenScan:
        """Teacher-forced: row b's image tokens kept through layer ``exit_layer_B[b]`` (None: every layer); every
        layer's states in ``out_E`` (``N x B x T x D``), the final ones in ``h``."""
        b = x.h_BxTxD.shape[0]
        exit_layer_B = jnp.full((b,), self.cfg.depth - 1, jnp.int32) if exit_layer_B is None else exit_layer_B
        return tokens.scan(self.layers, [hidden_head] * self.cfg.depth, x.h_BxTxD, self.cfg.program,
                           self.schedule(x, exit_layer_B), layer_fn=tokens.block_layer_fn(causal=True),
                           exitable_BxT=x.image_BxT, remat=remat)

    def gate_heads(self) -> list:
        def make(l):
            def head(h_BxQxD, view):
                score_B = self.gate_score(gate_features(h_BxQxD, view), l)
                return tokens.GateOut(jnp.broadcast_to(score_B[:, None], view.pos_BxQ.shape))
            return head
        return [make(l) for l in range(self.cfg.depth)]

    def visual_exit(self, x: VLMInputs, threshold=0.0, executor=tokens.Compacted(), *, aux=None,
                    layer_fn=tokens.block_layer_fn(causal=True)) -> tokens.TokenOutputs:
        """DyVTE's inference, per row: after each layer its router scores the row; at the first layer where the
        score is >= ``threshold`` (DyVTE: exit logit > keep logit, threshold 0) the row's image tokens leave."""
        return tokens.run(self.layers, self.gate_heads(), x.h_BxTxD, self.cfg.program,
                          tokens.group_gate(threshold, self.cfg.depth), executor, layer_fn=layer_fn,
                          valid_BxT=x.valid_BxT, exitable_BxT=x.image_BxT, aux=aux)

    def prefill(self, x: VLMInputs, threshold=0.0, executor=tokens.Compacted(), *, cache_len: int
                ) -> tuple[tokens.TokenOutputs, token_cache.TokenCache]:
        """``visual_exit`` writing a KV cache of ``cache_len`` slots (each layer holds the keys it computed)."""
        b, t, _ = x.h_BxTxD.shape
        if cache_len < t:
            raise ValueError(f"{cache_len=} shorter than the prompt length {t}")
        cfg = self.cfg
        cache = token_cache.empty(cfg.depth, b, cache_len, cfg.num_heads, cfg.d_model // cfg.num_heads,
                                  x.h_BxTxD.dtype)
        out = self.visual_exit(x, threshold, executor, aux=cache, layer_fn=token_cache.prefill_layer_fn)
        return out, out.aux

    def decode_step(self, tok_B, pos_B, cache: token_cache.TokenCache) -> tuple[jax.Array, token_cache.TokenCache]:
        """One text token per row at position ``pos_B``; returns the next-token logits ``B x V`` and the cache."""
        pos_Bx1 = jnp.asarray(pos_B, jnp.int32)[:, None]
        h, cache = token_cache.decode(self.layers, self.embed_tokens(jnp.asarray(tok_B)[:, None], pos_Bx1), cache,
                                      pos_Bx1)
        return self.head(self.norm(h[:, 0])), cache


def exit_layer_of(out: tokens.TokenOutputs, image_BxT) -> jax.Array:
    """``int32[B]``: the layer after which each row's image tokens exited (the last layer: they never did)."""
    return jnp.max(jnp.where(image_BxT, out.exit_BxT, -1), axis=1)


def build(cfg: VLMConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``ToyVLM`` (``eejax.nn.build``)."""
    return nn_build(lambda rngs: ToyVLM(cfg, rngs=rngs), seed)


def prefill_flops(cfg: VLMConfig, text_B, exit_layer_B, *, routers: bool = True) -> np.ndarray:
    """``float64[B]``: FLOPs of a row's prefill whose ``text_B`` text tokens run every layer and whose image tokens
    run layers 0..``exit_layer_B`` (cost model: ``costs.token_layer_flops`` per layer, drop mode; the patch
    embedding, the answer head and, with ``routers``, the N routers the executed run evaluates, one per layer)."""
    text_B = np.asarray(text_B, np.float64)
    exit_layer_B = np.asarray(exit_layer_B)
    p = cfg.num_patches
    layer_N = np.arange(cfg.depth)[:, None]
    tok_NxB = text_B[None] + np.where(layer_N <= exit_layer_B[None], p, 0)
    layers = costs.token_layer_flops(tok_NxB, tok_NxB, cfg.d_model, cfg.mlp_dim, cfg.num_heads).sum(0)
    embed = costs.patch_embed_flops(p, cfg.patch_size ** 2 * cfg.channels, cfg.d_model)
    head = costs.linear_head_flops(cfg.d_model, cfg.vocab_size)
    router = costs.linear_head_flops(2 * cfg.d_model, 2) * cfg.depth if routers else 0
    return layers + embed + head + router


__all__ = ["VLMConfig", "VLMInputs", "ToyVLM", "hidden_head", "gate_features", "exit_layer_of", "build",
           "prefill_flops"]
