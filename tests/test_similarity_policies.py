"""MuE's saturation policy and DeeR's agreement policy, executed by the engine, against numpy references computed
from the scan path's per-layer states and softmaxes (a shared head after every layer, as both papers use)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import engine, policies
from eejax.models.vit import ViT, ViTConfig
from experiments import _common_vision as shv
from margins import float_tol, threshold_between

CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                num_classes=6, exits=[4], head_types="linear")
EXECUTORS = [engine.Masked(), engine.BucketCascade(buckets=(8, 16))]


@pytest.fixture(scope="module")
def setup():
    model = ViT(CFG, rngs=nnx.Rngs(0))
    model.heads[0].cls.fc.kernel[...] = model.heads[0].cls.fc.kernel[...] * 6.0   # spread the confidences
    x = jax.random.normal(jax.random.key(1), (24, 16, 16, 1))
    gs = nnx.split(model)

    @jax.jit
    def reference(gs, x):
        m = nnx.merge(*gs)
        h0 = m.embed(x)
        _, h_SxBxTxD = engine.run_layers(m.layers, h0)
        flat = jnp.concatenate([h0[None], h_SxBxTxD]).reshape(CFG.depth + 1, x.shape[0], -1)
        logits = jax.vmap(lambda h: m.heads[0](h).logits_BxC)(h_SxBxTxD)
        return flat, logits

    flat, logits = reference(gs, x)
    return gs, x, np.asarray(flat, np.float64), np.asarray(logits)


def _run(gs, x, policy, executor, report_state):
    fn = jax.jit(lambda gs, x: shv.run_engine(nnx.merge(*gs), x, policy, executor, report_state=report_state))
    return fn(gs, x)


def _first_exit(fire_ExB):
    fire_ExB = fire_ExB.copy()
    fire_ExB[-1] = True
    return np.argmax(fire_ExB, axis=0)


def _cosines(flat):
    a, b = flat[1:], flat[:-1]
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("executor", EXECUTORS, ids=["masked", "cascade"])
def test_saturation_equals_reference(setup, executor):
    gs, x, flat, logits = setup
    cos_ExB = _cosines(flat)
    for thr in (threshold_between(cos_ExB[:-1], q) for q in (0.3, 0.5, 0.7)):
        want = _first_exit(cos_ExB >= thr)
        assert len(np.unique(want)) >= 3
        out = _run(gs, x, policies.saturation(thr, CFG.depth, first=shv.flat_state), executor, True)
        np.testing.assert_array_equal(out.exit_B, want)
        np.testing.assert_allclose(out.logits_BxC, logits[want, np.arange(len(want))], **float_tol(CFG.depth))
        np.testing.assert_allclose(out.score_B, cos_ExB[want, np.arange(len(want))], **float_tol(CFG.depth))


def test_saturation_first_exit_conventions(setup):
    gs, x, flat, _ = setup
    # Without ``first`` the first exit compares with zeros: score 0, so a threshold of 0 stops every row there.
    out = _run(gs, x, policies.saturation(0.0, CFG.depth), engine.Masked(), True)
    np.testing.assert_array_equal(out.exit_B, 0)
    np.testing.assert_allclose(out.score_B, 0.0, atol=1e-7)
    # With the layer input as the first state, the first exit's score is cos(layer 1, embedding).
    out = _run(gs, x, policies.saturation(-1.0, CFG.depth, first=shv.flat_state), engine.Masked(), True)
    np.testing.assert_allclose(out.score_B, _cosines(flat)[0], atol=1e-5)
    with pytest.raises(ValueError, match="first\\(h0\\) has shape"):
        _run(gs, x, policies.saturation(0.5, CFG.depth, first=lambda h: h[:, 0]), engine.Masked(), True)


@pytest.mark.parametrize("executor", EXECUTORS, ids=["masked", "cascade"])
@pytest.mark.parametrize("max_exit", [2, 4])
def test_agreement_equals_reference(setup, executor, max_exit):
    gs, x, _, logits = setup
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dist_ExB = np.concatenate([np.full((1, p.shape[1]), np.inf), np.linalg.norm(p[1:] - p[:-1], axis=-1)])
    for thr in (threshold_between(dist_ExB[1:max_exit], q) for q in (0.3, 0.6)):
        fire = dist_ExB < thr
        fire[max_exit:] = True                      # the peak cap
        want = _first_exit(fire)
        out = _run(gs, x, policies.agreement(thr, CFG.depth, max_exit=max_exit), executor, False)
        np.testing.assert_array_equal(out.exit_B, want)
        assert int(np.max(out.exit_B)) <= max_exit and int(out.layers_run) <= max_exit + 1
        np.testing.assert_allclose(out.logits_BxC, logits[want, np.arange(len(want))], **float_tol(CFG.depth))
    # The first exit has nothing to agree with: even an infinite threshold stops rows only from exit 1 on.
    out = _run(gs, x, policies.agreement(np.inf, CFG.depth, max_exit=max_exit), executor, False)
    np.testing.assert_array_equal(out.exit_B, 1)


def test_agreement_bad_inputs():
    with pytest.raises(ValueError, match="max_exit"):
        policies.agreement(0.1, 5, max_exit=5)
    with pytest.raises(ValueError, match="outside"):
        policies.agreement(-0.1, 5)
    with pytest.raises(ValueError, match="shape"):
        policies.agreement(np.ones(3), 5)
