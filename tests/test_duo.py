"""Duo-LLM's per-token FFN routes (arXiv:2410.10846): the routed program against plain references on a tiny LM,
the FLOP counter against a hand count, the oracle against brute force, and the training / router losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.exits import costs, engine, routing
from eejax.models import lm as lm_lib
from eejax.train.trainer import StepContext

N, V, B, T = 4, 23, 3, 7
CFG = lm_lib.LMConfig(vocab_size=V, d_model=16, depth=N, num_heads=2, num_kv_heads=1, mlp_dim=64, small_mlp_dim=8,
                      exits=(N - 1,))
ATOL = 1e-5   # 4 float32 layers of width 16


@pytest.fixture(scope="module")
def model():
    return nnx.merge(*lm_lib.build(CFG, 0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(3), (B, T), 0, V)


def final_h(model, tokens, program=None):
    return model.hidden_states(tokens, program=program)[-1]


def test_small_ffn_is_drawn_last(model):
    """A Duo model holds the dense model's weights from the same seed, plus the small FFNs."""
    dense = nnx.merge(*lm_lib.build(lm_lib.LMConfig(**{**CFG.__dict__, "small_mlp_dim": 0}), 0))
    np.testing.assert_array_equal(np.asarray(dense.layers.mlp.fc1.kernel[...]),
                                  np.asarray(model.layers.mlp.fc1.kernel[...]))
    assert model.layers.mlp_small.fc1.kernel[...].shape == (N, CFG.d_model, CFG.small_mlp_dim)


def test_all_big_route_is_the_dense_model(model, tokens):
    route = np.full((N, B, T), engine.FFN_BIG, np.int32)
    np.testing.assert_allclose(final_h(model, tokens, engine.ffn_route(route)), final_h(model, tokens), atol=ATOL)


def test_skip_is_the_block_without_its_mlp(model, tokens):
    """Per row: FFN_SKIP at a layer equals ``mlp_skip``'s attention-only step there, big elsewhere."""
    skip_NxB = np.zeros((N, B), bool)
    skip_NxB[1, 0] = skip_NxB[3, 2] = skip_NxB[:, 1] = True
    route = np.where(skip_NxB, engine.FFN_SKIP, engine.FFN_BIG).astype(np.int32)
    np.testing.assert_allclose(final_h(model, tokens, engine.ffn_route(route)),
                               final_h(model, tokens, engine.mlp_skip(skip_NxB, [N - 1])), atol=ATOL)


def test_small_choice_is_the_small_mlp(model, tokens):
    """One block with every token on its small FFN equals ``h + mlp_small(norm2(h))`` written out."""
    layer = nnx.merge(*[jax.tree.map(lambda x: x[0], part) if i else part
                        for i, part in enumerate(nnx.split(model.layers))])
    h = jax.random.normal(jax.random.key(0), (B, T, CFG.d_model))
    ref = h + layer.mlp_small.fc2(jax.nn.gelu(layer.mlp_small.fc1(layer.norm2(h))))
    out = layer.mlp_routed(h, jnp.full((B, T), engine.FFN_SMALL))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    mixed = layer.mlp_routed(h, jnp.asarray([[0, 1, 2] * 2 + [1]] * B))
    np.testing.assert_allclose(mixed[:, 0], h[:, 0], atol=0)
    np.testing.assert_allclose(mixed[:, 1], ref[:, 1], atol=1e-6)
    np.testing.assert_allclose(mixed[:, 2], layer.mlp_half(h)[:, 2], atol=1e-6)


def test_each_row_equals_that_row_alone_with_its_route(model, tokens):
    """Per-token routes on a batch: every row's NLL equals the row run alone with its own route."""
    route = np.asarray(routing.uniform_routes(jax.random.key(7), N, (B, T)))
    nll = lm_lib.routed_nll(model, tokens, tokens, route)
    for b in range(B):
        alone = lm_lib.routed_nll(model, tokens[b:b + 1], tokens[b:b + 1], route[:, b:b + 1])
        np.testing.assert_allclose(nll[b:b + 1], alone, atol=1e-4)


def test_token_route_reaches_only_later_tokens(model, tokens):
    """Causality: changing the route of token t changes no output before t."""
    route = np.full((N, B, T), engine.FFN_BIG, np.int32)
    changed = route.copy()
    changed[:, :, 4] = engine.FFN_SKIP
    a, b = final_h(model, tokens, engine.ffn_route(route)), final_h(model, tokens, engine.ffn_route(changed))
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=ATOL)
    assert float(jnp.abs(a[:, 4:] - b[:, 4:]).max()) > 1e-3


def test_pattern_table_equals_one_route_at_a_time(model, tokens):
    pats = routing.patterns(N)
    table = lm_lib.pattern_nll(model, tokens, tokens, pats[[0, 5, 15]], batch_size=2)
    for i, p in enumerate(pats[[0, 5, 15]]):
        one = lm_lib.routed_nll(model, tokens, tokens, np.broadcast_to(p[:, None, None], (N, B, T)))
        np.testing.assert_allclose(table[i], one, atol=1e-5)


def test_route_flops_equal_a_hand_count():
    """d=16, 2 query / 1 KV heads of 8, GELU big 64 / small 8, V=23; token t sees t + 1 keys."""
    route = np.asarray([[[2, 1]], [[1, 0]], [[0, 0]], [[2, 2]]])          # N x B=1 x T=2
    qkv_o = 16 * (2 + 2) * 8 + 2 * 8 * 16                              # multiply-adds per token per layer
    attn = [2 * (qkv_o + 2 * 2 * 8 * keys) for keys in (1, 2)]         # scores + mix over the keys seen
    ffn = {0: 0, 1: 2 * 2 * 16 * 8, 2: 2 * 2 * 16 * 64}
    head = 2 * 16 * 23
    want = [4 * attn[t] + sum(ffn[int(c)] for c in route[:, 0, t]) + head for t in range(2)]
    np.testing.assert_array_equal(costs.ffn_route_flops(CFG, route, CFG.small_mlp_dim)[0], want)
    all_skip = costs.ffn_route_flops(CFG, np.zeros((N, 1, 2), int), CFG.small_mlp_dim)
    assert np.all(all_skip >= 4 * attn[0] + head)                      # skipping every FFN still pays attention


def test_oracle_is_the_brute_force_minimum():
    rng = np.random.default_rng(0)
    pats = routing.patterns(4)
    assert len({tuple(p) for p in pats}) == 16 and routing.num_big(pats).tolist()[::15] == [0, 4]
    loss = rng.random((16, 50))
    for k in range(5):
        o = routing.oracle(loss, pats, k)
        for n in range(50):
            cands = [p for p in range(16) if routing.num_big(pats[p]) == k]
            assert o.loss_N[n] == min(loss[p, n] for p in cands) and routing.num_big(pats[o.pattern_N[n]]) == k


def test_prefix_and_budget_routes():
    big, small = engine.FFN_BIG, engine.FFN_SMALL
    assert routing.is_prefix([big, big, small]) and routing.is_prefix([small] * 3)
    assert not routing.is_prefix([small, big, small])
    r = np.asarray(routing.budget_routes(jax.random.key(0), 6, 2, (5, 9)))
    assert r.shape == (6, 5, 9) and np.all((r == big).sum(0) == 2) and np.all((r == big) | (r == small))
    u = np.asarray(routing.uniform_routes(jax.random.key(0), 6, (40, 40)))
    assert set(np.unique(u)) == {0, 1, 2} and abs((u == 2).mean() - 1 / 3) < 0.02


def test_router_picks_within_the_budget_and_learns_separable_labels():
    pats = routing.patterns(3)
    feat = jnp.asarray(np.eye(8, dtype=np.float32))            # token n's feature says its oracle pattern
    target_KxN = np.stack([[p if routing.num_big(pats[p]) == k else
                            np.flatnonzero(routing.num_big(pats) == k)[0] for p in range(8)] for k in (1, 2)])
    loss_fn = routing.router_loss(pats, (1, 2))
    grad = jax.jit(jax.grad(lambda r: loss_fn(r, {"feat": feat, "oracle": jnp.asarray(target_KxN.T)}, None)[0]))
    router = routing.init_router(8, 8)
    for _ in range(200):
        router = jax.tree.map(lambda p, g: p - 1.0 * g, router, grad(router))
    for i, k in enumerate((1, 2)):
        pick = np.asarray(routing.router_pick(router, feat, pats, k))
        assert np.all(routing.num_big(pats[pick]) == k)
        np.testing.assert_array_equal(pick, target_KxN[i])


def test_duo_loss_is_the_routed_nll_of_its_drawn_route(model, tokens):
    gd, params = nnx.split(model)
    loss_fn = lm_lib.duo_lm_loss(gd, CFG)
    rng = jax.random.key(5)
    loss, aux = loss_fn(params, {"tokens": tokens, "targets": tokens}, StepContext(step=0, rng=rng, frozen=None))
    route = routing.uniform_routes(rng, N, tokens.shape)
    np.testing.assert_allclose(loss, lm_lib.routed_nll(model, tokens, tokens, route).mean(), rtol=1e-6)
    assert 0 < float(aux["big_frac"]) < 1


def test_bad_routes_are_refused(model):
    with pytest.raises(ValueError, match="route_NxB"):
        engine.ffn_route(np.full((N, B), 3))
    with pytest.raises(ValueError, match="route_NxB"):
        engine.ffn_route(np.zeros((N,), np.int32))
    with pytest.raises(ValueError, match="small_mlp_dim"):
        lm_lib.duo_lm_loss(None, lm_lib.LMConfig(vocab_size=V, d_model=16, depth=2, num_heads=2, num_kv_heads=1))
    with pytest.raises(ValueError, match="budget"):
        routing.oracle(np.zeros((8, 2)), routing.patterns(3), 4)
    with pytest.raises(ValueError, match="choices"):
        routing.uniform_routes(jax.random.key(0), 3, (2,), (1, 5))
    with pytest.raises(ValueError, match="route_NxBxT"):
        costs.ffn_route_flops(CFG, np.zeros((N - 1, 1, 2), int), 8)


def test_kv_cached_decoding_under_a_route_equals_the_teacher_forced_forward(model, tokens):
    """One token at a time through the KV cache (``kv.forward``) with a per-token route equals the teacher-forced
    routed forward, for the static path (``cache_layer``) and the path with a policy (``pending_layer``)."""
    from eejax.decoding import kv
    from eejax.exits import policies

    route = np.asarray(routing.uniform_routes(jax.random.key(11), N, (B, T)))
    ref = model.exit_logits(final_h(model, tokens, engine.ffn_route(route)), 0)
    never = policies.fixed_exit(jnp.zeros((B,), jnp.int32))     # one exit: the policy path with pending K/V
    for policy in (None, never):
        state, logits = kv.empty_state(model, B, T), []
        for t in range(T):
            out, state = kv.forward(model, tokens[:, t:t + 1], state, engine.ffn_route(route[:, :, t:t + 1]),
                                    kv.final_head(model, last_token=False), policy)
            logits.append(out.out.logits_BxC)
        np.testing.assert_allclose(jnp.concatenate(logits, 1), ref, atol=1e-4)


def test_compacting_executors_carry_the_route_with_their_rows():
    prog = engine.ffn_route(np.arange(2 * 4).reshape(2, 4) % 3)
    np.testing.assert_array_equal(engine.rows_of(prog, jnp.asarray([3, 0])).ffn_SxB, [[0, 0], [1, 1]])
    assert engine.per_row(prog) and not engine.per_row(engine.prefix(2, [1]))
