"""Small shared layers: multi-head self-attention, MLP (GELU, or LLaMA's SwiGLU), the pre-LN transformer block, and
the normalisation placement around a residual sublayer (pre / post / peri: ``sublayer_input``, ``sublayer_residual``).

Shapes: B batch, T tokens, D width, H heads, K head dim (D = H*K), F MLP width.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


ATTENTION_KINDS = ("auto", "einsum", "dot_product", "cudnn")
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)   # what cuDNN's flash attention takes
# cuDNN's training check refuses odd query / key lengths whenever a bias is present, and jax (0.10-0.11) always
# passes one: ``cudnn.fused_attention_stablehlo.dot_product_attention`` replaces a missing bias by
# ``jnp.zeros(0)`` before ``check_is_flash_attention(..., has_bias, is_training=True)``. The training path pads the
# sequence to a multiple of this (even) and masks the padding with ``query_seq_lengths`` /
# ``key_value_seq_lengths``; inference (no differentiation) runs unpadded.
CUDNN_TRAIN_PAD = 2


def _backend() -> str:
    return jax.default_backend()


@functools.lru_cache(maxsize=None)
def cudnn_attention_support() -> tuple[bool, int]:
    """``(usable, max_head_dim)`` of cuDNN flash attention on the default device: a CUDA GPU of compute capability
    >= 8.0 (Ampere), head dims up to 128, or 256 from Hopper (9.0) on (jax's ``check_is_flash_attention``)."""
    try:
        dev = jax.devices()[0]
        if dev.platform != "gpu" or "cuda" not in str(dev.client.platform_version).lower():
            return False, 0
        cc = tuple(int(x) for x in str(dev.compute_capability).split("."))
    except Exception:  # noqa: BLE001  (no device information: do not pick cuDNN)
        return False, 0
    if cc < (8, 0):
        return False, 0
    return True, 256 if cc >= (9, 0) else 128


def resolve_attention(kind: str, dtype, head_dim: int) -> str:
    """The implementation ``SelfAttention(attention=kind)`` runs for inputs of ``dtype`` and ``head_dim``:
    ``"auto"`` is ``"cudnn"`` on a GPU where cuDNN flash attention takes the call (bf16 / fp16, head dim a
    multiple of 8 within the device's limit; any sequence length, see ``fused_attention``), ``"einsum"``
    elsewhere (CPU, TPU, float32, unsupported head dims). Other kinds are returned as they are."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention={kind!r}: use one of {ATTENTION_KINDS}")
    if kind != "auto":
        return kind
    if _backend() != "gpu" or jnp.dtype(dtype) not in [jnp.dtype(d) for d in FUSED_DTYPES]:
        return "einsum"
    usable, max_head_dim = cudnn_attention_support()
    return "cudnn" if usable and head_dim % 8 == 0 and head_dim <= max_head_dim else "einsum"


def einsum_attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                     mask=None) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v with two einsums around a materialised float32 softmax (any backend, any dtype).

    ``mask``: which keys each query sees, ``bool[B, S]`` (the same keys for every query) or ``bool[B, T, S]``;
    hidden keys get the float32 minimum as logit, so a query that sees no key gets a finite (uniform) mix, never
    NaN (token exit: a compacted bucket's padding slots)."""
    logits_BxHxTxS = (jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK) / jnp.sqrt(q_BxTxHxK.shape[-1])
                      ).astype(jnp.float32)
    if mask is not None:
        logits_BxHxTxS = jnp.where(_mask_BxHxTxS(mask), logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(v_BxSxHxK.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs, v_BxSxHxK)


def _mask_BxHxTxS(mask) -> jax.Array:
    """A key mask ``B x S`` or a query-key mask ``B x T x S`` broadcast against ``B x H x T x S`` logits."""
    if mask.ndim == 2:
        return mask[:, None, None, :]
    if mask.ndim == 3:
        return mask[:, None]
    raise ValueError(f"attention mask must be B x S or B x T x S, got shape {mask.shape}")


def padded_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, *, implementation: str | None, multiple: int) -> jax.Array:
    """``jax.nn.dot_product_attention`` with T and S padded up to ``multiple`` and the padding masked out by
    ``query_seq_lengths`` / ``key_value_seq_lengths`` (cuDNN's PADDING mask); the output is sliced back to T.
    Same values as the unpadded call: padded keys get no weight, padded query rows are dropped."""
    b, t = q_BxTxHxK.shape[:2]
    s = k_BxSxHxK.shape[1]
    tp, sp = -(-t // multiple) * multiple, -(-s // multiple) * multiple

    def pad(x, n):
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))) if n != x.shape[1] else x

    o = jax.nn.dot_product_attention(pad(q_BxTxHxK, tp), pad(k_BxSxHxK, sp), pad(v_BxSxHxK, sp),
                                     query_seq_lengths=jnp.full((b,), t, jnp.int32),
                                     key_value_seq_lengths=jnp.full((b,), s, jnp.int32),
                                     implementation=implementation)
    return o[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _train_padded(q, k, v, implementation, multiple):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _train_padded_fwd(q, k, v, implementation, multiple):
    o, vjp = jax.vjp(functools.partial(padded_attention, implementation=implementation, multiple=multiple), q, k, v)
    return o, vjp


def _train_padded_bwd(implementation, multiple, vjp, g):
    del implementation, multiple
    return vjp(g)


_train_padded.defvjp(_train_padded_fwd, _train_padded_bwd)


def fused_attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, *,
                    implementation: str | None = None, train_pad: int = 1) -> jax.Array:
    """``jax.nn.dot_product_attention(implementation=...)`` (``None``: jax's choice, ``"xla"``, ``"cudnn"``).

    ``train_pad > 1``: when T or S is not a multiple of it, differentiation runs the padded call
    (``padded_attention``) and plain evaluation the unpadded one: a ``custom_vjp`` whose primal is the unpadded
    kernel and whose forward-for-backward is the padded one, so inference pays no padding and training passes
    cuDNN's even-length check (see ``CUDNN_TRAIN_PAD``). Forward-mode differentiation (``jax.jvp``) is not
    available on that path (a ``custom_vjp``).
    """
    if train_pad < 1:
        raise ValueError(f"{train_pad=} must be >= 1")
    t, s = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
    if train_pad == 1 or (t % train_pad == 0 and s % train_pad == 0):
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, implementation=implementation)
    return _train_padded(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, implementation, train_pad)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention (fused QKV projection).

    ``attention`` picks how softmax(q k^T / sqrt(K)) v is computed (same math, same parameters):

    * ``"auto"`` (default): ``"cudnn"`` on a GPU for bf16 / fp16 activations with a head dim cuDNN takes,
      ``"einsum"`` otherwise (``resolve_attention``; decided at trace time from the activations' dtype). On the
      H200 a plain ViT-S (12 layers, D=384, 65 tokens, batch 1024, bf16) ran 15.0 ms with the einsum, 12.1 ms with
      cuDNN (issue 20).
    * ``"einsum"``: two einsums around a materialised float32 softmax (``einsum_attention``);
    * ``"dot_product"``: ``jax.nn.dot_product_attention`` with jax's own choice of implementation (XLA today);
    * ``"cudnn"``: the fused cuDNN flash kernel (GPU only; fp16/bf16); in training an odd token count is padded
      to an even one and masked (``fused_attention``, ``CUDNN_TRAIN_PAD``), since cuDNN refuses odd lengths there.

    ``mask`` (optional, ``bool[B, T]`` keys or ``bool[B, T, T]`` query-key pairs): which tokens each query sees.
    A masked call runs the einsum path (token exit inside a sequence, ``eejax.exits.tokens``, and causal toy
    decoders); unmasked calls are unchanged.
    """

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 attention: str = "auto"):
        if d_model % num_heads:
            raise ValueError(f"{d_model=} not divisible by {num_heads=}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={attention!r}: use one of {ATTENTION_KINDS}")
        self.num_heads = num_heads
        self.attention = attention
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs, dtype=dtype)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs, dtype=dtype)

    def project(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values ``B x T x H x K`` of (normalised) inputs ``x``: one GEMM."""
        b, t, d = x_BxTxD.shape
        qkv = self.qkv(x_BxTxD).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def mix(self, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=None) -> jax.Array:
        """The output projection of ``einsum_attention`` over the given keys / values (a KV cache's, say)."""
        b, t, h, k = q_BxTxHxK.shape
        return self.out(einsum_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask).reshape(b, t, h * k))

    def __call__(self, x_BxTxD: jax.Array, mask=None) -> jax.Array:
        b, t, d = x_BxTxD.shape
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = self.project(x_BxTxD)
        if mask is not None:
            return self.mix(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask)
        kind = resolve_attention(self.attention, q_BxTxHxK.dtype, q_BxTxHxK.shape[-1])
        if kind == "einsum":
            o_BxTxHxK = einsum_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
        elif kind == "cudnn":
            o_BxTxHxK = fused_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, implementation="cudnn",
                                        train_pad=CUDNN_TRAIN_PAD)
        else:
            o_BxTxHxK = fused_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
        return self.out(o_BxTxHxK.reshape(b, t, d))


class Mlp(nnx.Module):
    def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = nnx.Linear(d_model, mlp_dim, rngs=rngs, dtype=dtype)
        self.fc2 = nnx.Linear(mlp_dim, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class SwiGLU(nnx.Module):
    """Gated MLP of LLaMA-family models: ``down(silu(gate(x)) * up(x))``, no biases (Shazeer 2020,
    arXiv:2002.05202). Same call signature as ``Mlp``."""

    def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.gate = nnx.Linear(d_model, mlp_dim, use_bias=False, rngs=rngs, dtype=dtype)
        self.up = nnx.Linear(d_model, mlp_dim, use_bias=False, rngs=rngs, dtype=dtype)
        self.down = nnx.Linear(mlp_dim, d_model, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x_BxTxD):
        return self.down(jax.nn.silu(self.gate(x_BxTxD)) * self.up(x_BxTxD))


MLPS = ("gelu", "swiglu")


def make_mlp(kind: str, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=None):
    """The MLP of a transformer block by name: ``"gelu"`` (``Mlp``, with biases) or ``"swiglu"`` (``SwiGLU``)."""
    if kind == "gelu":
        return Mlp(d_model, mlp_dim, rngs=rngs) if dtype is None else Mlp(d_model, mlp_dim, rngs=rngs, dtype=dtype)
    if kind == "swiglu":
        return SwiGLU(d_model, mlp_dim, rngs=rngs, dtype=dtype)
    raise ValueError(f"mlp={kind!r}: use one of {MLPS}")


NORM_PLACEMENTS = ("pre", "post", "peri")


def check_norm_placement(placement: str) -> str:
    if placement not in NORM_PLACEMENTS:
        raise ValueError(f"norm={placement!r}: use one of {NORM_PLACEMENTS}")
    return placement


def sublayer_input(placement: str, norm_in, h_BxTxD: jax.Array) -> jax.Array:
    """What a residual sublayer ``F`` reads under a normalisation placement: ``Norm_in(h)`` for Pre-LN and
    Peri-LN, the raw residual ``h`` for Post-LN (``norm_in`` is then unused and may be None)."""
    return h_BxTxD if placement == "post" else norm_in(h_BxTxD)


def sublayer_residual(placement: str, h_BxTxD: jax.Array, y_BxTxD: jax.Array, norm_out=None) -> jax.Array:
    """The residual update of one sublayer whose output is ``y = F(sublayer_input(h))``, by placement:

    * ``"pre"``: ``h + y`` (Pre-LN, GPT-2 / LLaMA; ``norm_out`` unused);
    * ``"peri"``: ``h + Norm_out(y)``: the sublayer's output is normalised *before* it joins the residual stream
      (Peri-LN, Kim et al. 2025, arXiv:2502.02732; Gemma 2/3 and OLMo 2 use this or close variants);
    * ``"post"``: ``Norm_out(h + y)``: the sum is normalised, so the residual stream itself is re-normalised after
      every sublayer (Post-LN, the original Transformer, arXiv:1706.03762).

    One pure function, so every path (teacher-forced scan, KV-cached decoding, half-layer programs) applies the same
    placement."""
    if placement == "pre":
        return h_BxTxD + y_BxTxD
    if placement == "peri":
        return h_BxTxD + norm_out(y_BxTxD)
    if placement == "post":
        return norm_out(h_BxTxD + y_BxTxD)
    raise ValueError(f"norm={placement!r}: use one of {NORM_PLACEMENTS}")


class Block(nnx.Module):
    """Transformer block with LayerNorms placed by ``norm`` (``sublayer_residual``): ``"pre"`` (default)
    ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; ``"peri"`` also normalises each sublayer's output before the add
    (``post1`` / ``post2``, Peri-LN, arXiv:2502.02732); ``"post"`` normalises the sum (``ln1`` / ``ln2`` then sit
    after the add, so a Post-LN block has Pre-LN's parameter tree and, from the same seed, its projections)."""

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 attention: str = "auto", norm: str = "pre"):
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"norm={norm!r}: use one of {NORM_PLACEMENTS}")
        self.placement = norm
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs, dtype=dtype)
        self.attn = SelfAttention(d_model, num_heads, rngs=rngs, dtype=dtype, attention=attention)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(d_model, mlp_dim, rngs=rngs, dtype=dtype)
        if norm == "peri":
            self.post1 = nnx.LayerNorm(d_model, rngs=rngs, dtype=dtype)
            self.post2 = nnx.LayerNorm(d_model, rngs=rngs, dtype=dtype)

    def _sublayer(self, sub: int, f, x_BxTxD: jax.Array) -> jax.Array:
        """Sublayer ``sub`` (1 attention, 2 MLP) with residual ``f`` under the block's placement."""
        ln = getattr(self, f"ln{sub}")
        if self.placement == "post":
            return sublayer_residual("post", x_BxTxD, f(x_BxTxD), ln)
        return sublayer_residual(self.placement, x_BxTxD, f(ln(x_BxTxD)), getattr(self, f"post{sub}", None))

    def attn_half(self, x_BxTxD: jax.Array, mask=None) -> jax.Array:
        """``mask``: see ``SelfAttention`` (None: every token sees every token)."""
        return self._sublayer(1, lambda x: self.attn(x, mask), x_BxTxD)

    def mlp_half(self, x_BxTxD: jax.Array) -> jax.Array:
        return self._sublayer(2, self.mlp, x_BxTxD)

    def __call__(self, x_BxTxD: jax.Array, mask=None) -> jax.Array:
        return self.mlp_half(self.attn_half(x_BxTxD, mask))


def require_pre_ln(layer, what: str) -> None:
    """Paths that open a ``Block`` up (fused kernels, per-slot weights, token caches) compute Pre-LN; refuse a block
    of another placement by name instead of computing the wrong function."""
    placement = getattr(layer, "placement", "pre")
    if placement != "pre":
        raise ValueError(f"{what} implements Pre-LN blocks; this model's blocks are norm={placement!r} (use the "
                         "model's own dynamic path)")


def stacked(make_layer, num_layers: int, rngs: nnx.Rngs):
    """``num_layers`` independently initialised copies of a layer, as one module with a leading layer axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return make_layer(rngs)

    return make(rngs)


def build(make_model, seed: int):
    """``make_model(rngs)`` initialised under ``jit`` (eager init is slow on CPU), split once into
    ``(graphdef, params)``. Every model's ``build(cfg, seed)`` is this with its constructor."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))))
    params = jax.jit(lambda key: nnx.state(make_model(nnx.Rngs(key))))(jax.random.key(seed))
    return graphdef, params


def param_count(params) -> int:
    """Stored parameters: the number of entries over every array of a state (``build``'s ``params``, or any
    pytree of arrays)."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
