"""The bucket-cascade, compacted (baseline) and per-device exit paths return what the masked while-loop
(engine.while_exits) returns. Thresholds sit in gaps between observed scores (margin asserted) and tolerances follow
the depth, so the comparisons hold on any CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from eejax.exits import confidence, engine, paths
from eejax.models.vit import ViT, ViTConfig
from margins import float_tol, threshold_between

CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                num_classes=6, exits="all", head_types=("local", "global", "vitee", "linear", "linear"),
                local_hidden=16, global_pool=2)
BUCKETS = (3, 6, 12)   # with B=24: the full batch plus B/2, B/4, B/8
TOL = float_tol(CFG.depth)


@pytest.fixture(scope="module")
def setup():
    model = ViT(CFG, rngs=nnx.Rngs(0))
    for i, head in enumerate(model.heads):   # sharpen the heads so that rows exit at different exits
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
    x = jax.random.normal(jax.random.key(1), (24, 16, 16, 1))
    gs = nnx.split(model)
    scores_ExB = engine.scores_from_outputs(jax.jit(lambda gs, x: nnx.merge(*gs).all_exits(x))(gs, x))
    # Per-exit thresholds in gaps between observed scores (no row within the margin of one), at a spread of
    # quantiles, so that rows leave at every exit.
    thr_E = [threshold_between(scores_ExB[e], q) for e, q in enumerate((0.75, 0.6, 0.5, 0.4, 0.0))]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    return gs, x, jnp.asarray(thr_E, jnp.float32), mesh


def _path(name, mesh=None, measure="max_softmax"):
    measure = confidence.get_measure(measure)
    fns = {"masked": engine.while_exits,
           "cascade": lambda *a, **k: paths.cascade_exits(*a, buckets=BUCKETS, **k),
           "compacted": lambda *a, **k: paths.compacted_exits(*a, buckets=BUCKETS, **k),
           "sharded": lambda *a, **k: paths.sharded_exits(mesh, *a, **k)}

    @jax.jit
    def run(gs, x, thr):
        m = nnx.merge(*gs)
        return fns[name](m.layers, list(m.heads), m.embed(x), CFG.exit_layers, thr, measure=measure)
    return run


def _assert_same(got, want):
    np.testing.assert_array_equal(got.exit_B, want.exit_B)
    np.testing.assert_array_equal(got.exit_layer_B, want.exit_layer_B)
    np.testing.assert_allclose(got.logits_BxC, want.logits_BxC, **TOL)
    np.testing.assert_allclose(got.score_B, want.score_B, **TOL)


def test_default_buckets():
    assert paths.default_buckets(24, multiple=1) == (3, 6, 12, 24)
    assert paths.default_buckets(100) == (16, 32, 56, 100)
    assert paths.default_buckets(5) == (5,)
    with pytest.raises(ValueError, match="must lie in"):
        engine.check_buckets((0, 4), 8)


def test_cascade_compacted_and_sharded_equal_masked(setup):
    gs, x, thr_E, mesh = setup
    masked, sharded = _path("masked"), _path("sharded", mesh)
    bucketed = [_path("cascade"), _path("compacted")]
    for thr in (thr_E, jnp.full_like(thr_E, -jnp.inf), jnp.full_like(thr_E, jnp.inf)):
        want = masked(gs, x, thr)
        for path in bucketed:
            got = path(gs, x, thr)
            _assert_same(got, want)
            assert int(got.layers_run) == int(want.layers_run)
        got_s = sharded(gs, x, thr)
        _assert_same(got_s, want)
        # Each device ran to the depth of its own deepest row.
        per_dev = np.asarray(want.exit_layer_B).reshape(8, -1).max(-1) + 1
        np.testing.assert_array_equal(got_s.layers_run, per_dev)
    # Rows leave at every exit but (maybe) the last: the deep exits' max softmax crowds at 1.0, where no threshold
    # keeps the margin from every score.
    assert len(np.unique(np.asarray(masked(gs, x, thr_E).exit_B))) >= len(CFG.exit_layers) - 1


def test_per_device_depths_differ(setup):
    """Rows sorted by exit depth: the first devices hold shallow rows and stop early, the last ones run deep."""
    gs, x, thr_E, mesh = setup
    masked, sharded = _path("masked"), _path("sharded", mesh)
    order = np.argsort(np.asarray(masked(gs, x, thr_E).exit_B), kind="stable")
    x_sorted = x[order]
    want = masked(gs, x_sorted, thr_E)
    got = sharded(gs, x_sorted, thr_E)
    _assert_same(got, want)
    run_P = np.asarray(got.layers_run)
    assert run_P.shape == (8,) and run_P[0] < run_P[-1] and (np.diff(run_P) >= 0).all()
    # The global loop runs every device to the deepest row.
    assert int(want.layers_run) == run_P[-1] == int(np.max(np.asarray(want.exit_layer_B))) + 1


def test_bucketed_stateful_measure(setup):
    """Patience (PABEE) carries per-row state across exits; compaction must permute it with the rows."""
    gs, x, _, _ = setup
    thr = jnp.float32(1.0)
    want = _path("masked", measure="patience")(gs, x, thr)
    for name in ("cascade", "compacted"):
        _assert_same(_path(name, measure="patience")(gs, x, thr), want)
    assert len(np.unique(np.asarray(want.exit_B))) >= 2
