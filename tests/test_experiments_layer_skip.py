"""The layer-skip programs of ULS and FiRST on the real SmolLM2 (slow; their smoke runs: tests/test_experiments.py)."""
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smollm2_skip_programs_match_references():
    """On the real SmolLM2 weights: ULS's table with every layer equals plain greedy; a per-row FiRST decode with
    full-depth prefill equals the gated one-pass twin (hard gates)."""
    import jax
    import jax.numpy as jnp

    from eejax.decoding import layer_skip as ls
    from eejax.decoding import per_token
    from eejax.models import pretrained

    pre_m = pretrained.load("smollm2-135m")
    model, tok, n = pre_m.model, pre_m.tokenizer, pre_m.cfg.depth
    prompts = jnp.asarray(np.stack([tok.encode("The capital of France is Paris, and the capital of")[:8],
                                    tok.encode("Once upon a time, there was a little girl who")[:8]]), jnp.int32)
    pre = ls.prefill_pooled(model, prompts, jnp.full((2,), 8, jnp.int32), 16)
    table, count = ls.layer_table(np.arange(n), n)
    full = per_token.decode(model, pre.logits_BxV, pre.state, 8, per_token.full_depth_step)
    tab = per_token.decode(model, pre.logits_BxV, pre.state, 8,
                           lambda m, t, s, i: ls.table_step(m, t, s, i, table, count))
    np.testing.assert_array_equal(full.tokens_BxG, tab.tokens_BxG)
    keep = np.ones((n, 2), bool)
    keep[ls.uls_layers(n, 1.5)[1:3], 0] = False
    keep[[5, 17, 23], 1] = False
    forced = full.tokens_BxG
    dec = per_token.decode(model, pre.logits_BxV, pre.state, 8,
                    lambda m, t, s, i: ls.row_step(m, t, s, i, jnp.asarray(keep)), force_BxG=forced)
    pre8 = ls.prefill_pooled(model, prompts, jnp.full((2,), 8, jnp.int32), 8)
    logits = ls.gated_continuation_logits(model, pre8.state.cache.k_NxBxJxSxK, pre8.state.cache.v_NxBxJxSxK,
                                          forced[:, :-1], jnp.asarray(keep, jnp.float32))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), forced[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(logp, np.asarray(dec.logprob_BxG[:, 1:]), atol=2e-3)
