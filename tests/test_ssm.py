"""The selective SSM (Mamba) mixer: parallel scan equals the sequential reference, prefill equals token-by-token
decoding, chunked prefill from a carried state, right padding, parameter counts, bad arguments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.nn import ssm

# float32 through one mixer (projections of width <= 32, a 12-step scan): products of ~1e-7 relative error; the
# outputs are O(0.1-1), so 1e-5 absolute is ~100 ulps of headroom.
ATOL = 1e-5


def _mixer(**kw):
    return ssm.MambaMixer(16, 32, d_state=4, conv_width=4, rngs=nnx.Rngs(0), **kw)


def test_parallel_scan_equals_sequential_reference():
    k = jax.random.split(jax.random.key(0), 4)
    dA = jax.random.uniform(k[0], (2, 13, 5, 3), minval=0.5, maxval=1.0)
    dBx = jax.random.normal(k[1], (2, 13, 5, 3))
    c = jax.random.normal(k[2], (2, 13, 3))
    h0 = jax.random.normal(k[3], (2, 5, 3))
    y, h = jax.jit(ssm.selective_scan)(dA, dBx, c, h0)
    y_ref, h_ref = jax.jit(ssm.selective_scan_ref)(dA, dBx, c, h0)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    # A plain Python loop, the definition: h_t = dA_t h_{t-1} + dBx_t, y_t = C_t . h_t.
    hh = np.asarray(h0)
    for t in range(13):
        hh = np.asarray(dA[:, t]) * hh + np.asarray(dBx[:, t])
        np.testing.assert_allclose(y[:, t], np.einsum("bin,bn->bi", hh, np.asarray(c[:, t])), atol=1e-5, rtol=1e-5)


def test_mixer_paths_agree_prefill_then_steps():
    m = _mixer()
    x = jax.random.normal(jax.random.key(1), (3, 12, 16))
    y, st = jax.jit(lambda x: m(x))(x)
    for scan in ("sequential", "fused"):
        y_seq, st_seq = jax.jit(lambda x, scan=scan: m(x, scan=scan))(x)
        np.testing.assert_allclose(y, y_seq, atol=ATOL)
        np.testing.assert_allclose(st.ssm_BxIxN, st_seq.ssm_BxIxN, atol=ATOL)
    # Prefill 5 tokens, then the one-token recurrence for the other 7: same outputs and final state.
    y5, s = m(x[:, :5])
    step = jax.jit(m.step)
    outs = [y5]
    for t in range(5, 12):
        o, s = step(x[:, t], s)
        outs.append(o[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y, atol=ATOL)
    np.testing.assert_allclose(s.ssm_BxIxN, st.ssm_BxIxN, atol=ATOL)
    np.testing.assert_allclose(s.conv_BxWxI, st.conv_BxWxI, atol=ATOL)
    # Chunked prefill: 7 tokens from the state after 5 equal the tail of the 12-token prefill.
    y7, s7 = m(x[:, 5:], m(x[:, :5])[1])
    np.testing.assert_allclose(y7, y[:, 5:], atol=ATOL)
    np.testing.assert_allclose(s7.ssm_BxIxN, st.ssm_BxIxN, atol=ATOL)
    assert st.conv_BxWxI.shape == (3, 3, 32) and st.ssm_BxIxN.shape == (3, 32, 4)


def test_right_padding_leaves_state_at_last_real_token():
    m = _mixer()
    x = jax.random.normal(jax.random.key(2), (2, 9, 16))
    valid = jnp.arange(9)[None, :] < jnp.asarray([[6], [9]])
    y, st = m(x, valid_BxT=valid)
    np.testing.assert_allclose(m(x, valid_BxT=valid, scan="fused")[1].ssm_BxIxN, st.ssm_BxIxN, atol=ATOL)
    y6, st6 = m(x[:1, :6])
    np.testing.assert_allclose(y[0, :6], y6[0], atol=ATOL)
    np.testing.assert_allclose(st.ssm_BxIxN[0], st6.ssm_BxIxN[0], atol=ATOL)
    np.testing.assert_allclose(st.conv_BxWxI[0], st6.conv_BxWxI[0], atol=ATOL)
    np.testing.assert_allclose(st.ssm_BxIxN[1], m(x[1:])[1].ssm_BxIxN[0], atol=ATOL)


def test_causal_and_input_dependent():
    m = _mixer()
    x = jax.random.normal(jax.random.key(3), (1, 8, 16))
    y = m(x)[0]
    y2 = m(x.at[:, -1].add(1.0))[0]
    np.testing.assert_allclose(y2[:, :-1], y[:, :-1], atol=ATOL)
    assert not np.allclose(y2[:, -1], y[:, -1])


def test_param_count_grad_and_bad_args():
    m = ssm.MambaMixer(16, 24, d_state=5, conv_width=3, dt_rank=2, d_out=1, rngs=nnx.Rngs(0))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count == ssm.mixer_param_count(16, 24, d_state=5, conv_width=3, dt_rank=2, d_out=1)
    gd, params = nnx.split(m)
    x = jax.random.normal(jax.random.key(4), (2, 6, 16))
    g = jax.grad(lambda p: jnp.sum(nnx.merge(gd, p)(x)[0] ** 2))(params)
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(g))
    assert float(jnp.abs(g["A_log"][...]).sum()) > 0   # the selection reaches A through the scan
    with pytest.raises(ValueError, match="d_state"):
        ssm.MambaMixer(16, 24, d_state=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="scan"):
        m(x, scan="fast")
