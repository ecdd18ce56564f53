"""Attention implementations of eejax.nn.layers: every kind, and the padded training path, equal the einsum
reference (values and gradients, within the dtype's tolerance); ``"auto"`` picks cuDNN on a GPU for bf16 only
(backend query mocked: no GPU needed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.nn import layers
from eejax.nn.layers import SelfAttention, einsum_attention, fused_attention, padded_attention, resolve_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _qkv(t, dtype, b=2, h=2, k=8, s=None, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    s = t if s is None else s
    return tuple(jax.random.normal(kk, (b, n, h, k)).astype(dtype) for kk, n in zip(ks, (t, s, s)))


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t", [17, 65, 16])
def test_padded_path_equals_einsum_values_and_gradients(t, dtype):
    """T = 17, 65 (odd: padded to 24 / 72 and masked by sequence lengths) and 16 (no padding needed)."""
    q, k, v = _qkv(t, dtype)
    want = einsum_attention(q, k, v)
    _close(padded_attention(q, k, v, implementation="xla", multiple=8), want, dtype)
    _close(fused_attention(q, k, v, implementation="xla", train_pad=8), want, dtype)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))

    g_want = jax.grad(loss(einsum_attention), argnums=(0, 1, 2))(q, k, v)
    for fn in (lambda q, k, v: fused_attention(q, k, v, implementation="xla", train_pad=8),
               lambda q, k, v: padded_attention(q, k, v, implementation="xla", multiple=8)):
        g_got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
        for a, b in zip(g_got, g_want):
            assert a.shape == b.shape and a.dtype == b.dtype
            _close(a, b, dtype)


def test_padded_path_cross_attention_lengths():
    """T != S (both odd): each side is padded and masked on its own."""
    q, k, v = _qkv(9, jnp.float32, s=13)
    _close(padded_attention(q, k, v, implementation="xla", multiple=4), einsum_attention(q, k, v), jnp.float32)


def test_training_pads_and_inference_does_not(monkeypatch):
    """``fused_attention(train_pad=2)`` at odd T: plain evaluation calls the kernel on the unpadded sequence; under
    ``jax.grad`` the call it differentiates is padded to an even length with both sequence-length vectors."""
    calls = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, *args, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("query_seq_lengths") is not None,
                      kw.get("key_value_seq_lengths") is not None, kw.get("implementation")))
        return real(q, k, v, *args, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v = _qkv(17, jnp.bfloat16)
    fused_attention(q, k, v, implementation="cudnn", train_pad=2)
    assert calls == [(17, 17, False, False, "cudnn")]
    calls.clear()
    jax.grad(lambda q: jnp.sum(fused_attention(q, k, v, implementation="cudnn", train_pad=2).astype(jnp.float32)))(q)
    assert calls == [(18, 18, True, True, "cudnn")]
    calls.clear()
    fused_attention(*_qkv(16, jnp.bfloat16), implementation="cudnn", train_pad=2)   # even T: never padded
    assert calls == [(16, 16, False, False, "cudnn")]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_kind_equals_einsum_in_a_module(dtype):
    """SelfAttention at odd T: each kind that runs on CPU equals the einsum module (same parameters)."""
    x = jax.random.normal(jax.random.key(3), (2, 17, 32))
    ref = SelfAttention(32, 4, rngs=nnx.Rngs(0), dtype=dtype, attention="einsum")
    for kind in ("auto", "dot_product"):
        mod = SelfAttention(32, 4, rngs=nnx.Rngs(0), dtype=dtype, attention=kind)
        _close(mod(x), ref(x), dtype)
        g_got = jax.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(mod)
        g_want = jax.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(ref)
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            _close(a, b, dtype)


def test_auto_is_the_einsum_bit_for_bit_on_cpu():
    attn = SelfAttention(32, 4, rngs=nnx.Rngs(0))
    assert attn.attention == "auto" and jax.default_backend() == "cpu"
    ein = SelfAttention(32, 4, rngs=nnx.Rngs(0), attention="einsum")
    x = jax.random.normal(jax.random.key(1), (3, 7, 32))
    np.testing.assert_array_equal(np.asarray(attn(x)), np.asarray(ein(x)))


def test_auto_choice_on_a_mocked_gpu(monkeypatch):
    """With the backend query saying "gpu" (Hopper): bf16 / fp16 with a supported head dim pick cuDNN, float32 and
    unsupported head dims the einsum; the module then lowers a cuDNN call padded in training (spied)."""
    monkeypatch.setattr(layers, "_backend", lambda: "gpu")
    monkeypatch.setattr(layers, "cudnn_attention_support", lambda: (True, 256))
    assert resolve_attention("auto", jnp.bfloat16, 64) == "cudnn"
    assert resolve_attention("auto", jnp.float16, 128) == "cudnn"
    assert resolve_attention("auto", jnp.float32, 64) == "einsum"
    assert resolve_attention("auto", jnp.bfloat16, 12) == "einsum"      # head dim not a multiple of 8
    assert resolve_attention("auto", jnp.bfloat16, 512) == "einsum"     # above the device's limit
    assert resolve_attention("einsum", jnp.bfloat16, 64) == "einsum"
    monkeypatch.setattr(layers, "cudnn_attention_support", lambda: (False, 0))   # e.g. ROCm, pre-Ampere
    assert resolve_attention("auto", jnp.bfloat16, 64) == "einsum"
    monkeypatch.setattr(layers, "cudnn_attention_support", lambda: (True, 128))  # Ampere
    assert resolve_attention("auto", jnp.bfloat16, 256) == "einsum"
    with pytest.raises(ValueError, match="attention='flash'"):
        resolve_attention("flash", jnp.bfloat16, 64)

    impls = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, *args, **kw):
        impls.append((kw.get("implementation"), q.shape[1]))
        return real(q, k, v, *args, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    mod = SelfAttention(64, 4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 197, 64), jnp.float32)
    jax.eval_shape(lambda x: mod(x), x)
    jax.eval_shape(jax.grad(lambda x: jnp.sum(mod(x).astype(jnp.float32))), x)
    assert impls == [("cudnn", 197), ("cudnn", 198)]
    impls.clear()
    jax.eval_shape(lambda x: SelfAttention(64, 4, rngs=nnx.Rngs(0))(x), x)   # float32: einsum, no fused call
    assert impls == []


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="attention='flash'"):
        SelfAttention(32, 2, rngs=nnx.Rngs(0), attention="flash")
    with pytest.raises(ValueError, match="train_pad=0"):
        fused_attention(*_qkv(5, jnp.float32), train_pad=0)


def test_cudnn_training_step_in_a_remat_scan_on_a_mocked_gpu(monkeypatch):
    """A bf16 multi-exit ViT step with attention="cudnn" at odd T=17 under dots_saveable remat: the program runs the
    attention padded to 18 with sequence lengths, never at 17 (the unpadded primal is traced, not run: no 17 x 17
    scores in the step's jaxpr; the kernel is spied and run by XLA here), and the loss and gradients equal the
    einsum model's within bf16 tolerance."""
    from eejax.exits import losses
    from eejax.models import vit as vit_lib

    calls = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, *args, **kw):
        calls.append((kw.get("implementation"), q.shape[1], kw.get("query_seq_lengths") is not None))
        return real(q, k, v, *args, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    cfg = vit_lib.ViTConfig(image_size=16, channels=3, patch_size=4, d_model=32, depth=2, num_heads=2, mlp_dim=64,
                            exits="all", head_types="linear")
    graphdef, params = vit_lib.build(cfg, 0)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    y = jnp.arange(4)
    weights_E = losses.exit_weights(cfg.exit_layers, "uniform")

    def loss_grad(attention):
        model = nnx.merge(graphdef, params)
        for _, node in nnx.iter_graph(model):
            if isinstance(node, SelfAttention):
                node.attention = attention
            if isinstance(node, nnx.Module) and hasattr(node, "dtype"):
                node.dtype = jnp.bfloat16
        gd, p = nnx.split(model)

        def loss(p):
            logits = nnx.merge(gd, p).all_exits(x, remat="dots_saveable").logits_ExBxC
            return losses.multi_exit_ce(logits, y, weights_E)[0]

        step = jax.value_and_grad(loss)
        return jax.jit(step)(p), str(jax.make_jaxpr(step)(p))

    (l_ein, g_ein), _ = loss_grad("einsum")
    assert calls == []
    (l_cud, g_cud), jaxpr = loss_grad("cudnn")
    assert ("cudnn", 18, True) in calls and {c[0] for c in calls} == {"cudnn"}
    assert ",18,18]" in jaxpr and ",17,17]" not in jaxpr
    assert abs(float(l_cud) - float(l_ein)) <= 2e-2 * abs(float(l_ein))
    for a, b in zip(jax.tree.leaves(g_cud), jax.tree.leaves(g_ein)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.1,
                                   atol=0.1 * max(1e-3, float(jnp.abs(b).max())))
