"""Bad input to the engine's Python API is a ValueError naming the argument, raised where it enters (issue 23,
item 9), instead of JAX's gather semantics clamping an index into a wrong answer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import engine, policies
from eejax.models.vit import ViT, ViTConfig

CFG = ViTConfig(image_size=8, channels=1, patch_size=4, d_model=16, depth=4, num_heads=2, mlp_dim=32,
                num_classes=5, exits=[1, 2, 3], head_types="linear")    # 4 stored layers, 3 exits
B = 4


@pytest.fixture(scope="module")
def vit():
    model = ViT(CFG, rngs=nnx.Rngs(0))
    return model, model.embed(jnp.zeros((B, 8, 8, 1)))


def _run(vit, program=None, policy=None, heads=None, h0=None, executor=engine.Masked()):
    model, h = vit
    program = engine.prefix(CFG.depth, CFG.exit_layers) if program is None else program
    heads = list(model.heads)[:program.num_exits] if heads is None else heads
    return engine.run(model.layers, heads, h if h0 is None else h0, program, policy, executor)


@pytest.mark.parametrize("program", [engine.prefix(9, [8]), engine.repeat([0, 9], 2)], ids=["prefix9", "repeat09"])
def test_program_naming_layers_that_are_not_stored(vit, program):
    """prefix(9) on 4 stored layers used to run layer 3 five times (and report layers_run=9)."""
    with pytest.raises(ValueError, match=r"program runs stored layers \[.*\], but the layers hold 4"):
        _run(vit, program=program, heads=[vit[0].heads[-1]] * program.num_exits)


@pytest.mark.parametrize("exit_B", [7, 3, [0, 1, 2, 5]])
def test_fixed_exit_out_of_range(vit, exit_B):
    """fixed_exit(7) on a 3-exit program used to stop every row at the last exit."""
    with pytest.raises(ValueError, match="fixed_exit's exit_B holds exits in .* exits 0..2"):
        _run(vit, policy=policies.fixed_exit(exit_B))


@pytest.mark.parametrize("exit_B", [-1, [0, -1, 1, 2], 1.5])
def test_fixed_exit_negative_or_not_an_index(exit_B):
    with pytest.raises(ValueError, match="exit_B must hold exit indices"):
        policies.fixed_exit(exit_B)


def test_fixed_exit_with_a_wrong_row_count(vit):
    with pytest.raises(ValueError, match=r"exit_B has shape \(3,\); want one exit index for every row"):
        _run(vit, policy=policies.fixed_exit([0, 1, 2]))


@pytest.mark.parametrize("num_exits", [2, 5])
def test_threshold_policy_built_for_another_program(vit, num_exits):
    """A policy for 2 or 5 exits on a 3-exit program used to be accepted (its thresholds indexed with clamping)."""
    for policy in (policies.threshold("max_softmax", 0.5, num_exits), policies.batch_mean("max_softmax", 0.5,
                                                                                          num_exits),
                   policies.window("max_softmax", 0.2, 0.8, num_exits), policies.agreement(0.1, num_exits),
                   policies.saturation(0.9, num_exits), policies.shadow(num_exits),
                   policies.uncertainty_gate(np.zeros((num_exits, 4)), np.zeros(num_exits))):
        with pytest.raises(ValueError, match=f"{num_exits}.*program has 3 exits|program with 3 exits"):
            _run(vit, policy=policy)
        if not isinstance(policy, policies.Shadow):     # the offline rule checks the same way
            with pytest.raises(ValueError, match="program has 3 exits"):
                engine.simulate(policy, jnp.zeros((3, B)))


@pytest.mark.parametrize("num_exits", [-1, 0, 2.5, True])
def test_threshold_policy_with_a_bad_exit_count(num_exits):
    with pytest.raises(ValueError, match="num_exits=.* must be a positive number of exits"):
        policies.threshold("max_softmax", 0.5, num_exits)


def test_empty_batch(vit):
    model, h = vit
    with pytest.raises(ValueError, match="h0 has an empty batch"):
        _run(vit, h0=h[:0])
    with pytest.raises(ValueError, match="h0 has an empty batch"):
        _run(vit, h0=h[:0], policy=policies.threshold("max_softmax", 0.5, 3), executor=engine.BucketCascade())
    with pytest.raises(ValueError, match="empty batch"):
        engine.simulate(policies.score_threshold(0.5, 3), np.zeros((3, 0)))


def test_lists_instead_of_arrays(vit):
    """Lists are refused with a hint where an array of rows is needed, and accepted where they are values."""
    model, h = vit
    with pytest.raises(ValueError, match="h0 must be an array.*convert lists with jnp.asarray"):
        _run(vit, h0=np.asarray(h).tolist())
    with pytest.raises(ValueError, match="h0's arrays must share one leading batch axis"):
        _run(vit, h0=(h, h[:2]))
    policy = policies.threshold("max_softmax", [0.9, 0.8, 0.0], 3)          # a list of thresholds
    assert _run(vit, policy=policy).exit_B.shape == (B,)
    np.testing.assert_array_equal(_run(vit, policy=policies.fixed_exit([0, 2, 1, 0])).exit_B, [0, 2, 1, 0])
    keep = [[True] * B, [False] * B, [True] * B, [True] * B]                  # row_skip from lists
    assert _run(vit, program=engine.row_skip(keep, CFG.exit_layers)).exit_B.shape == (B,)
    sim = engine.simulate(policies.score_threshold([0.5, 0.5, 0.5], 3), [[0.9, 0.1], [0.2, 0.6], [0.0, 0.0]])
    np.testing.assert_array_equal(sim.exit_B, [0, 1])


def test_program_and_outputs_of_the_wrong_kind(vit):
    model, h = vit
    with pytest.raises(ValueError, match="program must be an engine.Program"):
        engine.run(model.layers, list(model.heads), h, CFG.exit_layers)
    with pytest.raises(ValueError, match="outputs must be stacked per exit"):
        engine.simulate(policies.score_threshold(0.5, 3), np.zeros((B,)))
    with pytest.raises(ValueError, match="bucket sizes"):
        _run(vit, policy=policies.threshold("max_softmax", 0.5, 3), executor=engine.BucketCascade((0, 2)))


def test_traced_values_are_checked_by_shape_only(vit):
    """Inside jit the values are unknown; shapes are still checked (a wrong threshold count fails to trace)."""
    model, h = vit
    gd, state = nnx.split(model)
    prog = engine.prefix(CFG.depth, CFG.exit_layers)

    @jax.jit
    def run(state, h, thr):
        m = nnx.merge(gd, state)
        return engine.run(m.layers, list(m.heads), h, prog, policies.threshold("max_softmax", thr, 3)).exit_B

    assert run(state, h, jnp.zeros(3)).shape == (B,)
    with pytest.raises(ValueError, match="threshold has shape"):
        run(state, h, jnp.zeros(2))
