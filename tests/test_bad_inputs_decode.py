"""Bad inputs to the decoding API are refused with a ValueError naming the argument (issue 23 item 9), instead of
being clamped by JAX's gather semantics or decoding something else: prompt lengths, token counts, sampling
settings, thresholds an LM exit can never fire at, and the static counts of the skip decoders."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import kv as kv_lib
from eejax.decoding import layer_skip as ls
from eejax.decoding import per_token, skipdecode
from eejax.exits import confidence
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=19, d_model=16, depth=3, num_heads=2, num_kv_heads=1, mlp_dim=32)


@pytest.fixture(scope="module")
def model():
    return nnx.merge(*lm.build(CFG, 0))


PROMPT = jnp.asarray([[1, 2, 3, 4], [5, 6, 0, 0]], jnp.int32)
LENGTHS = jnp.asarray([4, 2], jnp.int32)


def _gen(model, **kw):
    args = dict(prompt_BxP=PROMPT, lengths_B=LENGTHS, num_new=3, step_fn=per_token.full_depth_step) | kw
    return per_token.generate(model, args.pop("prompt_BxP"), args.pop("lengths_B"), args.pop("num_new"),
                              args.pop("step_fn"), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(lengths_B=jnp.asarray([5, 2], jnp.int32)), r"lengths_B=\[5, 2\] must be integers in \[1, 4\]"),
    (dict(lengths_B=jnp.asarray([0, 2], jnp.int32)), r"lengths_B=\[0, 2\]"),
    (dict(lengths_B=jnp.asarray([-1, 2], jnp.int32)), r"lengths_B=\[-1, 2\]"),
    (dict(lengths_B=jnp.asarray([4], jnp.int32)), r"lengths_B has shape \(1,\)"),
    (dict(num_new=0), r"num_new=0 must be an integer >= 1"),
    (dict(num_new=-2), r"num_new=-2"),
    (dict(num_new=2.5), r"num_new=2.5"),
    (dict(temperature=-1.0), r"temperature=-1.0 must be a finite number >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan"),
    (dict(temperature=1.0, top_k=CFG.vocab_size + 1), r"top_k=20 must be an integer in \[0, 19\]"),
    (dict(top_k=-1), r"top_k=-1"),
    (dict(prompt_BxP=PROMPT[0]), r"prompt_BxP of shape \(4,\) must be B x P"),
    (dict(prompt_BxP=PROMPT.at[0, 0].set(CFG.vocab_size)), r"prompt_BxP hold ids in \[0, 19\]"),
    (dict(force_BxG=jnp.zeros((2, 2), jnp.int32)), r"force_BxG has shape \(2, 2\)"),
    (dict(force_BxG=jnp.full((2, 3), -1, jnp.int32)), r"force_BxG hold ids"),
])
def test_generate_refuses(model, kw, match):
    with pytest.raises(ValueError, match=match):
        _gen(model, **kw)


@pytest.mark.parametrize("measure,threshold,match", [
    (confidence.neg_entropy, 0.5, r"threshold=0.5 outside \[None, 0.0\]"),
    (confidence.cosine, 5.0, r"threshold=5.0 outside \[-1.0, 1.0\]"),
    (confidence.max_softmax, 1.5, r"threshold=1.5 outside \[0.0, 1.0\]"),
    (confidence.margin, -0.2, r"threshold=-0.2"),
    (confidence.learned, 2.0, r"threshold=2.0"),
    (confidence.max_softmax, float("nan"), r"threshold=nan contains NaN"),
    (confidence.max_softmax, np.asarray([0.5, 0.5]), r"threshold has shape \(2,\)"),
])
def test_exit_thresholds_that_can_never_fire_are_refused(model, measure, threshold, match):
    step = lambda m, t, s, i: per_token.exit_step(m, t, s, i, threshold, measure=measure)   # noqa: E731
    with pytest.raises(ValueError, match=match):
        _gen(model, step_fn=step)


def test_exit_thresholds_at_the_edges_are_accepted(model):
    """+-inf (never / always exit) and the range's edges are meaningful; a bad measure/head pairing is refused."""
    for measure, thr in ((confidence.neg_entropy, 0.0), (confidence.cosine, -1.0), (confidence.max_softmax, jnp.inf),
                         (confidence.max_softmax, -jnp.inf)):
        _gen(model, step_fn=lambda m, t, s, i: per_token.exit_step(m, t, s, i, thr, measure=measure))
    bad = [dict(kv="teleport"), dict(heads="some"), dict(executor="fast"),
           dict(heads="taken", measure=confidence.max_softmax)]
    for kw in bad:
        with pytest.raises(ValueError, match=next(iter(kw))):
            _gen(model, step_fn=lambda m, t, s, i: per_token.exit_step(m, t, s, i, 0.5, **kw))
    with pytest.raises(ValueError, match="exit_index=3"):
        _gen(model, step_fn=lambda m, t, s, i: per_token.forced_step(m, t, s, i, 3))


def test_static_counts_and_schedules_are_checked(model):
    with pytest.raises(ValueError, match=r"count=5 must lie in \[1, 3\]"):
        ls.table_program(jnp.arange(3), 5)
    keep = np.ones((3, 2), bool)
    keep[1, :] = False
    with pytest.raises(ValueError, match="count=3 but the rows keep 2 layers"):
        ls.row_program(keep, count=3)
    with pytest.raises(ValueError, match=r"run=4 layers must lie in \[1, 3\]"):
        skipdecode.skip_program(3, 4)
    with pytest.raises(ValueError, match="non-increasing"):
        skipdecode.phases([1, 2], 3)
    with pytest.raises(ValueError, match="phases"):
        _gen(model, step_fn=[(2, per_token.full_depth_step)])     # 2 steps for num_new=3
    with pytest.raises(ValueError, match="propagate from layer 4"):
        kv_lib.propagate(model, kv_lib.empty_state(model, 1, 4).cache, jnp.zeros((1, 1, CFG.d_model)),
                         jnp.zeros((1, 1), jnp.int32), 4)
    logits = jnp.zeros((2, CFG.vocab_size))
    with pytest.raises(ValueError, match="temperature=-1"):
        kv_lib.sample(logits, jax.random.key(0), -1)
    with pytest.raises(ValueError, match="top_k=100"):
        kv_lib.sample(logits, jax.random.key(0), 1.0, top_k=100)
