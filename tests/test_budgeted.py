"""Budgeted batch classification against a plain-Python re-implementation of MSDNet's rule."""
import math

import numpy as np
import pytest

from eejax.eval import budgeted

E, N, C = 3, 12, 4
CUM_FLOPS_E = np.array([10.0, 25.0, 45.0])


def _probs(seed):
    """Random softmaxes (continuous, so no ties in max prob) and labels."""
    rng = np.random.default_rng(seed)
    logits_ExNxC = rng.normal(size=(E, N, C)) * 2
    probs_ExNxC = np.exp(logits_ExNxC) / np.exp(logits_ExNxC).sum(-1, keepdims=True)
    return probs_ExNxC, rng.integers(0, C, size=N)


def _brute_thresholds(probs, prior):
    """MSDNet's dynamic_eval_find_threshold, loop by loop."""
    q = [prior ** (k + 1) for k in range(E)]
    q = [x / sum(q) for x in q]
    exited = [False] * N
    thresholds = [math.inf] * E
    for k in range(E - 1):
        n_k = math.floor(N * q[k] + 1e-9)
        order = sorted(range(N), key=lambda i: -max(probs[k][i]))
        count = 0
        for i in order:
            if not exited[i]:
                count += 1
                if count == n_k:
                    thresholds[k] = max(probs[k][i])
                    break
        for i in range(N):
            exited[i] = exited[i] or max(probs[k][i]) >= thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds, q


def _brute_eval(probs, labels, thresholds):
    exits, correct, flops = [], 0, 0.0
    for i in range(N):
        for k in range(E):
            if max(probs[k][i]) >= thresholds[k]:
                break
        exits.append(k)
        correct += int(np.argmax(probs[k][i]) == labels[i])
        flops += CUM_FLOPS_E[k]
    return exits, correct / N, flops / N


def test_priors():
    p = budgeted.priors()
    assert len(p) == 39 and p[0] == pytest.approx(0.05) and p[-1] == pytest.approx(1.95)
    np.testing.assert_allclose(budgeted.target_fractions(2.0, 3), [2 / 14, 4 / 14, 8 / 14])


def test_budgeted_curve_matches_brute_force():
    probs_val, labels_val = _probs(0)
    probs_test, labels_test = _probs(1)
    points = budgeted.budgeted_curve(probs_val, labels_val, probs_test, labels_test, CUM_FLOPS_E)
    assert len(points) == 39
    conf_val = probs_val.max(-1)
    for point, prior in zip(points, budgeted.priors()):
        thresholds, q = _brute_thresholds(probs_val, prior)
        np.testing.assert_array_equal(point.thresholds_E, thresholds)
        # On validation, exit k < E-1 takes exactly floor(N q_k) examples; the last takes the rest.
        val_exits, _, _ = _brute_eval(probs_val, labels_val, thresholds)
        want = [math.floor(N * q[k] + 1e-9) for k in range(E - 1)]
        want.append(N - sum(want))
        assert [val_exits.count(k) for k in range(E)] == want
        np.testing.assert_array_equal(budgeted.simulate_exits(conf_val, point.thresholds_E), val_exits)
        # On test, accuracy, FLOPs and fractions equal a direct loop.
        test_exits, acc, flops = _brute_eval(probs_test, labels_test, thresholds)
        assert point.prior == prior
        assert point.accuracy == pytest.approx(acc)
        assert point.expected_flops == pytest.approx(flops)
        np.testing.assert_allclose(point.exit_fractions_E, [test_exits.count(k) / N for k in range(E)])


def test_prior_extremes():
    probs, labels = _probs(2)
    points = budgeted.budgeted_curve(probs, labels, probs, labels, CUM_FLOPS_E)
    # q_k ~ p^k: small p = low budget, floor(12 * 0.952) = 11 of 12 leave at the first exit.
    np.testing.assert_allclose(points[0].exit_fractions_E, [11 / 12, 0, 1 / 12])
    # Large p = high budget: the fractions grow with depth, q = [.15, .29, .56] -> counts [1, 3, 8].
    np.testing.assert_allclose(points[-1].exit_fractions_E, [1 / 12, 3 / 12, 8 / 12])
    assert points[0].expected_flops < points[-1].expected_flops
    # With many examples, the realised validation fractions approach q for every prior.
    rng = np.random.default_rng(3)
    conf_ExN = rng.uniform(size=(4, 5000))
    for prior in (0.05, 1.0, 1.95):
        q_E = budgeted.target_fractions(prior, 4)
        exit_idx_N = budgeted.simulate_exits(conf_ExN, budgeted.select_thresholds(conf_ExN, q_E))
        np.testing.assert_allclose(np.bincount(exit_idx_N, minlength=4) / 5000, q_E, atol=4 / 5000)


def test_threshold_sweep_extremes():
    probs, labels = _probs(4)
    last, first = budgeted.threshold_sweep(probs, labels, CUM_FLOPS_E, [np.inf, -np.inf])
    np.testing.assert_array_equal(last.exit_fractions_E, [0, 0, 1])
    assert last.expected_flops == CUM_FLOPS_E[-1]
    assert last.accuracy == pytest.approx(np.mean(probs[-1].argmax(-1) == labels))
    np.testing.assert_array_equal(first.exit_fractions_E, [1, 0, 0])
    assert first.expected_flops == CUM_FLOPS_E[0]
    assert np.isnan(first.prior)
    (mid,) = budgeted.threshold_sweep(probs, labels, CUM_FLOPS_E, [0.6])
    exits, acc, flops = _brute_eval(probs, labels, [0.6] * E)
    assert (mid.accuracy, mid.expected_flops) == (pytest.approx(acc), pytest.approx(flops))


def test_static_points():
    probs, labels = _probs(5)
    static_flops_E = np.array([8.0, 20.0, 40.0])
    points = budgeted.static_points(probs, labels, static_flops_E)
    for e, point in enumerate(points):
        assert point.accuracy == pytest.approx(np.mean(probs[e].argmax(-1) == labels))
        assert point.expected_flops == static_flops_E[e]
        # Its thresholds route everybody to exit e.
        exit_idx_N = budgeted.simulate_exits(probs.max(-1), point.thresholds_E)
        np.testing.assert_array_equal(exit_idx_N, np.full(N, e))


def test_simulate_exits_by_hand():
    conf_ExN = np.array([[0.9, 0.2, 0.5, 0.1],
                         [0.9, 0.8, 0.5, 0.1],
                         [0.9, 0.9, 0.5, 0.1]])
    np.testing.assert_array_equal(budgeted.simulate_exits(conf_ExN, np.array([0.8, 0.7, np.inf])), [0, 1, 2, 2])


def test_shape_errors():
    probs, labels = _probs(6)
    with pytest.raises(ValueError, match="flops_E.shape"):
        budgeted.threshold_sweep(probs, labels, [1.0, 2.0], [0.5])
    with pytest.raises(ValueError, match="labels"):
        budgeted.static_points(probs, labels[:-1], CUM_FLOPS_E)


def test_static_mix_interpolates_neighbouring_depths_at_a_target_cost():
    per_depth = np.asarray([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])   # depth e's metric on two examples
    flops = [10.0, 20.0, 40.0]
    for e in range(3):   # at a static cost, exactly that depth
        np.testing.assert_allclose(budgeted.static_mix(per_depth, flops, flops[e]), per_depth[e])
    np.testing.assert_allclose(budgeted.static_mix(per_depth, flops, 15.0), [0.5, 1.0])     # half of depth 0 and 1
    np.testing.assert_allclose(budgeted.static_mix(per_depth, flops, 35.0), [1.0, 0.25])    # 1/4 depth 1, 3/4 depth 2
    assert budgeted.static_mix(per_depth, flops, 9.0) is None and budgeted.static_mix(per_depth, flops, 41.0) is None
    with pytest.raises(ValueError, match="two static depths"):
        budgeted.static_mix(per_depth[:1], [10.0], 10.0)
