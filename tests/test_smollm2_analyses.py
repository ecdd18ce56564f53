"""The SmolLM2 analyses (depth efficiency, CoLa, CEED-VLA's Jacobi decoder): their layer programs against references
on a tiny random LM, the settle-depth rule (the scripts' smoke runs: tests/test_experiments.py)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import engine
from eejax.models import lm
from experiments import _common_smollm2 as common

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = lm.LMConfig(vocab_size=31, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48, mlp="swiglu",
                  exits=[3])


@pytest.fixture(scope="module")
def model_tokens():
    gd, params = lm.build(CFG, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7)), jnp.int32)
    return nnx.merge(gd, params), tokens


def _run(model, tokens, program):
    pos, mask = common.causal_inputs(tokens)
    h_last, h_S = engine.run_layers(model.layers, model.embed_tokens(tokens),
                                    layer_fn=lm.sequence_layer_fn(pos, mask), program=program)
    return model.shared_head(model.final_norm(h_last)), h_S


def test_half_layer_program_is_the_model(model_tokens):
    """Attention steps then MLP steps of every layer = the plain forward; the residual after each sublayer."""
    model, tokens = model_tokens
    logits, h_S = _run(model, tokens, common.half_layer_program(range(CFG.depth)))
    np.testing.assert_allclose(logits, model(tokens), atol=1e-5, rtol=1e-5)
    assert h_S.shape == (2 * CFG.depth,) + tokens.shape + (CFG.d_model,)


def test_skip_program_equals_row_skip_mask(model_tokens):
    """The depth analysis' skip (a sequence without layer s) = the scan path's per-row layer mask with s off."""
    model, tokens = model_tokens
    for s in range(CFG.depth):
        logits, _ = _run(model, tokens, common.half_layer_program([l for l in range(CFG.depth) if l != s]))
        keep = jnp.ones((CFG.depth, tokens.shape[0]), bool).at[s].set(False)
        ref = model.all_exits(tokens, layer_mask_NxB=keep).logits_ExBxTxV[-1]
        np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)


def test_padded_chain_program_equals_static_sequence(model_tokens):
    """CoLa's chains as one padded traced table give the static ``engine.sequence`` program's output."""
    model, tokens = model_tokens
    from experiments import cola

    gd, params = nnx.split(model)
    f = cola.chain_fn(gd)
    label = jnp.zeros((tokens.shape[0],), jnp.int32)
    for chain in [(0, 1, 2, 3), (0, 2, 3), (0, 1, 1, 2, 3, 3), (1, 0, 3)]:
        static, _ = _run(model, tokens, engine.sequence(chain))
        top, p = f(params, tokens, label, *common.padded_program(engine.sequence(chain), 8)[:3])
        np.testing.assert_array_equal(top, jnp.argmax(static[:, -1], -1))
        np.testing.assert_allclose(p, jax.nn.softmax(static[:, -1])[:, 0], atol=1e-6)


def test_settle_layer():
    from experiments.depth_efficiency import settle_layer

    top_NxM = np.asarray([[5, 1, 2, 7], [5, 2, 2, 7], [5, 1, 2, 3], [5, 2, 2, 7]])
    np.testing.assert_array_equal(settle_layer(top_NxM), [0, 3, 0, 3])


@pytest.mark.slow
def test_full_jacobi_equals_greedy_on_smollm2():
    """The real model (float32): full Jacobi = greedy token for token, batched, at most n iterations a block."""
    from eejax.decoding import jacobi, kv, per_token
    from eejax.models import pretrained

    pre = pretrained.load("smollm2-135m")
    tok = pre.tokenizer
    prompt, lengths = (jnp.asarray(x) for x in kv.pad_prompts([tok.encode("The capital of France is"),
                                                                tok.encode("Once upon a time, there")]))
    greedy = jax.jit(per_token.decode_fn(pre.graphdef, per_token.full_depth_step, 8))(pre.params, prompt, lengths)
    out = jax.jit(lambda p, t, n: jacobi.jacobi_decode(nnx.merge(pre.graphdef, p), t, n, 8, block=4))(
        pre.params, prompt, lengths)
    np.testing.assert_array_equal(out.tokens_BxG, greedy.tokens_BxG)
    assert int(out.iters_BxK.max()) <= 4
