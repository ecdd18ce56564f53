"""The engine's three parts: every executor x every policy it supports equals the masked executor row for row;
programs (repeat, per-row skip, MLP-only skip) equal unrolled references; the per-row KV cache (extend, rollback) and
self-speculative decoding equal plain decoding; the confidence measures' values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token, speculative
from eejax.exits import confidence, continuous, engine, paths, policies
from eejax.models import diffusion, lm
from eejax.models.vit import ViT, ViTConfig
from margins import float_tol, threshold_between

B = 16
CFG = ViTConfig(image_size=16, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                num_classes=6, exits="all", head_types="linear")
E = len(CFG.exit_layers)
TOL = float_tol(CFG.depth)


@pytest.fixture(scope="module")
def vit():
    model = ViT(CFG, rngs=nnx.Rngs(2))
    for i, head in enumerate(model.heads):
        head.cls.fc.kernel[...] = head.cls.fc.kernel[...] * (2.0 + 2 * i)
    x = jax.random.normal(jax.random.key(3), (B, 16, 16, 1))
    outs = jax.jit(lambda gs, x: nnx.merge(*gs).all_exits(x))(nnx.split(model), x)
    return nnx.split(model), x, outs


def _mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def _policy(name, outs):
    """Policies whose decisions spread the rows over the exits."""
    if name in ("max_softmax", "patience"):
        scores = engine.scores_from_outputs(outs, confidence.get_measure(name))
        thr = 1.0 if name == "patience" else threshold_between(scores[:-1], 0.6)
        return lambda: policies.threshold(name, thr, E)
    if name == "batch_mean":
        return lambda: policies.batch_mean("max_softmax", 0.3, E)
    if name == "fixed_exit":
        return lambda: policies.fixed_exit(jnp.arange(B) % E)
    if name == "router":   # a depth predicted from the input before any layer runs
        return lambda: policies.router(lambda h0: (jnp.abs(h0[:, 1, 0]) * 7).astype(jnp.int32) % E)
    raise ValueError(name)


EXECUTORS = {
    "cascade": lambda: engine.BucketCascade((4, 8)),
    "compacted": lambda: engine.Compacted((4, 8)),     # the baseline the cascade replaced
    "sharded": lambda: paths.Sharded(_mesh()),
    "sharded_cascade": lambda: paths.Sharded(_mesh(), engine.BucketCascade()),
    "gated_kernel": lambda: paths.GatedKernel(block_rows=8),
    "continuous": lambda: continuous.Continuous(num_slots=5),
}
# A batch-wide rule cannot be decided per device or per slot; a per-batch-row exit list means nothing to a slot.
UNSUPPORTED = {("sharded", "batch_mean"), ("sharded_cascade", "batch_mean"), ("continuous", "batch_mean"),
               ("continuous", "fixed_exit")}
POLICIES = ["max_softmax", "patience", "batch_mean", "fixed_exit", "router"]


@pytest.mark.parametrize("executor_name,policy_name",
                         [(e, p) for e in sorted(EXECUTORS) for p in POLICIES if (e, p) not in UNSUPPORTED])
def test_executor_equals_masked(vit, executor_name, policy_name):
    gs, x, outs = vit
    make_policy, make_exec = _policy(policy_name, outs), EXECUTORS[executor_name]

    @jax.jit
    def both(gs, x):
        m = nnx.merge(*gs)
        a = m.dynamic(x, policy=make_policy())
        b = m.dynamic(x, policy=make_policy(), executor=make_exec())
        return a, b

    masked, other = both(gs, x)
    if policy_name == "batch_mean":    # the batch exits together
        assert len(np.unique(masked.exit_B)) == 1
    else:
        assert len(np.unique(masked.exit_B)) >= 2, "policy leaves no spread of exits"
    np.testing.assert_array_equal(other.exit_B, masked.exit_B)
    np.testing.assert_array_equal(other.exit_layer_B, masked.exit_layer_B)
    np.testing.assert_allclose(other.logits_BxC, masked.logits_BxC, **TOL)
    np.testing.assert_allclose(masked.logits_BxC, engine.take_exit(outs.logits_ExBxC, masked.exit_B), **TOL)


def test_uvit_executors_equal_masked():
    cfg = diffusion.UViTConfig(image_size=8, channels=1, patch_size=4, d_model=32, depth=5, num_heads=4, mlp_dim=64,
                               num_classes=3)
    gd, params = diffusion.build(cfg, 0)
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
    t = jnp.arange(8) * 12
    y = jnp.arange(8) % 3

    @jax.jit
    def run(params):
        m = nnx.merge(gd, params)
        return {name: m.dynamic(x, t, y, 0.5, executor=ex)
                for name, ex in (("masked", engine.Masked()), ("cascade", engine.BucketCascade((4,))),
                                 ("compacted", engine.Compacted((4,))), ("sharded", paths.Sharded(_mesh())))}

    got = run(params)
    for name in ("cascade", "compacted", "sharded"):
        np.testing.assert_array_equal(got[name].exit_B, got["masked"].exit_B)
        np.testing.assert_allclose(got[name].out.eps_BxP, got["masked"].out.eps_BxP, **float_tol(cfg.depth))


def test_aux_state_needs_masked_executor(vit):
    gs, x, _ = vit
    m = nnx.merge(*gs)
    for executor in (engine.BucketCascade(), engine.Compacted()):
        with pytest.raises(ValueError, match="aux"):
            engine.run(m.layers, list(m.heads), m.embed(x), engine.prefix(CFG.depth, CFG.exit_layers),
                       policies.threshold("max_softmax", 0.5, E), executor, aux=jnp.zeros(3))
    with pytest.raises(ValueError, match="per exit"):
        policies.threshold("max_softmax", jnp.zeros(E + 1), E)


# --------------------------------------------------------------------------------------------------- programs


def test_repeat_program_equals_unrolled_with_per_repeat_hook(vit):
    gs, x, _ = vit
    m = nnx.merge(*gs)
    h0 = m.embed(x)
    program = engine.repeat([0, 1], 3, exit_steps=[1, 3, 5])
    np.testing.assert_array_equal(program.repeat_S, [0, 0, 1, 1, 2, 2])
    heads = [m.heads[0], m.heads[2], m.heads[4]]

    def hooked(layer, h, ctx):   # a per-loop adapter: a bias that depends on the repeat index
        return layer(h) + 0.01 * (ctx.repeat + 1).astype(h.dtype)

    layer_def, stacked = nnx.split(m.layers)
    layer = lambda l: nnx.merge(layer_def, jax.tree.map(lambda p: p[l], stacked))  # noqa: E731
    h, want = h0, []
    for s, (l, r) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]):
        h = layer(l)(h) + 0.01 * (r + 1)
        if s in (1, 3, 5):
            want.append(heads[len(want)](h).logits_BxC)
    scan = engine.scan_exits(m.layers, heads, h0, program=program, layer_fn=hooked)
    np.testing.assert_allclose(scan.logits_ExBxC, jnp.stack(want), **TOL)
    static = engine.run(m.layers, heads, h0, program, None, layer_fn=hooked)
    np.testing.assert_allclose(static.logits_BxC, want[-1], **TOL)
    scores = engine.scores_from_outputs(scan)
    policy = policies.threshold("max_softmax", threshold_between(scores[:-1], 0.5), 3)
    dyn = engine.run(m.layers, heads, h0, program, policy, layer_fn=hooked)
    np.testing.assert_array_equal(dyn.exit_B, engine.simulate(policy, scan).exit_B)
    np.testing.assert_allclose(dyn.logits_BxC, engine.take_exit(scan.logits_ExBxC, dyn.exit_B), **TOL)
    assert dyn.exit_layer_B.max() <= 5


def test_row_skip_program_equals_scan_layer_mask(vit):
    gs, x, _ = vit
    m = nnx.merge(*gs)
    keep_NxB = jax.random.bernoulli(jax.random.key(4), 0.6, (CFG.depth, B)).at[-1].set(True)
    scan = m.all_exits(x, layer_mask_NxB=keep_NxB)
    scores = engine.scores_from_outputs(scan)
    thr = threshold_between(scores[:-1], 0.6)
    program = engine.row_skip(keep_NxB, CFG.exit_layers)
    for ex in (engine.Masked(), engine.BucketCascade((4, 8)), engine.Compacted((4, 8))):
        dyn = jax.jit(lambda gs, x, ex=ex: nnx.merge(*gs).dynamic(x, thr, program=program, executor=ex))(gs, x)
        np.testing.assert_array_equal(dyn.exit_B, engine.simulate(policies.threshold("max_softmax", thr, E),
                                                                  scan).exit_B)
        np.testing.assert_allclose(dyn.logits_BxC, engine.take_exit(scan.logits_ExBxC, dyn.exit_B), **TOL)


def test_mlp_skip_program_equals_block_without_mlp(vit):
    gs, x, _ = vit
    m = nnx.merge(*gs)
    h0 = m.embed(x)
    skip_NxB = jax.random.bernoulli(jax.random.key(5), 0.5, (CFG.depth, B))
    layer_def, stacked = nnx.split(m.layers)
    h = h0
    for l in range(CFG.depth):
        layer = nnx.merge(layer_def, jax.tree.map(lambda p: p[l], stacked))
        a = layer.attn_half(h)
        h = jnp.where(skip_NxB[l][:, None, None], a, layer.mlp_half(a))   # reference: MLP removed where skipped
    program = engine.mlp_skip(skip_NxB, [CFG.depth - 1])
    got = engine.run(m.layers, [m.heads[-1]], h0, program)
    np.testing.assert_allclose(got.h, h, **TOL)
    kern = engine.run(m.layers, [m.heads[-1]], h0, program, policies.fixed_exit(jnp.zeros(B, jnp.int32)),
                      paths.GatedKernel(block_rows=8))
    np.testing.assert_allclose(kern.h, h, **TOL)


# ------------------------------------------------------------------------------------------------ KV cache

LCFG = lm.LMConfig(vocab_size=23, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7], [2, 7, 1]]


@pytest.fixture(scope="module")
def lm_gs():
    gd, params = lm.build(LCFG, 0)
    model = nnx.merge(gd, params)
    model.embed.embedding[...] = model.embed.embedding[...] * 5
    return nnx.split(model)


def test_extend_equals_single_steps_and_rollback(lm_gs):
    gd, params = lm_gs
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts(PROMPTS))
    new = jnp.asarray([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], jnp.int32)

    @jax.jit
    def run(params):
        model = nnx.merge(gd, params)
        _, st0 = kv_lib.prefill(model, prompt, lengths, 16)
        ext, st_ext = kv_lib.extend(model, new, st0)
        st, steps = st0, []
        for j in range(3):
            lg, st = kv_lib.full_step(model, new[:, j], st)
            steps.append(lg)
        # Rollback: write 3 tokens, keep 1, continue with token 9 == write 1 token, continue with token 9.
        back = kv_lib.rollback(st_ext, st0.pos_B + 1)
        lg_back, st_back = kv_lib.full_step(model, jnp.full((4,), 9, jnp.int32), back)
        _, st1 = kv_lib.extend(model, new[:, :1], st0)
        lg_ref, st_ref = kv_lib.full_step(model, jnp.full((4,), 9, jnp.int32), st1)
        return ext, jnp.stack(steps, 1), st_ext, st, lg_back, st_back, lg_ref, st_ref

    ext, steps, st_ext, st, lg_back, st_back, lg_ref, st_ref = run(params)
    np.testing.assert_allclose(ext, steps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(st_ext.pos_B, st.pos_B)
    for b in range(4):
        n = int(st.pos_B[b])
        np.testing.assert_allclose(st_ext.cache.k_NxBxJxSxK[:, b, :, :n], st.cache.k_NxBxJxSxK[:, b, :, :n], rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_allclose(lg_back, lg_ref, rtol=1e-5, atol=1e-5)
    for b in range(4):
        n = int(st_ref.pos_B[b])
        assert int(st_back.pos_B[b]) == n
        np.testing.assert_allclose(st_back.cache.v_NxBxJxSxK[:, b, :, :n], st_ref.cache.v_NxBxJxSxK[:, b, :, :n],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("draft_exit,k", [(0, 3), (1, 2)])
def test_self_speculative_equals_greedy(lm_gs, draft_exit, k):
    gd, params = lm_gs
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts(PROMPTS))
    g = 12

    @jax.jit
    def run(params):
        model = nnx.merge(gd, params)
        plain = per_token.generate(model, prompt, lengths, g, per_token.full_depth_step)
        spec = speculative.self_speculative(model, prompt, lengths, g, draft_exit=draft_exit, k=k)
        return plain, spec

    plain, spec = run(params)
    np.testing.assert_array_equal(spec.tokens_BxG, plain.tokens_BxG)
    accepted = np.asarray(spec.accepted_B)
    assert len(np.unique(accepted)) >= 2, f"rows should accept different lengths, got {accepted}"
    assert 0 < float(spec.acceptance_rate) < 1 and 1 < float(spec.tokens_per_verify) <= k + 1
    assert (np.asarray(spec.rounds_B) < g).all()     # fewer verify steps than tokens for every row


def test_lm_decode_policies(lm_gs):
    """Router and fixed-exit policies in KV-cached decoding equal the static exit they name."""
    gd, params = lm_gs
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts(PROMPTS))
    e_B = jnp.asarray([0, 2, 1, 3])

    @jax.jit
    def run(params):
        model = nnx.merge(gd, params)
        _, st = kv_lib.prefill(model, prompt, lengths, 12)
        tok = jnp.asarray([1, 2, 3, 4], jnp.int32)
        prog = engine.prefix(LCFG.depth, LCFG.exit_layers)
        heads = kv_lib.model_heads(model)
        fixed, _ = kv_lib.forward(model, tok[:, None], st, prog, heads, policies.fixed_exit(e_B))
        routed, _ = kv_lib.forward(model, tok[:, None], st, prog, heads,
                                   policies.router(lambda h0: jnp.asarray([0, 2, 1, 3])))
        per_exit = [per_token.exit_step(model, tok, st, 0, per_token.static_thresholds(LCFG.num_exits, e))[0]
                    for e in range(LCFG.num_exits)]
        return fixed, routed, jnp.stack(per_exit)

    fixed, routed, per_exit = run(params)
    np.testing.assert_array_equal(fixed.exit_B, e_B)
    np.testing.assert_array_equal(routed.exit_B, e_B)
    np.testing.assert_allclose(fixed.logits_BxC, per_exit[e_B, jnp.arange(4)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(routed.logits_BxC, fixed.logits_BxC, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ measures


def test_measure_values():
    logits = jnp.asarray([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    p = jax.nn.softmax(logits, -1)
    hidden = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
    out = engine.HeadOut(logits, hidden, hidden, jnp.asarray([0.0, 2.0]))
    state = confidence.init_state(out, jnp.zeros(2, jnp.int32))
    srt = np.sort(np.asarray(p), -1)
    np.testing.assert_allclose(confidence.margin(out, state)[0], srt[:, -1] - srt[:, -2], rtol=1e-6)
    np.testing.assert_allclose(confidence.neg_entropy(out, state)[0], np.sum(p * np.log(p), -1), rtol=1e-6)
    np.testing.assert_allclose(confidence.learned(out, state)[0], 1 / (1 + np.exp(-np.asarray([0.0, 2.0]))),
                               rtol=1e-6)
    # Patience: consecutive exits with the same argmax; row 0 keeps class 0 twice, row 1 switches.
    s1, st = confidence.patience(out, state)
    np.testing.assert_array_equal(s1, [0, 0])
    out2 = out._replace(logits_BxC=jnp.asarray([[5.0, 0.0, 0.0], [9.0, 0.0, 0.0]]))
    s2, st = confidence.patience(out2, st)
    np.testing.assert_array_equal(s2, [1, 0])
    s3, _ = confidence.patience(out2, st)
    np.testing.assert_array_equal(s3, [2, 1])
