"""Self-speculative drafters (eejax.decoding.speculative): DEL's per-row dynamic exit and length is lossless
(batched, rows choosing differently), its TPL rule and acceptance update equal references, and a verify pass's
shadow tokens equal the exits' teacher-forced argmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token, speculative
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=23, d_model=32, depth=5, num_heads=4, num_kv_heads=2, mlp_dim=48, exits="all")
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7], [2, 7, 1]]


@pytest.fixture(scope="module")
def gs():
    gd, params = lm.build(CFG, 0)
    model = nnx.merge(gd, params)
    model.embed.embedding[...] = model.embed.embedding[...] * 5
    return nnx.split(model)


def test_del_equals_greedy_batched(gs):
    gd, params = gs
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts(PROMPTS))
    g = 14
    # Optimistic priors at the deeper exits: rows start long and deep, then follow their own shadow statistics.
    drafter = speculative.dynamic(CFG, [0, 1, 2, 3], 3, decay=0.5, alpha0=[0.3, 0.6, 0.9, 0.95])

    @jax.jit
    def run(params):
        model = nnx.merge(gd, params)
        plain = per_token.generate(model, prompt, lengths, g, per_token.full_depth_step)
        return plain, speculative.self_speculative(model, prompt, lengths, g, drafter=drafter)

    plain, spec = run(params)
    np.testing.assert_array_equal(spec.tokens_BxG, plain.tokens_BxG)
    ex, kt = np.asarray(spec.exit_trace_BxG), np.asarray(spec.k_trace_BxG)
    rounds = np.asarray(spec.rounds_B)
    assert ((ex >= 0).sum(1) == rounds).all() and ((kt > 0).sum(1) == rounds).all()
    assert len(np.unique(ex[ex >= 0])) >= 2 and len(np.unique(kt[kt > 0])) >= 2   # choices change over rounds
    assert np.asarray(spec.drafted_B).tolist() == kt.sum(1).tolist()
    layers = np.where(ex >= 0, ex, 0) * kt
    assert np.asarray(spec.draft_layers_B).tolist() == layers.sum(1).tolist()
    assert (np.asarray(spec.accepted_B) <= np.asarray(spec.drafted_B)).all()


def test_del_at_batch_1_equals_greedy(gs):
    """At batch 1 a DEL round's plan is the row's own (exit, length): the static truncated model of that exit."""
    gd, params = gs
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts(PROMPTS[2:3]))
    drafter = speculative.dynamic(CFG, [0, 2, 3], 2, decay=0.5, alpha0=[0.3, 0.8, 0.95])

    @jax.jit
    def run(params):
        model = nnx.merge(gd, params)
        plain = per_token.generate(model, prompt, lengths, 10, per_token.full_depth_step)
        return plain, speculative.self_speculative(model, prompt, lengths, 10, drafter=drafter)

    plain, spec = run(params)
    np.testing.assert_array_equal(spec.tokens_BxG, plain.tokens_BxG)
    assert int(spec.draft_steps) == int(spec.drafted_B[0])          # at batch 1 the batch drafts the row's own


def test_static_drafter_equals_the_draft_exit_arguments(gs):
    gd, params = gs
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts(PROMPTS))

    @jax.jit
    def run(params):
        model = nnx.merge(gd, params)
        a = speculative.self_speculative(model, prompt, lengths, 9, draft_exit=2, k=2)
        b = speculative.self_speculative(model, prompt, lengths, 9, drafter=speculative.static(2, 2))
        return a, b

    a, b = run(params)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert (np.asarray(a.draft_layers_B) == 3 * np.asarray(a.drafted_B)).all()   # exit 2 runs 3 layers


def test_truncated_draft_steps_equal_the_masked_engine(gs):
    """The static truncated model (one exit, its layers only) and the per-row variant give the masked engine's
    fixed-exit logits, over two consecutive steps (the second reads the cache the first wrote)."""
    gd, params = gs
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts(PROMPTS))
    exit_B = jnp.asarray([0, 3, 1, 2], jnp.int32)

    @jax.jit
    def run(params):
        model = nnx.merge(gd, params)
        logits, st = kv_lib.prefill(model, prompt, lengths, prompt.shape[1] + 4)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        out = {}
        for name, fn in (("static", lambda t, s: speculative.draft_step(model, t, s, 2)),
                         ("masked_static", lambda t, s: speculative.masked_draft_step(model, t, s, 2)),
                         ("rows", lambda t, s: speculative.rows_draft_step(model, t, s, exit_B, 3)),
                         ("masked_rows", lambda t, s: speculative.masked_draft_step(model, t, s, exit_B))):
            a, s1 = fn(tok, st)
            b, _ = fn(jnp.argmax(a, -1).astype(jnp.int32), s1)
            out[name] = (a, b)
        return out

    out = run(params)
    for name in ("static", "rows"):
        for got, want in zip(out[name], out["masked_" + name]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tpl_choice_and_update_equal_references():
    d = speculative.dynamic(CFG, [0, 2, 3], 4, decay=0.8, verify_per_token=0.5)
    alpha = np.random.default_rng(0).uniform(0.0, 1.0, (6, 3)).astype(np.float32)
    alpha[0] = [0.999, 0.999, 0.999]
    exit_B, d_B = d.choose(speculative.DynamicState(jnp.asarray(alpha)))
    for b in range(6):
        best, arg = -1.0, None
        for c, l in zip(d.candidates, d.layers_C):
            for k in range(1, 5):
                a = alpha[b, d.candidates.index(c)]
                tpl = sum(a ** i for i in range(k + 1)) / (k * l + CFG.depth * (1 + 0.5 * k))
                if tpl > best + 1e-9:
                    best, arg = tpl, (c, k)
        assert (int(exit_B[b]), int(d_B[b])) == arg
    # Update: 3 candidates, verify of 3 positions; row 0 accepted 1 draft (positions 0, 1 count), row 1 none.
    shadow = jnp.asarray([[[5, 6, 0], [5, 1, 7], [2, 6, 7]], [[4, 4, 4], [1, 1, 1], [4, 0, 0]]])
    g = jnp.asarray([[5, 6, 7], [4, 9, 9]])
    st = speculative.DynamicState(jnp.full((2, 3), 0.5))
    new = d.update(st, shadow, g, jnp.asarray([1, 0]), jnp.asarray([True, True]))
    hits = np.asarray([[2, 1, 1], [1, 0, 1]], np.float32)
    m = np.asarray([2.0, 1.0], np.float32)
    keep = 0.8 ** m
    want = 0.5 * keep[:, None] + (1 - keep[:, None]) * hits / m[:, None]
    np.testing.assert_allclose(new.alpha_BxC, want, rtol=1e-6)
    frozen = d.update(st, shadow, g, jnp.asarray([1, 0]), jnp.asarray([False, True]))
    np.testing.assert_allclose(frozen.alpha_BxC[0], 0.5)


def test_verify_shadow_tokens_equal_teacher_forced_exits(gs):
    gd, params = gs
    seq = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]], jnp.int32)

    @jax.jit
    def run(params):
        model = nnx.merge(gd, params)
        _, st = kv_lib.prefill(model, seq[:, :4], jnp.asarray([4, 4]), 12)
        g, shadow, _ = speculative.verify(model, seq[:, 4:], st, shadow_exits=(0, 2, 3))
        ref = model.all_exits(seq).logits_ExBxTxV
        return g, shadow, jnp.argmax(ref, -1)

    g, shadow, ref_ExBxT = run(params)
    np.testing.assert_array_equal(g, ref_ExBxT[-1][:, 4:])
    np.testing.assert_array_equal(shadow, np.stack([ref_ExBxT[e][:, 4:] for e in (0, 2, 3)], 1))


@pytest.mark.slow
def test_del_and_static_equal_greedy_on_smollm2():
    """On the real weights (the first 8 layers of SmolLM2-135M, so it runs in about a minute): static drafts and DEL
    give plain greedy decoding's tokens, batched, prompts of different lengths."""
    pytest.importorskip("gguf")
    from eejax.models import pretrained

    try:
        pre = pretrained.load("smollm2-135m", depth=8, exits=(1, 3, 5, 7), exit_head="lowrank", exit_rank=4)
    except pretrained.PretrainedError as e:
        pytest.skip(str(e))
    tok = pre.tokenizer
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts(
        [tok.encode(s) for s in ("The capital of France is", "Once upon a time, there was a little girl who")]))
    drafter = speculative.dynamic(pre.cfg, [0, 1, 2], 3)

    @jax.jit
    def run(params):
        model = nnx.merge(pre.graphdef, params)
        plain = per_token.generate(model, prompt, lengths, 10, per_token.full_depth_step)
        return (plain, speculative.self_speculative(model, prompt, lengths, 10, draft_exit=1, k=3),
                speculative.self_speculative(model, prompt, lengths, 10, drafter=drafter))

    plain, static, dyn = run(pre.params)
    np.testing.assert_array_equal(static.tokens_BxG, plain.tokens_BxG)
    np.testing.assert_array_equal(dyn.tokens_BxG, plain.tokens_BxG)
