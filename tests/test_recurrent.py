"""The Mamba LM, the DYNAMAX exit classifiers and early-exit decoding with a per-row recurrent state on the engine.

Decoding invariants: prefill + full-depth steps equal the teacher-forced forward; every row exiting at exit e equals
the static truncated model at e; per-row exits in a batch equal running each row alone; the state of skipped layers
follows a plain per-layer reference of each mode (propagate / freeze).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import recurrent as rec
from eejax.decoding.per_token import static_thresholds
from eejax.exits import confidence as conf_lib
from eejax.exits import costs, losses
from eejax.models import exit_classifier as ec
from eejax.models import lm, mamba_lm

V = 17
# A 4-layer float32 chain of width 16 (the scan in float32): decode and the parallel forward differ by summation
# order only, ~1e-7 relative per op; log-probs are O(3), so 1e-4 absolute is ample and still catches any real
# mismatch (a wrong state moves log-probs by >1e-2).
ATOL = 1e-4
CFG = mamba_lm.MambaConfig(vocab_size=V, d_model=16, depth=4, d_state=4, exits="from:1")


@functools.lru_cache(maxsize=None)
def _mamba(kind="mamba"):
    gd, params = mamba_lm.build(CFG, 0)
    cgd, cparams = ec.build(ec.ClassifierConfig(kind, 16, CFG.num_exits, hidden=8), 1)
    return nnx.merge(gd, params), nnx.merge(cgd, cparams)


def _tokens(b=3, t=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def _decode(model, clf, step, prompt, force):
    return jax.jit(lambda p, f: rec.generate(model, p, jnp.full((p.shape[0],), p.shape[1]), f.shape[1], step,
                                             classifiers=clf, force_BxG=f))(prompt, force)


@functools.lru_cache(maxsize=None)
def _exit_decoder(backbone: str, kind: str, mode: str, measure: str, executor: str = "unrolled"):
    """One jitted teacher-forced exit decoder per setting; the per-exit thresholds ``float[E]`` are traced, so a
    sweep compiles once per batch shape."""
    model, clf = _mamba(kind) if backbone == "mamba" else _transformer(kind)
    meas = conf_lib.get_measure(measure)

    def f(thr_E, prompt, force):
        step = lambda m, t, s, i: rec.exit_step(m, t, s, i, thr_E, measure=meas, mode=mode,  # noqa: E731
                                                classifiers=clf, executor=executor)
        return rec.generate(model, prompt, jnp.full((prompt.shape[0],), prompt.shape[1]), force.shape[1], step,
                            classifiers=clf, force_BxG=force)

    jitted = jax.jit(f)
    return lambda thr, p, fc: jitted(jnp.broadcast_to(jnp.asarray(thr, jnp.float32), (model.cfg.num_exits,)), p,
                                     fc)


TCFG = lm.LMConfig(vocab_size=V, d_model=16, depth=4, num_heads=2, num_kv_heads=1, mlp_dim=32, exits="from:1")


@functools.lru_cache(maxsize=None)
def _transformer(kind="mamba"):
    clf = nnx.merge(*ec.build(ec.ClassifierConfig(kind, 16, TCFG.num_exits, hidden=8), 2))
    return nnx.merge(*lm.build(TCFG, 0)), clf


def _ref_logprob(logits_BxTxV, toks, p):
    """Log-prob of tokens p.. under the teacher-forced logits at positions p-1.."""
    logp = jax.nn.log_softmax(logits_BxTxV, -1)
    return jnp.take_along_axis(logp[:, p - 1:-1], toks[:, p:, None], -1)[..., 0]


def test_mamba_lm_shapes_causality_and_heads():
    model, _ = _mamba()
    toks = _tokens()
    out = model.all_exits(toks)
    assert out.logits_ExBxTxV.shape == (CFG.num_exits, 3, 12, V)
    out2 = model.all_exits(toks.at[:, -1].set((toks[:, -1] + 1) % V))
    np.testing.assert_allclose(out2.logits_ExBxTxV[:, :, :-1], out.logits_ExBxTxV[:, :, :-1], atol=1e-5)
    h_BxD = out.hidden_ExBxTxD[0, :, 5]
    exit_B = jnp.asarray([0, 2, 1])
    taken = jax.jit(model.taken_logits)(h_BxD, exit_B)
    for b, e in enumerate([0, 2, 1]):
        np.testing.assert_allclose(taken[b], model.exit_logits(h_BxD[b], e), atol=1e-5)
        np.testing.assert_allclose(jax.jit(model.exit_logits)(h_BxD, jnp.int32(e)), model.exit_logits(h_BxD, e),
                                   atol=1e-5)
    gd, params = mamba_lm.build(CFG, 0)
    assert mamba_lm.param_count(params) == (CFG.depth * CFG.layer_params() + V * 16 + 16 * CFG.num_exits)
    with pytest.raises(ValueError, match="d_state"):
        mamba_lm.MambaConfig(d_state=0)


def test_full_depth_decode_equals_forward_and_static_exit_equals_truncated_model():
    model, clf = _mamba()
    toks = _tokens()
    full = model.all_exits(toks)
    g = _decode(model, clf, functools.partial(rec.full_step, classifiers=clf), toks[:, :5], toks[:, 5:])
    np.testing.assert_allclose(g.logprob_BxG, _ref_logprob(full.logits_ExBxTxV[-1], toks, 5), atol=ATOL)
    # Every row leaves at exit e (thresholds -inf there, +inf before): the static truncated model at exit e. Every
    # mode gives the same, because the layers above e never feed a later token.
    for mode in ("propagate", "freeze"):
        run = _exit_decoder("mamba", "mamba", mode, "max_softmax")
        for e in range(CFG.num_exits):
            g = run(static_thresholds(CFG.num_exits, e), toks[:, :5], toks[:, 5:])
            assert (np.asarray(g.exit_layer_BxG[:, 1:]) == CFG.exit_layers[e]).all()
            np.testing.assert_allclose(g.logprob_BxG[:, 1:], _ref_logprob(full.logits_ExBxTxV[e], toks, 6),
                                       atol=ATOL)


def _gap_threshold(scores):
    """A threshold in the widest gap between observed scores between their 0.2 and 0.8 quantiles, and its
    margin (half the gap)."""
    s = np.sort(np.unique(np.asarray(scores).ravel()))
    s = s[(s > np.quantile(s, 0.2)) & (s < np.quantile(s, 0.8))]
    i = int(np.argmax(np.diff(s)))
    return float((s[i] + s[i + 1]) / 2), float((s[i + 1] - s[i]) / 2)


@pytest.mark.parametrize("backbone,mode,measure", [
    ("mamba", "propagate", "learned"), ("mamba", "freeze", "learned"), ("mamba", "oracle", "learned"),
    ("mamba", "propagate", "max_softmax"), ("transformer", "propagate", "learned")])
def test_per_row_exits_in_a_batch_equal_each_row_alone(backbone, mode, measure):
    toks = _tokens(seed=1)
    run = _exit_decoder(backbone, "mamba", mode, measure)
    num_exits = (CFG if backbone == "mamba" else TCFG).num_exits
    # Each early exit's scores (every row forced to leave there) place the threshold in a gap between them.
    scores = []
    for e in range(num_exits - 1):
        thr = jnp.full((num_exits,), jnp.inf).at[e].set(-jnp.inf)
        scores.append(np.asarray(run(thr, toks[:, :5], toks[:, 5:]).score_BxG[:, 1:]))
    thr, margin = _gap_threshold(np.concatenate(scores))
    assert margin > 1e-4    # every decision is clear of float noise
    batch = run(thr, toks[:, :5], toks[:, 5:])
    layers = np.asarray(batch.exit_layer_BxG[:, 1:])
    assert len(np.unique(layers)) > 1   # rows leave at different layers
    for b in range(3):
        alone = run(thr, toks[b:b + 1, :5], toks[b:b + 1, 5:])   # one compile for batch 1, reused
        np.testing.assert_array_equal(alone.exit_layer_BxG[0], batch.exit_layer_BxG[b])
        np.testing.assert_allclose(alone.logprob_BxG[0], batch.logprob_BxG[b], atol=ATOL)


@pytest.mark.parametrize("backbone,mode", [("mamba", "propagate"), ("mamba", "freeze"),
                                           ("transformer", "propagate")])
def test_unrolled_executor_equals_the_masked_loop(backbone, mode):
    """The default executor (one cond per decision, the stop branch filling the skipped layers' states over a
    static range) and the masked while loop (a traced fill after it) give the same exits, log-probs and states."""
    toks = _tokens(seed=3)
    num_exits = (CFG if backbone == "mamba" else TCFG).num_exits
    runs = {ex: _exit_decoder(backbone, "mamba", mode, "learned", ex) for ex in rec.EXECUTORS}
    scores = np.concatenate([np.asarray(runs["masked"](jnp.full((num_exits,), jnp.inf).at[e].set(-jnp.inf),
                                                       toks[:, :5], toks[:, 5:]).score_BxG[:, 1:])
                             for e in range(num_exits - 1)])
    thr, margin = _gap_threshold(scores)
    assert margin > 1e-4    # every decision is clear of float noise
    out = {ex: run(thr, toks[:, :5], toks[:, 5:]) for ex, run in runs.items()}
    assert len(np.unique(np.asarray(out["masked"].exit_layer_BxG[:, 1:]))) > 1
    np.testing.assert_array_equal(out["unrolled"].exit_layer_BxG, out["masked"].exit_layer_BxG)
    np.testing.assert_allclose(out["unrolled"].logprob_BxG, out["masked"].logprob_BxG, atol=ATOL)


def test_unrolled_decode_step_stops_at_most_once_per_decision():
    """GPU cost, read from the compiled step on CPU (``eejax.exits.hlo``): no data-dependent loop and at most one
    conditional per exit decision (E - 1), against the masked loop's while over exits and traced fill loop."""
    from eejax.exits import hlo   # noqa: PLC0415

    model, clf = _mamba()
    toks = _tokens(b=2, t=6, seed=4)
    _, state = rec.prefill(model, toks, jnp.full((2,), 6), 8, classifiers=clf)
    stops = {}
    for ex in rec.EXECUTORS:
        prof = hlo.profile(lambda tok, st, ex=ex: rec.exit_step(model, tok, st, 0, 0.5, measure=conf_lib.learned,
                                                                 classifiers=clf, executor=ex)[0],
                           toks[:, -1], state)
        stops[ex] = (prof.unknown_whiles, prof.host_stops(trips=(CFG.num_exits, CFG.depth)))
    assert stops["unrolled"][0] == 0 and 0 < stops["unrolled"][1] <= CFG.num_exits - 1, stops
    assert stops["masked"][1] > CFG.num_exits - 1, stops


def _reference_decode(model, clf, prompt_P, force_G, exit_layer_G, mode):
    """One row, token by token, layer by layer in plain Python: rows run layers 0..k of their exit layer k; every
    layer above k advances its state with the frozen exit state as input (propagate) or keeps it (freeze); the
    exit classifiers alike. Returns the log-probs of force_G[1:]."""
    cfg = model.cfg
    layers = [rec.layer_at(model.layers, l) for l in range(cfg.depth)]
    clfs = [clf.at(e) for e in range(cfg.num_exits - 1)]
    states = [jax.tree.map(lambda s, l=l: s[l], model.empty_state(1)) for l in range(cfg.depth)]
    gstates = [jax.tree.map(lambda s, e=e: s[e], clf.empty_state(1)) for e in range(cfg.num_exits - 1)]
    exit_of = list(cfg.exit_of_layer)

    def token(tok, k):   # states / gstates are updated in place
        h = model.embed_tokens(jnp.asarray([tok]))
        frozen = None
        for l in range(cfg.depth):
            e = exit_of[l]
            if l <= k:
                h, states[l] = layers[l].step(h, states[l])
                if 0 <= e < cfg.num_exits - 1:
                    _, gstates[e] = clfs[e].step(h, gstates[e])
                if l == k:
                    frozen = h
            elif mode == "propagate":
                _, states[l] = layers[l].step(frozen, states[l])
                if 0 <= e < cfg.num_exits - 1:
                    _, gstates[e] = clfs[e].step(frozen, gstates[e])
        return model.exit_logits(frozen, exit_of[k])[0]

    for tok in prompt_P:
        token(int(tok), cfg.depth - 1)
    out = []
    for g in range(1, len(force_G)):
        logits = token(int(force_G[g - 1]), int(exit_layer_G[g]))
        out.append(float(jax.nn.log_softmax(logits)[int(force_G[g])]))
    return np.asarray(out)


@pytest.mark.parametrize("mode", ["propagate", "freeze"])
def test_skipped_layer_state_follows_the_plain_reference(mode):
    model, clf = _mamba()
    toks = _tokens(b=2, t=10, seed=2)
    g = _exit_decoder("mamba", "mamba", mode, "learned")(0.5, toks[:, :4], toks[:, 4:])
    layers = np.asarray(g.exit_layer_BxG[:, 1:])
    assert len(np.unique(layers)) > 1
    for b in range(2):
        ref = _reference_decode(model, clf, np.asarray(toks[b, :4]), np.asarray(toks[b, 4:]),
                                np.asarray(g.exit_layer_BxG[b]), mode)
        np.testing.assert_allclose(g.logprob_BxG[b, 1:], ref, atol=ATOL)


def test_modes_differ_and_freeze_refused_for_kv():
    model, _ = _mamba()
    toks = _tokens(seed=1)
    lp = {mode: np.asarray(_exit_decoder("mamba", "mamba", mode, "learned")(0.5, toks[:, :5], toks[:, 5:])
                           .logprob_BxG) for mode in rec.STATE_MODES}
    assert not np.allclose(lp["propagate"], lp["freeze"], atol=1e-3)
    with pytest.raises(ValueError, match="freeze"):
        rec.check_mode(_transformer()[0], "freeze")
    with pytest.raises(ValueError, match="mode"):
        rec.check_mode(model, "stale")


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_gates_while_decoding_equal_the_parallel_classifier(backbone):
    """A stateful (Mamba) classifier's gate at an exit, decoded token by token through the engine, equals the
    classifier run over the teacher-forced hidden states by its parallel scan; on the KV transformer full-depth
    decoding with classifiers attached still equals its forward."""
    model, clf = _transformer() if backbone == "transformer" else _mamba()
    toks = _tokens(seed=4)
    full = model.all_exits(toks)
    if backbone == "transformer":
        g = _decode(model, clf, functools.partial(rec.full_step, classifiers=clf), toks[:, :5], toks[:, 5:])
        np.testing.assert_allclose(g.logprob_BxG, _ref_logprob(full.logits_ExBxTxV[-1], toks, 5), atol=ATOL)
    gates, _ = clf.gates(full.hidden_ExBxTxD)
    run = _exit_decoder(backbone, "mamba", "oracle", "learned")
    for e in range(model.cfg.num_exits - 1):
        d = run(jnp.full((model.cfg.num_exits,), jnp.inf).at[e].set(-jnp.inf), toks[:, :5], toks[:, 5:])
        np.testing.assert_allclose(d.score_BxG[:, 1:], jax.nn.sigmoid(gates[e, :, 5:-1]), atol=1e-5)


def test_classifier_budget_labels_and_loss():
    for kind in ("mlp", "mamba"):
        h = ec.hidden_for_budget(kind, 32, 1000)
        c = ec.ClassifierConfig(kind, 32, 3, hidden=h)
        count = sum(x.size for x in jax.tree.leaves(nnx.eval_shape(lambda c=c: ec.ExitClassifier(c, rngs=nnx.Rngs(0)))))
        assert count == c.params_each()
        assert abs(count - 1000) <= abs(ec.ClassifierConfig(kind, 32, 3, hidden=h + 1).params_each() - 1000)
    assert ec.ClassifierConfig("linear", 32, 3).params_each() == 33
    logits = jnp.asarray([[[[0.0, 1.0, 2.0]]], [[[2.0, 1.0, 0.0]]], [[[0.0, 2.0, 1.5]]]])   # E=3, B=T=1, V=3
    np.testing.assert_array_equal(ec.relaxed_labels(logits, 1)[:, 0, 0], [0.0, 0.0])
    np.testing.assert_array_equal(ec.relaxed_labels(logits, 2)[:, 0, 0], [1.0, 0.0])
    np.testing.assert_allclose(losses.exit_weights([3, 4, 5], "decaying"), [0.5, 1 / 3, 1 / 6])
    # The classifier loss trains the classifiers only, the mamba kind through its scan.
    model, clf = _mamba()
    lm_gd, lm_params = nnx.split(model)
    cgd, cparams = nnx.split(clf)
    loss_fn = ec.classifier_loss(lm_gd, lm_params, cgd, top_k=2)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, {"tokens": _tokens()}, None),
                                                        has_aux=True))(cparams)
    assert np.isfinite(loss) and 0 <= float(metrics["positive"]) <= 1
    assert float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(grads))) > 0
    # Several kinds side by side on one frozen forward: the joint loss is the sum of the single ones.
    lgd, lparams = ec.build(ec.ClassifierConfig("linear", 16, CFG.num_exits), 3)
    joint = ec.classifier_loss(lm_gd, lm_params, {"mamba": cgd, "linear": lgd}, top_k=2)
    single = ec.classifier_loss(lm_gd, lm_params, lgd, top_k=2)
    j, jm = jax.jit(lambda p: joint(p, {"tokens": _tokens()}, None))({"mamba": cparams, "linear": lparams})
    np.testing.assert_allclose(j, loss + jax.jit(lambda p: single(p, {"tokens": _tokens()}, None)[0])(lparams),
                               rtol=1e-5)
    assert {"mamba_bce", "linear_acc"} <= set(jm)


def test_distilled_lm_loss_trains_both_backbones():
    toks = _tokens(b=2, t=8)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:]}
    for gd, params, layers in (mamba_lm.build(CFG, 0) + (CFG.exit_layers,), lm.build(TCFG, 0) + (TCFG.exit_layers,)):
        loss_fn = mamba_lm.distilled_lm_loss(gd, layers)
        (loss, m), g = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None), has_aux=True))(params)
        assert float(loss) > float(m["ce_last"]) > 0 and float(m["kd_first"]) > 0
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))


def test_ssm_cost_model():
    shape = costs.ssm_shape(CFG)
    p = costs.ssm_param_counts(CFG)
    assert p["layer"] == CFG.layer_params() and 0 < p["fill"] < p["layer"]
    assert costs.greedy_counts(CFG).layers == CFG.depth and shape.d_inner == 32
    full = costs.decode_time(CFG, costs.greedy_counts(CFG), batch=1)
    half = costs.decode_time(CFG, costs.TokenCounts(layers=2, heads=1, kv_fill_layers=2), batch=1)
    frozen = costs.decode_time(CFG, costs.TokenCounts(layers=2, heads=1), batch=1)
    assert frozen.time_s < half.time_s < full.time_s
    sp = costs.predicted_speedup(CFG, costs.TokenCounts(layers=2, heads=1))
    assert sp.value > 1 and "roofline" in sp.label
    with pytest.raises(ValueError, match="verify"):
        costs.decode_work(CFG, costs.TokenCounts(layers=1, verify_passes=1))
