"""The Pallas gated MLP step (interpret mode on CPU) equals its pure-JAX reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax.kernels.gated_step import gated_mlp, gated_mlp_ran_tiles, gated_mlp_ref, resolve_interpret


def _inputs(seed, n, d, f, num_layers=3):
    k = jax.random.split(jax.random.key(seed), 6)
    return (jax.random.normal(k[0], (n, d)),
            jax.random.normal(k[1], (num_layers, d, f)) / np.sqrt(d), jax.random.normal(k[2], (num_layers, f)),
            jax.random.normal(k[3], (num_layers, f, d)) / np.sqrt(f), jax.random.normal(k[4], (num_layers, d)),
            k[5])


def _active(key, n, block_rows, pattern):
    if pattern == "all":
        return jnp.ones((n,), bool)
    if pattern == "none":
        return jnp.zeros((n,), bool)
    # Mixed rows, with tile 1 all inactive and tile 2 all active.
    a = jax.random.bernoulli(key, 0.5, (n,))
    return a.at[block_rows:2 * block_rows].set(False).at[2 * block_rows:3 * block_rows].set(True)


# (N, D, F, block_rows, block_k, pattern); N=50 and N=70 need row padding, block_k=F is a single F tile.
CASES = [(64, 32, 128, 16, 32, "mixed"), (70, 16, 96, 16, 32, "mixed"), (50, 16, 64, 16, 64, "all"),
         (48, 32, 96, 8, 48, "none"), (40, 32, 64, 8, 16, "mixed")]


@pytest.mark.parametrize("n,d,f,block_rows,block_k,pattern", CASES)
def test_kernel_equals_reference(n, d, f, block_rows, block_k, pattern):
    h, w1, b1, w2, b2, key = _inputs(n + f, n, d, f)
    active = _active(key, n, block_rows, pattern)
    kw = dict(block_rows=block_rows, block_k=block_k, interpret=True)
    for layer in (0, 2):
        out = jax.jit(lambda *a: gated_mlp(*a, **kw))(h, active, w1, b1, w2, b2, layer)
        want = gated_mlp_ref(h, active, w1, b1, w2, b2, layer)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out)[~np.asarray(active)], np.asarray(h)[~np.asarray(active)])

    # The MLP branch ran exactly in the row tiles holding an active row.
    out, ran_T = gated_mlp_ran_tiles(h, active, w1, b1, w2, b2, 1, **kw)
    a_pad = np.pad(np.asarray(active), (0, -n % block_rows))
    np.testing.assert_array_equal(ran_T, a_pad.reshape(-1, block_rows).any(-1).astype(np.int32))
    np.testing.assert_allclose(out, gated_mlp_ref(h, active, w1, b1, w2, b2, 1), rtol=1e-5, atol=1e-5)


def test_gradient_equals_reference():
    h, w1, b1, w2, b2, key = _inputs(0, 40, 16, 64)
    active = _active(key, 40, 8, "mixed")

    def loss(fn):
        def f(h, w1, b1, w2, b2):
            return jnp.sum(jnp.sin(fn(h, active, w1, b1, w2, b2, 1, block_rows=8, block_k=16, interpret=True)))
        return f

    got = jax.jit(jax.grad(loss(gated_mlp), argnums=(0, 1, 2, 3, 4)))(h, w1, b1, w2, b2)
    want = jax.grad(loss(gated_mlp_ref), argnums=(0, 1, 2, 3, 4))(h, w1, b1, w2, b2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got[1][0]).sum()) == 0 and float(jnp.abs(got[1][1]).sum()) > 0   # only layer 1 is used


def test_dynamic_layer_in_a_loop():
    """The layer index can be a loop counter: the stacked weights are indexed inside the kernel."""
    h, w1, b1, w2, b2, key = _inputs(1, 32, 16, 32)
    active = _active(key, 32, 8, "mixed")

    def run(fn):
        def body(l, h):
            return fn(h, active, w1, b1, w2, b2, l, block_rows=8, block_k=16, interpret=True)
        return jax.jit(lambda h: jax.lax.fori_loop(0, w1.shape[0], body, h))(h)

    np.testing.assert_allclose(run(gated_mlp), run(gated_mlp_ref), rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_interpret_switch(monkeypatch):
    h, w1, b1, w2, b2, key = _inputs(2, 16, 16, 48)
    with pytest.raises(ValueError, match="must divide F=48"):
        gated_mlp(h, jnp.ones((16,), bool), w1, b1, w2, b2, 0, block_k=32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        gated_mlp(h, jnp.ones((8,), bool), w1, b1, w2, b2, 0)
    monkeypatch.setenv("EEJAX_PALLAS_INTERPRET", "1")
    assert resolve_interpret(None) is True and resolve_interpret(False) is False
    monkeypatch.setenv("EEJAX_PALLAS_INTERPRET", "")
    assert resolve_interpret(None) == (jax.default_backend() == "cpu")
