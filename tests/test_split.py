"""Cloud-edge split decoding (``eejax.decoding.split``, CE-CoLLM arXiv:2411.02829): the two ends of the threshold
against their references (1.0: the full model's greedy decoding; 0: the static exit-k model), the deferred cloud
K/V against the full model's cache, the byte and call counts against a hand count, the cost model's limits, bad
input, and the step's host-stop budget."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token, split
from eejax.exits import costs, hlo
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=64, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48, exits="all")
K = 2          # edge layers
G = 6


@pytest.fixture(scope="module")
def setup():
    gd, params = lm.build(CFG, 0)
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]))
    return gd, params, prompt, lengths


def _generate(gd, params, prompt, lengths, step):
    return jax.jit(lambda p: per_token.generate(nnx.merge(gd, p), prompt, lengths, G,
                                                lambda m, t, s, i: step(m, t, s, i)))(params)


@pytest.mark.parametrize("cloud_kv", split.CLOUD_KV)
def test_threshold_one_is_the_full_model(setup, cloud_kv):
    gd, params, prompt, lengths = setup
    gen = _generate(gd, params, prompt, lengths,
                    lambda m, t, s, i: split.split_step(m, t, s, i, 1.0, edge_layers=K, cloud_kv=cloud_kv))
    full = _generate(gd, params, prompt, lengths, per_token.full_depth_step)
    # The random model's edge probabilities are far below 1, so no row can reach the threshold (margin asserted).
    probe = jax.jit(lambda p: split.split_step(nnx.merge(gd, p), prompt[:, 0],
                                               kv_lib.prefill(nnx.merge(gd, p), prompt, lengths, 16)[1], 0, 1.0,
                                               edge_layers=K))(params)
    assert float(jnp.max(jax.nn.softmax(probe[0]))) < 0.5
    assert not split.edge_mask(gen, K).any()
    np.testing.assert_array_equal(gen.tokens_BxG, full.tokens_BxG)
    np.testing.assert_allclose(gen.logprob_BxG, full.logprob_BxG, atol=1e-4)


@pytest.mark.parametrize("cloud_kv", split.CLOUD_KV)
def test_threshold_zero_is_the_static_exit_model(setup, cloud_kv):
    gd, params, prompt, lengths = setup
    gen = _generate(gd, params, prompt, lengths,
                    lambda m, t, s, i: split.split_step(m, t, s, i, 0.0, edge_layers=K, cloud_kv=cloud_kv))
    static = _generate(gd, params, prompt, lengths, lambda m, t, s, i: per_token.forced_step(m, t, s, i, K - 1))
    edge = split.edge_mask(gen, K)
    assert edge[:, 1:].all() and not edge[:, 0].any()
    np.testing.assert_array_equal(gen.tokens_BxG, static.tokens_BxG)
    np.testing.assert_allclose(gen.logprob_BxG, static.logprob_BxG, atol=1e-4)


def test_deferred_cloud_cache_is_the_full_models(setup):
    """Rows split both ways (a threshold between the observed edge scores), fed the same tokens: the deferred rule's
    cache equals full-depth decoding's at every layer, state propagation's differs above the cut."""
    gd, params, prompt, lengths = setup
    model = nnx.merge(gd, params)
    _, st0 = kv_lib.prefill(model, prompt, lengths, 16)
    toks = [jnp.asarray([3, 7, 11], jnp.int32), jnp.asarray([5, 1, 2], jnp.int32)]
    _, stats, _ = split.split_step(model, toks[0], st0, 0, 0.0, edge_layers=K)
    scores = np.sort(np.asarray(stats.score_B))
    assert scores[-1] - scores[0] > 1e-3                       # a threshold fits between them with margin
    thr = float((scores[0] + scores[1]) / 2) if scores[1] - scores[0] > 1e-4 else float((scores[1] + scores[2]) / 2)
    states = {}
    for rule in (*split.CLOUD_KV, "full"):
        st = st0
        edge = []
        for t in toks:
            if rule == "full":
                _, st = kv_lib.full_step(model, t, st)
            else:
                _, s, st = split.split_step(model, t, st, 0, thr, edge_layers=K, cloud_kv=rule)
                edge.append(np.asarray(s.exit_layer_B) == K - 1)
        states[rule] = (st, edge)
    assert states["deferred"][1][0].any() and not states["deferred"][1][0].all()
    np.testing.assert_allclose(states["deferred"][0].cache.k_NxBxJxSxK, states["full"][0].cache.k_NxBxJxSxK,
                               atol=1e-4)
    np.testing.assert_allclose(states["deferred"][0].cache.v_NxBxJxSxK, states["full"][0].cache.v_NxBxJxSxK,
                               atol=1e-4)
    gap = np.abs(np.asarray(states["propagate"][0].cache.k_NxBxJxSxK - states["full"][0].cache.k_NxBxJxSxK))
    assert gap[:K].max() < 1e-4 and gap[K:].max() > 1e-3       # the edge's layers exact, the cloud's propagated


def test_traffic_equals_a_hand_count():
    edge = np.array([[0, 1, 1, 0, 1], [0, 0, 1, 0, 0]], bool)
    lengths = np.array([3, 2])
    t = split.traffic(edge, lengths, d_model=4, depth=4, edge_layers=2, bytes_per_value=2, token_bytes=4)
    # Row 0: prompt 3 states; step 3 (cloud) uploads positions 3, 4, 5; step 4's state stays pending.
    # Row 1: prompt 2; step 1 uploads 1 state, step 3 two (positions 3, 4), step 4 one.
    np.testing.assert_array_equal(t.edge_tokens, [3, 1])
    np.testing.assert_array_equal(t.cloud_calls, [2, 4])
    np.testing.assert_array_equal(t.up_states, [6, 6])
    np.testing.assert_array_equal(t.up_bytes, [6 * 4 * 2, 6 * 4 * 2])
    np.testing.assert_array_equal(t.naive_up_states, [3 + 6, 2 + 3 + 5 + 6])
    np.testing.assert_array_equal(t.down_bytes, [8, 16])
    np.testing.assert_array_equal(t.cloud_token_layers, [12, 12])
    np.testing.assert_array_equal(t.naive_cloud_token_layers, [18, 32])
    p = split.traffic(edge, lengths, d_model=4, depth=4, edge_layers=2, cloud_kv="propagate")
    np.testing.assert_array_equal(p.cloud_token_layers, [(3 + 1) * 2, (2 + 3) * 2])
    np.testing.assert_array_equal(p.cloud_kv_token_layers, [2 * 2, 1 * 2])


def test_latency_limits():
    """Instant devices and links: the split's latency is its round trips, cloud-only's one per token, edge-only
    nothing; and a slow uplink makes naive collaboration pay for the re-sent context."""
    edge = np.array([[0, 1, 1, 0, 1], [0, 0, 1, 0, 0]], bool)
    lengths = np.array([3, 2])
    shape = costs.lm_shape(CFG)
    t = split.traffic(edge, lengths, d_model=32, depth=4, edge_layers=2)
    fast = split.CostModel(1e30, 1e30, 0.01, 1e30, 1e30)
    lat = split.latency(t, edge, lengths, shape, 2, fast)
    np.testing.assert_allclose(lat.split, [0.02, 0.04])
    np.testing.assert_allclose(lat.cloud_only, [0.05, 0.05])
    np.testing.assert_allclose(lat.edge_only, [0.0, 0.0], atol=1e-12)
    slow = split.latency(t, edge, lengths, shape, 2, fast._replace(uplink_bps=1e3))
    np.testing.assert_allclose(slow.naive - slow.split, (t.naive_up_bytes - t.up_bytes) * 8 / 1e3, rtol=1e-9)


def test_bad_input(setup):
    gd, params, prompt, lengths = setup
    model = nnx.merge(gd, params)
    _, st = kv_lib.prefill(model, prompt, lengths, 16)
    tok = prompt[:, 0]
    with pytest.raises(ValueError, match="edge_layers"):
        split.split_step(model, tok, st, 0, 0.9, edge_layers=CFG.depth)
    with pytest.raises(ValueError, match="cloud_kv"):
        split.split_step(model, tok, st, 0, 0.9, edge_layers=K, cloud_kv="copy")
    with pytest.raises(ValueError, match="threshold"):
        split.split_step(model, tok, st, 0, 1.5, edge_layers=K)
    one = lm.LMConfig(**{**CFG.__dict__, "exits": (CFG.depth - 1,)})
    with pytest.raises(ValueError, match="no exit after layer"):
        split.edge_exit_index(lm.DecoderLM(one, rngs=nnx.Rngs(0)), K)
    with pytest.raises(ValueError, match=r"edge_BxG\[:, 0\]"):
        split.traffic(np.ones((1, 3), bool), [2], d_model=4, depth=4, edge_layers=2)
    with pytest.raises(ValueError, match="rtt_s"):
        split.check_cost_model(split.CostModel(1.0, 1.0, -1.0, 1.0, 1.0))


def test_host_stop_budget(setup):
    """A split step decides once (one conditional, no data-dependent loop) with CALM propagation; the deferred rule
    runs the cloud's layers for every row in the emulation (the real cloud call is the link's round trip), so it has
    no host stop at all."""
    gd, params, prompt, lengths = setup
    st = jax.jit(lambda p: kv_lib.prefill(nnx.merge(gd, p), prompt, lengths, 16)[1])(params)
    for rule, conds in (("propagate", 1), ("deferred", 0)):
        prof = hlo.profile(lambda p, t, s: split.split_step(nnx.merge(gd, p), t, s, 0, 0.9, edge_layers=K,
                                                            cloud_kv=rule)[0], params, prompt[:, 0], st)
        assert (prof.unknown_whiles, prof.conditionals) == (0, conds), rule
        assert prof.host_stops(trips=1) == conds, rule
