"""Exit-aware decoder-only language model over stacked layers, and its multi-exit training loss.

Architecture: token embedding -> N blocks (RMSNorm, grouped-query attention with RoPE, GELU MLP or with
``mlp="swiglu"`` LLaMA's gated SiLU MLP) with the norms placed by ``norm`` (``eejax.nn.sublayer_residual``):
``"pre"`` (default) ``h + F(Norm(h))``; ``"peri"`` ``h + Norm_out(F(Norm_in(h)))``, each sublayer's output also
normalised before the residual add (Peri-LN, Kim et al. 2025, arXiv:2502.02732); ``"post"`` ``Norm(h + F(h))``
(Post-LN) -> an exit after any set of layers. Every exit maps its hidden state to logits through its own RMSNorm
and then the output head, which is shared by all exits (tied to the embedding or untied). ``exit_head`` picks what an early exit adds on top of that:

* ``"shared"``: per-exit RMSNorm + the shared output head (CALM, LayerSkip);
* ``"own"``: per-exit RMSNorm + the exit's own output matrix;
* ``"block"``: one extra position-wise residual MLP block, then per-exit RMSNorm + the shared head. The extra block
  has no attention, so it needs no KV cache of its own and decoding stays exact;
* ``"lowrank"``: per-exit RMSNorm, then a residual low-rank linear adapter ``x + up(down(x))`` of rank
  ``exit_rank``, then the shared head (exits trained on a frozen model: ``eejax.decoding.exit_training``);
* ``"final"``: no per-exit part at all: every exit is the model's final norm + shared head, so a sub-model of the
  first n layers adds no parameter and the parameter tree does not depend on ``exits`` (Sorted LLaMA / SoFT,
  Kavehzadeh et al. 2023, arXiv:2309.08968: nested sub-models sharing one norm and LM head).
The last exit is always the model's final norm + shared head.

Compute dtype: ``dtype=None`` (default) computes in the parameters' dtype (float32 when freshly built); e.g.
``dtype="bfloat16"`` makes every projection, norm and the output head compute in bfloat16 whatever the
parameters' dtype (attention logits, softmax and norm statistics stay float32). ``eejax.models.pretrained`` loads
SmolLM2 into this model (``mlp="swiglu"``, ``norm_eps=1e-5``, ``rope_base=1e5``).

Shapes: B batch, T (query) tokens, S key/cache slots, D width, H query heads, J key/value heads (GQA; each serves
R = H / J query heads), K head dim, F MLP width, V vocabulary, N layers, E exits.

Attention (decode-friendly, arXiv:2305.13245 for GQA): one fused projection ``qkv`` (``D -> (H + 2J) K``) gives the
queries, keys and values in one GEMM from one RMSNorm pass, RoPE rotates queries and keys in one op, and keys /
values come out in the KV cache's layout ``B x J x S x K`` (head-major: a layer's cache slice feeds the attention
dots without a transpose). Attention logits are accumulated and kept in float32 whatever the compute dtype.

Paths (same parameters):

* ``hidden_states(tokens)``: every layer's output (``N x B x T x D``) of the teacher-forced path, ``engine.run_layers``
  (a ``lax.scan``) with ``sequence_layer_fn`` (any layer program, per-row or per-position skips).
* ``all_exits(tokens)``: ``hidden_states`` plus every exit's logits (the training path). ``layer_mask_NxB`` is a
  per-(layer, sample) program (LayerSkip layer dropout: rows are masked, never removed); ``pos_mask_NxT`` is a
  per-(layer, position) program (SkipDecode's schedule).
* the layer primitives ``Block.project`` (q, k, v of one GEMM) / ``Block.kv`` / ``Block.attn_out`` /
  ``Block.mlp_half`` used by ``eejax.decoding`` for KV-cached decoding on the engine (a program may run one half
  without the other).
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
from eejax.nn.layers import (MLPS, NORM_PLACEMENTS, build as nn_build, make_mlp, stacked, sublayer_input,
                             sublayer_residual)

EXIT_HEADS = ("shared", "own", "block", "lowrank", "final")
NORMS = NORM_PLACEMENTS                      # "pre" | "post" | "peri"


@dataclasses.dataclass(frozen=True)
class LMConfig(engine.ExitSpec):
    vocab_size: int = 65
    d_model: int = 128
    depth: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 512
    rope_base: float = 10000.0
    norm: str = "pre"                        # "pre" | "post" | "peri"
    tie_embeddings: bool = True
    exits: str | Sequence[int] = "all"       # see engine.exit_layers_from
    exit_head: str = "shared"                # "shared" | "own" | "block" | "lowrank" | "final"
    exit_rank: int = 16                      # rank of the "lowrank" exit adapter
    mlp: str = "gelu"                        # "gelu" (with biases) | "swiglu" (LLaMA: no biases)
    small_mlp_dim: int = 0                   # > 0: each block also holds a small FFN of this width (Duo-LLM)
    norm_eps: float = 1e-6                   # epsilon of every RMSNorm
    dtype: str | None = None                 # compute dtype; None = the parameters' dtype

    @property
    def compute_dtype(self):
        return None if self.dtype is None else jnp.dtype(self.dtype)

    def __post_init__(self):
        # Sizes first (two tokens at least: the margin measure reads the top two logits).
        checks.config_ints(self, vocab_size=2, d_model=1, depth=1, num_heads=1, num_kv_heads=1, mlp_dim=1,
                           exit_rank=0, small_mlp_dim=0)
        checks.positive_number(self.rope_base, "rope_base")
        checks.positive_number(self.norm_eps, "norm_eps")
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
        checks.dtype_name(self.dtype)
        self.exit_layers  # validates the exit spec  # noqa: B018

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


# ------------------------------------------------------------------------------------------------- layers


def _norm(cfg: LMConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, rngs=rngs)


def _linear(cfg: LMConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.compute_dtype, rngs=rngs)


def _fused_qkv(cfg: LMConfig, rngs: nnx.Rngs) -> nnx.Linear:
    """The fused ``[q | k | v]`` projection (``D -> (H + 2J) K``), initialised exactly as three separate
    projections drawn in the order q, k, v (the same random keys and shapes), so a model built from a seed has the
    weights it had before the fusion."""
    d, k, h, j = cfg.d_model, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    init = nnx.initializers.lecun_normal()
    q_key, k_key = rngs.params(), rngs.params()

    def kernel_init(v_key, shape, dtype):
        del shape
        return jnp.concatenate([init(q_key, (d, h * k), dtype), init(k_key, (d, j * k), dtype),
                                init(v_key, (d, j * k), dtype)], axis=1)

    return nnx.Linear(d, (h + 2 * j) * k, use_bias=False, dtype=cfg.compute_dtype, kernel_init=kernel_init,
                      rngs=rngs)


def rope(x_BxTxHxK: jax.Array, pos_BxT: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (half-split convention, as in GPT-NeoX / LLaMA)."""
    half = x_BxTxHxK.shape[-1] // 2
    freqs_K2 = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x_BxTxHxK.shape[-1])
    angles_BxTxK2 = pos_BxT.astype(jnp.float32)[..., None] * freqs_K2[None, None, :]
    sin, cos = jnp.sin(angles_BxTxK2)[:, :, None, :], jnp.cos(angles_BxTxK2)[:, :, None, :]
    x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxK.dtype)


def gqa_attention(q_BxTxHxK, k_BxJxSxK, v_BxJxSxK, mask_BxTxS) -> jax.Array:
    """Grouped-query attention over keys / values in the cache layout; query head h reads key/value head
    ``h // (H/J)``. The logits are float32 (accumulated in float32 from any input dtype); the probabilities are
    cast to the values' dtype for the second dot. Returns ``B x T x H*K``."""
    return gqa_attention_blocks(q_BxTxHxK, [(k_BxJxSxK, v_BxJxSxK, mask_BxTxS)])


def gqa_attention_blocks(q_BxTxHxK, blocks) -> jax.Array:
    """``gqa_attention`` over several key/value blocks ``[(k_BxJxSxK, v_BxJxSxK, mask_BxTxS), ...]`` as if they
    were concatenated along S, without concatenating them (one softmax over every block's logits): a decode step
    attends to the cache, read only, and to its own new keys/values, which are written to the cache after the
    step (``eejax.decoding.kv``)."""
    b, t, h, k = q_BxTxHxK.shape
    j = blocks[0][0].shape[1]
    q_BxTxJxRxK = q_BxTxHxK.reshape(b, t, j, h // j, k)
    logits = [jnp.where(mask[:, None, None], jnp.einsum("btjrk,bjsk->bjrts", q_BxTxJxRxK, kb,
                                                         preferred_element_type=jnp.float32) / math.sqrt(k),
                        jnp.finfo(jnp.float32).min) for kb, _, mask in blocks]
    sizes = np.cumsum([lg.shape[-1] for lg in logits])[:-1]
    probs = jnp.split(jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1), sizes, axis=-1)
    outs = [jnp.einsum("bjrts,bjsk->btjrk", p.astype(vb.dtype), vb) for p, (_, vb, _) in zip(probs, blocks)]
    out = outs[0]
    for o in outs[1:]:
        out = out + o
    return out.reshape(b, t, h * k)


class Block(nnx.Module):
    """Decoder block, Pre-LN / Peri-LN / Post-LN by ``cfg.norm``. Parameters: ``norm1`` / ``norm2`` normalise each
    sublayer's input (pre and peri), ``post1`` / ``post2`` its output (peri) or the residual sum (post).
    ``project`` (one GEMM for q, k, v), ``attn_out`` and ``mlp_half`` are the pieces KV-cached decoding composes;
    ``kv`` / ``attn_half`` / ``attend`` are the same with keys and values given."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        d, k = cfg.d_model, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, k
        self.rope_base = cfg.rope_base
        self.placement = cfg.norm
        post = cfg.norm == "post"
        # Built in this order so a "pre" / "peri" model drawn from a seed has the weights it always had, and a
        # "post" model (its norms drawn where pre's input norms are) the same projections: placements compare paired.
        norm1 = _norm(cfg, rngs)
        self.qkv = _fused_qkv(cfg, rngs)
        self.o = _linear(cfg, cfg.num_heads * k, d, rngs)
        norm2 = _norm(cfg, rngs)
        self.mlp = make_mlp(cfg.mlp, d, cfg.mlp_dim, rngs=rngs, dtype=cfg.compute_dtype)
        if post:
            self.post1, self.post2 = norm1, norm2
        else:
            self.norm1, self.norm2 = norm1, norm2
        if cfg.norm == "peri":
            self.post1 = _norm(cfg, rngs)
            self.post2 = _norm(cfg, rngs)
        if cfg.small_mlp_dim:      # drawn last: a model without it keeps the weights its seed always gave
            self.mlp_small = make_mlp(cfg.mlp, d, cfg.small_mlp_dim, rngs=rngs, dtype=cfg.compute_dtype)

    def _input(self, sub: int, h_BxTxD: jax.Array) -> jax.Array:
        """What sublayer ``sub`` (1 attention, 2 MLP) reads under the placement."""
        return sublayer_input(self.placement, getattr(self, f"norm{sub}", None), h_BxTxD)

    def _residual(self, sub: int, h_BxTxD: jax.Array, y_BxTxD: jax.Array) -> jax.Array:
        """The residual update of sublayer ``sub`` with output ``y`` under the placement."""
        return sublayer_residual(self.placement, h_BxTxD, y_BxTxD, getattr(self, f"post{sub}", None))

    def project(self, h_BxTxD: jax.Array, pos_BxT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated queries ``B x T x H x K``, rotated keys and values ``B x J x T x K`` (the cache layout) of hidden
        states ``h`` (the layer's *input*) at positions ``pos``: one norm, one GEMM, one RoPE."""
        b, t, _ = h_BxTxD.shape
        hq, j = self.num_heads, self.num_kv_heads
        y_BxTxCxK = self.qkv(self._input(1, h_BxTxD)).reshape(b, t, hq + 2 * j, self.head_dim)
        qk = rope(y_BxTxCxK[:, :, :hq + j], pos_BxT, self.rope_base)
        k_BxJxTxK = qk[:, :, hq:].transpose(0, 2, 1, 3)
        v_BxJxTxK = y_BxTxCxK[:, :, hq + j:].transpose(0, 2, 1, 3)
        return qk[:, :, :hq], k_BxJxTxK, v_BxJxTxK

    def kv(self, h_BxTxD: jax.Array, pos_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This layer's keys (rotated) and values ``B x J x T x K`` for hidden states ``h`` at ``pos``, from the
        key/value columns of ``qkv`` only (state propagation fills skipped layers with this: no query weights
        read)."""
        b, t, _ = h_BxTxD.shape
        hq, j = self.num_heads, self.num_kv_heads
        x_BxTxD = self._input(1, h_BxTxD)
        x, w = self.qkv.promote_dtype((x_BxTxD, self.qkv.kernel[...][:, hq * self.head_dim:], None),
                                      dtype=self.qkv.dtype)[:2]
        y_BxTxCxK = jnp.dot(x, w, precision=self.qkv.precision).reshape(b, t, 2 * j, self.head_dim)
        k_BxJxTxK = rope(y_BxTxCxK[:, :, :j], pos_BxT, self.rope_base).transpose(0, 2, 1, 3)
        return k_BxJxTxK, y_BxTxCxK[:, :, j:].transpose(0, 2, 1, 3)

    def attn_out(self, h_BxTxD, q_BxTxHxK, k_BxJxSxK, v_BxJxSxK, mask_BxTxS, extra=()) -> jax.Array:
        """The attention half's output for queries already projected (``project``) attending to the given keys /
        values (the cache or the sequence) and to any ``extra`` blocks ``(k, v, mask)`` (``gqa_attention_blocks``)."""
        y = self.o(gqa_attention_blocks(q_BxTxHxK, [(k_BxJxSxK, v_BxJxSxK, mask_BxTxS), *extra]))
        return self._residual(1, h_BxTxD, y)

    def attn_half(self, h_BxTxD, pos_BxT, k_BxJxSxK, v_BxJxSxK, mask_BxTxS) -> jax.Array:
        """The attention half: queries ``h`` attend to the given keys/values (the cache or the sequence)."""
        q_BxTxHxK = self.project(h_BxTxD, pos_BxT)[0]
        return self.attn_out(h_BxTxD, q_BxTxHxK, k_BxJxSxK, v_BxJxSxK, mask_BxTxS)

    def mlp_half(self, h_BxTxD) -> jax.Array:
        """The MLP half (position-wise; no cache)."""
        y = self.mlp(self._input(2, h_BxTxD))
        return self._residual(2, h_BxTxD, y)

    def mlp_routed(self, h_BxTxD, choice) -> jax.Array:
        """The MLP half under Duo-LLM's module choice (arXiv:2410.10846): per row (``choice`` ``int[B]``) or per
        token (``int[B, T]``) no FFN (``engine.FFN_SKIP``: the residual passes), the small FFN (``FFN_SMALL``) or
        the big one (``FFN_BIG``, the block's ``mlp``), both reading the same normalised input and added under the
        same placement. Needs ``small_mlp_dim > 0``."""
        if not hasattr(self, "mlp_small"):
            raise ValueError("mlp_routed needs a block built with small_mlp_dim > 0 (LMConfig)")
        x_BxTxD = self._input(2, h_BxTxD)
        small = self._residual(2, h_BxTxD, self.mlp_small(x_BxTxD))
        big = self._residual(2, h_BxTxD, self.mlp(x_BxTxD))
        return engine.select_variant(choice, (h_BxTxD, small, big))

    def attend(self, h_BxTxD, pos_BxT, k_BxJxSxK, v_BxJxSxK, mask_BxTxS) -> jax.Array:
        """The block's output for queries ``h`` attending to the given keys/values (both halves)."""
        return self.mlp_half(self.attn_half(h_BxTxD, pos_BxT, k_BxJxSxK, v_BxJxSxK, mask_BxTxS))

    def __call__(self, h_BxTxD, pos_BxT, mask_BxTxT) -> jax.Array:
        q, k, v = self.project(h_BxTxD, pos_BxT)
        return self.mlp_half(self.attn_out(h_BxTxD, q, k, v, mask_BxTxT))


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


def exit_outputs(model, h_NxBxTxD: jax.Array, exits: Sequence[int] | None = None) -> LMOutputs:
    """Every layer's hidden state -> the hidden state and logits (``model.exit_logits``) at each exit, or only at
    the exit indices ``exits``: the read-out of every LM's ``all_exits``."""
    exits = range(model.cfg.num_exits) if exits is None else exits
    hidden = [h_NxBxTxD[model.cfg.exit_layers[e]] for e in exits]
    return LMOutputs(jnp.stack([model.exit_logits(h, e) for h, e in zip(hidden, exits)]), jnp.stack(hidden))


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
        self.exit_heads = stacked(lambda r: ExitHead(cfg, rngs=r), cfg.num_exits - 1, rngs) \
            if cfg.num_exits > 1 and cfg.exit_head != "final" else None

    # ---------------------------------------------------------------------------------------------- heads

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        """Token embeddings ``B x T x D`` in the compute dtype: ``cfg.dtype``, else the embedding's own dtype (nnx's
        Embed would keep the float32 it was built with, so parameters cast to bfloat16 after building would still
        start a float32 residual stream and every matmul after it)."""
        checks.token_ids(tokens_BxT, self.cfg.vocab_size)
        h_BxTxD = self.embed(tokens_BxT)
        return h_BxTxD if self.cfg.dtype is not None else h_BxTxD.astype(self.embed.embedding[...].dtype)

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
        if self.exit_heads is None:                   # one exit, or exit_head="final": every exit is the final one
            return final(h_BxTxD)
        if isinstance(e, (int, np.integer)):
            return final(h_BxTxD) if e == last else self._early_head(h_BxTxD, e)
        return jax.lax.cond(e == last, final, lambda h: self._early_head(h, jnp.minimum(e, last - 1)), h_BxTxD)

    def taken_logits(self, h_BxD: jax.Array, exit_B: jax.Array) -> jax.Array:
        """Logits ``B x V`` of each row's own exit ``exit_B[b]`` (traced): the vocabulary projected once, at the
        exit taken (an exit decided by a cheap gate needs no vocabulary before it; issue 20, cause 4).

        Every exit's own part runs for the batch as one batched computation over the stacked exit heads and each
        row keeps its exit's features, then ONE shared-head projection. Cheap for ``"shared"`` (a norm per exit)
        and ``"lowrank"``; ``"block"`` runs E - 1 small MLP blocks; ``"own"`` (an output matrix per exit) projects
        every exit (no shared projection exists)."""
        cfg = self.cfg
        last = cfg.num_exits - 1
        final_BxD = self.final_norm(h_BxD)
        if self.exit_heads is None:                   # one exit, or exit_head="final"
            return self.shared_head(final_BxD)
        exit_B = jnp.asarray(exit_B, jnp.int32)
        head_def, head_state = nnx.split(self.exit_heads)
        early = jax.vmap(lambda st: nnx.merge(head_def, st).features(h_BxD))(head_state)     # (E-1) x B x D
        pick_B = jnp.clip(exit_B, 0, last - 1)
        early_BxD = jnp.take_along_axis(early, pick_B[None, :, None], axis=0)[0]
        is_last_Bx1 = (exit_B == last)[:, None]
        if cfg.exit_head == "own":
            own = jax.vmap(lambda st, x: nnx.merge(head_def, st).proj(x))(head_state, early)  # (E-1) x B x V
            own_BxV = jnp.take_along_axis(own, pick_B[None, :, None], axis=0)[0]
            return jnp.where(is_last_Bx1, self.shared_head(final_BxD), own_BxV)
        return self.shared_head(jnp.where(is_last_Bx1, final_BxD.astype(early_BxD.dtype), early_BxD))

    # ---------------------------------------------------------------------------------------------- paths

    def positions(self, valid_BxT: jax.Array) -> jax.Array:
        """Position of each token counted over real tokens only (left padding gets position 0)."""
        return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1, 0)

    def hidden_states(self, tokens_BxT: jax.Array, *, valid_BxT: jax.Array | None = None,
                      program: engine.Program | None = None, layer_mask_NxB: jax.Array | None = None,
                      pos_mask_NxT: jax.Array | None = None, remat: bool = False,
                      wrap_layer_fn=None) -> jax.Array:
        """Every program step's output ``S x B x T x D`` of the teacher-forced causal forward (default program:
        every layer once, so ``S = N``), like ``Encoder.hidden_states``. ``program``: any static layer program
        (skips, repeats, reorderings, half-layer steps; ``engine.sequence`` / ``prefix`` / ...);
        ``layer_mask_NxB``: per-(layer, sample) skips (LayerSkip's layer dropout: rows are masked, never removed);
        ``pos_mask_NxT``: per-(layer, position) skips (SkipDecode's schedule); ``wrap_layer_fn(layer_fn) ->
        layer_fn``: a hook around the sequence layer function, e.g. per-loop LoRA read through ``ctx.repeat``
        (``eejax.models.recursive``)."""
        checks.batch_array(tokens_BxT, "tokens", ndim=2)
        if tokens_BxT.shape[1] == 0:
            raise ValueError(f"tokens of shape {tuple(tokens_BxT.shape)} hold no token (T=0)")
        valid_BxT = jnp.ones(tokens_BxT.shape, bool) if valid_BxT is None else valid_BxT
        layer_fn = sequence_layer_fn(self.positions(valid_BxT), causal_mask(valid_BxT), pos_mask_NxT)
        layer_fn = layer_fn if wrap_layer_fn is None else wrap_layer_fn(layer_fn)
        _, h_SxBxTxD = engine.run_layers(self.layers, self.embed_tokens(tokens_BxT), layer_fn=layer_fn,
                                         layer_mask_NxB=layer_mask_NxB, program=program, remat=remat)
        return h_SxBxTxD

    def all_exits(self, tokens_BxT: jax.Array, *, valid_BxT: jax.Array | None = None,
                  layer_mask_NxB: jax.Array | None = None, pos_mask_NxT: jax.Array | None = None,
                  exits: Sequence[int] | None = None, remat: bool = False) -> LMOutputs:
        """``hidden_states`` (every layer under ``lax.scan``) and the logits at every exit (or only at the exit
        indices ``exits``)."""
        h_NxBxTxD = self.hidden_states(tokens_BxT, valid_BxT=valid_BxT, layer_mask_NxB=layer_mask_NxB,
                                       pos_mask_NxT=pos_mask_NxT, remat=remat)
        return exit_outputs(self, h_NxBxTxD, exits)

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


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood ``B x T`` (float32 softmax)."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def lm_ce(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weight_BxT: jax.Array | None = None) -> jax.Array:
    nll_BxT = token_nll(logits_BxTxV, targets_BxT)
    if weight_BxT is None:
        return jnp.mean(nll_BxT)
    return jnp.sum(nll_BxT * weight_BxT) / jnp.maximum(jnp.sum(weight_BxT), 1.0)


def multi_exit_lm_loss(graphdef, cfg: LMConfig, *, weighting: str = "uniform", gamma: float = 2.0,
                       warmup_steps: int = 0, layer_drop: float = 0.0, pos_mask_NxT=None, remat: bool = False):
    """``loss_fn(params, batch, ctx)`` for the Trainer; ``batch = {"tokens", "targets"}`` (``B x T`` int32).

    Weighted CE over exits (``weighting`` uniform / linear / geometric, ``losses.exit_weights``) with the EE-LLM
    warm-up, LayerSkip layer dropout of maximum rate ``layer_drop``, and optionally SkipDecode's per-position layer
    program ``pos_mask_NxT`` (then only the final exit is trained: SkipDecode decodes with the final head).
    On a model with ``exit_head="final"`` and uniform weights this is SoFT's many-in-one loss (Sorted LLaMA,
    arXiv:2309.08968): the mean over the nested sub-models (first n layers, the one final norm + head) of their CE.
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


def skip_path_lm_loss(graphdef, cfg: LMConfig, *, stage_size: int, keep_stages: int, swap_prob: float = 0.0,
                      micro_batches: int = 1, remat: bool = False):
    """``loss_fn(params, batch, ctx)``: SkipPipe training (arXiv:2502.19913) on the scan path. The batch is cut
    into ``micro_batches`` equal micro-batches; each runs its own ``engine.stage_path`` (stage 0, then
    ``keep_stages - 1`` random other stages of ``stage_size`` layers, one adjacent pair swapped with probability
    ``swap_prob``) and is scored by next-token CE at the final exit (final norm + shared head); the loss is their
    mean. ``keep_stages = depth / stage_size`` and ``swap_prob = 0`` is ordinary full-order training."""
    engine.check_stage_path(cfg.depth, stage_size, keep_stages, swap_prob)
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be an integer >= 1")
    last = cfg.num_exits - 1

    def loss_fn(params, batch, ctx):
        rng = ctx.rng
        tokens, targets = batch["tokens"], batch["targets"]
        if tokens.shape[0] % micro_batches:
            raise ValueError(f"batch of {tokens.shape[0]} rows does not split into micro_batches={micro_batches}")
        model = nnx.merge(graphdef, params)
        m = tokens.shape[0] // micro_batches
        ces = []
        for i, key in enumerate(jax.random.split(rng, micro_batches)):
            program = engine.stage_path(key, cfg.depth, stage_size, keep_stages, swap_prob)
            rows = slice(i * m, (i + 1) * m)
            h_BxTxD = model.hidden_states(tokens[rows], program=program, remat=remat)[-1]
            ces.append(lm_ce(model.exit_logits(h_BxTxD, last), targets[rows]))
        ce = jnp.mean(jnp.stack(ces))
        return ce, {"ce_path": ce}

    return loss_fn


# ------------------------------------------------------------------------------------- Duo-LLM FFN routes


def routed_nll(model: "DecoderLM", tokens_BxT: jax.Array, targets_BxT: jax.Array, route_NxBxT) -> jax.Array:
    """Per-token NLL ``B x T`` at the final exit of the teacher-forced forward under a per-token FFN route
    (``engine.ffn_route``; ``route_NxBxT`` may also be ``N x B``, one route per row)."""
    program = engine.ffn_route(route_NxBxT)
    h_BxTxD = model.hidden_states(tokens_BxT, program=program)[-1]
    return token_nll(model.exit_logits(h_BxTxD, model.cfg.num_exits - 1), targets_BxT)


def pattern_nll(model: "DecoderLM", tokens_BxT: jax.Array, targets_BxT: jax.Array, patterns_PxN,
                batch_size: int = 8) -> jax.Array:
    """``P x B x T``: per-token NLL with pattern p (``int[N]`` per layer) as every token's route, for all P
    patterns in one program (``lax.map`` over the patterns, ``batch_size`` of them vectorised at a time): the table
    the Duo-LLM oracle searches (``eejax.exits.routing.oracle``)."""
    b, t = tokens_BxT.shape

    def one(pattern_N):
        return routed_nll(model, tokens_BxT, targets_BxT, jnp.broadcast_to(pattern_N[:, None, None],
                                                                           (pattern_N.shape[0], b, t)))

    return jax.lax.map(one, jnp.asarray(patterns_PxN, jnp.int32), batch_size=batch_size)


def router_features(model: "DecoderLM", tokens_BxT: jax.Array) -> jax.Array:
    """``B x T x D``: what a Duo-LLM router reads before the first routed FFN: the hidden state after layer 0's
    attention half (context-aware; no FFN has run yet), RMS-normalised."""
    program = engine.sequence([0])._replace(sub_S=np.asarray([engine.ATTN], np.int32))
    return _rms_normalise(model.hidden_states(tokens_BxT, program=program)[-1])


def duo_lm_loss(graphdef, cfg: LMConfig, *, choices: Sequence[int] = (engine.FFN_SKIP, engine.FFN_SMALL,
                                                                       engine.FFN_BIG)):
    """``loss_fn(params, batch, ctx)``: Duo-LLM's first stage (arXiv:2410.10846): next-token CE at the final exit
    with a route drawn uniformly from ``choices`` per layer and token from the step's rng
    (``routing.uniform_routes``), so every pattern of modules is trained. Needs ``cfg.small_mlp_dim > 0``."""
    from eejax.exits import routing  # noqa: PLC0415  (routing imports the engine only)

    if cfg.small_mlp_dim < 1:
        raise ValueError(f"duo_lm_loss needs a small FFN per block: cfg.small_mlp_dim={cfg.small_mlp_dim}")
    routing.uniform_routes(jax.random.key(0), cfg.depth, (1,), choices)      # checks choices up front

    def loss_fn(params, batch, ctx):
        tokens, targets = batch["tokens"], batch["targets"]
        route = routing.uniform_routes(ctx.rng, cfg.depth, tokens.shape, choices)
        nll_BxT = routed_nll(nnx.merge(graphdef, params), tokens, targets, route)
        ce = jnp.mean(nll_BxT)
        return ce, {"ce_routed": ce, "big_frac": jnp.mean(route == engine.FFN_BIG)}

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
    """Gate logit (``B``) of exit ``e``: sigmoid of it is the probability that the exit already agrees. A float32
    statistic of the hidden state (a multiply-and-sum over D, like the norm's), so a bfloat16 decode runs no
    float32 matmul for it."""
    w_1xD = clf["w_ExD"][e].astype(jnp.float32).reshape((1,) * (h_BxD.ndim - 1) + (-1,))
    return jnp.sum(_rms_normalise(h_BxD) * w_1xD, axis=-1) + clf["b_E"][e]


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


def sequence_layer_fn(pos_BxT: jax.Array, mask_BxTxT: jax.Array, pos_mask_NxT: jax.Array | None = None):
    """THE teacher-forced (uncached) layer function over whole sequences (``DecoderLM.hidden_states`` uses it): with
    it ``engine.run`` / ``engine.run_layers`` run any layer program (skips, repeats, reorderings, half-layer steps:
    the sublayer bits ``engine.ATTN`` / ``engine.MLP``; per-token FFN routes, ``engine.ffn_route``) over full
    sequences. A repeated stored layer computes its
    keys/values afresh from its input at every step. ``pos_mask_NxT``: stored layer l runs at position t only
    where set (SkipDecode's per-position schedule)."""

    def layer_fn(layer: Block, h_BxTxD, ctx: engine.StepCtx):
        q, k, v = layer.project(h_BxTxD, pos_BxT)
        mlp = lambda h: engine.mlp_step(layer, h, ctx)   # noqa: E731
        if ctx.sub_B is None:
            new_h = mlp(layer.attn_out(h_BxTxD, q, k, v, mask_BxTxT))
        else:
            h1 = engine.where_rows((ctx.sub_B & engine.ATTN) > 0, layer.attn_out(h_BxTxD, q, k, v, mask_BxTxT),
                                   h_BxTxD)
            new_h = engine.where_rows((ctx.sub_B & engine.MLP) > 0, mlp(h1), h1)
        if pos_mask_NxT is None:
            return new_h
        return jnp.where(jnp.asarray(pos_mask_NxT)[ctx.layer][None, :, None], new_h, h_BxTxD)

    return layer_fn
