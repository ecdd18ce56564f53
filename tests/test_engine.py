"""The engine's invariants: the while-loop path equals the scan path at each sample's exit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import confidence, engine, policies
from eejax.models.vit import ViT, ViTConfig

CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                num_classes=6, exits="all", head_types=("local", "global", "vitee", "linear", "linear"),
                local_hidden=16, global_pool=2)


@pytest.fixture(scope="module")
def model_and_x():
    model = ViT(CFG, rngs=nnx.Rngs(0))
    # Sharpen the heads so that different samples become confident at different exits.
    for i, head in enumerate(model.heads):
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
    x = jax.random.normal(jax.random.key(1), (24, 16, 16, 1))
    return nnx.split(model), x


@jax.jit
def _all(graph_state, x):
    return nnx.merge(*graph_state).all_exits(x)


def _dyn(graph_state, x, thr, measure):
    return jax.jit(lambda gs, x, thr: nnx.merge(*gs).dynamic(x, thr, measure))(graph_state, x, thr)


def _sim(scores_ExB, thr):
    """The engine's stop rule over cached scores."""
    return engine.simulate(policies.score_threshold(thr, scores_ExB.shape[0]), scores_ExB).exit_B


def spreading_thresholds(scores_ExB, num: int = 3) -> list[float]:
    """Up to ``num`` thresholds (score quantiles, or the integer patience counts) under which the rows take at
    least three distinct exits; a threshold that puts every row at one exit tests nothing."""
    flat = np.asarray(scores_ExB[:-1]).ravel()
    cands = sorted(set(np.round(np.quantile(flat, np.linspace(0.05, 0.95, 37)), 6).tolist()))
    good = [t for t in cands if len(np.unique(_sim(scores_ExB, t))) >= 3]
    return [good[i] for i in np.linspace(0, len(good) - 1, min(num, len(good))).astype(int)] if good else []


@pytest.mark.parametrize("measure", sorted(confidence.MEASURES))
def test_dynamic_equals_scan_at_exit(model_and_x, measure):
    gs, x = model_and_x
    outs = _all(gs, x)
    scores_ExB = engine.scores_from_outputs(outs, confidence.get_measure(measure))
    thresholds = spreading_thresholds(scores_ExB)
    assert thresholds, f"no threshold spreads the rows over >= 3 exits for {measure}"
    for thr in thresholds:
        dyn = _dyn(gs, x, thr, measure)
        assert len(np.unique(dyn.exit_B)) >= 3
        want_exit = _sim(scores_ExB, thr)
        np.testing.assert_array_equal(dyn.exit_B, want_exit)
        np.testing.assert_allclose(dyn.logits_BxC, engine.take_exit(outs.logits_ExBxC, dyn.exit_B),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(dyn.exit_layer_B, np.asarray(CFG.exit_layers)[np.asarray(dyn.exit_B)])
        assert int(dyn.layers_run) == int(dyn.exit_layer_B.max()) + 1


def test_exits_spread_and_per_exit_thresholds(model_and_x):
    gs, x = model_and_x
    outs = _all(gs, x)
    scores_ExB = engine.scores_from_outputs(outs)
    thr_E = jnp.asarray([0.9, 0.7, 0.5, 0.3, 0.0])
    dyn = _dyn(gs, x, thr_E, "max_softmax")
    np.testing.assert_array_equal(dyn.exit_B, _sim(scores_ExB, thr_E))
    thr = float(np.quantile(np.asarray(scores_ExB[:-1]), 0.5))
    assert len(np.unique(_dyn(gs, x, thr, "max_softmax").exit_B)) >= 2


def test_extreme_thresholds(model_and_x):
    gs, x = model_and_x
    outs = _all(gs, x)
    full = _dyn(gs, x, jnp.inf, "max_softmax")
    assert (np.asarray(full.exit_B) == len(CFG.exit_layers) - 1).all() and int(full.layers_run) == CFG.depth
    np.testing.assert_allclose(full.logits_BxC, outs.logits_ExBxC[-1], rtol=1e-5, atol=1e-5)
    first = _dyn(gs, x, -jnp.inf, "max_softmax")
    assert (np.asarray(first.exit_B) == 0).all() and int(first.layers_run) == CFG.exit_layers[0] + 1
    np.testing.assert_allclose(first.logits_BxC, outs.logits_ExBxC[0], rtol=1e-5, atol=1e-5)


def test_batched_equals_per_row(model_and_x):
    """A row's exit and logits do not depend on the other rows in its batch."""
    gs, x = model_and_x
    thr = 0.5
    batched = _dyn(gs, x, thr, "patience")
    for i in range(0, x.shape[0], 5):
        row = _dyn(gs, x[i:i + 1], thr, "patience")
        assert int(row.exit_B[0]) == int(batched.exit_B[i])
        np.testing.assert_allclose(row.logits_BxC[0], batched.logits_BxC[i], rtol=1e-5, atol=1e-5)


def test_layer_mask_program(model_and_x):
    gs, x = model_and_x
    model = nnx.merge(*gs)
    h0 = model.embed(x)
    ones = engine.run_layers(model.layers, h0)[0]
    mask = jnp.ones((CFG.depth, x.shape[0]), bool).at[:, 0].set(False).at[2:, 1].set(False)
    h_last, _ = engine.run_layers(model.layers, h0, layer_mask_NxB=mask)
    np.testing.assert_allclose(h_last[0], h0[0])                       # row 0 skipped every layer
    two = engine.run_layers(jax.tree.map(lambda p: p[:2], model.layers), h0)[0]
    np.testing.assert_allclose(h_last[1], two[1], rtol=1e-5, atol=1e-5)  # row 1 ran a 2-layer prefix
    np.testing.assert_allclose(h_last[2:], ones[2:], rtol=1e-5, atol=1e-5)


def test_static_truncation_equals_scan_exit(model_and_x):
    gs, x = model_and_x
    outs = _all(gs, x)
    model = nnx.merge(*gs)
    for e in (0, 2):
        np.testing.assert_allclose(model.static(x, e), outs.logits_ExBxC[e], rtol=1e-5, atol=1e-5)


def test_grad_through_all_exits(model_and_x):
    gs, x = model_and_x
    graphdef, state = gs

    def loss(state):
        return jnp.sum(nnx.merge(graphdef, state).all_exits(x).logits_ExBxC ** 2)

    grads = jax.grad(loss)(state)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["layers"]["mlp"]["fc1"]["kernel"][...]).sum()) > 0


def test_exit_layer_specs():
    assert engine.exit_layers_from("all", 4) == (0, 1, 2, 3)
    assert engine.exit_layers_from("every:2", 5) == (1, 3, 4)
    assert engine.exit_layers_from("from:3", 6) == (3, 4, 5)
    assert engine.exit_layers_from([0, 2], 4) == (0, 2, 3)
    with pytest.raises(ValueError, match="bad exit spec"):
        engine.exit_layers_from("every:x", 4)
    with pytest.raises(ValueError, match="outside"):
        engine.exit_layers_from([7], 4)
    with pytest.raises(ValueError, match="head_types"):
        ViTConfig(head_types=("linear",))
