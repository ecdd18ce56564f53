"""The exit-aware decoder LM: shapes, causality, padding, the multi-exit loss, LayerSkip dropout, text windows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.data.lm import WindowIterator
from eejax.models import lm
from eejax.train import StepContext

V = 19
SMALL = dict(vocab_size=V, d_model=32, depth=3, num_heads=4, num_kv_heads=2, mlp_dim=48)


@pytest.mark.parametrize("kw", [dict(), dict(norm="peri", exit_head="own", tie_embeddings=False),
                                dict(exit_head="block", exits="every:2"), dict(exit_head="final")])
def test_variants_shapes_and_causality(kw):
    cfg = lm.LMConfig(**SMALL, **kw)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, V)
    gd, params = lm.build(cfg, 0)
    fwd = jax.jit(lambda p, t: nnx.merge(gd, p).all_exits(t))
    out = fwd(params, tokens)
    assert out.logits_ExBxTxV.shape == (cfg.num_exits, 2, 7, V)
    assert out.hidden_ExBxTxD.shape == (cfg.num_exits, 2, 7, 32)
    # Causal: changing the last token leaves every earlier position unchanged (at every exit).
    out2 = fwd(params, tokens.at[:, -1].set((tokens[:, -1] + 1) % V))
    np.testing.assert_allclose(out2.logits_ExBxTxV[:, :, :-1], out.logits_ExBxTxV[:, :, :-1], atol=1e-5)
    assert not np.allclose(out2.logits_ExBxTxV[:, :, -1], out.logits_ExBxTxV[:, :, -1])
    # The traced-exit head (used inside the decode loop) equals the static one.
    model = nnx.merge(gd, params)
    for e in range(cfg.num_exits):
        np.testing.assert_allclose(jax.jit(model.exit_logits)(out.hidden_ExBxTxD[e], jnp.int32(e)),
                                   out.logits_ExBxTxV[e], rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded():
    cfg = lm.LMConfig(**SMALL)
    gd, params = lm.build(cfg, 0)
    fwd = jax.jit(lambda p, t, v: nnx.merge(gd, p).all_exits(t, valid_BxT=v).logits_ExBxTxV)
    seq = jax.random.randint(jax.random.key(1), (1, 6), 0, V)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), seq], axis=1)
    valid = jnp.arange(9)[None] >= 3
    np.testing.assert_allclose(fwd(params, padded, valid)[:, :, 3:], fwd(params, seq, jnp.ones((1, 6), bool)),
                               rtol=1e-5, atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        lm.LMConfig(**{**SMALL, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="exit_head"):
        lm.LMConfig(**SMALL, exit_head="mlp")
    with pytest.raises(ValueError, match="norm"):
        lm.LMConfig(**SMALL, norm="sandwich")


def test_exit_weights_warmup_and_layerskip_rates():
    w = jnp.asarray([0.25, 0.25, 0.5])
    np.testing.assert_allclose(lm.warmup_exit_weights(0, w, 10), [0, 0, 0.5])
    np.testing.assert_allclose(lm.warmup_exit_weights(5, w, 10), [0.125, 0.125, 0.5])
    np.testing.assert_allclose(lm.warmup_exit_weights(50, w, 10), w)
    rates = lm.layerskip_rates(6, 0.2)
    assert rates[0] == 0 and np.isclose(rates[-1], 0.2) and np.all(np.diff(rates) > 0)
    mask = lm.layer_drop_mask(jax.random.key(0), rates, 4000)
    assert mask.shape == (6, 4000)  # rows are masked, never removed
    np.testing.assert_allclose(1 - np.asarray(mask).mean(1), rates, atol=0.03)


def test_layer_mask_skips_layers_per_sample():
    cfg = lm.LMConfig(**SMALL)
    gd, params = lm.build(cfg, 0)
    tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, V)
    mask = jnp.ones((3, 2), bool).at[1:, 0].set(False)  # row 0 runs layer 0 only
    out = jax.jit(lambda p, t, m: nnx.merge(gd, p).all_exits(t, layer_mask_NxB=m))(params, tokens, mask)
    full = jax.jit(lambda p, t: nnx.merge(gd, p).all_exits(t))(params, tokens)
    np.testing.assert_allclose(out.hidden_ExBxTxD[2, 0], full.hidden_ExBxTxD[0, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logits_ExBxTxV[:, 1], full.logits_ExBxTxV[:, 1], rtol=1e-5, atol=1e-5)


def test_final_exit_head_is_a_nested_sub_model_with_no_new_parameter():
    """``exit_head="final"`` (Sorted LLaMA / SoFT, arXiv:2309.08968): exit e is the first n layers, then the model's
    final norm + shared head; the parameters are those of the one-exit model, and the uniform multi-exit loss is
    the mean of the sub-models' CEs, each computed here by hand from the layer outputs."""
    nested = lm.LMConfig(**SMALL, exits=(0, 2), exit_head="final")
    gd, params = lm.build(nested, 0)
    last_cfg = lm.LMConfig(**SMALL, exits=(2,), exit_head="final")
    gd_last, params_last = lm.build(last_cfg, 0)
    assert jax.tree.structure(params) == jax.tree.structure(params_last)
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, V)
    targets = (tokens + 1) % V
    model = nnx.merge(gd, params)
    h_NxBxTxD = model.hidden_states(tokens)
    ref_E = [model.final_norm(h) @ model.embed.embedding[...].T for h in (h_NxBxTxD[0], h_NxBxTxD[2])]
    out = model.all_exits(tokens)
    for e in range(2):
        np.testing.assert_allclose(out.logits_ExBxTxV[e], ref_E[e], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.taken_logits(h_NxBxTxD[0][:, -1], jnp.zeros(2, jnp.int32)), ref_E[0][:, -1],
                               rtol=1e-4, atol=1e-4)
    ctx = StepContext(0, jax.random.key(0), None)
    batch = {"tokens": tokens, "targets": targets}
    loss, _ = lm.multi_exit_lm_loss(gd, nested)(params, batch, ctx)
    expected = np.mean([float(lm.lm_ce(r, targets)) for r in ref_E])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    last, _ = lm.multi_exit_lm_loss(gd_last, last_cfg)(params, batch, ctx)
    np.testing.assert_allclose(float(last), float(lm.lm_ce(ref_E[1], targets)), rtol=1e-5)


def test_multi_exit_loss_trains():
    cfg = lm.LMConfig(**SMALL)
    gd, params = lm.build(cfg, 0)
    tokens = jnp.tile(jnp.arange(8, dtype=jnp.int32)[None], (4, 1)) % V
    batch = {"tokens": tokens, "targets": (tokens + 1) % V}
    loss_fn = lm.multi_exit_lm_loss(gd, cfg, weighting="linear", warmup_steps=2, layer_drop=0.1)

    @jax.jit
    def step(p, k):
        ctx = StepContext(k, jax.random.key(k), None)
        (loss, aux), g = jax.value_and_grad(lambda p: loss_fn(p, batch, ctx), has_aux=True)(p)
        return jax.tree.map(lambda a, b: a - 0.05 * b, p, g), loss, aux

    losses = []
    for k in range(12):
        params, loss, aux = step(params, k)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[2]
    assert float(aux["w_first"]) > 0
    clf = lm.init_classifier(cfg)
    l, aux = jax.jit(lm.classifier_loss(gd, params))(clf, batch, StepContext(0, jax.random.key(0), None))
    assert np.isfinite(float(l)) and 0 <= float(aux["gate_acc"]) <= 1


def test_window_iterator_resumes_and_covers():
    ids = np.arange(1000) % 97
    it = WindowIterator(ids, 4, 16, seed=3)
    first = [next(it) for _ in range(3)]
    assert first[0]["tokens"].shape == (4, 16)
    np.testing.assert_array_equal(first[0]["targets"][:, :-1], first[0]["tokens"][:, 1:])
    state = it.state_dict()
    nxt = next(it)
    it2 = WindowIterator(ids, 4, 16, seed=3)
    it2.load_state_dict(state)
    np.testing.assert_array_equal(next(it2)["tokens"], nxt["tokens"])
    ev = list(WindowIterator(ids, 8, 16, shuffle=False))
    assert sum(len(b["tokens"]) for b in ev) == (1000 - 1) // 16
    np.testing.assert_array_equal(ev[0]["tokens"][1], ids[16:32])
