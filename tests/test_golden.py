"""Behaviour preserved across the engine refactor: every inference path, run through the new engine on the fixed
models and inputs of ``tests/golden/record_pre_engine.py``, equals the outputs recorded with the old loops
(exits exactly; logits and log-probs to float tolerance, since segments are now compiled as one program).

The recording was made on one CPU; another CPU rounds differently in the last bits. So the ViT exits are compared
for the rows whose scores (recomputed here) are clear of the recorded threshold by a margin (``margins.clear_rows``;
most rows, asserted), and float tolerances follow the depth (``margins.float_tol``)."""
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
from margins import MARGIN, clear_rows, float_tol

GOLD = np.load(pathlib.Path(__file__).parent / "golden" / "engine_golden.npz")
TOL = float_tol(5)      # five f32 layers (the ViT, the U-ViT); the LM has four


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
def test_vit_masked_and_bucketed(vit, measure):
    """The masked executor and the bucket cascade (the compacted executor's successor; it equals the recorded
    compacted outputs) against the recording."""
    cfg, gs, x = vit
    outs = jax.jit(lambda gs, x: nnx.merge(*gs).all_exits(x))(gs, x)
    np.testing.assert_allclose(outs.logits_ExBxC, GOLD["vit_scan_logits"], **TOL)
    scores_ExB = engine.scores_from_outputs(outs, confidence.get_measure(measure))

    @jax.jit
    def both(gs, x, thr):
        m = nnx.merge(*gs)
        a = m.dynamic(x, thr, measure)
        b = m.dynamic(x, thr, measure, executor=engine.BucketCascade((8, 16)))
        return a.exit_B, a.logits_BxC, b.exit_B, b.logits_BxC

    for q in (0.3, 0.6):
        key = f"{measure}_{q}"
        thr = GOLD[f"vit_while_{key}_thr"]
        # Patience scores are exact integer counts: no float difference moves them across a threshold.
        ok_B = clear_rows(scores_ExB, thr, 0.0 if measure == "patience" else MARGIN)
        assert ok_B.mean() >= 0.75, f"only {ok_B.sum()} of {ok_B.size} rows clear of the recorded threshold"
        a_exit, a_logits, b_exit, b_logits = both(gs, x, thr)
        for exit_B, logits, rec in ((a_exit, a_logits, "vit_while"), (b_exit, b_logits, "vit_compact")):
            np.testing.assert_array_equal(np.asarray(exit_B)[ok_B], GOLD[f"{rec}_{key}_exit"][ok_B])
            np.testing.assert_allclose(np.asarray(logits)[ok_B], GOLD[f"{rec}_{key}_logits"][ok_B], **TOL)


def test_vit_continuous(vit):
    _, _, x = vit
    cfg = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                    num_classes=6, exits="all", head_types="linear")
    m = ViT(cfg, rngs=nnx.Rngs(3))
    for i, head in enumerate(m.heads):
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
    gs = nnx.split(m)
    out = jax.jit(lambda gs, x: continuous.vit_continuous_exits(nnx.merge(*gs), x, 0.5, num_slots=8))(gs, x)
    ok_B = clear_rows(engine.scores_from_outputs(jax.jit(lambda gs, x: nnx.merge(*gs).all_exits(x))(gs, x)), 0.5)
    assert ok_B.mean() >= 0.75, f"only {ok_B.sum()} of {ok_B.size} rows clear of the recorded threshold"
    np.testing.assert_array_equal(np.asarray(out.exit_B)[ok_B], GOLD["vit_cont_exit"][ok_B])
    np.testing.assert_allclose(np.asarray(out.logits_BxC)[ok_B], GOLD["vit_cont_logits"][ok_B], **TOL)


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

