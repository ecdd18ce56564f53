"""Small shared layers: multi-head self-attention, MLP (GELU, or LLaMA's SwiGLU), and the pre-LN transformer block.

Shapes: B batch, T tokens, D width, H heads, K head dim (D = H*K), F MLP width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


ATTENTION_KINDS = ("einsum", "dot_product", "cudnn")


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention (fused QKV projection).

    ``attention`` picks how softmax(q k^T / sqrt(K)) v is computed (same math, same parameters):

    * ``"einsum"`` (default): two einsums around a materialised float32 softmax;
    * ``"dot_product"``: ``jax.nn.dot_product_attention`` with jax's own choice of implementation (XLA today);
    * ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the fused cuDNN kernel (GPU only;
      fp16/bf16 inputs).
    """

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 attention: str = "einsum"):
        if d_model % num_heads:
            raise ValueError(f"{d_model=} not divisible by {num_heads=}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={attention!r}: use one of {ATTENTION_KINDS}")
        self.num_heads = num_heads
        self.attention = attention
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs, dtype=dtype)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        b, t, d = x_BxTxD.shape
        qkv = self.qkv(x_BxTxD).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.attention != "einsum":
            impl = "cudnn" if self.attention == "cudnn" else None
            o_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, implementation=impl)
            return self.out(o_BxTxHxK.reshape(b, t, d))
        logits_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxTxHxK) / jnp.sqrt(q_BxTxHxK.shape[-1])
        probs = jax.nn.softmax(logits_BxHxTxT.astype(jnp.float32), axis=-1).astype(v_BxTxHxK.dtype)
        o_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs, v_BxTxHxK)
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


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 attention: str = "einsum"):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs, dtype=dtype)
        self.attn = SelfAttention(d_model, num_heads, rngs=rngs, dtype=dtype, attention=attention)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(d_model, mlp_dim, rngs=rngs, dtype=dtype)

    def attn_half(self, x_BxTxD: jax.Array) -> jax.Array:
        return x_BxTxD + self.attn(self.ln1(x_BxTxD))

    def mlp_half(self, x_BxTxD: jax.Array) -> jax.Array:
        return x_BxTxD + self.mlp(self.ln2(x_BxTxD))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.mlp_half(self.attn_half(x_BxTxD))


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
