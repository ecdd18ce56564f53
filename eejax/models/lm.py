"""Exit-aware decoder-only language model over stacked layers, and its multi-exit training loss.

Architecture: token embedding -> N pre-LN blocks (RMSNorm, grouped-query attention with RoPE, GELU MLP or with
``mlp="swiglu"`` LLaMA's gated SiLU MLP; with ``norm="peri"`` each sublayer's output is also normalised before the
residual add, Peri-LN, Kim et al. 2025) -> an exit after any set of layers. Every exit maps its hidden state to
logits through its own RMSNorm and then the output head, which is shared by all exits (tied to the embedding or
untied). ``exit_head`` picks what an early exit adds on top of that:

* ``"shared"``: per-exit RMSNorm + the shared output head (CALM, LayerSkip);
* ``"own"``: per-exit RMSNorm + the exit's own output matrix;
* ``"block"``: one extra position-wise residual MLP block, then per-exit RMSNorm + the shared head. The extra block
  has no attention, so it needs no KV cache of its own and decoding stays exact;
* ``"lowrank"``: per-exit RMSNorm, then a residual low-rank linear adapter ``x + up(down(x))`` of rank
  ``exit_rank``, then the shared head (exits trained on a frozen model: ``eejax.decoding.exit_training``).
The last exit is always the model's final norm + shared head.

Compute dtype: ``dtype=None`` (default) computes in the parameters' dtype (float32 when freshly built); e.g.
``dtype="bfloat16"`` makes every projection, norm and the output head compute in bfloat16 whatever the
parameters' dtype (attention logits, softmax and norm statistics stay float32). ``eejax.models.pretrained`` loads
SmolLM2 into this model (``mlp="swiglu"``, ``norm_eps=1e-5``, ``rope_base=1e5``).

Shapes: B batch, T (query) tokens, S key/cache slots, D width, H query heads, G key/value heads (GQA), K head dim,
F MLP width, V vocabulary, N layers, E exits.

Paths (same parameters):

* ``all_exits(tokens)``: the training / teacher-forced path, ``engine.run_layers`` (a ``lax.scan``) over every
  layer with every exit's logits. ``layer_mask_NxB`` is a per-(layer, sample) program (LayerSkip layer dropout:
  rows are masked, never removed); ``pos_mask_NxT`` is a per-(layer, position) program (SkipDecode's schedule).
* the layer primitives ``Block.kv`` / ``Block.attn_half`` / ``Block.mlp_half`` used by ``eejax.decoding`` for
  KV-cached decoding on the engine (a program may run one half without the other).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.exits import engine, losses
from eejax.nn.layers import MLPS, build as nn_build, make_mlp, stacked

EXIT_HEADS = ("shared", "own", "block", "lowrank")
NORMS = ("pre", "peri")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 65
    d_model: int = 128
    depth: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 512
    rope_base: float = 10000.0
    norm: str = "pre"                        # "pre" | "peri"
    tie_embeddings: bool = True
    exits: str | Sequence[int] = "all"       # see engine.exit_layers_from
    exit_head: str = "shared"                # "shared" | "own" | "block" | "lowrank"
    exit_rank: int = 16                      # rank of the "lowrank" exit adapter
    mlp: str = "gelu"                        # "gelu" (with biases) | "swiglu" (LLaMA: no biases)
    norm_eps: float = 1e-6                   # epsilon of every RMSNorm
    dtype: str | None = None                 # compute dtype; None = the parameters' dtype

    @property
    def compute_dtype(self):
        return None if self.dtype is None else jnp.dtype(self.dtype)

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"{self.d_model=} not divisible by {self.num_heads=}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads=} not divisible by {self.num_kv_heads=} (grouped-query attention)")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.num_heads} must be even for RoPE")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: use one of {NORMS}")
        if self.exit_head not in EXIT_HEADS:
            raise ValueError(f"exit_head={self.exit_head!r}: use one of {EXIT_HEADS}")
        if self.exit_head == "lowrank" and self.exit_rank < 1:
            raise ValueError(f"{self.exit_rank=} must be >= 1 for exit_head='lowrank'")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp={self.mlp!r}: use one of {MLPS}")
        if self.dtype is not None:
            try:
                jnp.dtype(self.dtype)
            except TypeError:
                raise ValueError(f"dtype={self.dtype!r} is not a dtype name (e.g. 'float32', 'bfloat16')") from None
        self.exit_layers  # validates the exit spec  # noqa: B018

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return engine.exit_layers_from(self.exits, self.depth)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    @property
    def exit_of_layer(self) -> np.ndarray:
        """``int32[N]``: the exit index after layer l, or -1 where layer l has no exit."""
        table = np.full(self.depth, -1, np.int32)
        table[list(self.exit_layers)] = np.arange(self.num_exits)
        return table


# ------------------------------------------------------------------------------------------------- layers


def _norm(cfg: LMConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, rngs=rngs)


def _linear(cfg: LMConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.compute_dtype, rngs=rngs)


def rope(x_BxTxHxK: jax.Array, pos_BxT: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (half-split convention, as in GPT-NeoX / LLaMA)."""
    half = x_BxTxHxK.shape[-1] // 2
    freqs_K2 = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x_BxTxHxK.shape[-1])
    angles_BxTxK2 = pos_BxT.astype(jnp.float32)[..., None] * freqs_K2[None, None, :]
    sin, cos = jnp.sin(angles_BxTxK2)[:, :, None, :], jnp.cos(angles_BxTxK2)[:, :, None, :]
    x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxK.dtype)


def gqa_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS) -> jax.Array:
    """Grouped-query attention; query head h reads key/value head ``h // (H/G)``. Returns ``B x T x H*K``."""
    b, t, h, k = q_BxTxHxK.shape
    g = k_BxSxGxK.shape[2]
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, k)
    logits = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK).astype(jnp.float32) / math.sqrt(k)
    logits = jnp.where(mask_BxTxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxGxK.dtype)
    return jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK).reshape(b, t, h * k)


class Block(nnx.Module):
    """Pre-LN (or Peri-LN) decoder block. ``kv`` and ``attend`` are the two halves used by KV-cached decoding."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        d, k = cfg.d_model, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, k
        self.rope_base = cfg.rope_base
        self.peri = cfg.norm == "peri"
        self.norm1 = _norm(cfg, rngs)
        self.q = _linear(cfg, d, cfg.num_heads * k, rngs)
        self.k = _linear(cfg, d, cfg.num_kv_heads * k, rngs)
        self.v = _linear(cfg, d, cfg.num_kv_heads * k, rngs)
        self.o = _linear(cfg, cfg.num_heads * k, d, rngs)
        self.norm2 = _norm(cfg, rngs)
        self.mlp = make_mlp(cfg.mlp, d, cfg.mlp_dim, rngs=rngs, dtype=cfg.compute_dtype)
        if self.peri:
            self.post1 = _norm(cfg, rngs)
            self.post2 = _norm(cfg, rngs)

    def kv(self, h_BxTxD: jax.Array, pos_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This layer's key (rotated) and value for hidden states ``h`` (the layer's *input*) at ``pos``."""
        b, t, _ = h_BxTxD.shape
        x = self.norm1(h_BxTxD)
        k_BxTxGxK = rope(self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim), pos_BxT, self.rope_base)
        return k_BxTxGxK, self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)

    def attn_half(self, h_BxTxD, pos_BxT, k_BxSxGxK, v_BxSxGxK, mask_BxTxS) -> jax.Array:
        """The attention half: queries ``h`` attend to the given keys/values (the cache or the sequence)."""
        b, t, _ = h_BxTxD.shape
        x = self.norm1(h_BxTxD)
        q_BxTxHxK = rope(self.q(x).reshape(b, t, self.num_heads, self.head_dim), pos_BxT, self.rope_base)
        y = self.o(gqa_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS))
        return h_BxTxD + (self.post1(y) if self.peri else y)

    def mlp_half(self, h_BxTxD) -> jax.Array:
        """The MLP half (position-wise; no cache)."""
        y = self.mlp(self.norm2(h_BxTxD))
        return h_BxTxD + (self.post2(y) if self.peri else y)

    def attend(self, h_BxTxD, pos_BxT, k_BxSxGxK, v_BxSxGxK, mask_BxTxS) -> jax.Array:
        """The block's output for queries ``h`` attending to the given keys/values (both halves)."""
        return self.mlp_half(self.attn_half(h_BxTxD, pos_BxT, k_BxSxGxK, v_BxSxGxK, mask_BxTxS))

    def __call__(self, h_BxTxD, pos_BxT, mask_BxTxT) -> jax.Array:
        k, v = self.kv(h_BxTxD, pos_BxT)
        return self.attend(h_BxTxD, pos_BxT, k, v, mask_BxTxT)


class ExitHead(nnx.Module):
    """An early exit's own part: [residual MLP block] -> RMSNorm -> [own output matrix, else the shared head]."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.exit_head
        self.norm = _norm(cfg, rngs)
        if self.kind == "block":
            self.block_norm = _norm(cfg, rngs)
            self.block = make_mlp(cfg.mlp, cfg.d_model, cfg.mlp_dim, rngs=rngs, dtype=cfg.compute_dtype)
        if self.kind == "own":
            self.proj = _linear(cfg, cfg.d_model, cfg.vocab_size, rngs)
        if self.kind == "lowrank":
            self.down = _linear(cfg, cfg.d_model, cfg.exit_rank, rngs)
            self.up = _linear(cfg, cfg.exit_rank, cfg.d_model, rngs)

    def features(self, h_BxTxD):
        if self.kind == "block":
            h_BxTxD = h_BxTxD + self.block(self.block_norm(h_BxTxD))
        x = self.norm(h_BxTxD)
        return x + self.up(self.down(x)) if self.kind == "lowrank" else x


class LMOutputs(NamedTuple):
    logits_ExBxTxV: jax.Array
    hidden_ExBxTxD: jax.Array   # backbone hidden state at each exit (before the exit's head)


def causal_mask(valid_BxT: jax.Array) -> jax.Array:
    """``B x T x T``: query t sees key s <= t when key s is a real token."""
    t = valid_BxT.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & valid_BxT[:, None, :]


class DecoderLM(nnx.Module):
    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype,
                               embedding_init=nnx.initializers.normal(stddev=0.02))
        self.layers = stacked(lambda r: Block(cfg, rngs=r), cfg.depth, rngs)
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.unembed = _linear(cfg, cfg.d_model, cfg.vocab_size, rngs)
        self.exit_heads = stacked(lambda r: ExitHead(cfg, rngs=r), cfg.num_exits - 1, rngs) if cfg.num_exits > 1 \
            else None

    # ---------------------------------------------------------------------------------------------- heads

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        checks.token_ids(tokens_BxT, self.cfg.vocab_size)
        return self.embed(tokens_BxT)

    def shared_head(self, x_BxTxD: jax.Array) -> jax.Array:
        if self.cfg.tie_embeddings:
            emb_VxD = self.embed.embedding[...]
            if self.cfg.dtype is not None:
                x_BxTxD, emb_VxD = x_BxTxD.astype(self.cfg.dtype), emb_VxD.astype(self.cfg.dtype)
            return x_BxTxD @ emb_VxD.T
        return self.unembed(x_BxTxD)

    def _early_head(self, h_BxTxD, e):
        head_def, head_state = nnx.split(self.exit_heads)
        head = nnx.merge(head_def, jax.tree.map(lambda p: p[e], head_state))
        x = head.features(h_BxTxD)
        return head.proj(x) if self.cfg.exit_head == "own" else self.shared_head(x)

    def exit_logits(self, h_BxTxD: jax.Array, e) -> jax.Array:
        """Logits of exit ``e`` (a Python int or a traced int32) for hidden states ``h``."""
        last = self.cfg.num_exits - 1
        final = lambda h: self.shared_head(self.final_norm(h))
        if isinstance(e, (int, np.integer)):
            return final(h_BxTxD) if e == last else self._early_head(h_BxTxD, e)
        if last == 0:
            return final(h_BxTxD)
        return jax.lax.cond(e == last, final, lambda h: self._early_head(h, jnp.minimum(e, last - 1)), h_BxTxD)

    # ---------------------------------------------------------------------------------------------- paths

    def positions(self, valid_BxT: jax.Array) -> jax.Array:
        """Position of each token counted over real tokens only (left padding gets position 0)."""
        return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1, 0)

    def all_exits(self, tokens_BxT: jax.Array, *, valid_BxT: jax.Array | None = None,
                  layer_mask_NxB: jax.Array | None = None, pos_mask_NxT: jax.Array | None = None,
                  exits: Sequence[int] | None = None, remat: bool = False) -> LMOutputs:
        """Every layer under ``lax.scan``; logits at every exit (or only at the exit indices ``exits``)."""
        valid_BxT = jnp.ones(tokens_BxT.shape, bool) if valid_BxT is None else valid_BxT
        pos_BxT = self.positions(valid_BxT)
        mask_BxTxT = causal_mask(valid_BxT)

        def layer_fn(layer, h, ctx):
            new_h = layer(h, pos_BxT, mask_BxTxT)
            if pos_mask_NxT is None:
                return new_h
            return jnp.where(pos_mask_NxT[ctx.layer][None, :, None], new_h, h)

        _, h_NxBxTxD = engine.run_layers(self.layers, self.embed_tokens(tokens_BxT), layer_fn=layer_fn,
                                         layer_mask_NxB=layer_mask_NxB, remat=remat)
        exits = range(self.cfg.num_exits) if exits is None else exits
        hidden = [h_NxBxTxD[self.cfg.exit_layers[e]] for e in exits]
        logits = [self.exit_logits(h, e) for h, e in zip(hidden, exits)]
        return LMOutputs(jnp.stack(logits), jnp.stack(hidden))

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """Final-exit logits ``B x T x V`` of a full-depth causal forward."""
        return self.all_exits(tokens_BxT, exits=[self.cfg.num_exits - 1]).logits_ExBxTxV[0]


def build(cfg: LMConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``DecoderLM`` (``eejax.nn.build``)."""
    return nn_build(lambda rngs: DecoderLM(cfg, rngs=rngs), seed)


# ------------------------------------------------------------------------------------------------- training


def layerskip_rates(num_layers: int, p_max: float) -> np.ndarray:
    """LayerSkip's layer-dropout rate per layer, rising with depth: ``p_l = p_max * (exp(l ln2 / (N-1)) - 1)``.

    (Elhoushi et al. 2024, Sec. 4.1: 0 at the first layer, ``p_max`` at the last.)
    """
    if num_layers == 1:
        return np.asarray([0.0])
    return p_max * (np.exp(np.arange(num_layers) * np.log(2) / (num_layers - 1)) - 1)


def layer_drop_mask(rng: jax.Array, rates_N, batch: int) -> jax.Array:
    """``bool[N, B]``: which layers each sample runs (per-sample masking; no row is ever removed from the batch)."""
    rates_N = jnp.asarray(rates_N, jnp.float32)
    return jax.random.uniform(rng, (rates_N.shape[0], batch)) >= rates_N[:, None]


def warmup_exit_weights(step, weights_E, warmup_steps: int) -> jax.Array:
    """EE-LLM-style warm-up (Chen et al. 2023, Sec. 4): early-exit weights rise linearly from 0 to their value over
    ``warmup_steps``; the final exit keeps its weight throughout."""
    weights_E = jnp.asarray(weights_E, jnp.float32)
    if warmup_steps <= 0:
        return weights_E
    ramp = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
    return weights_E.at[:-1].multiply(ramp)


def lm_ce(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weight_BxT: jax.Array | None = None) -> jax.Array:
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll_BxT = -jnp.take_along_axis(logp, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if weight_BxT is None:
        return jnp.mean(nll_BxT)
    return jnp.sum(nll_BxT * weight_BxT) / jnp.maximum(jnp.sum(weight_BxT), 1.0)


def multi_exit_lm_loss(graphdef, cfg: LMConfig, *, weighting: str = "uniform", gamma: float = 2.0,
                       warmup_steps: int = 0, layer_drop: float = 0.0, pos_mask_NxT=None, remat: bool = False):
    """``loss_fn(params, batch, ctx)`` for the Trainer; ``batch = {"tokens", "targets"}`` (``B x T`` int32).

    Weighted CE over exits (``weighting`` uniform / linear / geometric, ``losses.exit_weights``) with the EE-LLM
    warm-up, LayerSkip layer dropout of maximum rate ``layer_drop``, and optionally SkipDecode's per-position layer
    program ``pos_mask_NxT`` (then only the final exit is trained: SkipDecode decodes with the final head).
    """
    base_E = losses.exit_weights(cfg.exit_layers, weighting, gamma)
    rates_N = layerskip_rates(cfg.depth, layer_drop)
    final_only = pos_mask_NxT is not None

    def loss_fn(params, batch, ctx):
        tokens, targets = batch["tokens"], batch["targets"]
        mask = layer_drop_mask(ctx.rng, rates_N, tokens.shape[0]) if layer_drop > 0 else None
        model = nnx.merge(graphdef, params)
        exits = [cfg.num_exits - 1] if final_only else None
        outs = model.all_exits(tokens, layer_mask_NxB=mask, pos_mask_NxT=pos_mask_NxT, exits=exits, remat=remat)
        ce_E = jnp.stack([lm_ce(lg, targets) for lg in outs.logits_ExBxTxV])
        if final_only:
            return ce_E[0], {"ce_last": ce_E[0]}
        w_E = warmup_exit_weights(ctx.step, base_E, warmup_steps)
        return jnp.sum(w_E * ce_E), {"ce_first": ce_E[0], "ce_last": ce_E[-1], "w_first": w_E[0]}

    return loss_fn


# ------------------------------------------------------------------------------------- learned exit classifier


def init_classifier(cfg: LMConfig) -> dict:
    """CALM's learned exit classifier, one linear probe per exit on the RMS-normalised hidden state."""
    return {"w_ExD": jnp.zeros((cfg.num_exits, cfg.d_model), jnp.float32),
            "b_E": jnp.zeros((cfg.num_exits,), jnp.float32)}


def _rms_normalise(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def classifier_gate(clf: dict, h_BxD: jax.Array, e) -> jax.Array:
    """Gate logit (``B``) of exit ``e``: sigmoid of it is the probability that the exit already agrees."""
    return _rms_normalise(h_BxD) @ clf["w_ExD"][e] + clf["b_E"][e]


def classifier_loss(graphdef, model_params):
    """Second-stage loss on the frozen model: BCE of each exit's gate against "this exit's argmax equals the final
    argmax" (CALM's consistency label). ``loss_fn(clf, batch, ctx)``; only the classifier is trained."""

    def loss_fn(clf, batch, ctx):
        del ctx
        outs = jax.lax.stop_gradient(nnx.merge(graphdef, model_params).all_exits(batch["tokens"]))
        pred_ExBxT = jnp.argmax(outs.logits_ExBxTxV, -1)
        label = (pred_ExBxT == pred_ExBxT[-1:]).astype(jnp.float32)
        gate = (jnp.einsum("ebtd,ed->ebt", _rms_normalise(outs.hidden_ExBxTxD), clf["w_ExD"])
                + clf["b_E"][:, None, None])
        bce = jnp.maximum(gate, 0) - gate * label + jnp.log1p(jnp.exp(-jnp.abs(gate)))
        acc = jnp.mean((gate > 0) == (label > 0))
        return jnp.mean(bce[:-1]), {"gate_acc": acc, "agree_first": jnp.mean(label[0])}

    return loss_fn


# ------------------------------------------------------------------------------------- teacher-forced programs


def sequence_layer_fn(pos_BxT: jax.Array, mask_BxTxT: jax.Array):
    """The engine ``layer_fn`` of a teacher-forced (uncached) forward over whole sequences that honours a program's
    sublayer bits (``engine.ATTN`` / ``engine.MLP``): with it ``engine.run`` / ``engine.run_layers`` run any layer
    program (skips, repeats, reorderings, half-layer steps) over full sequences. A repeated stored layer computes
    its keys/values afresh from its input at every step."""

    def layer_fn(layer: Block, h_BxTxD, ctx: engine.StepCtx):
        k, v = layer.kv(h_BxTxD, pos_BxT)
        if ctx.sub_B is None:
            return layer.attend(h_BxTxD, pos_BxT, k, v, mask_BxTxT)
        h1 = engine.where_rows((ctx.sub_B & engine.ATTN) > 0, layer.attn_half(h_BxTxD, pos_BxT, k, v, mask_BxTxT),
                               h_BxTxD)
        return engine.where_rows((ctx.sub_B & engine.MLP) > 0, layer.mlp_half(h1), h1)

    return layer_fn
