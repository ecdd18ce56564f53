"""Depth-grouped continuous batching returns what the masked while-loop (engine.while_exits) returns, per input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import continuous, engine
from eejax.models.vit import ViT, ViTConfig
from margins import float_tol, threshold_between

CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                num_classes=6, exits="all", head_types="linear")
Q = 20   # queued inputs, more than the slots
TOL = float_tol(CFG.depth)


@pytest.fixture(scope="module")
def setup():
    model = ViT(CFG, rngs=nnx.Rngs(0))
    for i, head in enumerate(model.heads):   # sharpen the heads so that inputs exit at different exits
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
    x = jax.random.normal(jax.random.key(1), (Q, 16, 16, 1))
    gs = nnx.split(model)
    scores_ExB = np.asarray(engine.scores_from_outputs(jax.jit(lambda gs, x: nnx.merge(*gs).all_exits(x))(gs, x)))
    # Per-exit thresholds in gaps between observed scores (no input within the margin of one), so inputs leave
    # at every exit; and one threshold for every exit, in a gap between the scores of all exits.
    thr_E = [threshold_between(scores_ExB[e], qt) for e, qt in enumerate((0.75, 0.6, 0.5, 0.4, 0.0))]
    return gs, x, jnp.asarray(thr_E, jnp.float32), jnp.float32(threshold_between(scores_ExB[:-1], 0.5))


@jax.jit
def _masked(gs, x, thr):
    m = nnx.merge(*gs)
    return engine.while_exits(m.layers, list(m.heads), m.embed(x), CFG.exit_layers, thr)


def _continuous(num_slots, measure="max_softmax"):
    @jax.jit
    def run(gs, x, thr):
        return continuous.vit_continuous_exits(nnx.merge(*gs), x, thr, num_slots=num_slots, measure=measure)
    return run


def test_grouped_linear_equals_per_layer():
    key = jax.random.key(0)
    n, s, t, d, f = 4, 7, 3, 8, 5
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w_NxDxF = jax.random.normal(k1, (n, d, f))
    b_NxF = jax.random.normal(k2, (n, f))
    x_SxTxD = jax.random.normal(k3, (s, t, d))
    layer_S = jnp.sort(jax.random.randint(k4, (s,), 0, n))          # sorted by layer; layer 2 may be empty
    count_N = jnp.sum(layer_S[:, None] == jnp.arange(n)[None], axis=0)
    got = continuous.grouped_linear(x_SxTxD, w_NxDxF, b_NxF, layer_S, count_N)
    want = jnp.stack([x_SxTxD[i] @ w_NxDxF[layer_S[i]] + b_NxF[layer_S[i]][None] for i in range(s)])
    np.testing.assert_allclose(got, want, **float_tol(1))


def test_grouped_block_step_equals_block(setup):
    gs, x, _, _ = setup
    m = nnx.merge(*gs)
    h_SxTxD = m.embed(x[:6])
    layer_S = jnp.asarray([3, 0, 4, 0, 2, 3])                        # unsorted, with repeats and a gap (layer 1)
    got = jax.jit(continuous.grouped_block_step)(m.layers, h_SxTxD, layer_S)
    for i, l in enumerate(np.asarray(layer_S)):
        block = jax.tree.map(lambda p: p[l], m.layers)
        np.testing.assert_allclose(got[i], block(h_SxTxD[i:i + 1])[0], **float_tol(1))


@pytest.mark.parametrize("num_slots", [3, 8])
def test_continuous_equals_masked(setup, num_slots):
    gs, x, thr_E, thr_all = setup
    run = _continuous(num_slots)
    for thr in (thr_E, jnp.full_like(thr_E, -jnp.inf), jnp.full_like(thr_E, jnp.inf), thr_all):
        want = _masked(gs, x, thr)
        got = run(gs, x, thr)
        np.testing.assert_array_equal(got.exit_B, want.exit_B)
        np.testing.assert_array_equal(got.exit_layer_B, want.exit_layer_B)
        np.testing.assert_allclose(got.logits_BxC, want.logits_BxC, **TOL)
        np.testing.assert_allclose(got.score_B, want.score_B, **TOL)
        # Each step applies one layer to each of S slots: at least sum(depth)/S steps; a slot never idles while
        # the queue is non-empty, so at most that plus one drain of the deepest input.
        depth_sum = int(np.sum(np.asarray(want.exit_layer_B) + 1))
        assert -(-depth_sum // num_slots) <= int(got.steps) <= -(-depth_sum // num_slots) + CFG.depth
    assert len(np.unique(np.asarray(_masked(gs, x, thr_E).exit_B))) == len(CFG.exit_layers)   # every exit taken


def test_continuous_stateful_measure_and_more_slots_than_inputs(setup):
    """Patience (PABEE) state must be reset when a slot is refilled; 32 slots > 20 inputs leaves slots empty."""
    gs, x, _, _ = setup
    thr = jnp.float32(1.0)
    want = jax.jit(lambda gs, x, thr: nnx.merge(*gs).dynamic(x, thr, "patience"))(gs, x, thr)
    for num_slots in (4, 32):
        got = _continuous(num_slots, "patience")(gs, x, thr)
        np.testing.assert_array_equal(got.exit_B, want.exit_B)
        np.testing.assert_allclose(got.logits_BxC, want.logits_BxC, **TOL)
    assert len(np.unique(np.asarray(want.exit_B))) >= 2
    assert int(got.steps) == int(np.max(np.asarray(want.exit_layer_B))) + 1   # all inputs in flight at once


def test_rejects_non_block_layers(setup):
    gs, x, thr_E, _ = setup
    m = nnx.merge(*gs)
    with pytest.raises(TypeError, match="pre-LN"):
        continuous.continuous_exits(m.layers.mlp, list(m.heads), m.embed(x), CFG.exit_layers, thr_E, num_slots=4)
