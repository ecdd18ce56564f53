"""Kangaroo (arXiv:2404.18911): the adapter drafter on the engine equals its training path, and double-early-exit
self-speculative decoding equals plain greedy decoding, batched, with rows stopping their drafts at different
lengths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import kangaroo
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.exits import engine
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=11, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48, exits=[3])
_rng = np.random.default_rng(1)
PROMPTS = [_rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 6, 2, 5)]
G, L = 12, 1


@pytest.fixture(scope="module")
def setup():
    gd, params = lm.build(CFG, 0)
    model = nnx.merge(gd, params)
    model.embed.embedding[...] = model.embed.embedding[...] * 8    # sharper logits: confident drafts
    gd, params = nnx.split(model)
    adapter = kangaroo.init_adapter(model, L)
    adapter = jax.tree.map(lambda x: x * 1.3, adapter)             # not a copy of any frozen layer
    prompt, lengths = kv_lib.pad_prompts(PROMPTS)
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lengths)
    ref = jax.jit(per_token.decode_fn(gd, per_token.full_depth_step, G))(params, prompt, lengths).tokens_BxG
    decode = jax.jit(kangaroo.kangaroo_fn(gd, G, exit_layer=L, gamma=4))   # eta traced: one compile for all
    return gd, params, adapter, prompt, lengths, ref, decode


def test_drafter_on_engine_equals_training_path(setup):
    gd, params, adapter, prompt, lengths, _, _ = setup
    model = nnx.merge(gd, params)
    draft = kangaroo.make_draft(model, adapter, L)
    # Engine: the draft program over the prompt (layers 0..l-1 whole, the adapter layer's attention half only).
    out, _ = kv_lib.forward(draft, prompt, kv_lib.empty_state(draft, prompt.shape[0], prompt.shape[1]),
                            kangaroo.draft_program(L), kv_lib.final_head(draft, last_token=False))
    # Training path: the frozen model's layer-l hidden states, then the adapter and the tied head.
    valid = jnp.arange(prompt.shape[1])[None] < lengths[:, None]
    _, h_NxBxTxD = engine.run_layers(model.layers, model.embed_tokens(prompt), layer_fn=lambda layer, x, ctx: layer(
        x, model.positions(valid), lm.causal_mask(valid)))
    ref = kangaroo.adapter_logits(model, adapter, h_NxBxTxD[L - 1], valid)
    np.testing.assert_allclose(np.where(valid[..., None], out.logits_BxC, 0), np.where(valid[..., None], ref, 0),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.01])
def test_kangaroo_is_greedy_exact_batched(setup, eta):
    gd, params, adapter, prompt, lengths, ref, decode = setup
    out = decode(params, adapter, prompt, lengths, jnp.float32(eta))
    np.testing.assert_array_equal(np.asarray(out.tokens_BxG), np.asarray(ref))
    drafted, rounds = np.asarray(out.drafted_B), np.asarray(out.rounds_B)
    if eta == 0.0:        # never stops early: gamma drafts per round
        assert (drafted == 4 * rounds).all()
    elif eta > 1:         # stops after the first draft token
        assert (drafted == rounds).all()
    else:                 # rows stop their drafts at different lengths
        per_round = drafted / rounds
        assert (per_round > 1).any() and (per_round < 4).any() and len(set(drafted.tolist())) > 1
    assert 0 < float(out.acceptance_rate) <= 1 and int(out.conf_hist_2xC[0].sum()) == int(out.accepted_B.sum())
    assert float(out.tokens_per_verify) == pytest.approx((G - 1) / rounds.mean(), rel=0.35)
