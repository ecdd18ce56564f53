"""Normalisation placement (pre / post / peri, ``eejax.nn.sublayer_residual``, Peri-LN arXiv:2502.02732): the LM's
every path equals a plain layer loop written from the formulas, the default is unchanged, and the half-layer program
and the layer-skip mask read the same placement."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax import nn
from eejax.exits import engine
from eejax.models import lm
from margins import float_tol

V = 23
SMALL = dict(vocab_size=V, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
TOL = float_tol(4)


def _rms(x, scale, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale[None, None, :]


def _residual(norm, h, y, norm_out):
    if norm == "pre":
        return h + y
    return h + norm_out(y) if norm == "peri" else norm_out(h + y)


def _reference_hidden(layers, cfg, tokens, emb):
    """Plain loop over layer l of the stacked parameters, straight from the three formulas."""
    b, t = tokens.shape
    h = emb[tokens]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    hq, j, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = []
    for l in range(cfg.depth):
        p = jax.tree.map(lambda a: a[l], layers)
        scale = lambda name: p[name]["scale"]
        # attention sublayer
        x = h if cfg.norm == "post" else _rms(h, scale("norm1"))
        y = (x @ p["qkv"]["kernel"]).reshape(b, t, hq + 2 * j, k)
        qk = lm.rope(y[:, :, :hq + j], pos, cfg.rope_base)
        att = lm.gqa_attention(qk[:, :, :hq], qk[:, :, hq:].transpose(0, 2, 1, 3),
                               y[:, :, hq + j:].transpose(0, 2, 1, 3), mask) @ p["o"]["kernel"]
        h = _residual(cfg.norm, h, att, lambda x: _rms(x, scale("post1")))
        # MLP sublayer
        x = h if cfg.norm == "post" else _rms(h, scale("norm2"))
        fc1, fc2 = p["mlp"]["fc1"], p["mlp"]["fc2"]
        m = jax.nn.gelu(x @ fc1["kernel"] + fc1["bias"][None, None]) @ fc2["kernel"] + fc2["bias"][None, None]
        h = _residual(cfg.norm, h, m, lambda x: _rms(x, scale("post2")))
        out.append(h)
    return jnp.stack(out)


def _perturbed(params, seed=5):
    """Norm scales away from 1 (as after training), so a misplaced norm shows."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [a * (1 + 0.3 * jax.random.normal(kk, a.shape)) for a, kk in zip(leaves, keys)])


@pytest.mark.parametrize("norm", nn.NORM_PLACEMENTS)
def test_hidden_states_equal_plain_reference(norm):
    cfg = lm.LMConfig(**SMALL, norm=norm)
    gd, params = lm.build(cfg, 0)
    params = _perturbed(params)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, V)
    got = jax.jit(lambda p, t: nnx.merge(gd, p).hidden_states(t))(params, tokens)
    pure = nnx.to_pure_dict(params)
    want = _reference_hidden(pure["layers"], cfg, tokens, pure["embed"]["embedding"])
    np.testing.assert_allclose(got, want, **TOL)


def test_parameters_per_placement_and_default_unchanged():
    """Pre has input norms only, post output norms only, peri both; a pre / peri model drawn from a seed has the same
    shared weights as before the option existed (the build order is kept), and a post model the same projections."""
    built = {n: nnx.to_pure_dict(lm.build(lm.LMConfig(**SMALL, norm=n), 0)[1]) for n in nn.NORM_PLACEMENTS}
    keys = {n: set(p["layers"]) for n, p in built.items()}
    assert keys["pre"] >= {"norm1", "norm2"} and not keys["pre"] & {"post1", "post2"}
    assert keys["post"] >= {"post1", "post2"} and not keys["post"] & {"norm1", "norm2"}
    assert keys["peri"] == keys["pre"] | {"post1", "post2"}
    for n in ("post", "peri"):
        for name in ("qkv", "o", "mlp"):
            jax.tree.map(np.testing.assert_array_equal, built[n]["layers"][name], built["pre"]["layers"][name])
    assert lm.LMConfig(**SMALL).norm == "pre"


def test_sublayer_residual_formulas_and_bad_placement():
    h, y = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3))
    double = lambda x: 2 * x
    np.testing.assert_array_equal(nn.sublayer_residual("pre", h, y), h + y)
    np.testing.assert_array_equal(nn.sublayer_residual("peri", h, y, double), h + 2 * y)
    np.testing.assert_array_equal(nn.sublayer_residual("post", h, y, double), 2 * (h + y))
    np.testing.assert_array_equal(nn.sublayer_input("post", None, h), h)
    np.testing.assert_array_equal(nn.sublayer_input("pre", double, h), 2 * h)
    with pytest.raises(ValueError, match="norm='sandwich'"):
        nn.sublayer_residual("sandwich", h, y)
    with pytest.raises(ValueError, match="norm"):
        lm.LMConfig(**SMALL, norm="sandwich")


@pytest.mark.parametrize("norm", ("post", "peri"))
def test_half_layer_program_and_skip_mask_follow_the_placement(norm):
    """An attention-only step and a per-row skip mask run the same placement as the full layer."""
    cfg = lm.LMConfig(**SMALL, norm=norm)
    gd, params = lm.build(cfg, 0)
    params = _perturbed(params)
    tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, V)
    model = nnx.merge(gd, params)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    mask = lm.causal_mask(jnp.ones((2, 6), bool))
    layer_def, stacked = nnx.split(model.layers)
    layer0 = nnx.merge(layer_def, jax.tree.map(lambda a: a[0], stacked))
    h0 = model.embed_tokens(tokens)
    attn_only = model.hidden_states(tokens, program=engine.sequence([0])._replace(sub_S=np.asarray([engine.ATTN])))[-1]
    np.testing.assert_allclose(attn_only, layer0.attn_half(h0, pos, *layer0.project(h0, pos)[1:], mask), **TOL)
    skip = jnp.ones((cfg.depth, 2), bool).at[1:, 0].set(False)      # row 0 runs layer 0 only
    masked = model.hidden_states(tokens, layer_mask_NxB=skip)
    np.testing.assert_allclose(masked[-1, 0], layer0(h0, pos, mask)[0], **TOL)


@pytest.mark.parametrize("norm", nn.NORM_PLACEMENTS)
def test_cached_decode_primitives_follow_the_placement(norm):
    """The pieces KV-cached decoding composes: ``kv`` gives ``project``'s keys/values, and the last token attending to
    the cached keys/values (``attend``) equals the teacher-forced layer at that position."""
    cfg = lm.LMConfig(**SMALL, norm=norm)
    gd, params = lm.build(cfg, 0)
    model = nnx.merge(gd, _perturbed(params))
    layer_def, stacked = nnx.split(model.layers)
    layer0 = nnx.merge(layer_def, jax.tree.map(lambda a: a[0], stacked))
    tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, V)
    h0 = model.embed_tokens(tokens)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    _, k, v = layer0.project(h0, pos)
    k2, v2 = layer0.kv(h0, pos)
    np.testing.assert_allclose(k2, k, **TOL)
    np.testing.assert_allclose(v2, v, **TOL)
    full = layer0(h0, pos, lm.causal_mask(jnp.ones((2, 6), bool)))
    last = layer0.attend(h0[:, -1:], pos[:, -1:], k, v, jnp.ones((2, 1, 6), bool))
    np.testing.assert_allclose(last, full[:, -1:], **TOL)


# ------------------------------------------------------------------ the encoder / ViT block (LayerNorm placements)

def _ln(mod, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + mod.epsilon) * mod.scale[...][None, None] + mod.bias[...][None, None]


@pytest.mark.parametrize("norm", nn.NORM_PLACEMENTS)
def test_block_placement_equals_its_formula(norm):
    """``nn.Block(norm=...)`` against the three formulas written with the block's own sublayers and LayerNorms."""
    blk = nn.Block(16, 2, 32, rngs=nnx.Rngs(0), norm=norm)
    if norm == "peri":   # non-trivial output norms, so a missing one would show
        for post in (blk.post1, blk.post2):
            post.scale[...] = 1.5 + jax.random.normal(jax.random.key(1), post.scale.shape) * 0.1
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    h = x
    for ln, f, post in ((blk.ln1, blk.attn, getattr(blk, "post1", None)),
                        (blk.ln2, blk.mlp, getattr(blk, "post2", None))):
        if norm == "post":
            h = _ln(ln, h + f(h))
        else:
            y = f(_ln(ln, h))
            h = h + (_ln(post, y) if norm == "peri" else y)
    np.testing.assert_allclose(np.asarray(blk(x)), np.asarray(h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ("peri", "post"))
def test_vit_with_a_placement_exits_like_its_static_path(norm):
    """A ViT built with ``norm`` runs it on every path: the dynamic loop's output at a forced exit equals the
    all-exits scan at that exit; paths that open the block up as Pre-LN refuse it by name."""
    from eejax.exits import continuous  # noqa: PLC0415
    from eejax.models import vit as vit_lib  # noqa: PLC0415

    cfg = vit_lib.ViTConfig(image_size=8, channels=1, patch_size=4, d_model=16, depth=3, num_heads=2, mlp_dim=32,
                            exits="all", head_types="linear", norm=norm)
    gd, params = vit_lib.build(cfg, 0)
    model = nnx.merge(gd, params)
    assert model.layers.placement == norm
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    every = model.all_exits(x).logits_ExBxC
    pre = nnx.merge(*vit_lib.build(dataclasses_replace(cfg, norm="pre"), 0)).all_exits(x).logits_ExBxC
    assert not np.allclose(np.asarray(every), np.asarray(pre), atol=1e-3)   # the placement changes the function
    out = model.dynamic(x, jnp.inf)   # +inf: no row exits early, every row to the last exit
    np.testing.assert_allclose(np.asarray(out.logits_BxC), np.asarray(every[-1]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="Pre-LN"):
        continuous.block_weights(model.layers)
    with pytest.raises(ValueError, match="norm="):
        vit_lib.ViTConfig(norm="sandwich")


def dataclasses_replace(cfg, **kw):
    import dataclasses  # noqa: PLC0415
    return dataclasses.replace(cfg, **kw)
