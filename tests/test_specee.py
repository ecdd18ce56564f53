"""SpecEE (arXiv:2504.08850) as an engine policy: the exit decision equals a reference computed by hand from the
full model's hidden states, and with the predictor forced to 0 the output equals full-depth greedy decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import kangaroo, specee
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=23, d_model=32, depth=5, num_heads=4, num_kv_heads=2, mlp_dim=48)
_rng = np.random.default_rng(2)
PROMPTS = [_rng.integers(0, CFG.vocab_size, n).tolist() for n in (4, 2, 6, 3, 5, 4)]
SCHEDULE, K, G = (1, 2, 3), 3, 7


@pytest.fixture(scope="module")
def setup():
    gd, params = lm.build(CFG, 0)
    model = nnx.merge(gd, params)
    model.embed.embedding[...] = model.embed.embedding[...] * 6
    gd, params = nnx.split(model)
    prompt, lengths = kv_lib.pad_prompts(PROMPTS)
    return gd, params, jnp.asarray(prompt), jnp.asarray(lengths)


def _np_score(pred, s, f):
    hid = np.maximum(f @ np.asarray(pred.w1_SxFxH[s]) + np.asarray(pred.b1_SxH[s]), 0)
    return 1 / (1 + np.exp(-(hid @ np.asarray(pred.w2_SxH[s]) + float(pred.b2_S[s]))))


@pytest.mark.parametrize("head_check", specee.HEAD_CHECKS)
def test_decision_equals_hand_reference(setup, head_check):
    """Either way of running the full head (under a cond, or at every scheduled layer) gives the same decisions."""
    gd, params, prompt, lengths = setup
    model = nnx.merge(gd, params)
    pred = specee.init_predictors(jax.random.key(3), len(SCHEDULE), K, 8)
    pred = pred._replace(w2_SxH=pred.w2_SxH * 3, b2_S=pred.b2_S + 1.0)   # scores on both sides of 0.5
    first, state = kv_lib.prefill(model, prompt, lengths, prompt.shape[1] + 2)
    tok = jnp.argmax(first, -1).astype(jnp.int32)
    emb = np.asarray(model.embed.embedding[...])
    # By hand: one unpadded full forward per row, every layer's hidden state at the new token, normed.
    x_BxNxD = np.stack([np.asarray(model.final_norm(model.all_exits(jnp.asarray([row + [int(tok[b])]])
                                                                    ).hidden_ExBxTxD[:, 0, -1]))
                        for b, row in enumerate(PROMPTS)])
    argmax_BxN = (x_BxNxD @ emb.T).argmax(-1)
    cand = _rng.integers(0, CFG.vocab_size, (len(PROMPTS), K))
    cand[::2, 0] = argmax_BxN[::2, SCHEDULE[1]]            # even rows: a middle layer's argmax is a candidate
    cand = jnp.asarray(cand, jnp.int32)
    out, _ = jax.jit(lambda p, t, s, c: specee.target_step(nnx.merge(gd, p), t, s, c, pred, SCHEDULE,
                                                           head_check=head_check))(params, tok, state, cand)
    exits, toks = [], []
    for b in range(len(PROMPTS)):
        prev = np.zeros(K)
        for s, layer in enumerate(SCHEDULE):
            logits = x_BxNxD[b, layer] @ emb[np.asarray(cand[b])].T
            p = np.exp(logits - logits.max())
            p /= p.sum()
            score = _np_score(pred, s, np.concatenate([logits, p, p - prev]))
            prev = p
            if score > 0.5 and argmax_BxN[b, layer] in np.asarray(cand[b]).tolist():
                exits.append(layer), toks.append(int(argmax_BxN[b, layer]))
                break
        else:
            exits.append(CFG.depth - 1), toks.append(int(argmax_BxN[b, -1]))
    np.testing.assert_array_equal(np.asarray(out.exit_layer_B), exits)
    np.testing.assert_array_equal(np.asarray(out.tok_B), toks)
    assert 0 < sum(e < CFG.depth - 1 for e in exits) < len(exits)   # the test sees both exits and full depth


def test_predictor_forced_to_zero_equals_full_depth(setup):
    gd, params, prompt, lengths = setup
    model = nnx.merge(gd, params)
    adapter = kangaroo.init_adapter(model, 1)
    pred = specee.init_predictors(jax.random.key(0), len(SCHEDULE), K)
    pred = pred._replace(b2_S=jnp.full_like(pred.b2_S, -1e9))      # score 0 at every layer
    ref = jax.jit(per_token.decode_fn(gd, per_token.full_depth_step, G))(params, prompt, lengths).tokens_BxG
    out = jax.jit(specee.decode_fn(gd, G, exit_layer=1, schedule=SCHEDULE, k=K))(params, adapter, pred, prompt,
                                                                                  lengths)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxG), np.asarray(ref))
    assert (np.asarray(out.exit_layer_BxG) == CFG.depth - 1).all()
    assert (np.asarray(out.preds_BxG)[:, 1:] == len(SCHEDULE)).all()


def test_auto_head_check_asks_the_cost_model():
    """``"auto"`` runs the full head at every decision point where the calibrated H200 roofline predicts it cheaper
    than a host stop (a small head, few rows), under a cond where it is dearer (a Llama-7B-sized head, or SmolLM2's
    at batch 128); ``"cond"`` / ``"always"`` are kept as asked; a policy refuses an unresolved mode."""
    assert specee.resolve_head_check(CFG, batch=len(PROMPTS)) == "always"
    smol = lm.LMConfig(vocab_size=49152, d_model=576, depth=30, num_heads=9, num_kv_heads=3, mlp_dim=1536,
                       mlp="swiglu", dtype="bfloat16")
    assert specee.resolve_head_check(smol, batch=1) == "always"
    assert specee.resolve_head_check(smol, batch=128) == "cond"
    llama_head = lm.LMConfig(vocab_size=32000, d_model=4096, depth=2, num_heads=32, mlp_dim=11008, dtype="bfloat16")
    assert specee.resolve_head_check(llama_head, batch=1) == "cond"
    for mode in ("cond", "always"):
        assert specee.resolve_head_check(llama_head, mode) == mode
    with pytest.raises(ValueError, match="head_check='sometimes'"):
        specee.resolve_head_check(CFG, "sometimes")
    policy = specee.SpecEEPolicy(specee.init_predictors(jax.random.key(0), 1, K), jnp.zeros((1, K), jnp.int32),
                                 lambda x: x, head_check="auto")
    with pytest.raises(ValueError, match="resolve_head_check"):
        policy.decide(None, None, 0)
