"""Jacobi decoding (CEED-VLA's decoder): full Jacobi equals greedy token for token (batched, rows of different
prompt lengths), at most n iterations per block; early exit stops sooner and is allowed to differ."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import jacobi, kv as kv_lib, per_token
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=23, d_model=32, depth=3, num_heads=4, num_kv_heads=2, mlp_dim=48, exits=[2])
_rng = np.random.default_rng(1)
PROMPTS = [_rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 6, 1, 4)]
G = 12


@pytest.fixture(scope="module")
def setup():
    gd, params = lm.build(CFG, 0)
    model = nnx.merge(gd, params)
    model.embed.embedding[...] = model.embed.embedding[...] * 5   # sharper logits: fewer near-ties
    gd, params = nnx.split(model)
    prompt, lengths = (jnp.asarray(x) for x in kv_lib.pad_prompts(PROMPTS))
    greedy = jax.jit(per_token.decode_fn(gd, per_token.full_depth_step, G))(params, prompt, lengths).tokens_BxG
    return gd, params, prompt, lengths, np.asarray(greedy)


_FNS = {}


def _jacobi(setup, block, tol=0, max_iters=None):
    """One compiled program per block size (``tol`` and ``max_iters`` traced)."""
    gd, params, prompt, lengths, _ = setup
    if block not in _FNS:
        _FNS[block] = jax.jit(lambda p, t, n, tol, mi: jacobi.jacobi_decode(nnx.merge(gd, p), t, n, G, block=block,
                                                                            tol=tol, max_iters=mi))
    mi = block if max_iters is None else max_iters
    return jax.device_get(_FNS[block](params, prompt, lengths, jnp.int32(tol), jnp.int32(mi)))


@pytest.mark.parametrize("block", [1, 4])
def test_full_jacobi_equals_greedy(setup, block):
    out = _jacobi(setup, block=block)
    np.testing.assert_array_equal(out.tokens_BxG, setup[4])
    assert out.iters_BxK.shape == (len(PROMPTS), G // block)
    assert (out.iters_BxK >= 1).all() and (out.iters_BxK <= block).all()
    # A row that stopped before n iterations stopped at a fixed point.
    assert (out.changed_BxK[out.iters_BxK < block] == 0).all()


def test_early_exit_stops_sooner(setup):
    full = _jacobi(setup, block=4)
    one = _jacobi(setup, block=4, max_iters=1)
    assert (one.iters_BxK == 1).all()
    # After one iteration the first token of every block is the greedy token given the emitted prefix; the first
    # block's first token is the greedy one.
    np.testing.assert_array_equal(one.tokens_BxG[:, 0], setup[4][:, 0])
    loose = _jacobi(setup, block=4, tol=4)
    assert (loose.iters_BxK == 1).all()
    forced = _jacobi(setup, block=4, tol=-1, max_iters=3)     # never stops on convergence: exactly 3 iterations
    assert (forced.iters_BxK == 3).all()
    relaxed = _jacobi(setup, block=4, tol=1)
    assert (relaxed.iters_BxK[:, 0] <= full.iters_BxK[:, 0]).all()   # same first block input


def test_bad_arguments(setup):
    gd, params, prompt, lengths, _ = setup
    model = nnx.merge(gd, params)
    with pytest.raises(ValueError, match="multiple"):
        jacobi.jacobi_decode(model, prompt, lengths, G, block=5)
    with pytest.raises(ValueError, match="max_iters"):
        jacobi.jacobi_decode(model, prompt, lengths, G, block=4, max_iters=0)
