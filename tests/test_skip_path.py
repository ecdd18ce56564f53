"""SkipPipe training paths (arXiv:2502.19913): ``engine.stage_path`` draws valid stage paths under jit, the scan path
runs a traced path exactly as the static program of the same layers, and ``lm.skip_path_lm_loss`` is the mean of
each micro-batch's CE under its own path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.train import StepContext
from eejax.exits import engine
from eejax.models import lm
from margins import float_tol

V = 19
SMALL = dict(vocab_size=V, d_model=32, depth=6, num_heads=4, num_kv_heads=2, mlp_dim=48, exits=(5,))


def _paths(n, stage, keep, swap, count=400):
    draw = jax.jit(jax.vmap(lambda k: engine.stage_path(k, n, stage, keep, swap).layer_S))
    return np.asarray(draw(jax.random.split(jax.random.key(0), count)))


@pytest.mark.parametrize("swap", [0.0, 1.0])
def test_stage_paths_are_valid_and_uniform(swap):
    paths = _paths(12, 2, 4, swap)                              # 6 stages of 2 layers, 4 kept
    assert paths.shape == (400, 8)
    stages = paths.reshape(400, 4, 2) // 2
    assert np.all(stages[:, :, 0] == stages[:, :, 1])          # a stage's layers run together, in order
    assert np.all(paths.reshape(400, 4, 2)[:, :, 1] == paths.reshape(400, 4, 2)[:, :, 0] + 1)
    order = stages[:, :, 0]
    assert np.all(order[:, 0] == 0)                             # stage 0 always first
    assert all(len(set(o)) == 4 for o in order)                 # no stage twice
    inversions = np.sum(order[:, 1:-1] > order[:, 2:], axis=1)
    if swap == 0.0:
        assert np.all(inversions == 0)
    else:
        assert np.all(inversions == 1)                          # exactly one adjacent pair swapped
    kept = np.bincount(order[:, 1:].ravel(), minlength=6)[1:] / 400
    np.testing.assert_allclose(kept, 3 / 5, atol=0.1)            # each other stage kept with probability 3/5


def test_stage_path_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="stage_size"):
        engine.stage_path(key, 12, 5, 2)
    with pytest.raises(ValueError, match="keep_stages"):
        engine.stage_path(key, 12, 2, 7)
    with pytest.raises(ValueError, match="swap_prob"):
        engine.stage_path(key, 12, 2, 3, 1.5)
    cfg = lm.LMConfig(**SMALL)
    with pytest.raises(ValueError, match="micro_batches"):
        lm.skip_path_lm_loss(None, cfg, stage_size=2, keep_stages=2, micro_batches=0)


def test_traced_path_equals_static_program_and_loss_is_micro_batch_mean():
    cfg = lm.LMConfig(**SMALL)
    gd, params = lm.build(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (4, 7), 0, V)
    targets = jnp.roll(tokens, -1, axis=1)
    rng = jax.random.key(3)

    def traced(p, t, key):
        return nnx.merge(gd, p).hidden_states(t, program=engine.stage_path(key, 6, 2, 2, 1.0))[-1]

    model = nnx.merge(gd, params)
    path = np.asarray(engine.stage_path(rng, 6, 2, 2, 1.0).layer_S)
    want = model.hidden_states(tokens, program=engine.sequence(path.tolist(), num_layers=6))[-1]
    np.testing.assert_allclose(jax.jit(traced)(params, tokens, rng), want, **float_tol(4))
    # the loss: micro-batch i runs the path of the i-th split key, CE at the final exit, mean over micro-batches
    loss_fn = lm.skip_path_lm_loss(gd, cfg, stage_size=2, keep_stages=2, swap_prob=0.5, micro_batches=2)
    ctx = StepContext(step=jnp.int32(0), rng=rng, frozen=None)
    got, _ = jax.jit(loss_fn)(params, {"tokens": tokens, "targets": targets}, ctx)
    ces = []
    for i, key in enumerate(jax.random.split(rng, 2)):
        layers = np.asarray(engine.stage_path(key, 6, 2, 2, 0.5).layer_S).tolist()
        h = model.hidden_states(tokens[2 * i:2 * i + 2], program=engine.sequence(layers, num_layers=6))[-1]
        ces.append(lm.lm_ce(model.exit_logits(h, 0), targets[2 * i:2 * i + 2]))
    np.testing.assert_allclose(got, np.mean(ces), rtol=1e-4)
    # full order (every stage kept, no swap) is ordinary training
    full = lm.skip_path_lm_loss(gd, cfg, stage_size=2, keep_stages=3)
    np.testing.assert_allclose(jax.jit(full)(params, {"tokens": tokens, "targets": targets}, ctx)[0],
                               lm.lm_ce(model(tokens), targets), rtol=1e-4)
