"""``engine.simulate`` (the stop rule run offline over every exit's outputs) takes the exit the executed engine
takes, for every kind of policy (issue 21, item 4): one rule, executed or simulated. Thresholds sit in gaps between
observed scores (margin asserted), so the two paths' float differences cannot move a row across one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import confidence, engine, policies
from eejax.models.vit import ViT, ViTConfig
from margins import float_tol, threshold_between

B = 16
CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                num_classes=6, exits="all", head_types="linear")
E = len(CFG.exit_layers)


@pytest.fixture(scope="module")
def vit():
    model = ViT(CFG, rngs=nnx.Rngs(4))
    for i, head in enumerate(model.heads):   # sharpen the heads so that rows exit at different exits
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
    x = jax.random.normal(jax.random.key(5), (B, 16, 16, 1))
    gs = nnx.split(model)
    outs, h0 = jax.jit(lambda gs, x: (nnx.merge(*gs).all_exits(x), nnx.merge(*gs).embed(x)))(gs, x)
    return gs, x, outs, h0


def _trace(policy, outs, h0):
    """Every exit's score for every row, the policy state advancing through all exits (``score_ExB``)."""
    per_exit = [engine.HeadOut(*(f[e] for f in outs[:4])) for e in range(E)]
    state = policy.init(per_exit[0], jnp.zeros((B,), jnp.int32), h0)
    scores = []
    for e, out in enumerate(per_exit):
        _, score_B, state = policy.decide(out, state, e)
        scores.append(score_B)
    return np.asarray(jnp.stack(scores))


def _spread(make, outs, h0, q=(0.7, 0.6, 0.5, 0.4, 0.0), sign=1.0, fixed=None):
    """``make(thr_E)`` with per-exit thresholds in gaps between the scores it produces (probed with +inf);
    ``sign=-1``: the policy thresholds minus its score (a distance); ``fixed``: exit -> a threshold far from every
    score there (an exit whose scores are all equal)."""
    score_ExB = sign * _trace(make(np.full(E, np.inf)), outs, h0)
    fixed = {E - 1: 0.5, **(fixed or {})}     # the last exit stops every row whatever its threshold
    return make(np.asarray([fixed[e] if e in fixed else threshold_between(score_ExB[e], q[e]) for e in range(E)]))


def _policies(outs, h0):
    pols = {f"threshold_{m}": _spread(lambda t, m=m: policies.threshold(m, t, E), outs, h0)
            for m in sorted(confidence.MEASURES) if m not in ("patience", "cosine")}
    pols["threshold_patience"] = policies.threshold("patience", 1.0, E)
    # Cosine with the previous exit: 0 at the first exit for every row (nothing to compare with).
    pols["saturation"] = _spread(lambda t: policies.saturation(t, E), outs, h0, fixed={0: 0.5})
    pols["batch_mean"] = policies.batch_mean("max_softmax", threshold_between(
        _trace(policies.batch_mean("max_softmax", np.inf, E), outs, h0)[:-1, 0], 0.5), E)
    pols["fixed_exit"] = policies.fixed_exit(jnp.arange(B) % E)
    pols["router"] = policies.router(lambda h: (jnp.arange(h.shape[0]) * 3) % E)
    w = jax.random.normal(jax.random.key(6), (E, 4))
    pols["uncertainty_gate"] = _spread(lambda t: policies.uncertainty_gate(w, jnp.zeros(E), jnp.clip(t, 0, 1)),
                                       outs, h0)
    lo = _trace(policies.window("max_softmax", -np.inf, np.inf, E), outs, h0)
    lo_E = np.asarray([threshold_between(lo[e], 0.2) for e in range(E)])
    hi_E = np.asarray([threshold_between(lo[e], 0.8) for e in range(E)])
    pols["window"] = policies.window("max_softmax", lo_E, hi_E, E)
    # Fires when the distance to the previous exit's softmax is below the threshold; the first exit never fires.
    pols["agreement"] = _spread(lambda t: policies.agreement(t, E, max_exit=3), outs, h0, sign=-1.0,
                                q=(0.5, 0.5, 0.5, 0.5, 0.5), fixed={0: 0.5})
    pols["shadow"] = policies.shadow(E)
    return pols


def test_simulate_equals_executed_engine_for_every_policy_kind(vit):
    gs, x, outs, h0 = vit
    pols = _policies(outs, h0)

    @jax.jit
    def executed(gs, x):
        m = nnx.merge(*gs)
        return {name: m.dynamic(x, policy=p) for name, p in pols.items()}

    runs = executed(gs, x)
    for name, policy in pols.items():
        sim = engine.simulate(policy, outs, h0=h0)
        dyn = runs[name]
        np.testing.assert_array_equal(sim.exit_B, dyn.exit_B, err_msg=name)
        np.testing.assert_allclose(sim.score_B, dyn.score_B, **float_tol(CFG.depth), err_msg=name)
        if name not in ("shadow", "batch_mean", "fixed_exit", "router"):
            assert len(np.unique(np.asarray(dyn.exit_B))) >= 2, f"{name}: no spread of exits"
    np.testing.assert_array_equal(engine.simulate(pols["shadow"], outs).policy_state,
                                  runs["shadow"].policy_state)   # every exit's recorded tokens
    np.testing.assert_array_equal(runs["fixed_exit"].exit_B, np.arange(B) % E)


def test_simulate_over_cached_scores_by_hand():
    conf_ExN = np.array([[0.9, 0.2, 0.5, 0.1],
                         [0.9, 0.8, 0.5, 0.1],
                         [0.9, 0.9, 0.5, 0.1]], np.float32)
    sim = engine.simulate(policies.score_threshold(np.array([0.8, 0.7, np.inf]), 3), conf_ExN)
    np.testing.assert_array_equal(sim.exit_B, [0, 1, 2, 2])
    np.testing.assert_allclose(sim.score_B, [0.9, 0.8, 0.5, 0.1])
    window = policies.window(confidence.cached_score, [0.3, 0.3, 0.3], [0.85, 0.85, 0.85], 3)
    np.testing.assert_array_equal(engine.simulate(window, conf_ExN).exit_B, [0, 0, 2, 0])   # outside: decided
