"""Behaviour preserved across the engine refactor: every inference path, run through the new engine on the fixed
models and inputs of ``tests/golden/record_pre_engine.py``, equals the outputs recorded with the old loops
(exits exactly; logits and log-probs to float tolerance, since segments are now compiled as one program)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import per_token, skipdecode
from eejax.exits import confidence, continuous, engine
from eejax.models import diffusion, lm
from eejax.models.vit import ViT, ViTConfig

GOLD = np.load(pathlib.Path(__file__).parent / "golden" / "engine_golden.npz")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def vit():
    cfg = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                    num_classes=6, exits="all", head_types=("local", "global", "vitee", "linear", "linear"),
                    local_hidden=16, global_pool=2)
    model = ViT(cfg, rngs=nnx.Rngs(0))
    for i, head in enumerate(model.heads):
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
    return cfg, nnx.split(model), jax.random.normal(jax.random.key(1), (24, 16, 16, 1))


@pytest.mark.parametrize("measure", sorted(confidence.MEASURES))
def test_vit_masked_and_compacted(vit, measure):
    cfg, gs, x = vit
    np.testing.assert_allclose(jax.jit(lambda gs, x: nnx.merge(*gs).all_exits(x).logits_ExBxC)(gs, x),
                               GOLD["vit_scan_logits"], **TOL)

    @jax.jit
    def both(gs, x, thr):
        m = nnx.merge(*gs)
        a = m.dynamic(x, thr, measure)
        b = m.dynamic(x, thr, measure, executor=engine.Compacted((8, 16)))
        return a.exit_B, a.logits_BxC, b.exit_B, b.logits_BxC

    for q in (0.3, 0.6):
        key = f"{measure}_{q}"
        a_exit, a_logits, b_exit, b_logits = both(gs, x, GOLD[f"vit_while_{key}_thr"])
        np.testing.assert_array_equal(a_exit, GOLD[f"vit_while_{key}_exit"])
        np.testing.assert_allclose(a_logits, GOLD[f"vit_while_{key}_logits"], **TOL)
        np.testing.assert_array_equal(b_exit, GOLD[f"vit_compact_{key}_exit"])
        np.testing.assert_allclose(b_logits, GOLD[f"vit_compact_{key}_logits"], **TOL)


def test_vit_continuous(vit):
    _, _, x = vit
    cfg = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                    num_classes=6, exits="all", head_types="linear")
    m = ViT(cfg, rngs=nnx.Rngs(3))
    for i, head in enumerate(m.heads):
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
    out = jax.jit(lambda gs, x: continuous.vit_continuous_exits(nnx.merge(*gs), x, 0.5, num_slots=8))(
        nnx.split(m), x)
    np.testing.assert_array_equal(out.exit_B, GOLD["vit_cont_exit"])
    np.testing.assert_allclose(out.logits_BxC, GOLD["vit_cont_logits"], **TOL)


def test_lm_decoding():
    cfg = lm.LMConfig(vocab_size=23, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
    gd, params = lm.build(cfg, 0)
    model = nnx.merge(gd, params)
    model.embed.embedding[...] = model.embed.embedding[...] * 5
    gd, params = nnx.split(model)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 23, (4, 6)), jnp.int32)
    lengths = jnp.full((4,), 6, jnp.int32)

    def gen(step):
        return jax.jit(lambda p: per_token.generate(nnx.merge(gd, p), prompt, lengths, 6, step))(params)

    g = gen(per_token.full_depth_step)
    np.testing.assert_array_equal(g.tokens_BxG, GOLD["lm_full_tokens"])
    np.testing.assert_allclose(g.logprob_BxG, GOLD["lm_full_logp"], **TOL)
    for kvm in ("propagate", "oracle"):
        for thr in (0.2, 0.5):
            g = gen(lambda m, t, s, i, thr=thr, kvm=kvm: per_token.exit_step(m, t, s, i, thr, kv=kvm))
            key = f"lm_exit_{kvm}_{thr}"
            np.testing.assert_array_equal(g.tokens_BxG, GOLD[f"{key}_tokens"])
            np.testing.assert_array_equal(g.exit_layer_BxG, GOLD[f"{key}_exit"])
            np.testing.assert_allclose(g.logprob_BxG, GOLD[f"{key}_logp"], **TOL)
    sched = jnp.asarray(GOLD["lm_skip_sched"])
    g = gen(lambda m, t, s, i: skipdecode.skip_step(m, t, s, i, sched))
    np.testing.assert_array_equal(g.tokens_BxG, GOLD["lm_skip_tokens"])
    np.testing.assert_allclose(g.logprob_BxG, GOLD["lm_skip_logp"], **TOL)



@pytest.mark.parametrize("measure", ["per_sample", "batch_mean"])
def test_diffusion_sampler(measure):
    cfg = diffusion.UViTConfig(image_size=8, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                               num_classes=3)
    gd, params = diffusion.build(cfg, 0)
    sched = diffusion.make_schedule("linear", 100)
    y = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
    thr = diffusion.constant_thresholds(0.5, 4, cfg.depth)
    s = diffusion.make_sampler(gd, sched, measure=measure, parameterization="v")(params, jax.random.key(0), y, thr)
    np.testing.assert_array_equal(s.exit_layer_SxB, GOLD[f"diff_{measure}_exit"])
    np.testing.assert_allclose(s.x0_BxHxWxC, GOLD[f"diff_{measure}_x0"], rtol=1e-4, atol=1e-4)

