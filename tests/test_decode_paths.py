"""Every decoder written for the GPU equals the path it replaces: the same tokens, exits and layer counts, and log-probs
within a float tolerance set from the depth and the dtype (two compiled programs of the same math round
differently, never by more).

* the ``Unrolled`` exit executor (one cond per decision) with cheap gates (the vocabulary only at the exit taken)
  = the masked while loop with every exit's head, per row, with CALM's learned classifier (exits spread over the
  rows, every gate clear of the threshold), with propagated and with oracle K/V; hidden-state saturation likewise;
* ``forced_step`` (static truncated program) = ``exit_step`` with static thresholds;
* SkipDecode grouped into static phases = the traced schedule; ULS / FiRST with static counts = traced counts;
* FFN skips by predication = under ``lax.cond``; ``kv.propagate`` (static range, static list, traced first layer) =
  the per-layer projection of the exit state; the fused QKV projection = three separate projections.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import ffn_skip, kv as kv_lib, layer_skip as ls, per_token, skipdecode
from eejax.exits import confidence
from eejax.models import lm

N, G = 4, 4
CFG = lm.LMConfig(vocab_size=23, d_model=16, depth=N, num_heads=2, num_kv_heads=1, mlp_dim=32)
E = CFG.num_exits
PROMPT, LENGTHS = (jnp.asarray(x) for x in kv_lib.pad_prompts([[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8]]))
B = PROMPT.shape[0]


def tol(depth: int = N, dtype=jnp.float32) -> dict:
    """Float tolerance of two compilations of the same ``depth``-layer computation: a few ulps per layer."""
    eps = float(jnp.finfo(dtype).eps)
    return dict(rtol=64 * depth * eps, atol=64 * depth * eps)


@pytest.fixture(scope="module")
def gs():
    gd, params = lm.build(CFG, 0)
    model = nnx.merge(gd, params)
    model.embed.embedding[...] = model.embed.embedding[...] * 5   # sharper logits than at init
    return nnx.split(model)


def _gen(gs, step, force=None):
    gd, params = gs
    f = jax.jit(lambda p, fo: per_token.generate(nnx.merge(gd, p), PROMPT, LENGTHS, G, step, force_BxG=fo))
    return f(params, force)


def _same(a: per_token.Generation, b: per_token.Generation, depth=N):
    np.testing.assert_array_equal(a.tokens_BxG, b.tokens_BxG)
    np.testing.assert_array_equal(a.exit_layer_BxG, b.exit_layer_BxG)
    np.testing.assert_array_equal(a.layers_BxG, b.layers_BxG)
    np.testing.assert_allclose(a.logprob_BxG, b.logprob_BxG, **tol(depth))


def _classifier(scale=300.0):
    """CALM's classifier with large random weights: gate logits far from 0 (the threshold 0.5 on the sigmoid), so
    exits spread over the rows and no gate sits near the threshold on any CPU."""
    rng = np.random.default_rng(3)
    return {"w_ExD": jnp.asarray(rng.normal(size=(E, CFG.d_model)) * scale, jnp.float32),
            "b_E": jnp.asarray(rng.normal(size=(E,)) * 0.1, jnp.float32)}


@pytest.mark.parametrize("kv", per_token.KV_MODES)
def test_unrolled_executor_and_cheap_gate_equal_masked_loop(gs, kv):
    """The Unrolled executor with the vocabulary only at the exit taken = the masked while loop with every exit's
    head, row by row (CALM's learned classifier decides)."""
    clf = _classifier()
    step = lambda ex, heads: (lambda m, t, s, i: per_token.exit_step(   # noqa: E731
        m, t, s, i, 0.5, measure=confidence.learned, classifier=clf, kv=kv, executor=ex, heads=heads))
    ref = _gen(gs, step("masked", "every"))
    exits = np.asarray(ref.exit_layer_BxG)[:, 1:]
    assert len(np.unique(exits)) >= 2 and exits.min() < N - 1, "the gate should spread the rows over exits"
    _same(_gen(gs, step("unrolled", "taken")), ref)


def test_saturation_gate_equals_every_exit_head(gs):
    """Hidden-state saturation (cosine of consecutive exits' states) decides the same with or without the
    vocabulary at every exit."""
    step = lambda heads: (lambda m, t, s, i: per_token.exit_step(   # noqa: E731
        m, t, s, i, 0.9, measure=confidence.cosine, heads=heads))
    _same(_gen(gs, step("taken")), _gen(gs, step("every")))


@pytest.mark.parametrize("exit_index", [1, E - 1])
def test_forced_step_equals_static_thresholds(gs, exit_index):
    force = jax.random.randint(jax.random.key(1), (B, G), 0, CFG.vocab_size)
    ref = _gen(gs, lambda m, t, s, i: per_token.exit_step(m, t, s, i, per_token.static_thresholds(E, exit_index),
                                                         executor="masked"), force)
    got = _gen(gs, lambda m, t, s, i: per_token.forced_step(m, t, s, i, exit_index), force)
    _same(got, ref)
    assert (np.asarray(got.exit_layer_BxG)[:, 1:] == CFG.exit_layers[exit_index]).all()


def test_skipdecode_phases_equal_traced_schedule(gs):
    sched = np.asarray([4, 3, 3, 1])
    force = jax.random.randint(jax.random.key(2), (B, G), 0, CFG.vocab_size)
    ref = _gen(gs, lambda m, t, s, i: skipdecode.skip_step(m, t, s, i, jnp.asarray(sched), keep_bottom=1), force)
    phases = skipdecode.phases(sched, N, keep_bottom=1)
    assert [k for k, _ in phases] == [1, 2, 1]
    got = _gen(gs, phases, force)
    _same(got, ref)
    np.testing.assert_array_equal(got.layers_run_G[1:], sched[:-1])


def test_static_layer_counts_equal_traced(gs):
    force = jax.random.randint(jax.random.key(3), (B, G), 0, CFG.vocab_size)
    table, count = ls.layer_table([0, 2, 3], N)
    _same(_gen(gs, lambda m, t, s, i: ls.table_step(m, t, s, i, table, count), force),
          _gen(gs, lambda m, t, s, i: ls.table_step(m, t, s, i, jnp.asarray(table), jnp.int32(count)), force))
    keep = np.ones((N, B), bool)
    keep[1, 0] = keep[2, 1] = False
    keep[1:3, 2] = False
    assert ls.union_count(keep) == N
    keep[1, :] = False
    count = ls.union_count(keep)
    assert count == N - 1
    _same(_gen(gs, lambda m, t, s, i: ls.row_step(m, t, s, i, jnp.asarray(keep), count=count), force),
          _gen(gs, lambda m, t, s, i: ls.row_step(m, t, s, i, jnp.asarray(keep)), force))


def test_ffn_predication_equals_cond(gs):
    gd, params = gs
    model = nnx.merge(gd, params)
    skip = np.random.default_rng(0).random((N, B, 7)) < 0.5
    skip[:, :, 3] = True                       # a token index where every row skips every FFN (the cond's saving)
    tokens = jax.random.randint(jax.random.key(4), (B, 7), 0, CFG.vocab_size)
    run = jax.jit(lambda branch: ffn_skip.forward(model, tokens, kv_lib.empty_state(model, B, 7),
                                                  ffn_skip.Table(skip), branch=branch), static_argnums=0)
    a, b = run("where"), run("cond")
    np.testing.assert_allclose(a.logits, b.logits, **tol())
    np.testing.assert_array_equal(a.skip.skip_NxBxT, b.skip.skip_NxBxT)


def test_propagate_equals_per_layer_projection(gs):
    gd, params = gs
    model = nnx.merge(gd, params)
    state = kv_lib.prefill(model, PROMPT, LENGTHS, PROMPT.shape[1] + 2)[1]
    h_BxTxD = jax.random.normal(jax.random.key(5), (B, 1, CFG.d_model))
    pos_BxT = state.pos_B[:, None]
    ref = state.cache
    for l in range(1, N):
        k, v = kv_lib.layer_at(model, l).kv(h_BxTxD, pos_BxT)
        ref = kv_lib.write_kv(ref, l, pos_BxT, k, v)
    for layers in (1, [1, 2, 3], jnp.int32(1)):
        got = jax.jit(lambda c, h, first: kv_lib.propagate(model, c, h, pos_BxT, layers if not isinstance(
            layers, jax.Array) else first))(state.cache, h_BxTxD, jnp.int32(1))
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, **tol(1))
    sparse = kv_lib.propagate(model, state.cache, h_BxTxD, pos_BxT, [3, 1])
    np.testing.assert_allclose(sparse.k_NxBxJxSxK[jnp.asarray([1, 3])], ref.k_NxBxJxSxK[jnp.asarray([1, 3])],
                               **tol(1))
    np.testing.assert_array_equal(sparse.k_NxBxJxSxK[2], state.cache.k_NxBxJxSxK[2])


def test_fused_qkv_equals_separate_projections(gs):
    gd, params = gs
    layer = kv_lib.layer_at(nnx.merge(gd, params), 1)
    h = jax.random.normal(jax.random.key(6), (B, 3, CFG.d_model))
    pos = jnp.broadcast_to(jnp.arange(3)[None], (B, 3))
    hq, j, k = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    w = layer.qkv.kernel[...]
    x = layer.norm1(h)
    q_ref = lm.rope((x @ w[:, :hq * k]).reshape(B, 3, hq, k), pos, CFG.rope_base)
    k_ref = lm.rope((x @ w[:, hq * k:(hq + j) * k]).reshape(B, 3, j, k), pos, CFG.rope_base).transpose(0, 2, 1, 3)
    v_ref = (x @ w[:, (hq + j) * k:]).reshape(B, 3, j, k).transpose(0, 2, 1, 3)
    q, kk, v = layer.project(h, pos)
    for a, b in ((q, q_ref), (kk, k_ref), (v, v_ref)):
        np.testing.assert_allclose(a, b, **tol(1))
    for a, b in zip(layer.kv(h, pos), (k_ref, v_ref)):
        np.testing.assert_allclose(a, b, **tol(1))
