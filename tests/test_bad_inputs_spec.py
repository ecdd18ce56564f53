"""Bad arguments to the speculative family (speculative, kangaroo, specee, jacobi, exit_training's inference half)
raise one ValueError naming the argument, before any work (issue 23, item 9): nothing is clamped, nothing compiles a
program the size of a wrong number."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import exit_training, jacobi, kangaroo, kv as kv_lib, specee, speculative
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=23, d_model=16, depth=4, num_heads=2, num_kv_heads=1, mlp_dim=16, exits="all")


@pytest.fixture(scope="module")
def m():
    gd, params = lm.build(CFG, 0)
    model = nnx.merge(gd, params)
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts([[1, 2, 3], [4, 5]]))
    return model, prompt, lengths, kangaroo.init_adapter(model, 1)


def _spec(**kw):
    return lambda m: speculative.self_speculative(m[0], m[1], m[2], kw.pop("num_new", 6), **kw)


def _kangaroo(**kw):
    args = dict(exit_layer=1, gamma=2, num_new=6)
    args.update(kw)
    n = args.pop("num_new")
    return lambda m: kangaroo.kangaroo(m[0], m[3], m[1], m[2], n, **args)


def _specee(k=3, schedule=(1, 2), threshold=0.5, pred_k=None, pred_n=None):
    def f(m):
        pred = specee.init_predictors(jax.random.key(0), len(schedule) if pred_n is None else pred_n,
                                      k if pred_k is None else pred_k)
        return specee.decode(m[0], m[3], m[1], m[2], 5, exit_layer=1, pred=pred, schedule=schedule, k=k,
                             threshold=threshold)
    return f


def _jacobi(num_new=8, block=4, **kw):
    return lambda m: jacobi.jacobi_decode(m[0], m[1], m[2], num_new, block=block, **kw)


CASES = {
    # self-speculative (static drafts)
    "k 0": (_spec(draft_exit=1, k=0), "k=0"),
    "k float": (_spec(draft_exit=1, k=2.5), "k=2.5"),
    "draft exit is the last exit": (_spec(draft_exit=3, k=2), "draft_exit=3"),
    "draft exit negative": (_spec(draft_exit=-1, k=2), "draft_exit=-1"),
    "draft exit beyond depth": (_spec(draft_exit=9, k=2), "draft_exit=9"),
    "draft exit and drafter": (_spec(draft_exit=1, k=2, drafter=speculative.static(1, 2)), "not both"),
    "num_new 0": (_spec(draft_exit=1, k=2, num_new=0), "num_new=0"),
    "k longer than num_new": (_spec(draft_exit=1, k=50), "up to 50 tokens"),
    "lengths past the prompt": (lambda m: speculative.self_speculative(m[0], m[1], jnp.asarray([3, 4]), 6,
                                                                       draft_exit=1, k=2), "lengths_B"),
    "lengths zero": (lambda m: speculative.self_speculative(m[0], m[1], jnp.asarray([0, 2]), 6, draft_exit=1, k=2),
                     "lengths_B"),
    "lengths shape": (lambda m: speculative.self_speculative(m[0], m[1], jnp.asarray([3]), 6, draft_exit=1, k=2),
                      "lengths_B"),
    "prompt ids outside the vocabulary": (lambda m: speculative.self_speculative(
        m[0], m[1] + 30, m[2], 6, draft_exit=1, k=2), "prompt_BxP"),
    # DEL
    "DEL candidate is the last exit": (lambda m: speculative.dynamic(CFG, [0, 3], 2), "candidates"),
    "DEL duplicate candidates": (lambda m: speculative.dynamic(CFG, [1, 1], 2), "candidates"),
    "DEL max_k 0": (lambda m: speculative.dynamic(CFG, [0, 1], 0), "max_k=0"),
    "DEL decay 1": (lambda m: speculative.dynamic(CFG, [0, 1], 2, decay=1.0), "decay=1.0"),
    "DEL alpha0 above 1": (lambda m: speculative.dynamic(CFG, [0, 1], 2, alpha0=1.5), "alpha0"),
    "DEL alpha0 per candidate": (lambda m: speculative.dynamic(CFG, [0, 1], 2, alpha0=[0.5, 0.5, 0.5]), "alpha0"),
    "DEL max_k longer than num_new": (lambda m: speculative.self_speculative(
        m[0], m[1], m[2], 3, drafter=speculative.dynamic(CFG, [0, 1], 5)), "up to 5 tokens"),
    "DEL drafter of another model": (lambda m: speculative.self_speculative(
        m[0], m[1], m[2], 6, drafter=speculative.dynamic(lm.LMConfig(**{**CFG.__dict__, "depth": 6}), [0, 1], 2)),
        "drafter built for"),
    "draft step of the last exit": (lambda m: speculative.draft_step(m[0], m[1][:, 0], None, 3), "draft_exit=3"),
    # Kangaroo
    "gamma 100000": (_kangaroo(gamma=100000), "gamma=100000"),
    "gamma 0": (_kangaroo(gamma=0), "gamma=0"),
    "gamma float": (_kangaroo(gamma=2.5), "gamma=2.5"),
    "eta above 1": (_kangaroo(eta=1.5), "eta=1.5"),
    "eta negative": (_kangaroo(eta=-0.1), "eta=-0.1"),
    "exit_layer 0": (_kangaroo(exit_layer=0), "exit_layer=0"),
    "exit_layer at depth": (_kangaroo(exit_layer=4), "exit_layer=4"),
    "kangaroo num_new 0": (_kangaroo(num_new=0), "num_new=0"),
    "kangaroo lengths past the prompt": (lambda m: kangaroo.kangaroo(m[0], m[3], m[1], jnp.asarray([9, 1]), 6,
                                                                     exit_layer=1, gamma=2), "lengths_B"),
    # SpecEE
    "specee k 0": (_specee(k=0, pred_k=1), "k=0"),
    "specee k above the vocabulary": (_specee(k=30), "k=30"),
    "specee threshold 1.5": (_specee(threshold=1.5), "threshold=1.5"),
    "specee schedule names the last layer": (_specee(schedule=(1, 3)), "schedule"),
    "specee schedule not increasing": (_specee(schedule=(2, 1)), "schedule"),
    "specee predictors for another schedule": (_specee(pred_n=3), "predictors"),
    "specee predictors for another k": (_specee(pred_k=4), "pred reads"),
    # Jacobi
    "jacobi block 0": (_jacobi(block=0), "block=0"),
    "jacobi num_new not a multiple": (_jacobi(num_new=6), "multiple"),
    "jacobi tol below -1": (_jacobi(tol=-2), "tol=-2"),
    "jacobi max_iters 0": (_jacobi(max_iters=0), "max_iters=0"),
    "jacobi lengths past the prompt": (lambda m: jacobi.jacobi_decode(m[0], m[1], jnp.asarray([3, 7]), 8, block=4),
                                       "lengths_B"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_the_argument_named(m, case):
    fn, match = CASES[case]
    with pytest.raises(ValueError, match=match):
        fn(m)


def test_gamma_is_bounded_before_any_work(m, monkeypatch):
    """``gamma=100000`` for 6 tokens once compiled 100000 verify branches (4.7 GB, > 400 s): refused before the
    draft model is even built."""
    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(kangaroo, "make_draft", no_work)
    monkeypatch.setattr(kv_lib, "prefill", no_work)
    with pytest.raises(ValueError, match="gamma=100000"):
        _kangaroo(gamma=100000)(m)
    with pytest.raises(ValueError, match="up to 50 tokens"):
        _spec(draft_exit=1, k=50)(m)


def test_exit_training_inference_half(m):
    model = m[0]
    gd, params = nnx.split(model)
    windows = np.zeros((4, 5), np.int32)
    with pytest.raises(ValueError, match="batch=0"):
        exit_training.cache_features(gd, params, windows, 0)
    with pytest.raises(ValueError, match="windows_WxT1"):
        exit_training.cache_features(gd, params, windows.astype(np.float32), 2)
    with pytest.raises(ValueError, match="windows_WxT1"):
        exit_training.cache_features(gd, params, windows, 8)
    with pytest.raises(ValueError, match="rank=-1"):
        exit_training.init_exit_params(model, rank=-1)
    cache = exit_training.FeatureCache(np.zeros((3, 8, 16), np.float32), np.zeros((8, 16), np.float32),
                                       np.zeros((8,), np.int32))
    p = exit_training.init_exit_params(model)
    with pytest.raises(ValueError, match="batch_tokens=0"):
        exit_training.evaluate_exits(gd, params, cache, p, 0)
    with pytest.raises(ValueError, match="max_tokens=-1"):
        exit_training.evaluate_exits(gd, params, cache, p, 4, -1)
