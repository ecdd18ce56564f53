"""Dynamic Perceiver (eejax/models/perceiver.py): the engine path equals the scan path at the exit taken."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import engine, policies
from eejax.models import perceiver as P

CFG = P.PerceiverConfig(width=8, depth=3, latent_tokens=4, latent_dim=16, num_heads=2, mlp_dim=16)


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (16, 28, 28, 1))


@pytest.mark.parametrize("latent_tokens", [4, 0], ids=["perceiver", "feature_exits"])
def test_engine_equals_scan_at_exit_taken(x, latent_tokens):
    cfg = P.PerceiverConfig(**{**CFG.__dict__, "latent_tokens": latent_tokens})
    graphdef, params = P.build(cfg, 0)
    model = nnx.merge(graphdef, params)
    outs = jax.jit(lambda p, x: nnx.merge(graphdef, p).all_exits(x))(params, x)
    conf_ExB = jax.nn.softmax(outs.logits_ExBxC, -1).max(-1)
    # Per-exit thresholds at the median confidence: rows leave at every exit.
    thr_E = jnp.median(conf_ExB, axis=1)
    want_B = engine.simulate(policies.score_threshold(thr_E, conf_ExB.shape[0]), conf_ExB).exit_B
    assert set(np.asarray(want_B).tolist()) == {0, 1, 2}
    for executor in (engine.Masked(), engine.BucketCascade((4, 8))):
        dyn = jax.jit(lambda p, x, t, ex=executor: nnx.merge(graphdef, p).dynamic(x, t, executor=ex))(
            params, x, thr_E)
        np.testing.assert_array_equal(dyn.exit_B, want_B)
        np.testing.assert_allclose(dyn.logits_BxC, engine.take_exit(outs.logits_ExBxC, dyn.exit_B),
                                   atol=1e-5, rtol=1e-5)
    # The truncated static model equals the scan path's exit, and the carry has both branches (or one).
    np.testing.assert_allclose(model.static(x[:4], 1), outs.logits_ExBxC[1, :4], atol=1e-5, rtol=1e-5)
    assert (model.embed(x).latent_BxLxD is None) == (latent_tokens == 0)
    assert P.head_sources(cfg)[-1] == ("merged" if latent_tokens else "feature")


def test_flops_count_latent_branch_and_heads():
    feat = P.flops(P.PerceiverConfig(**{**CFG.__dict__, "latent_tokens": 0}))
    lat = P.flops(CFG)
    g, c, l, d = CFG.grid, CFG.width, CFG.latent_tokens, CFG.latent_dim
    extra = (P.cross_attention_flops(l, d, g * g, c, d) + P.cross_attention_flops(g * g, c, l, d, d)
             + 8 * l * d * d + 4 * l * l * d + 4 * l * d * CFG.mlp_dim)
    # Per stage the Perceiver adds x2z + latent block + z2x; its heads read D (the last: D + C) instead of C.
    step_f, step_l = np.diff(feat.static_flops_E), np.diff(lat.static_flops_E)
    np.testing.assert_allclose(step_l[:-1] - step_f[:-1], extra)
    head_l, head_f = 2 * d * 10, 2 * c * 10
    np.testing.assert_allclose(lat.cum_flops_E - lat.static_flops_E, np.arange(3) * head_l)
    np.testing.assert_allclose(feat.cum_flops_E - feat.static_flops_E, np.arange(3) * head_f)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        P.PerceiverConfig(image_size=30)
    with pytest.raises(ValueError, match="latent_dim"):
        P.PerceiverConfig(latent_dim=30, num_heads=4)
