"""Static (ULS) and per-sequence (FiRST) layer skipping in KV-cached decoding, against references on a tiny LM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import kv as kv_lib
from eejax.decoding import layer_skip as ls
from eejax.decoding import per_token
from eejax.models import lm as lm_lib

N = 6
CFG = lm_lib.LMConfig(vocab_size=61, d_model=32, depth=N, num_heads=4, num_kv_heads=2, mlp_dim=48, mlp="swiglu",
                      exits=(N - 1,))


@pytest.fixture(scope="module")
def model():
    graphdef, params = lm_lib.build(CFG, 0)
    return nnx.merge(graphdef, params)


def removed(model, keep_layers):
    """The same LM with only ``keep_layers`` (a new model of that depth, the stored layers sliced)."""
    k = len(keep_layers)
    small_def, _ = lm_lib.build(lm_lib.LMConfig(**{**CFG.__dict__, "depth": k, "exits": (k - 1,)}), 0)
    state = nnx.state(model)
    state["layers"] = jax.tree.map(lambda a: a[jnp.asarray(keep_layers)], state["layers"])
    small = nnx.merge(small_def, state)
    return small


def test_uls_layers_even_and_keep_ends():
    keep = ls.uls_layers(30, 1.5)
    assert len(keep) == 20 and keep[0] == 0 and keep[-1] == 29
    skipped = np.setdiff1d(np.arange(30), keep)
    assert np.all(np.diff(skipped) >= 2)            # spread, never two adjacent at this ratio
    assert ls.uls_layers(30, 1.0).size == 30
    np.testing.assert_array_equal(ls.uls_layers(6, skip=2), [0, 1, 3, 5])
    with pytest.raises(ValueError):
        ls.uls_layers(6, skip=5)


def test_topk_keep_budget_and_ends():
    logit = jax.random.normal(jax.random.key(1), (N, 5))
    keep = np.asarray(ls.topk_keep(logit, ls.routable(N), 2))
    assert (keep.sum(0) == N - 2).all() and keep[0].all() and keep[-1].all()


def test_table_step_equals_removed_model(model):
    """A static skip set through the layer table (prefill and decode) equals the model with those layers removed."""
    keep_layers = [0, 2, 3, 5]
    prompt, lengths = kv_lib.pad_prompts([[3, 4, 5, 6, 7], [8, 9, 10]])
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lengths)
    table, count = ls.layer_table(keep_layers, N)
    prog = ls.table_program(table, count)
    out, state = kv_lib.forward(model, prompt, kv_lib.empty_state(model, 2, 12), prog,
                                kv_lib.final_head(model, last_token=False))
    last = jnp.take_along_axis(out.logits_BxC, (lengths - 1)[:, None, None], axis=1)[:, 0]
    got = per_token.decode(model, last, state._replace(pos_B=lengths), 7,
                    lambda m, t, s, i: ls.table_step(m, t, s, i, table, count))
    small = removed(model, keep_layers)
    logits, st = kv_lib.prefill(small, prompt, lengths, 12)
    ref = per_token.decode(small, logits, st, 7, per_token.full_depth_step)
    np.testing.assert_array_equal(got.tokens_BxG, ref.tokens_BxG)
    np.testing.assert_allclose(got.logprob_BxG, ref.logprob_BxG, atol=1e-4)
    assert (np.asarray(got.layers_BxG[:, 1:]) == 4).all()


def test_row_skip_decode_equals_removed_model_row_by_row(model):
    """Per-row skip sets (prefill and decode through the compacted row program) equal, row by row, the model with
    that row's layers removed (the uncompacted engine.row_skip is checked in the next test)."""
    compact = True
    keep_sets = [[0, 1, 3, 5], [0, 2, 4, 5], [0, 2, 3, 5]]     # one depth: the references share compiled code
    keep_NxB = np.zeros((N, 3), bool)
    for b, ks in enumerate(keep_sets):
        keep_NxB[ks, b] = True
    prompt, lengths = kv_lib.pad_prompts([[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]])
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lengths)
    prog = ls.row_program(keep_NxB, compact=compact)
    out, state = kv_lib.forward(model, prompt, kv_lib.empty_state(model, 3, 12), prog,
                                kv_lib.final_head(model, last_token=False))
    last = jnp.take_along_axis(out.logits_BxC, (lengths - 1)[:, None, None], axis=1)[:, 0]
    got = per_token.decode(model, last, state._replace(pos_B=lengths), 7,
                    lambda m, t, s, i: ls.row_step(m, t, s, i, jnp.asarray(keep_NxB), compact=compact))
    for b, ks in enumerate(keep_sets):
        small = removed(model, ks)
        logits, st = kv_lib.prefill(small, prompt[b:b + 1], lengths[b:b + 1], 12)
        ref = per_token.decode(small, logits, st, 7, per_token.full_depth_step)
        np.testing.assert_array_equal(got.tokens_BxG[b], ref.tokens_BxG[0])
        np.testing.assert_allclose(got.logprob_BxG[b], ref.logprob_BxG[0], atol=1e-4)
        assert (np.asarray(got.layers_BxG[b, 1:]) == len(ks)).all()
    assert int(got.layers_run_G[1]) == len(set(sum(keep_sets, [])))     # the union of the rows' layers


def test_first_decisions_fixed_after_prefill_and_match_teacher_forced_twin(model):
    """The routers decide once from the prompt: the decisions and each step's layers do not depend on the decoded
    tokens; full-depth prefill + row-skip decode equals the gated one-pass forward with hard gates (the training
    twin) and the masked scan path."""
    rng = np.random.default_rng(0)
    routers = ls.Routers(jnp.asarray(rng.normal(size=(N, CFG.d_model)), jnp.float32), jnp.zeros((N,), jnp.float32))
    prompt = jnp.asarray(rng.integers(1, CFG.vocab_size, (4, 5)), jnp.int32)
    lengths = jnp.full((4,), 5, jnp.int32)
    g = 6
    free, keep = ls.first_generate(model, routers, prompt, lengths, g)
    forced_toks = jnp.asarray(rng.integers(1, CFG.vocab_size, (4, g)), jnp.int32)
    forced, keep2 = ls.first_generate(model, routers, prompt, lengths, g, force_BxG=forced_toks, compact=False)
    keep = np.asarray(keep)
    np.testing.assert_array_equal(keep, np.asarray(keep2))
    pre = ls.prefill_pooled(model, prompt, lengths, 5)
    np.testing.assert_array_equal(keep, np.asarray(ls.hard_keep(ls.router_logits(routers, pre.pooled_NxBxD),
                                                                 ls.routable(N))))
    assert keep[0].all() and keep[-1].all() and not keep.all()      # routers skip some middle layers
    for dec in (free, forced):
        np.testing.assert_array_equal(np.asarray(dec.layers_BxG[:, 1:]),
                                      np.broadcast_to(keep.sum(0)[:, None], (4, g - 1)))
    assert (np.asarray(forced.layers_run_G[1:]) == N).all()      # engine.row_skip: every step, rows masked
    # The prefill's cache and logits equal plain kv.prefill.
    ref_logits, ref_state = kv_lib.prefill(model, prompt, lengths, 5)
    np.testing.assert_allclose(pre.logits_BxV, ref_logits, atol=1e-5)
    np.testing.assert_allclose(pre.state.cache.k_NxBxJxSxK, ref_state.cache.k_NxBxJxSxK, atol=1e-5)
    # Teacher-forced twins: the gated one-pass forward over the cached prompt K/V, and the scan path with a
    # per-(layer, position) mask, give the decode's log-probs of the forced tokens.
    logits = ls.gated_continuation_logits(model, pre.state.cache.k_NxBxJxSxK, pre.state.cache.v_NxBxJxSxK,
                                          forced_toks[:, :-1], jnp.asarray(keep, jnp.float32))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), forced_toks[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(logp, forced.logprob_BxG[:, 1:], atol=1e-4)
    for b in range(4):
        seq = jnp.concatenate([prompt[b], forced_toks[b, :-1]])[None]
        mask_NxT = np.concatenate([np.ones((N, 5), bool), np.repeat(keep[:, b:b + 1], g - 1, axis=1)], axis=1)
        full = model.all_exits(seq, pos_mask_NxT=jnp.asarray(mask_NxT)).logits_ExBxTxV[0, 0, 5:]
        ref = jnp.take_along_axis(jax.nn.log_softmax(full, -1), forced_toks[b, 1:, None], -1)[:, 0]
        np.testing.assert_allclose(ref, forced.logprob_BxG[b, 1:], atol=1e-4)
