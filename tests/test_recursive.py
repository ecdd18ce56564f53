"""Relaxed Recursive Transformers (eejax.models.recursive) against plain references: the tied-layer inits built by
hand, full-rank relaxation equal to the original model, rank 0 equal to the strict recursive model unrolled into
an ordinary stacked LM, the parameter count by hand, and the depth-wise batching counts on hand-checked queues."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.models import lm
from eejax.models import recursive as rr

CFG = lm.LMConfig(vocab_size=13, d_model=16, depth=6, num_heads=2, num_kv_heads=1, mlp_dim=32, exits=(5,),
                  exit_head="final")
# 6 f32 layers, logits of magnitude ~1-3: float rounding stays far below this.
ATOL = 2e-4


def _trained_like(cfg, seed=0):
    """A model whose layers all differ, norms and biases included (a fresh init has equal norms and zero biases)."""
    gd, p = lm.build(cfg, seed)
    leaves, tdef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return gd, jax.tree.unflatten(tdef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _tokens():
    return jax.random.randint(jax.random.key(7), (2, 9), 0, CFG.vocab_size)


@pytest.mark.parametrize("init,k,want", [
    ("average", 3, [[0, 3], [1, 4], [2, 5]]), ("average", 2, [[0, 2, 4], [1, 3, 5]]),
    ("stepwise", 3, [[0], [2], [4]]), ("stepwise", 2, [[0], [3]]), ("lower", 2, [[0], [1]])])
def test_tied_init_equals_hand_built(init, k, want):
    assert rr.tied_sources(6, k, init) == want
    _, p = _trained_like(CFG)
    w = np.asarray(p["layers"]["qkv"]["kernel"][...])
    ref = np.stack([w[src].mean(0) for src in want])
    got = rr.tie_layers(nnx.to_pure_dict(p)["layers"], k, init)["qkv"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-7)


def test_full_rank_relaxation_is_the_original_model():
    gd, p = _trained_like(CFG)
    ref = nnx.merge(gd, p)(_tokens())
    for init in rr.INITS[:2]:
        c = rr.convert(CFG, p, num_unique=3, loops=2, init=init, rank=16, relax_vectors=True)
        np.testing.assert_allclose(rr.loop_exit_logits(c.graphdef, c.params, _tokens(), 2)[-1], ref, atol=ATOL)
    # A fresh init has equal norms and zero biases in every layer: tied vectors lose nothing, LoRA alone recovers it.
    gd, p = lm.build(CFG, 3)
    c = rr.convert(CFG, p, num_unique=2, loops=3, init="average", rank=16)
    np.testing.assert_allclose(rr.loop_exit_logits(c.graphdef, c.params, _tokens(), 3)[-1], nnx.merge(gd, p)(_tokens()),
                               atol=ATOL)


def test_rank_zero_is_the_strict_recursive_model_unrolled():
    """Reference: an ordinary 6-layer DecoderLM whose layer l K + i holds tied layer i, run with no program."""
    _, p = _trained_like(CFG)
    c = rr.convert(CFG, p, num_unique=3, loops=2, init="stepwise", rank=0)
    assert c.params["lora"] == {} and c.params["vec"] == {}
    pure = nnx.to_pure_dict(c.params["lm"])
    unrolled = dict(pure, layers=jax.tree.map(lambda x: jnp.concatenate([x, x]), pure["layers"]))
    gd6, p6 = lm.build(CFG, 0)
    nnx.replace_by_pure_dict(p6, unrolled)
    logits_XxBxTxV = rr.loop_exit_logits(c.graphdef, c.params, _tokens(), 2)
    model6 = nnx.merge(gd6, p6)
    np.testing.assert_allclose(logits_XxBxTxV[-1], model6(_tokens()), atol=ATOL)
    # The loop-1 exit is the first K layers through the same final norm + head.
    h_3 = model6.hidden_states(_tokens())[2]
    np.testing.assert_allclose(logits_XxBxTxV[0], model6.exit_logits(h_3, 0), atol=ATOL)


def test_low_rank_adapter_is_the_truncated_svd_of_the_residual():
    _, p = _trained_like(CFG)
    c = rr.convert(CFG, p, num_unique=3, loops=2, init="average", rank=4)
    w = np.asarray(p["layers"]["o"]["kernel"][...], np.float64)
    tied = np.stack([w[[i, i + 3]].mean(0) for i in range(3)])
    for l in range(2):
        for i in range(3):
            res = w[l * 3 + i] - tied[i]
            u, s, vt = np.linalg.svd(res)
            ref = (u[:, :4] * s[:4]) @ vt[:4]
            a, b = (np.asarray(c.params["lora"]["o.kernel"][m][i, l], np.float64) for m in "AB")
            assert a.shape == (16, 4) and b.shape == (4, 16)
            np.testing.assert_allclose(a @ b, ref, atol=1e-5)


def test_unique_parameter_count_by_hand():
    d, f, v, r, k, loops = 16, 32, 13, 4, 3, 2
    _, p = lm.build(CFG, 0)
    c = rr.convert(CFG, p, num_unique=k, loops=loops, init="average", rank=r)
    qkv, o, fc1, fc2 = (d, (2 + 2) * 8), (16, d), (d, f), (f, d)
    block = sum(i * j for i, j in (qkv, o, fc1, fc2)) + f + d + 2 * d   # kernels, fc biases, two norms
    lora = k * loops * sum(r * (i + j) for i, j in (qkv, o, fc1, fc2))
    assert rr.unique_params(c.params) == v * d + d + k * block + lora
    assert rr.unique_params(rr.convert(CFG, p, num_unique=k, loops=loops, rank=0).params) == v * d + d + k * block
    assert rr.lora_row_flops(CFG, r) == (sum(i * j for i, j in (qkv, o, fc1, fc2)),
                                         sum(r * (i + j) for i, j in (qkv, o, fc1, fc2)))


def test_loss_trains_block_and_adapters():
    _, p = _trained_like(CFG)
    c = rr.convert(CFG, p, num_unique=3, loops=2, rank=2)
    tok = _tokens()
    loss_fn = rr.recursive_lm_loss(c.graphdef, 2, loop_weights=(0.5, 1.0))
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(c.params, {"tokens": tok, "targets": tok}, None)
    assert np.isfinite(loss) and float(aux["ce_first"]) > 0
    assert float(jnp.abs(g["lora"]["qkv.kernel"]["B"]).max()) > 0
    assert float(jnp.abs(g["lm"]["layers"]["qkv"]["kernel"][...]).max()) > 0


def test_depthwise_and_masked_slot_counts_by_hand():
    # 2 slots, 2 loops; rows need 1, 2, 1, 1, 2, 1 loops.
    e = [0, 1, 0, 0, 1, 0]
    m = rr.masked_counts(e, 2, 2)
    assert (m.block_calls, m.slot_loops) == (2 + 1 + 2, 8) and m.utilisation == pytest.approx(8 / 10)
    d = rr.depthwise_counts(e, 2, 2)
    # calls: {r0@0, r1@0} -> r0 leaves; {r2@0, r1@1} -> both leave; {r3@0, r4@0}; {r5@0, r4@1}
    assert (d.block_calls, d.slot_loops, d.utilisation) == (4, 8, 1.0)
    assert d.adapters_per_call == pytest.approx((1 + 2 + 1 + 2) / 4)
    # Every row to the last loop: nothing to gain, one adapter per call.
    full = [1] * 6
    assert rr.depthwise_counts(full, 2, 2).block_calls == rr.masked_counts(full, 2, 2).block_calls == 6
    assert rr.depthwise_counts(full, 2, 2).adapters_per_call == 1.0


def test_bad_input_is_refused():
    _, p = lm.build(CFG, 0)
    with pytest.raises(ValueError, match="exceeds"):
        rr.convert(CFG, p, num_unique=4, loops=2)
    with pytest.raises(ValueError, match="init="):
        rr.convert(CFG, p, num_unique=3, loops=2, init="top")
    with pytest.raises(ValueError, match="rank="):
        rr.convert(CFG, p, num_unique=3, loops=2, rank=-1)
    with pytest.raises(ValueError, match="loop_weights"):
        rr.recursive_lm_loss(None, 2, loop_weights=(0.0, 0.0))
    with pytest.raises(ValueError, match="exit_loop_Q"):
        rr.depthwise_counts([0, 2], 2, 2)
