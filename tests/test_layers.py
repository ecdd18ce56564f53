"""eejax.nn.layers: the attention option of SelfAttention (default "auto" = the einsum on CPU; other kinds equal it)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.nn.layers import Block, SelfAttention


def _einsum_reference(attn: SelfAttention, x_BxTxD):
    """The einsum attention as written before the option existed (softmax in float32)."""
    b, t, d = x_BxTxD.shape
    qkv = attn.qkv(x_BxTxD).reshape(b, t, 3, attn.num_heads, d // attn.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1])
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return attn.out(jnp.einsum("bhts,bshk->bthk", probs, v).reshape(b, t, d))


def test_default_is_the_einsum_bit_for_bit():
    """The default kind is "auto", which is the einsum on CPU (tests/test_attention.py covers the GPU choice)."""
    attn = SelfAttention(32, 4, rngs=nnx.Rngs(0))
    assert attn.attention == "auto" and jax.default_backend() == "cpu"
    x = jax.random.normal(jax.random.key(1), (3, 7, 32))
    np.testing.assert_array_equal(np.asarray(attn(x)), np.asarray(_einsum_reference(attn, x)))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_dot_product_attention_equals_einsum(dtype, tol):
    ref = SelfAttention(64, 4, rngs=nnx.Rngs(0), dtype=dtype)
    dpa = SelfAttention(64, 4, rngs=nnx.Rngs(0), dtype=dtype, attention="dot_product")
    x = jax.random.normal(jax.random.key(2), (2, 9, 64))
    want, got = np.asarray(ref(x), np.float32), np.asarray(dpa(x), np.float32)
    assert got.dtype == want.dtype and got.shape == (2, 9, 64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_block_passes_the_option_and_rejects_unknown_kinds():
    blk = Block(32, 2, 64, rngs=nnx.Rngs(0), attention="dot_product")
    assert blk.attn.attention == "dot_product"
    x = jax.random.normal(jax.random.key(3), (2, 5, 32))
    ref = Block(32, 2, 64, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(blk(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention='flash'"):
        SelfAttention(32, 2, rngs=nnx.Rngs(0), attention="flash")
