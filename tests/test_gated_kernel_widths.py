"""The Pallas gated MLP step at the ViT widths D = 384, 576, 768 (not powers of 2): interpret mode equals the
reference (forward and the custom_vjp backward), and the kernel lowers through Triton for a CUDA GPU on this CPU
machine (the H200 run failed there: "requires power-of-2 array sizes, encountered (32, 384)")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax.kernels.gated_step import default_block_d, gated_mlp, gated_mlp_ref

WIDTHS = (384, 576, 768)


def _inputs(d, f, n=40, num_layers=2, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(k[0], (n, d))
    w1 = jax.random.normal(k[1], (num_layers, d, f)) / np.sqrt(d)
    b1 = 0.1 * jax.random.normal(k[2], (num_layers, f))
    w2 = jax.random.normal(k[3], (num_layers, f, d)) / np.sqrt(f)
    b2 = 0.1 * jax.random.normal(k[4], (num_layers, d))
    active = jax.random.bernoulli(k[5], 0.5, (n,)).at[16:32].set(False)   # row tile 1 (of 16) all inactive
    return tuple(a.astype(dtype) for a in (h, w1, b1, w2, b2)), active


def test_default_column_chunk():
    assert [default_block_d(d) for d in (384, 576, 768, 512, 64, 16, 24)] == [128, 64, 128, 128, 64, 16, 24]


@pytest.mark.parametrize("d", WIDTHS)
def test_kernel_equals_reference_at_vit_widths(d):
    """Forward and the custom_vjp backward in one compiled program per width."""
    (h, w1, b1, w2, b2), active = _inputs(d, 2 * d)

    def value_and_grads(fn, **kw):
        def loss(*a):
            out = fn(a[0], active, *a[1:], 1, **kw)
            return jnp.sum(jnp.sin(out)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(h, w1, b1, w2, b2)

    (_, out), grads = value_and_grads(gated_mlp, block_rows=16, block_k=128, interpret=True)
    (_, want), want_grads = value_and_grads(gated_mlp_ref)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out)[~np.asarray(active)], np.asarray(h)[~np.asarray(active)])
    for g, r in zip(grads, want_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))


def test_bf16_with_a_smaller_column_chunk():
    """bf16 inputs (f32 accumulation in both) with 32-column chunks instead of the default 128."""
    (h, w1, b1, w2, b2), active = _inputs(384, 512, dtype=jnp.bfloat16)
    want = np.asarray(gated_mlp_ref(h, active, w1, b1, w2, b2, 0), np.float32)
    out = jax.jit(lambda h: gated_mlp(h, active, w1, b1, w2, b2, 0, block_rows=16, block_d=32, interpret=True))(h)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    with pytest.raises(ValueError, match="block_d=100 must divide D=384"):
        gated_mlp(h, active, w1, b1, w2, b2, 0, block_d=100)


def _triton_lowering_available() -> bool:
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_lowering_available(), reason="jax has no Pallas Triton lowering")
@pytest.mark.parametrize("d", WIDTHS)
def test_kernel_lowers_for_triton_at_vit_widths(d):
    """Cross-platform lowering (no GPU needed): every load and store in the kernel has a power-of-2 size."""
    f = 4 * d
    (h, w1, b1, w2, b2), active = _inputs(d, f, n=64, dtype=jnp.bfloat16)
    fn = jax.jit(lambda h, a, w1, b1, w2, b2: gated_mlp(h, a, w1, b1, w2, b2, 1, block_rows=32, interpret=False))
    text = fn.trace(h, active, w1, b1, w2, b2).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text or "triton" in text.lower()
