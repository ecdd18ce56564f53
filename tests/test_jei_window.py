"""JEI-DNN's learned uncertainty gates and the window-based cascade, executed by the engine, against numpy
references; the uncertainty metrics (conformal sets, ECE, selective risk, FPR@TPR) against their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.eval import uncertainty
from eejax.exits import cascade, engine, policies
from eejax.exits import confidence as conf_lib
from eejax.models.vit import ViT, ViTConfig
from margins import MARGIN, threshold_between

CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=4, num_heads=4, mlp_dim=64,
                num_classes=6, exits="all", head_types="linear")
EXECUTORS = [engine.Masked(), engine.BucketCascade(buckets=(8, 16))]


def _np_features(logits_BxC):
    z = np.asarray(logits_BxC, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.sort(p, -1)[:, ::-1]
    ent = -(p * np.log(p)).sum(-1)
    q = p ** 2 / (p ** 2).sum(-1, keepdims=True)
    return np.stack([top[:, 0], ent, top[:, 0] - top[:, 1], -(q * np.log(q)).sum(-1)], -1)


def test_uncertainty_features_by_hand():
    logits = jnp.asarray([[0.0, 0.0, 0.0], [3.0, 1.0, -2.0]])
    f = np.asarray(conf_lib.uncertainty_features(logits))
    np.testing.assert_allclose(f[0], [1 / 3, np.log(3), 0.0, np.log(3)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f, _np_features(logits), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def vit_setup():
    model = ViT(CFG, rngs=nnx.Rngs(0))
    for head in model.heads:
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * 5.0     # spread the confidences
    x = jax.random.normal(jax.random.key(1), (24, 16, 16, 1))
    gs = nnx.split(model)
    logits = jax.jit(lambda gs, x: nnx.merge(*gs).all_exits(x).logits_ExBxC)(gs, x)
    return gs, x, np.asarray(logits)


@pytest.mark.parametrize("executor", EXECUTORS, ids=["masked", "cascade"])
def test_uncertainty_gate_equals_hand_reference(vit_setup, executor):
    """JEI-DNN's jointly trained gates: stop at the first exit whose sigmoid(features . w + b) >= 0.5."""
    gs, x, logits_ExBxC = vit_setup
    e_num = logits_ExBxC.shape[0]
    rng = np.random.default_rng(0)
    w = rng.normal(size=(e_num, 4)) * np.asarray([4.0, 1.0, 3.0, 1.0])
    b = rng.normal(size=e_num) - 1.0
    # Reference by hand: every exit's gate probability from numpy features, the first >= 0.5 wins.
    g_ExB = np.stack([1 / (1 + np.exp(-(_np_features(l) @ w[e] + b[e]))) for e, l in enumerate(logits_ExBxC)])
    assert np.abs(g_ExB[:-1] - 0.5).min() > MARGIN, "a gate probability sits on the threshold"
    fire = g_ExB >= 0.5
    fire[-1] = True
    want = np.argmax(fire, 0)
    assert 0 < len(set(want.tolist())) and len(set(want.tolist())) > 1, "the test should exercise several exits"
    out = jax.jit(lambda gs, x: nnx.merge(*gs).dynamic(x, policy=policies.uncertainty_gate(w, b),
                                                         executor=executor))(gs, x)
    np.testing.assert_array_equal(np.asarray(out.exit_B), want)
    np.testing.assert_allclose(np.asarray(out.logits_BxC), logits_ExBxC[want, np.arange(len(want))], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.score_B), g_ExB[want, np.arange(len(want))], atol=1e-5)


def test_uncertainty_gate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="want w"):
        policies.uncertainty_gate(np.zeros((3, 5)), np.zeros(3))
    with pytest.raises(ValueError, match="lower edge"):
        policies.window("max_softmax", [0.5, 0.1], [0.4, 0.9], 2)


def _members(k_stages, d_in, c):
    keys = jax.random.split(jax.random.key(3), k_stages)
    ws = [jax.random.normal(k, (d_in, c)) * (1.0 + i) for i, k in enumerate(keys)]
    return ws, [lambda x, w=w: x.reshape(x.shape[0], -1) @ w for w in ws]


@pytest.mark.parametrize("executor", EXECUTORS, ids=["masked", "cascade"])
def test_window_cascade_routing_equals_numpy(executor):
    """Stage k+1 sees only the rows whose stage-k ensemble MSP lies in [lo_k, hi_k); its output is the mean
    softmax of the members run so far."""
    ws, members = _members(3, 12, 5)
    x = jax.random.normal(jax.random.key(4), (24, 3, 4, 1))
    xf = np.asarray(x, np.float64).reshape(24, -1)
    probs = []
    for w in ws:
        z = xf @ np.asarray(w, np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        probs.append(p / p.sum(-1, keepdims=True))
    ens = np.cumsum(probs, 0) / np.arange(1, 4)[:, None, None]
    msp = ens.max(-1)
    lo = threshold_between(msp[0], 0.3), threshold_between(msp[1], 0.2), -np.inf
    hi = threshold_between(msp[0], 0.7), threshold_between(msp[1], 0.9), np.inf
    lo, hi = np.asarray(lo), np.asarray(hi)
    want = np.full(24, 2)
    for n in range(24):
        for k in range(2):
            if not lo[k] <= msp[k, n] < hi[k]:
                want[n] = k
                break
    assert set(want.tolist()) == {0, 1, 2}
    out = jax.jit(lambda x: cascade.run(members, x, policies.window("max_softmax", lo, hi, 3), 5, executor))(x)
    np.testing.assert_array_equal(np.asarray(out.exit_B), want)
    np.testing.assert_allclose(np.exp(np.asarray(out.logits_BxC)), ens[want, np.arange(24)], atol=1e-5)
    # lo = -inf is the plain threshold cascade: the same exits as policies.threshold.
    plain = jax.jit(lambda x: cascade.run(members, x, policies.window("max_softmax", -np.inf, hi, 3), 5,
                                          executor).exit_B)(x)
    thr = jax.jit(lambda x: cascade.run(members, x, policies.threshold("max_softmax", hi, 3), 5,
                                        executor).exit_B)(x)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(thr))


def test_conformal_coverage_hits_target_on_synthetic_scores():
    """Labels drawn from the model's own (calibrated) softmax: LAC sets calibrated on one half cover the label at
    >= 1 - alpha on the other, and not much more (the finite-sample guarantee is tight up to 1/(n+1))."""
    rng = np.random.default_rng(0)
    n, c = 8000, 10
    logits = rng.normal(size=(n, c)) * 2.5
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = (probs.cumsum(-1) < rng.random((n, 1))).sum(-1).clip(0, c - 1)
    for alpha in (0.05, 0.1, 0.2):
        covs = []
        for split in range(4):
            perm = np.random.default_rng(split).permutation(n)
            cal, test = perm[:n // 2], perm[n // 2:]
            st = uncertainty.conformal_lac(probs[cal], labels[cal], probs[test], labels[test], alpha)
            covs.append(st.coverage)
            assert 1.0 <= st.mean_size <= c
        assert -0.005 < np.mean(covs) - (1 - alpha) < 0.015, (alpha, covs)
    # Perfectly calibrated confidences have a small ECE; always-wrong confident ones an ECE near the confidence.
    correct = probs.argmax(-1) == labels
    assert uncertainty.ece(probs.max(-1), correct) < 0.03
    assert uncertainty.ece(np.full(100, 0.9), np.zeros(100, bool)) == pytest.approx(0.9)
    assert uncertainty.conformal_quantile(np.arange(9.0), 0.05) == np.inf     # ceil(10 * 0.95) = 10 > 9


def test_selective_and_ood_metrics_by_hand():
    conf = np.asarray([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.asarray([True, True, False, True, False])
    # Accepting the top 2 has risk 0; the top 4 has risk 1/4.
    assert uncertainty.coverage_at_risk(conf, correct, 0.0) == (0.4, 0.8)
    assert uncertainty.coverage_at_risk(conf, correct, 0.25)[0] == 0.8
    assert uncertainty.risk_at_coverage(conf, correct, 0.6) == pytest.approx(1 / 3)
    ids, oods = np.arange(1.0, 21.0), np.asarray([0.5, 1.5, 2.5, 30.0])
    assert uncertainty.fpr_at_tpr(ids, oods, 0.95) == 0.5      # t = 2: accepts 2.5 and 30
    assert uncertainty.auroc(np.asarray([2.0, 3.0]), np.asarray([1.0, 2.0])) == pytest.approx(0.875)
