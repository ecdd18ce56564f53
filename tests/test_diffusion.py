"""Exit-aware diffusion: U-ViT long skips over stacked layers, DeeDiff losses, the DDIM sampler, baselines, FID/KID."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.eval import fid
from eejax.exits import engine, policies
from eejax.models import diffusion as D
from eejax.train import StepContext

CFG = D.UViTConfig(image_size=8, channels=1, patch_size=2, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                   num_classes=3)
B, STEPS = 6, 8
SCHED = D.make_schedule("cosine", 100)


@pytest.fixture(scope="module")
def model_and_inputs():
    graphdef, params = D.build(CFG, 0)
    # Sharpen the UEMs so that rows spread over the exits.
    params["uem_w"][...] = params["uem_w"][...] * 6.0
    x = jax.random.normal(jax.random.key(1), (B, 8, 8, 1))
    t = jnp.asarray([0, 10, 30, 50, 80, 99], jnp.int32)
    y = jnp.arange(B, dtype=jnp.int32) % 3
    return graphdef, params, x, t, y


@jax.jit
def _all(graphdef_params, x, t, y):
    return nnx.merge(*graphdef_params).all_exits(x, t, y)


@pytest.fixture(scope="module")
def outs(model_and_inputs):
    gd, p, x, t, y = model_and_inputs
    return _all((gd, p), x, t, y)


def test_shapes_and_config_checks(outs):
    e, p = CFG.depth, CFG.pixels
    assert outs.eps_ExBxP.shape == (e, B, p) and outs.gate_ExB.shape == (e, B)
    assert outs.h_last.tokens_BxKxTxD.shape == (B, 1 + CFG.num_in, CFG.tokens, CFG.d_model)
    u = jax.nn.sigmoid(-outs.gate_ExB)
    assert ((u > 0) & (u < 1)).all()
    with pytest.raises(ValueError, match="odd depth"):
        D.UViTConfig(depth=6)
    with pytest.raises(ValueError, match="divisible"):
        D.UViTConfig(image_size=28, patch_size=5)
    costs = D.flops(CFG)
    assert costs.cum_flops_E.shape == (e,) and np.all(np.diff(costs.cum_flops_E) > 0)


def test_long_skips_match_python_reference(model_and_inputs, outs):
    """Every exit of the stacked scan equals a plain U-ViT written as a Python loop with a skip list."""
    gd, p, x, t, y = model_and_inputs

    @jax.jit
    def reference(p):
        model = nnx.merge(gd, p)
        carry = model.embed(x, t, y).tokens_BxKxTxD
        h, skips, eps = carry[:, 0], [], []
        s = CFG.num_in
        for l in range(CFG.depth):
            layer = jax.tree.map(lambda a: a[l], model.layers)
            if l < s:
                h = layer(h)
                skips.append(h)
            elif l == s:
                h = layer(h)
            else:
                j = l - s - 1
                mixed = jnp.concatenate([h, skips.pop()], axis=-1) @ model.skip_w[...][j]
                h = layer(mixed + model.skip_b[...][j][None, None, :])
            eps.append(model.eps_from_hidden(h).reshape(B, -1))
        return jnp.stack(eps)

    np.testing.assert_allclose(outs.eps_ExBxP, reference(p), rtol=2e-5, atol=2e-5)


def _dyn(gd, p, x, t, y, thr, measure):
    return jax.jit(lambda p, thr: nnx.merge(gd, p).dynamic(x, t, y, thr, measure))(p, thr)


def test_dynamic_equals_scan_at_exit(model_and_inputs, outs):
    gd, p, x, t, y = model_and_inputs
    conf_ExB = jax.nn.sigmoid(outs.gate_ExB)
    thr = float(np.quantile(np.asarray(conf_ExB[:-1]), 0.6))
    dyn = _dyn(gd, p, x, t, y, thr, "per_sample")
    want = engine.simulate(policies.score_threshold(thr, conf_ExB.shape[0]), conf_ExB).exit_B
    np.testing.assert_array_equal(dyn.exit_B, want)
    assert len(np.unique(np.asarray(dyn.exit_B))) >= 2, "rows should spread over exits"
    np.testing.assert_allclose(dyn.out.eps_BxP, engine.take_exit(outs.eps_ExBxP, dyn.exit_B), rtol=2e-5,
                               atol=2e-5)
    # Batch mean: one exit for the whole batch, where the mean confidence first reaches the threshold.
    mean_thr = float(np.quantile(np.asarray(conf_ExB[:-1].mean(1)), 0.5))
    dyn_b = _dyn(gd, p, x, t, y, mean_thr, "batch_mean")
    want_e = int(engine.simulate(policies.score_threshold(mean_thr, conf_ExB.shape[0]),
                                 conf_ExB.mean(1, keepdims=True)).exit_B[0])
    np.testing.assert_array_equal(dyn_b.exit_B, np.full((B,), want_e))
    assert int(dyn_b.layers_run) == want_e + 1


def test_deediff_loss_hand_computation():
    """E=2 exits, B=2, P=2: every term computed by hand."""
    eps_pred = jnp.asarray([[[0.5, -0.5], [1.0, 0.0]],
                            [[0.1, 0.2], [0.0, 0.5]]])
    noise = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
    logit = jnp.asarray([[0.0, np.log(3.0)], [np.log(1 / 3), 0.0]])   # u = [[.5, .75], [.25, .5]]
    lam, beta = 0.7, 0.3
    out = D.deediff_loss(eps_pred, logit, noise, lam=lam, beta=beta)
    # exit 0: errors row0 [.5,-.5] row1 [0,-1]; exit 1: row0 [.1,.2] row1 [-1,-.5]
    mse = np.array([[0.25, 0.5], [0.025, 0.625]])
    mae = np.array([[0.5, 0.5], [0.15, 0.75]])
    u = np.array([[0.5, 0.75], [0.25, 0.5]])
    l_u = np.mean(((u - np.tanh(mae)) ** 2).sum(0))
    l_ual = np.mean((1 - u[0]) * mse[0])
    simple = mse[1].mean()
    np.testing.assert_allclose(out.simple, simple, rtol=1e-6)
    np.testing.assert_allclose(out.uem, l_u, rtol=1e-6)
    np.testing.assert_allclose(out.ual, l_ual, rtol=1e-6)
    np.testing.assert_allclose(out.total, simple + lam * l_u + beta * l_ual, rtol=1e-6)
    # The UAL weight is detached by default: d total / d logit comes from L_u only.
    g = jax.grad(lambda lg: D.deediff_loss(eps_pred, lg, noise, lam=lam, beta=beta).total)(logit)
    g_u = jax.grad(lambda lg: lam * D.deediff_loss(eps_pred, lg, noise).uem)(logit)
    np.testing.assert_allclose(g, g_u, rtol=1e-6, atol=1e-7)
    g_att = jax.grad(lambda lg: D.deediff_loss(eps_pred, lg, noise, lam=0.0, detach_ual_weight=False).total)(logit)
    assert float(g_att[0].sum()) < 0 and float(jnp.abs(g_att[1]).sum()) == 0.0   # UAL skips the last exit


def test_deediff_loss_x0_uem_target_matches_reference():
    """uem_target='x0': the pseudo uncertainty is tanh(mean |x0_i - x_0|), x0_i reconstructed from x_t by hand."""
    rng = np.random.default_rng(0)
    e, b, p = 3, 4, 5
    x0 = rng.uniform(-1, 1, (b, p))
    noise = rng.normal(size=(b, p))
    eps_pred = noise[None] + 0.1 * rng.normal(size=(e, b, p))
    ab = np.array([0.99, 0.6, 0.1, 0.002])
    x_t = np.sqrt(ab)[:, None] * x0 + np.sqrt(1 - ab)[:, None] * noise
    logit = rng.normal(size=(e, b))
    want_u_hat = np.zeros((e, b))
    for i in range(e):
        for r in range(b):
            x0_i = (x_t[r] - np.sqrt(1 - ab[r]) * eps_pred[i, r]) / np.sqrt(ab[r])
            want_u_hat[i, r] = np.tanh(np.mean(np.abs(x0_i - x0[r])))
    u = 1 / (1 + np.exp(-logit))
    args = [jnp.asarray(a, jnp.float32) for a in (eps_pred, logit, noise)]
    out = D.deediff_loss(*args, uem_target="x0", alpha_bar_B=jnp.asarray(ab, jnp.float32))
    np.testing.assert_allclose(out.u_target_E, want_u_hat.mean(1), rtol=1e-4)
    np.testing.assert_allclose(out.uem, np.mean(((u - want_u_hat) ** 2).sum(0)), rtol=1e-4)
    eps_out = D.deediff_loss(*args)
    # Only the UEM target moves: L_simple and L_UAL stay in eps space; the x0 target is the larger at high noise.
    np.testing.assert_allclose(out.simple, eps_out.simple, rtol=1e-6)
    np.testing.assert_allclose(out.ual, eps_out.ual, rtol=1e-6)
    assert float(out.u_target_E.mean()) > float(eps_out.u_target_E.mean())
    with pytest.raises(ValueError, match="alpha_bar_B"):
        D.deediff_loss(*args, uem_target="x0")
    with pytest.raises(ValueError, match="uem_target"):
        D.deediff_loss(*args, uem_target="v")


@pytest.mark.parametrize("parameterization,uem_target", [("eps", "eps"), ("v", "eps"), ("v", "x0")])
def test_training_loss_gradients(model_and_inputs, parameterization, uem_target):
    gd, p, x, t, y = model_and_inputs
    loss_fn = D.training_loss(gd, SCHED, parameterization=parameterization, uem_target=uem_target)
    batch = {"image": jnp.tanh(x), "label": y}
    ctx = StepContext(jnp.int32(0), jax.random.key(3), None)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(p, batch, ctx)
    assert np.isfinite(float(loss)) and {"simple", "uem", "ual"} <= set(metrics)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["uem_w"][...]).sum()) > 0 and float(jnp.abs(grads["skip_w"][...]).sum()) > 0


def test_schedules_and_q_sample():
    for kind in ("linear", "cosine"):
        s = D.make_schedule(kind, 1000)
        ab = np.asarray(s.alpha_bars_T)
        assert np.all(np.diff(ab) < 0) and 0.99 < ab[0] < 1 and ab[-1] < 1e-3
    x0 = jnp.ones((2, 4, 4, 1))
    n = -jnp.ones((2, 4, 4, 1))
    ab = SCHED.alpha_bars_T[jnp.asarray([0, 99])]
    xt = D.q_sample(SCHED, x0, jnp.asarray([0, 99]), n)
    np.testing.assert_allclose(xt[:, 0, 0, 0], jnp.sqrt(ab) - jnp.sqrt(1 - ab), rtol=1e-6)
    ts = D.ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(np.unique(ts)) == 50
    with pytest.raises(ValueError):
        D.make_schedule("quadratic")


@pytest.fixture(scope="module")
def samplers(model_and_inputs):
    gd, p, *_ = model_and_inputs
    return {"dyn": D.make_sampler(gd, SCHED), "batch": D.make_sampler(gd, SCHED, measure="batch_mean"),
            "full": D.make_sampler(gd, SCHED, static_full=True)}


def test_sampler_deterministic_and_inf_equals_full(model_and_inputs, samplers):
    gd, p, x, t, y = model_and_inputs
    inf = D.full_thresholds(STEPS, CFG.depth)
    a = samplers["dyn"](p, jax.random.key(7), y, inf)
    b = samplers["dyn"](p, jax.random.key(7), y, inf)
    full = samplers["full"](p, jax.random.key(7), y, inf)
    np.testing.assert_array_equal(a.x0_BxHxWxC, b.x0_BxHxWxC)
    np.testing.assert_array_equal(a.x0_BxHxWxC, full.x0_BxHxWxC)   # bit for bit
    assert (np.asarray(a.exit_layer_SxB) == CFG.depth - 1).all() and (np.asarray(a.layers_run_S) == CFG.depth).all()
    c = samplers["dyn"](p, jax.random.key(8), y, inf)
    assert not np.allclose(a.x0_BxHxWxC, c.x0_BxHxWxC)
    # A DeeDiff threshold: still deterministic, and rows exit early somewhere.
    thr = D.constant_thresholds(0.5, STEPS, CFG.depth)
    d1 = samplers["dyn"](p, jax.random.key(7), y, thr)
    d2 = samplers["dyn"](p, jax.random.key(7), y, thr)
    np.testing.assert_array_equal(d1.x0_BxHxWxC, d2.x0_BxHxWxC)
    np.testing.assert_array_equal(d1.exit_layer_SxB, d2.exit_layer_SxB)
    assert np.asarray(d1.exit_layer_SxB).min() < CFG.depth - 1
    assert (np.asarray(d1.layers_run_S) == np.asarray(d1.exit_layer_SxB).max(1) + 1).all()
    bm = samplers["batch"](p, jax.random.key(7), y, thr)
    ex = np.asarray(bm.exit_layer_SxB)
    assert (ex == ex[:, :1]).all() and (np.asarray(bm.layers_run_S) == ex[:, 0] + 1).all()


def test_depth_schedules_run_exactly(model_and_inputs, samplers):
    gd, p, x, t, y = model_and_inputs
    depth_S = np.asarray([1, 2, 3, 4, 5, 5, 3, 5])
    out = samplers["dyn"](p, jax.random.key(7), y, D.depth_thresholds(depth_S, CFG.depth))
    np.testing.assert_array_equal(out.layers_run_S, depth_S)
    np.testing.assert_array_equal(out.exit_layer_SxB, np.broadcast_to((depth_S - 1)[:, None], (STEPS, B)))


def test_baseline_schedules_match_target():
    ts = D.ddim_timesteps(1000, 50)
    for target in (2.3, 4.0, 5.6):
        band = D.banded_depth(ts, 1000, 7, target)
        assert abs(band.mean() - target) <= 0.5 and band[-1] == 7
        assert np.all(np.diff(band) >= 0), "depth must not fall as t decreases"
        two = D.two_depth(ts, 7, 3, target)
        assert abs(two.mean() - target) <= 0.1 + 1e-9 and len(np.unique(two)) <= 2 and two[-1] == 7
        assert np.all(np.diff(two) >= 0)
    np.testing.assert_array_equal(D.uniform_depth(4, 3), [3, 3, 3, 3])


def test_fid_and_kid():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 6))
    assert abs(fid.fid_from_features(f, f)) < 1e-8
    # Closed form for diagonal covariances: ||mu1-mu2||^2 + sum (s1 - s2)^2 (s = standard deviations).
    mu1, mu2, s1, s2 = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)), want, rtol=1e-9)
    # KID: a hand-computed MMD^2 on 2 + 2 points in 1-D, and ~0 for two samples of one distribution.
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [0.0]])
    k = lambda a, b: (a * b + 1) ** 3
    want = k(0, 1) * 2 / 2 + k(2, 0) * 2 / 2 - 2 * (k(0, 2) + k(0, 0) + k(1, 2) + k(1, 0)) / 4
    np.testing.assert_allclose(fid.polynomial_mmd2(x, y), want)
    same, _ = fid.kid_from_features(rng.normal(size=(600, 6)), rng.normal(size=(600, 6)), num_subsets=10,
                                    subset_size=200)
    shifted, _ = fid.kid_from_features(rng.normal(size=(600, 6)), rng.normal(size=(600, 6)) + 1.0, num_subsets=10,
                                       subset_size=200)
    assert abs(same) < 0.05 < shifted


def test_classifier_features_shape():
    gd, p = fid.build_classifier(0, channels=1, image_size=8, num_classes=3, features=16)
    x = np.zeros((7, 8, 8, 1), np.float32)
    feats = fid.apply_batched(fid.feature_fn(gd), p, x, batch_size=4)
    assert feats.shape == (7, 16)
    loss, aux = jax.jit(fid.classifier_loss(gd))(p, {"image": x, "label": np.zeros(7, np.int32)}, None)
    np.testing.assert_allclose(loss, np.log(3.0), rtol=0.5)


def test_ddim_update_recovers_data_with_oracle_eps():
    """With the exact epsilon of a one-image data set, DDIM (eta = 0) lands on that image from any x_T."""
    sched = D.make_schedule("linear", 1000)
    x_star = jnp.linspace(-0.9, 0.9, 16).reshape(1, 4, 4, 1)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 1))
    ts = D.ddim_timesteps(1000, 20)
    for t, t_prev in zip(ts, list(ts[1:]) + [-1]):
        ab = sched.alpha_bars_T[t]
        eps = (x - jnp.sqrt(ab) * x_star) / jnp.sqrt(1 - ab)
        x, x0 = D._ddim_update(sched, x, eps, jnp.int32(t), jnp.int32(t_prev), eta=0.0, clip=True,
                               noise=jnp.zeros_like(x))
        np.testing.assert_allclose(x0, x_star, atol=1e-4)
    np.testing.assert_allclose(x, x_star, atol=1e-4)


def test_v_parameterization_recovers_epsilon():
    """Reading the head as v: the true v gives back the true epsilon, for B x ... and E x B x ... outputs."""
    sched = D.make_schedule("cosine", 1000)
    k0, k1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k0, (3, 4, 4, 1), minval=-1, maxval=1)
    noise = jax.random.normal(k1, x0.shape)
    t_B = jnp.asarray([0, 500, 999])
    x_t = D.q_sample(sched, x0, t_B, noise)
    ab = sched.alpha_bars_T[t_B][:, None, None, None]
    v = jnp.sqrt(ab) * noise - jnp.sqrt(1 - ab) * x0
    np.testing.assert_allclose(D.eps_from_output(sched, v, x_t, t_B, "v"), noise, atol=1e-5)
    flat = lambda a: a.reshape(3, -1)
    stacked = D.eps_from_output(sched, jnp.stack([flat(v), flat(v)]), flat(x_t), t_B, "v")
    np.testing.assert_allclose(stacked, jnp.stack([flat(noise)] * 2), atol=1e-5)
    assert D.eps_from_output(sched, v, x_t, t_B, "eps") is v
    with pytest.raises(ValueError, match="parameterization"):
        D.eps_from_output(sched, v, x_t, t_B, "x0")
