"""Depth chosen before running (eejax.exits.gate_first): the grouped executor equals each row run alone at its exit
and the masked engine with the same fixed exits; its chunk programs have no host stop; its FLOPs are the chunks'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import engine, gate_first, hlo, policies
from eejax.models.vit import ViT, ViTConfig

CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=4, num_heads=4, mlp_dim=64,
                num_classes=5, exits="all", head_types="linear")
# A 4-layer float32 chain: outputs agree to float32 rounding of a few dozen ops per layer.
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def setup():
    model = ViT(CFG, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (21, 16, 16, 1))
    exit_B = jax.random.randint(jax.random.key(2), (21,), 0, 4).astype(jnp.int32)
    return model, model.embed(x), exit_B, engine.prefix(CFG.depth, CFG.exit_layers)


def test_gate_labels_rule():
    q_ExN = np.asarray([[0.5, 0.0, 0.9, 0.2],
                        [0.6, 0.0, 0.9, 0.5],
                        [0.9, 0.0, 0.9, 0.6]])
    np.testing.assert_array_equal(gate_labels := gate_first.gate_labels(q_ExN, 0.0), [2, 0, 0, 2])
    assert gate_labels.dtype == np.int32
    # 0.15 per step: row 0 gains 0.4 over two steps (worth 0.3): exit 2; row 3 gains 0.3 then 0.1: exit 1.
    np.testing.assert_array_equal(gate_first.gate_labels(q_ExN, 0.15), [2, 0, 0, 1])
    np.testing.assert_array_equal(gate_first.gate_labels(q_ExN, 10.0), [0, 0, 0, 0])
    # A larger beta never deepens a label (the price of depth only rises).
    rng = np.random.default_rng(0)
    q = np.cumsum(rng.uniform(size=(5, 200)), axis=0) / 5
    means = [gate_first.gate_labels(q, b).mean() for b in (0.0, 0.02, 0.05, 0.1, 0.3)]
    assert all(a >= b for a, b in zip(means, means[1:]))
    # depth_E prices each exit by its layers: a last exit 4 layers past the second no longer pays for row 0.
    np.testing.assert_array_equal(gate_first.gate_labels(q_ExN, 0.15, depth_E=[1, 2, 6]), [0, 0, 0, 1])


@pytest.mark.parametrize("bad, match", [
    (dict(quality_ExN=np.zeros((3,)), beta=0.1), "E x N"),
    (dict(quality_ExN=np.full((2, 2), np.nan), beta=0.1), "non-finite"),
    (dict(quality_ExN=np.zeros((2, 2)), beta=-1.0), "beta"),
    (dict(quality_ExN=np.zeros((2, 2)), beta=0.1, depth_E=[2, 1]), "depth_E"),
])
def test_gate_labels_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        gate_first.gate_labels(**bad)


def test_plan_groups_covers_every_row_once():
    exit_B = np.asarray([3, 0, 3, 1, 3, 3, 0, 3, 3, 3, 3, 3, 3, 0])
    sizes = gate_first.chunk_sizes(len(exit_B), multiple=2)
    assert sizes == (2, 4, 8)
    plan = gate_first.plan_groups(exit_B, 4, sizes)
    np.testing.assert_array_equal(exit_B[plan.order_B], np.sort(exit_B))
    seen = np.concatenate([plan.order_B[s:s + r] for s, r in zip(plan.start_K, plan.rows_K)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(exit_B)))
    for e, s, r, size in zip(plan.exit_K, plan.start_K, plan.rows_K, plan.size_K):
        assert size in sizes and 1 <= r <= size and np.all(exit_B[plan.order_B[s:s + r]] == e)
    # Exit 3 has 10 rows: 8 + 2; exit 0 has 3 rows: 2 + 1 (padded to 2); exit 1 one row; exit 2 none.
    assert list(zip(plan.exit_K.tolist(), plan.rows_K.tolist(), plan.size_K.tolist())) == [
        (0, 2, 2), (0, 1, 2), (1, 1, 2), (3, 8, 8), (3, 2, 2)]
    assert plan.padding == 2
    assert gate_first.chunk_sizes(5, multiple=8) == (5,)


def test_plan_groups_bad_inputs():
    with pytest.raises(ValueError, match="exit_B holds exits"):
        gate_first.plan_groups(np.asarray([0, 4]), 4, (8,))
    with pytest.raises(ValueError, match="exit_B must be"):
        gate_first.plan_groups(np.asarray([0.5]), 4, (8,))
    with pytest.raises(ValueError, match="chunk sizes"):
        gate_first.plan_groups(np.asarray([0]), 4, ())


def test_grouped_equals_each_row_alone_and_the_masked_engine(setup):
    model, h0, exit_B, program = setup
    heads = list(model.heads)
    g = gate_first.run_grouped(model.layers, heads, h0, program, exit_B, multiple=4)
    assert g.host_stops == 1 and g.plan.num_chunks >= 4 and g.plan.padding > 0   # padding rows are thrown away
    np.testing.assert_array_equal(g.exit_B, exit_B)
    np.testing.assert_array_equal(g.exit_layer_B, np.asarray(CFG.exit_layers)[np.asarray(exit_B)])
    # Each row alone (batch of one) through the truncated model of its exit.
    for b in range(h0.shape[0]):
        e = int(exit_B[b])
        h_last, _ = engine.run_layers(jax.tree.map(lambda p: p[:CFG.exit_layers[e] + 1], model.layers), h0[b:b + 1])
        np.testing.assert_allclose(g.out.logits_BxC[b], heads[e](h_last).logits_BxC[0], **TOL)
    masked = jax.jit(lambda h, e: engine.run(model.layers, heads, h, program, policies.fixed_exit(e),
                                             engine.Masked()))(h0, exit_B)
    np.testing.assert_array_equal(masked.exit_B, exit_B)
    np.testing.assert_allclose(g.out.logits_BxC, masked.out.logits_BxC, **TOL)
    np.testing.assert_allclose(g.out.hidden_BxD, masked.out.hidden_BxD, **TOL)


def test_grouped_executor_behind_engine_run(setup):
    model, h0, _, program = setup
    heads = list(model.heads)
    gate = gate_first.DepthGate(CFG.d_model, len(heads), rngs=nnx.Rngs(3))
    gate.fc.kernel[...] = gate.fc.kernel[...] * 50.0     # spread the rows over the exits
    policy = gate_first.gate_policy(gate)
    want_B = gate_first.predict_exits(gate(h0))
    assert len(np.unique(want_B)) >= 2
    # Per row: the released code's argmax over the flattened B x E tensor is one number for the whole batch (an
    # index into B x E, not a depth unless B = 1), so some rows would run at another depth than their own.
    flat = int(jnp.argmax(gate(h0)))
    assert flat >= len(heads) or np.any(np.asarray(want_B) != flat)
    got = engine.run(model.layers, heads, h0, program, policy, gate_first.Grouped(multiple=4))
    masked = jax.jit(lambda h: engine.run(model.layers, heads, h, program, policy, engine.Masked()))(h0)
    np.testing.assert_array_equal(got.exit_B, want_B)
    np.testing.assert_array_equal(masked.exit_B, want_B)
    np.testing.assert_allclose(got.logits_BxC, masked.logits_BxC, **TOL)
    assert int(got.layers_run) == int(masked.layers_run)


def test_host_stops_and_flops(setup):
    model, h0, exit_B, program = setup
    heads = list(model.heads)
    # A chunk's program: a loop of known trip count, no host stop.
    for e in range(len(heads)):
        fn = gate_first.chunk_fn(model.layers, heads[e], program, e)
        assert hlo.profile(jax.jit(fn), h0, np.arange(8, dtype=np.int32)).host_stops(trips=len(heads)) == 0
    # The masked per-row loop decides after every exit: host stops grow with the exits run.
    masked = jax.jit(lambda h, e: engine.run(model.layers, heads, h, program, policies.fixed_exit(e),
                                             engine.Masked()).out.logits_BxC)
    assert hlo.profile(masked, h0, exit_B).host_stops(trips=len(heads)) >= len(heads)
    # FLOPs: without padding the chunks cost the rows' static costs exactly; padding adds whole rows only.
    static_E = np.asarray([10.0, 20.0, 30.0, 40.0])
    exact = gate_first.plan_groups(np.asarray(exit_B), 4, (1,))
    assert exact.padding == 0
    assert gate_first.plan_flops(exact, static_E) == pytest.approx(static_E[np.asarray(exit_B)].sum())
    padded = gate_first.plan_groups(np.asarray(exit_B), 4, (4,))
    extra = gate_first.plan_flops(padded, static_E) - static_E[np.asarray(exit_B)].sum()
    assert extra == pytest.approx(np.sum((padded.size_K - padded.rows_K) * static_E[padded.exit_K]))
    parts = gate_first.plan_work(padded, lambda n: gate_first.costs.Work(flops=n), lambda n: gate_first.costs.Work(),
                                 np.asarray(CFG.exit_layers) + 1)
    assert sum(p.host_stops for p in parts) == 1
    assert sum(p.flops for p in parts) == pytest.approx(
        np.sum(padded.size_K * (np.asarray(CFG.exit_layers) + 1)[padded.exit_K]))


def test_grouped_bad_inputs(setup):
    model, h0, exit_B, program = setup
    heads = list(model.heads)
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda e: gate_first.run_grouped(model.layers, heads, h0, program, e).exit_B)(exit_B)
    with pytest.raises(ValueError, match="one exit per row"):
        gate_first.run_grouped(model.layers, heads, h0, program, exit_B[:3])
    with pytest.raises(ValueError, match="depth before running"):
        engine.run(model.layers, heads, h0, program, policies.threshold("max_softmax", 0.5, len(heads)),
                   gate_first.Grouped())
    per_row = engine.row_skip(jnp.ones((CFG.depth, h0.shape[0]), bool), CFG.exit_layers)
    with pytest.raises(ValueError, match="per-row program"):
        gate_first.run_grouped(model.layers, heads, h0, per_row, exit_B)
