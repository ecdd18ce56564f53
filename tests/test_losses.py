import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax.exits import losses


def _np_ce(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean()


def test_weights():
    np.testing.assert_allclose(losses.exit_weights([0, 1, 3], "uniform"), [1 / 3] * 3)
    np.testing.assert_allclose(losses.exit_weights([0, 1, 3], "linear"), np.array([1, 2, 4]) / 7)
    np.testing.assert_allclose(losses.exit_weights([0, 1, 3], "geometric", 2.0), np.array([1, 2, 4]) / 7)
    with pytest.raises(ValueError, match="unknown exit weighting"):
        losses.exit_weights([0], "cubic")
    w0 = losses.lgvit_stage1_weights(jnp.int32(0), [1, 2, 3])
    w1 = losses.lgvit_stage1_weights(jnp.int32(1), [1, 2, 3])
    np.testing.assert_allclose(w0, [0, 0, 1])
    np.testing.assert_allclose(w1, np.array([2, 3, 4]) / 9)


def test_multi_exit_ce_and_kd_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 5)
    w = np.array([0.2, 0.3, 0.5])
    loss, per = losses.multi_exit_ce(jnp.asarray(logits), jnp.asarray(labels), w)
    want = [_np_ce(logits[e], labels) for e in range(3)]
    np.testing.assert_allclose(per, want, rtol=1e-5)
    np.testing.assert_allclose(loss, np.dot(w, want), rtol=1e-5)
    t = 2.0
    p_t = jax.nn.softmax(logits[2] / t)
    kd = float(losses.kd_loss(logits[0], logits[2], t))
    want_kd = t * t * np.mean(np.sum(p_t * (np.log(p_t) - jax.nn.log_softmax(logits[0] / t)), -1))
    np.testing.assert_allclose(kd, want_kd, rtol=1e-5)
    assert abs(float(losses.kd_loss(logits[1], logits[1], t))) < 1e-6
    # KD does not push gradients into the teacher.
    g = jax.grad(lambda tl: losses.kd_loss(jnp.asarray(logits[0]), tl, t))(jnp.asarray(logits[2]))
    assert float(jnp.abs(g).max()) == 0.0


def test_stage2_terms_by_hand():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(4, 6, 8)), jnp.float32)
    final = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, 6))
    kinds = ("local", "local", "global", "linear")
    t = losses.lgvit_stage2_loss(logits, feats, final, labels, kinds, alpha=0.3)
    mse = lambda a, b: float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))  # noqa: E731
    np.testing.assert_allclose(t.hetero, np.mean([mse(feats[e], final) for e in range(3)]), rtol=1e-5)
    np.testing.assert_allclose(t.homo, mse(feats[0], feats[1]), rtol=1e-5)  # only 'local' has two members
    np.testing.assert_allclose(t.total, 0.7 * t.ce + 0.3 * t.kd + 0.01 * t.hetero + 0.01 * t.homo, rtol=1e-6)


def test_gate_loss_is_bce():
    gate = jnp.asarray([[2.0, -1.0]])
    logits = jnp.asarray([[[0.0, 1.0], [1.0, 0.0]]])
    labels = jnp.asarray([1, 1])  # exit correct for row 0, wrong for row 1
    want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))])
    np.testing.assert_allclose(losses.gate_loss(gate, logits, labels), want, rtol=1e-5)
