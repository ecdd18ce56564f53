"""Exits trained on a frozen LM (eejax.decoding.exit_training, trained by the one Trainer through
experiments/_common_smollm2.py): the cache equals the model's hidden states, training lowers the KL to the full
model, loaded heads give the trained logits."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import exit_training as et
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=40, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48, mlp="swiglu",
                  exits=(0, 1, 3), exit_head="lowrank", exit_rank=4)


@pytest.fixture(scope="module")
def setup():
    gd, params = lm.build(CFG, 0)
    model = nnx.merge(gd, params)
    model.embed.embedding[...] = model.embed.embedding[...] * 5     # a peaked full-model distribution
    gd, params = nnx.split(model)
    windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 17))
    return gd, params, windows, et.cache_features(gd, params, windows, 4)


def test_cache_holds_the_exits_hidden_states(setup):
    gd, params, windows, cache = setup
    assert cache.hidden_ExNxD.shape == (2, 8 * 16, 32) and cache.final_NxD.shape == (128, 32)
    np.testing.assert_array_equal(cache.targets_N, windows[:, 1:].reshape(-1))
    outs = nnx.merge(gd, params).all_exits(jnp.asarray(windows[:4, :-1]))
    np.testing.assert_allclose(cache.hidden_ExNxD[:, :64], np.asarray(outs.hidden_ExBxTxD[:2]).reshape(2, 64, 32),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 4])
def test_training_lowers_kl_and_loaded_heads_give_the_trained_logits(setup, rank, tmp_path):
    from experiments._common_smollm2 import train_exits

    gd, params, windows, cache = setup
    p0 = et.init_exit_params(nnx.merge(gd, params), rank=rank)
    before = et.evaluate_exits(gd, params, cache, p0, 64)
    p, hist, _ = train_exits(gd, params, cache, p0, steps=40, batch_tokens=64, lr=2e-2, workdir=tmp_path,
                             log_every=20)
    after = et.evaluate_exits(gd, params, cache, p, 64)
    assert [h["step"] for h in hist] == [20, 40]       # the Trainer's cadence: every log_every steps
    assert all(a < b for a, b in zip(after["kl"], before["kl"])), (before["kl"], after["kl"])
    assert before["full_ppl"] == after["full_ppl"]
    loaded = et.load_exit_params(gd, params, p)
    model = nnx.merge(gd, loaded)
    got = model.all_exits(jnp.asarray(windows[:4, :-1])).logits_ExBxTxV[:2].reshape(2, 64, -1)
    want = et.exit_logits(model, p, jnp.asarray(cache.hidden_ExNxD[:, :64]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The last exit (the full model) is untouched, and so are the parameters passed in (no shared variables).
    np.testing.assert_array_equal(nnx.merge(gd, params).final_norm.scale[...], model.final_norm.scale[...])
    np.testing.assert_array_equal(nnx.merge(gd, params).exit_heads.norm.scale[...], p0.scale_ExD)


def test_load_refuses_mismatched_params(setup):
    gd, params, _, _ = setup
    p = et.init_exit_params(nnx.merge(gd, params), rank=2)
    with pytest.raises(ValueError, match="exit_rank=2"):
        et.load_exit_params(gd, params, p)
    with pytest.raises(ValueError, match="2 early exits"):
        et.load_exit_params(gd, params, et.ExitParams(jnp.ones((3, 32))))
