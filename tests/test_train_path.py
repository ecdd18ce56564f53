"""The training scan's options (engine.run_layers / scan_exits, ViT.all_exits): remat policies, a readout that
stacks only what the heads read, a bf16 residual stream. Each gives today's outputs and gradients; the compiled
training step's temporary memory moves the way each option is meant to move it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import engine, losses
from eejax.models import vit as vit_lib
from eejax.models import vit_heads

CFG = vit_lib.ViTConfig(image_size=32, channels=3, patch_size=4, d_model=32, depth=3, num_heads=2, mlp_dim=64,
                        num_classes=10, exits="all", head_types="linear")   # T = 65 tokens
B = 8
_COMPILED = {}


@pytest.fixture(scope="module", autouse=True)
def _no_persistent_cache():
    """This module's programs compile without jax's persistent cache: writing or reading their executables there
    crashed the process (SIGSEGV / abort inside compilation_cache) on this CPU, in a different test each run."""
    from jax._src import compilation_cache  # noqa: PLC0415

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def setup():
    graphdef, params = vit_lib.build(CFG, 0)
    x = jax.random.normal(jax.random.key(1), (B, CFG.image_size, CFG.image_size, 3))
    y = jnp.arange(B) % CFG.num_classes
    return graphdef, params, x, y


def _compiled(setup, **kw):
    """The compiled ``params -> ((loss, ExitOutputs), grads)`` of ``all_exits(**kw)``, once per option set."""
    key = tuple(sorted((k, str(v)) for k, v in kw.items()))
    if key not in _COMPILED:
        graphdef, params, x, y = setup
        weights_E = losses.exit_weights(CFG.exit_layers, "uniform")

        def loss(p):
            out = nnx.merge(graphdef, p).all_exits(x, **kw)
            return losses.multi_exit_ce(out.logits_ExBxC, y, weights_E)[0], out

        _COMPILED[key] = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile()
    return _COMPILED[key]


def _loss_grad(setup, **kw):
    return _compiled(setup, **kw)


def _temp_bytes(setup, **kw) -> int:
    return _compiled(setup, **kw).memory_analysis().temp_size_in_bytes


def _assert_tree_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


def test_remat_policies_equal_no_remat(setup):
    (l0, out0), g0 = _loss_grad(setup, remat="none")(setup[1])
    for remat in ("full", "dots_saveable"):
        (l1, out1), g1 = _loss_grad(setup, remat=remat)(setup[1])
        assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
        _assert_tree_close(out1, out0, rtol=1e-5, atol=1e-6)
        _assert_tree_close(g1, g0, rtol=1e-4, atol=1e-6)


def test_remat_policies_order_the_compiled_memory(setup):
    """Full remat keeps least, dots_saveable keeps the projection outputs on top, no remat keeps everything."""
    none, dots, full = (_temp_bytes(setup, remat=r) for r in ("none", "dots_saveable", "full"))
    assert full < dots < none, (full, dots, none)


def test_summary_readout_equals_hidden_and_stacks_less(setup):
    """Linear heads read only the CLS token and the token mean: the scan stacks that instead of every layer's
    B x T x D state, with the same outputs and gradients and at least half a stacked hidden state less memory."""
    graphdef, params, x, _ = setup
    assert all(vit_heads.reads_summary(h) for h in nnx.merge(graphdef, params).heads)
    for remat in ("none", "full"):
        (l_h, out_h), g_h = _loss_grad(setup, readout="hidden", remat=remat)(params)
        (l_s, out_s), g_s = _loss_grad(setup, remat=remat)(params)
        assert abs(float(l_s) - float(l_h)) <= 1e-6 * abs(float(l_h))
        _assert_tree_close(out_s, out_h, rtol=1e-6, atol=1e-6)
        _assert_tree_close(g_s, g_h, rtol=1e-5, atol=1e-7)
    stacked_bytes = CFG.depth * B * CFG.tokens * CFG.d_model * 4
    hidden, summary = _temp_bytes(setup, readout="hidden", remat="full"), _temp_bytes(setup, remat="full")
    assert summary <= hidden - stacked_bytes // 2, (hidden, summary, stacked_bytes)
    assert _temp_bytes(setup, remat="none") < _temp_bytes(setup, readout="hidden", remat="none")


def test_heads_that_read_the_grid_keep_the_hidden_readout(monkeypatch):
    """LGViT heads (a local-perception head reads the patch grid): the scan stacks the hidden state."""
    cfg = vit_lib.ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=4, num_heads=2, mlp_dim=64,
                            exits="every:2")

    def abstract(cfg):   # graphdef and parameter shapes only: nothing is initialised or compiled
        return nnx.split(nnx.eval_shape(lambda: vit_lib.ViT(cfg, rngs=nnx.Rngs(0))))

    gd_lg, p_lg = abstract(cfg)
    gd_lin, p_lin = abstract(CFG)
    assert not all(vit_heads.reads_summary(h) for h in nnx.merge(gd_lg, p_lg).heads)
    readouts = []
    real = engine.scan_exits

    def spy(*args, **kw):
        readouts.append(kw.get("readout"))
        return real(*args, **kw)

    monkeypatch.setattr(engine, "scan_exits", spy)
    x_lg = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
    x_lin = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    jax.eval_shape(lambda p, x: nnx.merge(gd_lg, p).all_exits(x), p_lg, x_lg)
    jax.eval_shape(lambda p, x: nnx.merge(gd_lin, p).all_exits(x), p_lin, x_lin)
    jax.eval_shape(lambda p, x: nnx.merge(gd_lin, p).all_exits(x, readout="hidden"), p_lin, x_lin)
    assert readouts == [None, vit_heads.summarize, None]
    with pytest.raises(ValueError, match="readout='cls'"):
        jax.eval_shape(lambda p, x: nnx.merge(gd_lg, p).all_exits(x, readout="cls"), p_lg, x_lg)


def test_linear_head_from_summary_equals_call(setup):
    graphdef, params, _, _ = setup
    head = nnx.merge(graphdef, params).heads[0]
    h = jax.random.normal(jax.random.key(4), (3, CFG.tokens, CFG.d_model))
    _assert_tree_close(head.from_summary(vit_heads.summarize(h)), head(h), rtol=0, atol=0)


def test_bf16_residual_stream(setup):
    """``residual_dtype=bfloat16``: the carry and every stacked step are bf16; results within bf16 tolerance."""
    graphdef, params, x, _ = setup
    model = nnx.merge(graphdef, params)
    h0 = model.embed(x)
    run = jax.jit(lambda h0, dtype=None: engine.run_layers(model.layers, h0, residual_dtype=dtype), static_argnums=1)
    h_last, h_S = run(h0, jnp.bfloat16)
    ref_last, ref_S = run(h0)
    assert h_last.dtype == h_S.dtype == jnp.bfloat16 and ref_last.dtype == jnp.float32
    scale = float(jnp.abs(ref_S).max())
    np.testing.assert_allclose(np.asarray(h_S, np.float32), np.asarray(ref_S), atol=5e-2 * scale)
    (l_bf, _), g_bf = _loss_grad(setup, remat="none", residual_dtype=jnp.bfloat16)(params)
    (l_32, _), _ = _loss_grad(setup, remat="none")(params)
    assert abs(float(l_bf) - float(l_32)) <= 2e-2 * abs(float(l_32))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_bf))


def test_run_layers_readout_is_the_stacked_map(setup):
    graphdef, params, x, _ = setup
    model = nnx.merge(graphdef, params)
    h0 = model.embed(x)
    _, h_S = jax.jit(lambda h0: engine.run_layers(model.layers, h0))(h0)
    last, cls_S = jax.jit(lambda h0: engine.run_layers(model.layers, h0, readout=lambda h: h[:, 0],
                                                       remat="dots_saveable"))(h0)
    np.testing.assert_allclose(np.asarray(cls_S), np.asarray(h_S[:, :, 0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(last), np.asarray(h_S[-1]), rtol=1e-6, atol=1e-6)


def test_remat_policy_names():
    assert [engine.remat_policy(r) for r in (False, True, "none", "full", "dots_saveable")] == [
        "none", "full", "none", "full", "dots_saveable"]
    with pytest.raises(ValueError, match="remat='dots'"):
        engine.remat_policy("dots")
    # the remat helpers are public (eejax.exits.tokens and the training benchmark use them)
    assert {"REMAT_POLICIES", "remat_policy", "remat_step"} <= set(engine.__all__)
    assert all(hasattr(engine, name) for name in engine.__all__)
