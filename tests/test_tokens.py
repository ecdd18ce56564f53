"""Token exit inside a sequence (eejax.exits.tokens, F6): the compacted executor equals the masked one, an executed
run equals the teacher-forced pass under its own schedule (and the policy replayed on that pass takes the same
exits), every row equals itself run alone, a row whose tokens never exit equals the plain model, the FLOP and
host-stop accounting, DToP's top-k rule against a sort, the token-group variant and its KV cache (decoding after a
group exit equals the teacher-forced forward of the whole sequence)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.data import composed, vision
from eejax.decoding import token_cache
from eejax.eval import paired, segmentation
from eejax.exits import costs, engine, hlo, tokens
from eejax.models import segvit, vlm
from eejax.nn.layers import Block, stacked

D, C, T, B, N = 16, 5, 12, 3, 6
PROGRAM = engine.prefix(N, [1, 3, 5])
E = 3
BUCKETS = (4, 8, 12)
ATOL = 1e-4      # float32, 6 layers of width 16: compacted attention sums over fewer slots than the masked one
MARGIN = 1e-3    # a token counts as decided only when its score is this far from the threshold


@pytest.fixture(scope="module")
def stack():
    rngs = nnx.Rngs(0)
    layers = stacked(lambda r: Block(D, 2, 32, rngs=r), N, rngs)
    head_mods = [nnx.Linear(D, C, rngs=rngs) for _ in range(E)]

    def make(m, scale):
        return lambda h, view: tokens.TokenHeadOut(scale * m(h))

    heads = [make(m, 3.0 + i) for i, m in enumerate(head_mods)]
    h0 = jax.random.normal(jax.random.key(1), (B, T, D))
    return layers, heads, h0


def _gap_thresholds(layers, heads, h0, top_k=0):
    """Thresholds, exit by exit, in the widest gap of the realised scores near their median, so that no token's
    decision sits on the threshold (held by the tests with MARGIN)."""
    thr = [np.inf] * E
    for e in range(E - 1):
        pol = tokens.confidence(thr, E, top_k)
        m = tokens.run(layers, heads, h0, PROGRAM, pol, tokens.Masked())
        sc = tokens.scan(layers, heads, h0, PROGRAM, m.exit_BxT)
        probs = jax.nn.softmax(sc.out_E.logits_BxQxC[e], -1).max(-1)
        s = np.sort(np.asarray(probs)[np.asarray(m.exit_BxT) >= e])
        lo, hi = len(s) // 4, 3 * len(s) // 4
        i = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
        assert s[i + 1] - s[i] > 2 * MARGIN
        thr[e] = float(s[i] + s[i + 1]) / 2
    return thr


@pytest.fixture(scope="module")
def decided(stack):
    layers, heads, h0 = stack
    thr = _gap_thresholds(layers, heads, h0, top_k=1)
    return tokens.confidence(thr, E, top_k=1)


def _run(stack, policy, executor, h0=None, **kw):
    layers, heads, h = stack
    return tokens.run(layers, heads, h if h0 is None else h0, PROGRAM, policy, executor, **kw)


def _close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_compacted_equals_masked(stack, decided):
    m = _run(stack, decided, tokens.Masked())
    c = jax.jit(lambda h: _run(stack, decided, tokens.Compacted(BUCKETS), h))(stack[2])
    ex = np.asarray(m.exit_BxT)
    assert len(np.unique(ex)) == E and all(len(np.unique(r)) > 1 for r in ex), ex   # rows exit differently
    np.testing.assert_array_equal(ex, np.asarray(c.exit_BxT))
    _close(m.h, c.h)
    _close(m.out.logits_BxQxC, c.out.logits_BxQxC)
    np.testing.assert_array_equal(np.asarray(m.queries_SxB), np.asarray(c.queries_SxB))
    slots = np.asarray(c.slots_S)
    assert np.all(slots >= np.asarray(c.queries_SxB).max(1)) and set(slots[2:]) <= set(BUCKETS)
    assert np.all(np.asarray(m.slots_S) == T)


def test_executed_equals_teacher_forced(stack, decided):
    layers, heads, h0 = stack
    m = _run(stack, decided, tokens.Masked())
    sc = tokens.scan(layers, heads, h0, PROGRAM, m.exit_BxT)
    _close(sc.h, m.h, 1e-6)
    _close(tokens.take_exit(sc.out_E, m.exit_BxT).logits_BxQxC, m.out.logits_BxQxC, 1e-6)
    np.testing.assert_array_equal(np.asarray(tokens.replay(decided, sc, m.exit_BxT, PROGRAM)), np.asarray(m.exit_BxT))
    # the counts a cost model reads follow from the schedule alone
    query, key = tokens.schedule_masks(m.exit_BxT, PROGRAM)
    np.testing.assert_array_equal(np.asarray(query.sum(-1)), np.asarray(m.queries_SxB))
    np.testing.assert_array_equal(np.asarray(key.sum(-1)), np.asarray(m.keys_SxB))


def test_decisions_are_clear_of_thresholds(stack, decided):
    layers, heads, h0 = stack
    m = _run(stack, decided, tokens.Masked())
    sc = tokens.scan(layers, heads, h0, PROGRAM, m.exit_BxT)
    ex = np.asarray(m.exit_BxT)
    for e in range(E - 1):
        s = np.asarray(jax.nn.softmax(sc.out_E.logits_BxQxC[e], -1).max(-1))[ex >= e]
        assert np.min(np.abs(s - float(decided.threshold_E[e]))) > MARGIN


def test_every_row_equals_running_alone(stack, decided):
    c = _run(stack, decided, tokens.Compacted(BUCKETS))
    for b in range(B):
        alone = _run(stack, decided, tokens.Compacted(BUCKETS), stack[2][b:b + 1])
        np.testing.assert_array_equal(np.asarray(alone.exit_BxT[0]), np.asarray(c.exit_BxT[b]))
        _close(alone.h[0], c.h[b])
        np.testing.assert_array_equal(np.asarray(alone.queries_SxB[:, 0]), np.asarray(c.queries_SxB[:, b]))


def test_no_exit_equals_plain_model(stack, decided):
    layers, heads, h0 = stack
    plain_h, _ = engine.run_layers(layers, h0)
    plain = heads[-1](plain_h, None).logits_BxQxC
    never = _run(stack, tokens.confidence(np.inf, E), tokens.Compacted(BUCKETS))
    assert np.all(np.asarray(never.exit_BxT) == E - 1)
    _close(never.h, plain_h)
    _close(never.out.logits_BxQxC, plain)
    # one row whose tokens may not exit, in a batch whose other rows' tokens do
    exitable = jnp.ones((B, T), bool).at[1].set(False)
    mixed = _run(stack, decided, tokens.Compacted(BUCKETS), exitable_BxT=exitable)
    assert np.all(np.asarray(mixed.exit_BxT[1]) == E - 1) and np.any(np.asarray(mixed.exit_BxT[0]) < E - 1)
    _close(mixed.h[1], plain_h[1])
    _close(mixed.out.logits_BxQxC[1], plain[1])


def test_freeze_mode(stack, decided):
    layers, heads, h0 = stack
    f = _run(stack, decided, tokens.Masked(), mode="freeze")
    sc = tokens.scan(layers, heads, h0, PROGRAM, f.exit_BxT, mode="freeze")
    _close(sc.h, f.h, 1e-6)
    np.testing.assert_array_equal(np.asarray(tokens.replay(decided, sc, f.exit_BxT, PROGRAM, mode="freeze")),
                                  np.asarray(f.exit_BxT))
    assert np.all(np.asarray(f.keys_SxB) == T)            # frozen tokens stay keys
    d = _run(stack, decided, tokens.Masked())
    assert not np.allclose(np.asarray(d.h), np.asarray(f.h))   # dropping them changes the others
    with pytest.raises(ValueError, match="freeze"):
        _run(stack, decided, tokens.Compacted(BUCKETS), mode="freeze")


def test_top_k_per_class_against_sort():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 4, (4, 20)).astype(np.float32) / 4     # many ties
    cls = rng.integers(0, 3, (4, 20))
    fire = rng.random((4, 20)) < 0.7
    pos = np.stack([rng.permutation(20) for _ in range(4)])
    got = np.asarray(tokens.top_k_per_class(jnp.asarray(score), jnp.asarray(cls), jnp.asarray(fire),
                                            jnp.asarray(pos), 2))
    want = np.zeros_like(fire)
    for b in range(4):
        for c in range(3):
            idx = np.flatnonzero(fire[b] & (cls[b] == c))
            order = sorted(idx, key=lambda i: (-score[b, i], pos[b, i]))
            want[b, order[:2]] = True
    np.testing.assert_array_equal(got, want)


def test_flop_accounting():
    d, f, h = 16, 32, 2
    assert costs.token_layer_flops(T, T, d, f, h) == costs.transformer_layer_flops(T, d, f, h)
    # freeze: 5 updated tokens attending to 12 cost less than 12 updated, more than 5 alone
    assert costs.token_layer_flops(5, 5, d, f, h) < costs.token_layer_flops(5, T, d, f, h) < \
        costs.token_layer_flops(T, T, d, f, h)
    q = np.array([[12, 12], [12, 12], [4, 7], [4, 7]])
    np.testing.assert_allclose(costs.token_exit_flops(q, q, d, f, h),
                               [2 * costs.transformer_layer_flops(12, d, f, h)
                                + 2 * costs.transformer_layer_flops(n, d, f, h) for n in (4, 7)])


def test_host_stops(stack, decided):
    compacted = hlo.profile(jax.jit(lambda h: _run(stack, decided, tokens.Compacted(BUCKETS), h)), stack[2])
    masked = hlo.profile(jax.jit(lambda h: _run(stack, decided, tokens.Masked(), h)), stack[2])
    assert compacted.unknown_whiles == 0 and masked.unknown_whiles == 0
    assert compacted.host_stops() == E - 1       # one bucket switch per segment after the first
    assert masked.host_stops() == 0


def _table_gate(exit_layer_B):
    """Gate heads that fire at exit ``exit_layer_B[b]`` for row b."""
    def make(e):
        return lambda h, view: tokens.GateOut(jnp.broadcast_to(
            jnp.where(jnp.asarray(exit_layer_B) == e, 1.0, -1.0)[:, None], view.pos_BxQ.shape))
    return make


def test_group_exit(stack):
    layers, _, h0 = stack
    program = engine.prefix(N, range(N))
    k_B = np.array([1, 4, 2])
    heads = [_table_gate(k_B)(e) for e in range(N)]
    group = np.zeros((B, T), bool)
    group[0, 2:7], group[1, 5:11], group[2, 0:4] = True, True, True          # per-row positions
    valid = np.ones((B, T), bool)
    valid[2, 10:] = False
    kw = dict(valid_BxT=valid, exitable_BxT=group, layer_fn=tokens.block_layer_fn(causal=True))
    pol = tokens.group_gate(0.0, N)
    m = tokens.run(layers, heads, h0, program, pol, tokens.Masked(), **kw)
    c = tokens.run(layers, heads, h0, program, pol, tokens.Compacted((4, 8, 12)), **kw)
    want = np.where(valid, np.where(group, k_B[:, None], N - 1), -1)
    np.testing.assert_array_equal(np.asarray(m.exit_BxT), want)
    np.testing.assert_array_equal(np.asarray(c.exit_BxT), want)
    _close(m.h[valid], c.h[valid])
    sc = tokens.scan(layers, heads, h0, program, want, exitable_BxT=group, layer_fn=tokens.block_layer_fn(True))
    _close(sc.h[valid], m.h[valid], 1e-6)


# ------------------------------------------------------------------------------------------------ toy VLM

VCFG = vlm.VLMConfig(patch_size=14, d_model=16, depth=3, num_heads=2, mlp_dim=32, max_len=16)


@pytest.fixture(scope="module")
def toy_vlm():
    ds = vision.load_embedded_mnist()
    q = composed.digit_questions(ds.subset(np.arange(200), "test"), 4, seed=3, patch=14)
    model = vlm.ToyVLM(VCFG, rngs=nnx.Rngs(4))
    images = jnp.asarray(q.images_NxHxWx1, jnp.float32) / 255.0
    return model, images, q


def test_questions_lay_out_image_tokens_per_row(toy_vlm):
    _, _, q = toy_vlm
    first_img = (q.tokens_NxT == composed.IMG).argmax(1)
    assert len(set(first_img.tolist())) > 1                      # image positions differ between rows
    assert np.all((q.tokens_NxT == composed.IMG).sum(1) == VCFG.num_patches)
    assert np.all(q.tokens_NxT[np.arange(4), q.length_N - 1] == composed.QMARK)


def test_vlm_cache_decode_equals_teacher_forced(toy_vlm):
    model, images, q = toy_vlm
    b, t = q.tokens_NxT.shape
    x = model.inputs(images, jnp.asarray(q.tokens_NxT))
    k_B = np.array([0, 2, 1, 0])
    heads = [_table_gate(k_B)(e) for e in range(VCFG.depth)]
    cache = token_cache.empty(VCFG.depth, b, t + 2, VCFG.num_heads, VCFG.d_model // VCFG.num_heads)
    out = tokens.run(model.layers, heads, x.h_BxTxD, VCFG.program, tokens.group_gate(0.0, VCFG.depth),
                     tokens.Compacted((8, 16)), layer_fn=token_cache.prefill_layer_fn, valid_BxT=x.valid_BxT,
                     exitable_BxT=x.image_BxT, aux=cache)
    np.testing.assert_array_equal(np.asarray(vlm.exit_layer_of(out, x.image_BxT)), k_B)
    cache = out.aux
    # decode two more tokens; the reference runs the whole longer sequence teacher-forced
    new = np.array([[composed.DIGIT0 + 1, composed.YES], [composed.NO, composed.LEFT], [composed.SUM, 5], [6, 7]])
    longer = np.full((b, t + 2), composed.PAD, np.int32)
    longer[:, :t] = q.tokens_NxT
    pos = np.asarray(q.length_N)
    logits = []
    for i in range(2):
        longer[np.arange(b), pos + i] = new[:, i]
        lg, cache = model.decode_step(jnp.asarray(new[:, i]), jnp.asarray(pos + i), cache)
        logits.append(lg)
    xl = model.inputs(images, jnp.asarray(longer))
    ref = model.scan(xl, jnp.asarray(k_B))
    for i in range(2):
        _close(logits[i], model.answer_logits(ref.h, jnp.asarray(pos + i)), 1e-4)
    # the prefill's own answer equals the teacher-forced one on the prompt
    ref0 = model.scan(x, jnp.asarray(k_B))
    _close(model.answer_logits(out.h, x.last_B), model.answer_logits(ref0.h, x.last_B), 1e-4)
    # the cache holds the image keys exactly in the layers that ran them
    img = np.asarray(x.image_BxT)
    vis = np.asarray(cache.visible_NxBxS)[:, :, :t]
    for l in range(VCFG.depth):
        np.testing.assert_array_equal(vis[l][img], np.repeat(l <= k_B, img.sum(1)))


def _router_outs(model, x, sched, ref):
    """Every layer's router scores on a teacher-forced run under schedule ``sched`` (``E x B x T``)."""
    t = x.h_BxTxD.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), x.valid_BxT.shape)
    query_S, key_S = tokens.schedule_masks(sched, VCFG.program)
    heads = model.gate_heads()
    outs = [heads[l](ref.out_E[l], tokens.TokenView(pos, query_S[l], key_S[l], x.image_BxT))
            for l in range(VCFG.depth)]
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)


def test_vlm_routers_per_row(toy_vlm):
    model, images, q = toy_vlm
    x = model.inputs(images, jnp.asarray(q.tokens_NxT))
    full = model.scan(x)
    sched_full = model.schedule(x, jnp.full((4,), VCFG.depth - 1))
    s0 = np.sort(np.asarray(_router_outs(model, x, sched_full, full).gate_BxQ[0, :, 0]))
    i = int(np.argmax(np.diff(s0)))
    thr = float(s0[i] + s0[i + 1]) / 2                 # rows on both sides of the first router's threshold
    out = model.visual_exit(x, thr, tokens.Compacted((8, 16)))
    k_B = np.asarray(vlm.exit_layer_of(out, x.image_BxT))
    assert len(set(k_B.tolist())) > 1, k_B
    sched = model.schedule(x, jnp.asarray(k_B))
    ref = model.scan(x, jnp.asarray(k_B))
    routed = _router_outs(model, x, sched, ref)
    live = np.arange(VCFG.depth)[:, None] <= k_B[None]          # routers that decided something
    assert np.min(np.abs(np.asarray(routed.gate_BxQ[:, :, 0]) - thr)[live]) > MARGIN
    np.testing.assert_array_equal(
        np.asarray(tokens.replay(tokens.group_gate(thr, VCFG.depth), tokens.TokenScan(routed, ref.h), sched,
                                 VCFG.program, exitable_BxT=x.image_BxT)), np.asarray(sched))
    _close(model.answer_logits(out.h, x.last_B), model.answer_logits(ref.h, x.last_B))
    for b in range(len(k_B)):
        xb = model.inputs(images[b:b + 1], jnp.asarray(q.tokens_NxT[b:b + 1]))
        alone = model.visual_exit(xb, thr, tokens.Compacted((8, 16)))
        assert int(vlm.exit_layer_of(alone, xb.image_BxT)[0]) == k_B[b]
        _close(model.answer_logits(alone.h, xb.last_B)[0], model.answer_logits(out.h, x.last_B)[b])


# ------------------------------------------------------------------------------------------------ data, SegViT


def test_digit_canvases():
    ds = vision.load_embedded_mnist().subset(np.arange(300), "test")
    cv = composed.digit_canvases(ds, 40, seed=0)
    again = composed.digit_canvases(ds, 40, seed=0)
    np.testing.assert_array_equal(cv.images_NxHxWx1, again.images_NxHxWx1)
    ink = cv.images_NxHxWx1[..., 0] >= composed.INK
    assert np.all((cv.labels_NxHxW != cv.background) == ink)        # labelled exactly where a stroke is
    bg = (cv.labels_NxHxW == cv.background).mean((1, 2))
    assert bg[cv.digits_N == 2].mean() > bg[cv.digits_N == 4].mean()
    toy = np.full((1, 8, 8), 10, np.uint8)
    toy[0, :4, :4] = 3           # a full patch of class 3
    toy[0, 4:, 4:][:1, :3] = 7   # 3 of 16 pixels: below a quarter, background
    np.testing.assert_array_equal(composed.patch_labels(toy, 4, 10), [[3, 10, 10, 10]])


def test_segvit_paths_and_costs():
    cfg = segvit.SegViTConfig(image_size=16, patch_size=4, d_model=16, depth=4, num_heads=2, mlp_dim=32,
                              exits=(1, 3))
    model = segvit.SegViT(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    logits = model.all_exits(x)
    assert logits.shape == (2, 2, cfg.tokens, cfg.num_classes)
    out = model.token_exit(x, tokens.confidence(0.0, 2))       # every token leaves at the first head
    _close(out.out.logits_BxQxC, logits[0], 1e-5)
    np.testing.assert_allclose(segvit.run_flops(cfg, out.queries_SxB, out.keys_SxB), segvit.static_flops(cfg, 0))
    never = model.token_exit(x, tokens.confidence(np.inf, 2), tokens.Compacted())
    _close(never.out.logits_BxQxC, logits[1], 1e-4)
    np.testing.assert_allclose(segvit.run_flops(cfg, never.queries_SxB, never.keys_SxB),
                               segvit.static_flops(cfg, 1) + cfg.tokens * segvit.head_flops(cfg))


def test_miou_and_paired_bootstrap():
    label = np.array([[0, 0, 1, 2], [2, 2, 1, 0]])
    pred = np.array([[0, 1, 1, 2], [2, 2, 2, 0]])
    conf = segmentation.confusion_matrices(pred, label, 3)
    assert conf.shape == (2, 3, 3) and conf.sum() == 8
    # class 0: TP 2, FP 0, FN 1 -> 2/3; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 3, FP 1, FN 0 -> 3/4
    np.testing.assert_allclose(segmentation.iou_per_class(conf.sum(0)), [2 / 3, 1 / 3, 3 / 4])
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.8).astype(float)
    b = np.where(rng.random(400) < 0.9, a, 1 - a)
    d = paired.mean_difference(a, b, resamples=500)
    assert d.lo <= d.diff <= d.hi and d.diff == pytest.approx(a.mean() - b.mean())
    same = paired.mean_difference(a, a, resamples=200)
    assert same.diff == 0 and not same.separated
