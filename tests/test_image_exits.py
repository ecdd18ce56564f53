"""Image-output exits (F12, RBQE arXiv:2006.16581): the blind blockiness score, PSNR, JPEG re-compression and the
staged enhancer, each against a plain reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.data import jpeg
from eejax.exits import costs, engine
from eejax.exits import image_quality as iq
from eejax.models import enhancer as enh


def _blockiness_loops(img_HxW: np.ndarray, block: int = 8) -> float:
    """The score with explicit loops over every pair of neighbouring pixels."""
    h, w = img_HxW.shape
    edge, inside = [], []
    for i in range(h):
        for j in range(w - 1):
            (edge if j % block == block - 1 else inside).append(abs(img_HxW[i, j + 1] - img_HxW[i, j]))
    for i in range(h - 1):
        for j in range(w):
            (edge if i % block == block - 1 else inside).append(abs(img_HxW[i + 1, j] - img_HxW[i, j]))
    d_e, d_i = np.mean(edge), np.mean(inside)
    return (d_i + 1e-6) / (d_i + d_e + 2e-6)


def test_blockiness_equals_the_loop_reference_and_orders_block_structure():
    rng = np.random.default_rng(0)
    x = rng.random((3, 20, 28, 3)).astype(np.float32)
    got = np.asarray(iq.blockiness_quality(jnp.asarray(x)))
    want = [_blockiness_loops(img.mean(-1)) for img in x]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    flat = np.full((1, 16, 16, 1), 0.3, np.float32)
    blocks = np.kron(rng.random((2, 2)), np.ones((8, 8)))[None, :, :, None].astype(np.float32)
    q_flat, q_blocks = (float(iq.blockiness_quality(jnp.asarray(a))[0]) for a in (flat, blocks))
    assert q_flat == pytest.approx(0.5) and q_blocks < 1e-3   # no steps: neutral; steps only at block edges: ~0
    with pytest.raises(ValueError, match="block"):
        iq.blockiness_quality(jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="images_BxHxWxC"):
        iq.blockiness_quality(jnp.zeros((8, 8, 1)))


def test_psnr_and_delta_psnr_equal_numpy():
    rng = np.random.default_rng(1)
    clean = rng.random((2, 8, 8, 1)).astype(np.float32)
    noisy = clean + 0.05 * rng.standard_normal(clean.shape).astype(np.float32)
    better = clean + 0.01 * rng.standard_normal(clean.shape).astype(np.float32)

    def ref(a):
        return 10 * np.log10(1.0 / np.mean((np.clip(a, 0, 1) - clean) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(iq.psnr(jnp.asarray(noisy), jnp.asarray(clean)), ref(noisy), rtol=1e-5)
    np.testing.assert_allclose(iq.delta_psnr(jnp.asarray(better), jnp.asarray(noisy), jnp.asarray(clean)),
                               ref(better) - ref(noisy), rtol=1e-4)
    assert float(iq.psnr(jnp.asarray(clean), jnp.asarray(clean))[0]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="differ in shape"):
        iq.psnr(jnp.asarray(clean), jnp.asarray(clean[:1]))


def test_jpeg_recompression_is_deterministic_and_lower_quality_loses_more():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:32, :32]
    smooth = (127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0))[None, :, :, None]
    imgs = np.clip(smooth + rng.normal(0, 5, (4, 32, 32, 1)), 0, 255).astype(np.uint8)
    levels = jpeg.recompress_levels(imgs, [10, 90])
    assert levels.shape == (2,) + imgs.shape and levels.dtype == np.uint8
    np.testing.assert_array_equal(jpeg.recompress(imgs, 10), levels[0])            # deterministic
    err = [np.abs(lv.astype(float) - imgs).mean() for lv in levels]
    assert err[0] > 1.5 * err[1]                                                      # QF 10 far worse than 90
    assert jpeg.sha256_array(levels[0]) != jpeg.sha256_array(levels[1])
    rgb = jpeg.recompress(np.repeat(imgs, 3, -1), 50)
    assert rgb.shape == (4, 32, 32, 3)
    for bad in (0, 96, 2.5, True):
        with pytest.raises(ValueError, match="quality"):
            jpeg.recompress(imgs, bad)
    with pytest.raises(ValueError, match="uint8"):
        jpeg.recompress(imgs.astype(np.float32), 50)
    assert set(jpeg.encoder_info()) == {"pillow", "libjpeg"}


def _enhancer(seed=0):
    cfg = enh.EnhancerConfig(image_size=16, channels=1, width=8, stages=3)
    model = enh.Enhancer(cfg, rngs=nnx.Rngs(seed))
    for i, head in enumerate(model.heads):   # heads start at zero (identity exits); give them distinct corrections
        head.conv.kernel[...] = 0.05 * jax.random.normal(jax.random.key(10 + i), head.conv.kernel[...].shape)
    return cfg, model


def test_enhancer_heads_start_as_identity():
    cfg = enh.EnhancerConfig(image_size=16, channels=1, width=8, stages=3)
    model = enh.Enhancer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
    np.testing.assert_allclose(model.all_exits(x), jnp.broadcast_to(x, (3,) + x.shape), atol=1e-6)


def test_blind_exit_equals_first_exit_over_threshold_and_the_static_model():
    cfg, model = _enhancer()
    x = jax.random.uniform(jax.random.key(1), (12, 16, 16, 1))
    imgs_ExB = model.all_exits(x)
    score_ExB = np.asarray(jax.vmap(iq.blockiness_quality)(imgs_ExB))
    thr = float(np.median(score_ExB))
    clear_B = np.all(np.abs(score_ExB - thr) > 1e-4, axis=0)     # rows whose decision float error cannot flip
    want_B = np.where((score_ExB >= thr).any(0), np.argmax(score_ExB >= thr, axis=0), cfg.stages - 1)
    for executor in (engine.Masked(), engine.Compacted()) if hasattr(engine, "Compacted") else (engine.Masked(),):
        out = model.dynamic(x, thr, executor=executor)
        got_B = np.asarray(out.exit_B)
        np.testing.assert_array_equal(got_B[clear_B], want_B[clear_B])
        for b in np.flatnonzero(clear_B):
            ref = model.static(x[b:b + 1], int(got_B[b]))[0]
            np.testing.assert_allclose(out.out.image_BxHxWxC[b], ref, atol=1e-5)
            np.testing.assert_allclose(ref, imgs_ExB[got_B[b], b], atol=1e-5)
    assert clear_B.sum() >= 6 and len(set(want_B[clear_B].tolist())) >= 2


def test_enhancer_flops_and_checks():
    cfg = enh.EnhancerConfig(image_size=16, channels=1, width=8, stages=3, convs_per_stage=2, kernel=3)
    conv = costs.conv2d_flops(16, 16, 3, 8, 8)
    assert conv == 2 * 16 * 16 * 9 * 8 * 8
    ec, ec0 = enh.flops(cfg), enh.flops(cfg, iqa=False)
    head = costs.conv2d_flops(16, 16, 3, 8, 1)
    stem = costs.conv2d_flops(16, 16, 3, 1, 8)
    np.testing.assert_allclose(ec0.static_flops_E, [stem + 2 * conv * (e + 1) + head for e in range(3)])
    np.testing.assert_allclose(ec.cum_flops_E - ec0.cum_flops_E,
                               [(e + 1) * iq.blockiness_flops(16, 16, 1) for e in range(3)])
    with pytest.raises(ValueError, match="kernel"):
        enh.EnhancerConfig(kernel=4)
    with pytest.raises(ValueError, match="c_out"):
        costs.conv2d_flops(4, 4, 3, 1, 0)
    with pytest.raises(ValueError, match="exit_index"):
        _enhancer()[1].static(jnp.zeros((1, 16, 16, 1)), 3)
    with pytest.raises(ValueError, match="images"):
        _enhancer()[1].dynamic(jnp.zeros((1, 8, 8, 1)), 0.4)
