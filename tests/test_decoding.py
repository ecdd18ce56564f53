"""KV-cached decoding, per-token early exit (state-propagated and oracle K/V), SkipDecode and LTT, against references."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token, skipdecode
from eejax.exits import engine
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=23, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
N, E = CFG.depth, CFG.num_exits
_rng = np.random.default_rng(0)   # random prompts of different lengths (right-padded into one batch)
PROMPTS = [_rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 5, 7, 2)]
G = 6


@pytest.fixture(scope="module")
def gs():
    gd, params = lm.build(CFG, 0)
    model = nnx.merge(gd, params)
    # Sharper logits than at init, so that rows become confident at different layers.
    model.embed.embedding[...] = model.embed.embedding[...] * 5
    return nnx.split(model)


@pytest.fixture(scope="module")
def prompts():
    return tuple(jnp.asarray(x) for x in kv_lib.pad_prompts(PROMPTS))


def _left_padded(prompt_rows, cont_BxG):
    """The teacher-forced reference input: each row's prompt + continuation, left-padded, with its valid mask (so
    the G continuation tokens sit at the last G positions of every row)."""
    seqs = [list(x) + np.asarray(c).tolist() for x, c in zip(prompt_rows, cont_BxG)]
    t = max(len(x) for x in seqs)
    out = np.zeros((len(seqs), t), np.int32)
    valid = np.zeros((len(seqs), t), bool)
    for i, x in enumerate(seqs):
        out[i, t - len(x):], valid[i, t - len(x):] = x, True
    return jnp.asarray(out), jnp.asarray(valid)


def _generate(gs, prompt, lengths, step_fn, force=None, **kw):
    gd, params = gs
    f = jax.jit(lambda p, t, n, f: per_token.generate(nnx.merge(gd, p), t, n, G, step_fn, force_BxG=f, **kw))
    return f(params, prompt, lengths, force)


def _exit_step(thr, kv="propagate", measure="max_softmax"):
    from eejax.exits import confidence
    return lambda m, t, s, i: per_token.exit_step(m, t, s, i, thr, kv=kv, measure=confidence.get_measure(measure))


def test_kv_cached_decoding_equals_full_forward(gs, prompts):
    gd, params = gs
    prompt, lengths = prompts
    gen = _generate(gs, prompt, lengths, per_token.full_depth_step)
    fwd = jax.jit(lambda p, t: nnx.merge(gd, p)(t))
    for b, x in enumerate(PROMPTS):
        seq = jnp.asarray(list(x) + np.asarray(gen.tokens_BxG[b]).tolist())[None]
        logp_TxV = jax.nn.log_softmax(fwd(params, seq)[0], -1)
        rows = np.arange(G) + len(x) - 1          # position whose logits produced generated token g
        np.testing.assert_array_equal(np.argmax(logp_TxV[rows], -1), gen.tokens_BxG[b])
        np.testing.assert_allclose(logp_TxV[rows, gen.tokens_BxG[b]], gen.logprob_BxG[b], rtol=1e-4, atol=1e-4)

    # The step logits themselves, for two steps after the prefill.
    def two_steps(p, t, n, nxt):
        model = nnx.merge(gd, p)
        logits0, state = kv_lib.prefill(model, t, n, t.shape[1] + 2)
        logits1, state = kv_lib.full_step(model, nxt[:, 0], state)
        logits2, _ = kv_lib.full_step(model, nxt[:, 1], state)
        return jnp.stack([logits0, logits1, logits2], 1)

    nxt = gen.tokens_BxG[:, :2]
    got = jax.jit(two_steps)(params, prompt, lengths, nxt)
    for b, x in enumerate(PROMPTS):
        want = fwd(params, jnp.asarray(list(x) + np.asarray(nxt[b]).tolist())[None])[0, len(x) - 1:]
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4)


def test_per_token_exit_at_inf_equals_full_depth(gs, prompts):
    prompt, lengths = prompts
    full = _generate(gs, prompt, lengths, per_token.full_depth_step)
    for kv in per_token.KV_MODES:
        ee = _generate(gs, prompt, lengths, _exit_step(jnp.inf, kv))
        np.testing.assert_array_equal(ee.tokens_BxG, full.tokens_BxG)
        np.testing.assert_allclose(ee.logprob_BxG, full.logprob_BxG, rtol=1e-5, atol=1e-5)
        assert (np.asarray(ee.exit_layer_BxG) == N - 1).all() and (np.asarray(ee.layers_run_G) == N).all()


def _reference_rows(gs, thr, measure):
    """Per-row Python reference: batch 1, no padding, a Python loop over layers with explicit CALM state copying."""
    gd, params = gs
    model = nnx.merge(gd, params)
    layer_def, stacked = nnx.split(model.layers)
    st = [jax.tree.map(lambda p: p[l], stacked) for l in range(N)]
    kv_fn = jax.jit(lambda s, h, pos: nnx.merge(layer_def, s).kv(h, pos))
    att_fn = jax.jit(lambda s, h, pos, k, v, m: nnx.merge(layer_def, s).attend(h, pos, k, v, m))
    head_fn = jax.jit(lambda p, h, e: nnx.merge(gd, p).exit_logits(h, e))
    exit_of = CFG.exit_of_layer
    out_tokens, out_exits = [], []
    for x in PROMPTS:
        p, s = len(x), len(x) + G
        K = np.zeros((N, 1, CFG.num_kv_heads, s, CFG.head_dim), np.float32)
        Vc = np.zeros_like(K)
        h = model.embed_tokens(jnp.asarray(x)[None])
        pos = jnp.arange(p)[None]
        mask = np.zeros((1, p, s), bool)
        mask[0, :, :p] = np.tril(np.ones((p, p), bool))
        for l in range(N):
            k, v = kv_fn(st[l], h, pos)
            K[l, :, :, :p], Vc[l, :, :, :p] = k, v
            h = att_fn(st[l], h, pos, K[l], Vc[l], mask)
        logits = head_fn(params, h[:, -1], jnp.int32(E - 1))
        toks, exits = [], [N - 1]
        for g in range(G):
            tok = int(np.argmax(logits[0]))
            toks.append(tok)
            slot = p + g
            h = model.embed_tokens(jnp.asarray([[tok]]))
            pos = jnp.asarray([[slot]])
            m = (np.arange(s) <= slot)[None, None]
            active, prev_hidden = True, np.zeros(CFG.d_model, np.float32)
            for l in range(N):
                k, v = kv_fn(st[l], h, pos)      # an exited row: K/V from its own frozen exit state
                K[l, :, :, slot], Vc[l, :, :, slot] = k[:, :, 0], v[:, :, 0]
                if not active:
                    continue
                h = att_fn(st[l], h, pos, K[l], Vc[l], m)
                e = int(exit_of[l])
                if e < 0:
                    continue
                lg = head_fn(params, h[:, 0], jnp.int32(e))
                hid = np.asarray(h[0, 0], np.float32)
                if measure == "max_softmax":
                    score = float(jax.nn.softmax(lg[0].astype(jnp.float32)).max())
                else:
                    score = float(np.sum(hid * prev_hidden) / max(np.linalg.norm(hid) * np.linalg.norm(prev_hidden),
                                                                  1e-9))
                prev_hidden = hid
                if score >= thr or e == E - 1:
                    active, logits, exit_l = False, lg, l
            exits.append(exit_l)
        out_tokens.append(toks)
        out_exits.append(exits[:G])
    return np.asarray(out_tokens), np.asarray(out_exits)


@pytest.mark.parametrize("measure,thr", [("max_softmax", 0.12), ("cosine", 0.85)])
def test_batched_per_token_exit_equals_per_row_reference(gs, prompts, measure, thr):
    prompt, lengths = prompts
    gen = _generate(gs, prompt, lengths, _exit_step(thr, "propagate", measure))
    want_tokens, want_exits = _reference_rows(gs, thr, measure)
    np.testing.assert_array_equal(gen.tokens_BxG, want_tokens)
    np.testing.assert_array_equal(gen.exit_layer_BxG, want_exits)
    np.testing.assert_array_equal(gen.layers_BxG, want_exits + 1)
    assert len(np.unique(np.asarray(gen.exit_layer_BxG)[:, 1:])) >= 2, "threshold leaves no spread of exits"


def test_propagated_and_oracle_kv(gs, prompts):
    gd, params = gs
    prompt, lengths = prompts
    tok = jnp.asarray([7, 2, 11, 4])

    def run(p, t, n, tok, thr):
        model = nnx.merge(gd, p)
        _, state = kv_lib.prefill(model, t, n, t.shape[1] + 1)
        _, full = kv_lib.full_step(model, tok, state)
        _, prop_stats, prop = per_token.exit_step(model, tok, state, 0, thr, kv="propagate")
        _, orc_stats, orc = per_token.exit_step(model, tok, state, 0, thr, kv="oracle")
        # Hidden state after every layer of the full-depth run, and each layer's K/V projection of any state.
        aux = kv_lib.DecodeAux(state.cache, state.pos_B[:, None])
        hs, h = [], model.embed_tokens(tok[:, None])
        for l in range(N):
            ctx = engine.StepCtx(jnp.int32(l), jnp.int32(l), jnp.int32(0), None, aux)
            h, aux = kv_lib.cache_layer(kv_lib.layer_at(model, l), h, ctx)
            hs.append(h[:, 0])
        h_NxBxD = jnp.stack(hs)
        proj = [[kv_lib.layer_at(model, l).kv(h_NxBxD[j][:, None], state.pos_B[:, None])[0][:, :, 0]
                 for j in range(N)] for l in range(N)]
        return full.cache, prop.cache, orc.cache, prop_stats, orc_stats, h_NxBxD, jnp.asarray(proj)

    run = jax.jit(run)
    for thr in np.linspace(0.09, 0.16, 15):   # the first threshold that spreads the rows over layers
        full, prop, orc, ps, os_, h_NxBxD, proj_LxMxBxJxK = run(params, prompt, lengths, tok, thr)
        exits = np.asarray(ps.exit_layer_B)
        if len(np.unique(exits)) >= 2:
            break
    assert len(np.unique(exits)) >= 2 and exits.min() <= N - 3  # some row skips >= 2 layers
    np.testing.assert_array_equal(os_.exit_layer_B, exits)
    assert int(os_.layers_run) == N
    for b, e in enumerate(exits):
        slot = int(lengths[b])       # the row's next position = its slot
        np.testing.assert_allclose(ps.h_BxD[b], h_NxBxD[e, b], rtol=1e-5, atol=1e-5)
        for l in range(N):
            got = prop.k_NxBxJxSxK[l, b, :, slot]
            if l <= e:   # layers the row ran: the real K/V
                np.testing.assert_allclose(got, full.k_NxBxJxSxK[l, b, :, slot], rtol=1e-5, atol=1e-5)
            else:        # skipped layers: layer l's projection of the row's own exit state (not another layer's)
                np.testing.assert_allclose(got, proj_LxMxBxJxK[l, e, b], rtol=1e-5, atol=1e-5)
                if l > e + 1:  # (layer e+1's true input *is* the exit state; deeper ones differ)
                    assert not np.allclose(got, full.k_NxBxJxSxK[l, b, :, slot], atol=1e-4)
    for a, b in ((orc.k_NxBxJxSxK, full.k_NxBxJxSxK), (orc.v_NxBxJxSxK, full.v_NxBxJxSxK)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)   # oracle K/V = the full forward's


def test_static_thresholds_exit_everyone_at_one_layer(gs, prompts):
    prompt, lengths = prompts
    gen = _generate(gs, prompt, lengths, _exit_step(per_token.static_thresholds(E, 1)))
    assert (np.asarray(gen.exit_layer_BxG)[:, 1:] == 1).all() and (np.asarray(gen.layers_run_G)[1:] == 2).all()
    assert float(per_token.decayed_threshold(0.9, 0, 4.0, 10)) == pytest.approx(0.91)
    assert float(per_token.decayed_threshold(0.9, 10, 4.0, 10)) < 0.82


def test_skipdecode_schedule_is_monotone():
    for s in (1, 2, 3, 5):
        sched = skipdecode.schedule_for_speedup(50, 12, s)
        assert np.all(np.diff(sched) <= 0) and sched.min() >= 1 and sched.max() <= 12
        assert abs(sched.mean() - 12 / s) < 0.6
    np.testing.assert_array_equal(skipdecode.linear_schedule(4, 6, 6, 3), [6, 5, 4, 3])
    with pytest.raises(ValueError, match="non-increasing"):
        skipdecode.check_schedule([2, 3], 4)
    mask = skipdecode.position_layer_mask([4, 3, 1], 4, keep_bottom=1)
    np.testing.assert_array_equal(mask.T, [[1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 0, 0]])


@pytest.mark.parametrize("keep_bottom", [0, 1])
def test_skipdecode_decode_equals_layer_program_reference(gs, prompts, keep_bottom):
    gd, params = gs
    prompt, lengths = prompts
    layers_G = skipdecode.linear_schedule(G, N, N, 1 + keep_bottom)
    force = jax.random.randint(jax.random.key(5), (len(PROMPTS), G), 0, CFG.vocab_size)
    step = lambda m, t, s, i: skipdecode.skip_step(m, t, s, i, jnp.asarray(layers_G), keep_bottom=keep_bottom)
    gen = _generate(gs, prompt, lengths, step, force)
    np.testing.assert_array_equal(gen.tokens_BxG, force)
    np.testing.assert_array_equal(gen.layers_run_G[1:], layers_G[:-1])
    np.testing.assert_array_equal(gen.layers_BxG[:, 1:], np.broadcast_to(layers_G[:-1], (len(PROMPTS), G - 1)))
    # Reference: the teacher-forced full-sequence forward that runs exactly the scheduled layers at each position.
    seq, valid = _left_padded(PROMPTS, force)
    p = seq.shape[1] - G
    pos_mask = jnp.asarray(skipdecode.sequence_mask(p, layers_G, N, keep_bottom))
    logits = jax.jit(lambda pr, s, v, m: nnx.merge(gd, pr).all_exits(s, valid_BxT=v, pos_mask_NxT=m,
                                                                     exits=[E - 1]).logits_ExBxTxV[0])(
        params, seq, valid, pos_mask)
    logp = jax.nn.log_softmax(logits[:, p - 1:p - 1 + G], -1)
    want = jnp.take_along_axis(logp, force[..., None], -1)[..., 0]
    np.testing.assert_allclose(gen.logprob_BxG, want, rtol=1e-4, atol=1e-4)


def test_sampling():
    logits = jax.random.normal(jax.random.key(0), (64, 11)) * 3
    np.testing.assert_array_equal(kv_lib.sample(logits, jax.random.key(1), 1.0, top_k=1), jnp.argmax(logits, -1))
    tok = kv_lib.sample(logits, jax.random.key(1), 1.0, top_k=3)
    top3 = jax.lax.top_k(logits, 3)[1]
    assert bool(jnp.all(jnp.any(top3 == tok[:, None], -1)))
    assert not np.array_equal(kv_lib.sample(logits, jax.random.key(2), 5.0), jnp.argmax(logits, -1))


def test_learn_then_test_guarantee():
    import math

    from eejax.decoding import calibration
    for n, p in ((7, 0.3), (20, 0.05)):
        for k in (0, 2, 5):
            want = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
            assert calibration._binom_cdf(k, n, p) == pytest.approx(want, rel=1e-9)
    assert calibration.hoeffding_bentkus_pvalue(0.0, 500, 0.1) < 1e-10
    assert calibration.hoeffding_bentkus_pvalue(0.2, 500, 0.1) == pytest.approx(1.0)
    # Synthetic risk rising as the threshold falls; LTT must keep the true risk <= eps in >= 1 - delta of draws.
    lams = np.linspace(0.9, 0.1, 9)
    true_risk = 0.4 * (1 - lams)
    eps, delta, rng = 0.15, 0.1, np.random.default_rng(0)
    chosen = []
    for _ in range(300):
        u = rng.uniform(size=200)
        res = calibration.learn_then_test(lams, [(u < r).astype(float) for r in true_risk], eps, delta)
        chosen.append(res.threshold if res.threshold is not None else 1.0)
    chosen = np.asarray(chosen)
    risk_of_chosen = np.interp(chosen, lams[::-1], true_risk[::-1], right=0.0)
    assert np.mean(risk_of_chosen <= eps) >= 1 - delta
    assert np.median(chosen) < 0.9   # and it does certify below the most conservative candidate


@pytest.mark.parametrize("variant", [dict(), dict(norm="peri", exit_head="own", tie_embeddings=False,
                                                  exits="every:2"),
                                     dict(exit_head="block"), dict(norm="post", exits="every:2")])
def test_static_exit_decode_equals_teacher_forced_exit(prompts, variant):
    """Every row leaving at exit e reads only K/V of layers <= e, which are real: the decode's logits equal exit e's
    logits of the teacher-forced full-sequence forward (for every exit-head kind)."""
    cfg = dataclasses.replace(CFG, **variant)
    gd, params = lm.build(cfg, 1)
    prompt, lengths = prompts
    force = jax.random.randint(jax.random.key(6), (len(PROMPTS), G), 0, cfg.vocab_size)
    ex = 0
    step = lambda m, t, s, i: per_token.exit_step(m, t, s, i, per_token.static_thresholds(cfg.num_exits, ex))
    gen = jax.jit(lambda p, t, n, f: per_token.generate(nnx.merge(gd, p), t, n, G, step, force_BxG=f))(
        params, prompt, lengths, force)
    np.testing.assert_array_equal(gen.exit_layer_BxG[:, 1:], cfg.exit_layers[ex])
    seq, valid = _left_padded(PROMPTS, force)
    p = seq.shape[1] - G
    logits = jax.jit(lambda pr, s, v: nnx.merge(gd, pr).all_exits(s, valid_BxT=v).logits_ExBxTxV)(params, seq, valid)
    logp = jax.nn.log_softmax(logits[ex, :, p:p - 1 + G], -1)     # positions decoded by exit steps (not prefill)
    want = jnp.take_along_axis(logp, force[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(gen.logprob_BxG[:, 1:], want, rtol=1e-4, atol=1e-4)
