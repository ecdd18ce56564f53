"""Parallel layer groups (Make Deep Networks Shallow Again, arXiv:2309.08414) against plain references (the
experiment's smoke run: tests/test_experiments.py)."""
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from eejax.exits import engine, parallel
from eejax.models import vit as vit_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model(depth, seed=0):
    cfg = vit_lib.ViTConfig(d_model=16, depth=depth, num_heads=2, mlp_dim=32, exits=[depth - 1], head_types="linear")
    graphdef, params = vit_lib.build(cfg, seed)
    model = nnx.merge(graphdef, params)
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    return model, model.embed(x)


def _layer(model, i):
    return jax.tree.map(lambda p: p[i], model.layers)


def test_one_block_parallel_equals_sequential_one_block_model():
    model, h0 = _model(1)
    seq, _ = engine.run_layers(model.layers, h0)                                   # the sequential stack
    par, _ = engine.run_layers(parallel.group_layers(model.layers, 1), h0, layer_fn=parallel.parallel_layer_fn)
    np.testing.assert_allclose(par, seq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(parallel.static_run(model.layers, model.heads[0], h0, 1).logits_BxC,
                               model.heads[0](_layer(model, 0)(h0)).logits_BxC, rtol=1e-5, atol=1e-5)


def test_groups_equal_first_order_expansion_reference():
    model, h0 = _model(4)
    full = h0 + sum(_layer(model, i)(h0) - h0 for i in range(4))     # y = x + sum_i F_i(x)
    np.testing.assert_allclose(parallel.train_forward(model.layers, h0, 4), full, rtol=1e-5, atol=1e-5)
    g1 = h0 + (_layer(model, 0)(h0) - h0) + (_layer(model, 1)(h0) - h0)
    g2 = g1 + (_layer(model, 2)(g1) - g1) + (_layer(model, 3)(g1) - g1)
    np.testing.assert_allclose(parallel.train_forward(model.layers, h0, 2), g2, rtol=1e-5, atol=1e-5)
    seq = h0
    for i in range(4):
        seq = _layer(model, i)(seq)
    np.testing.assert_allclose(parallel.train_forward(model.layers, h0, 1), seq, rtol=1e-5, atol=1e-5)
    # The timed inference path (engine.run, static prefix program over the groups) equals the training path.
    out = jax.jit(lambda h: parallel.static_run(model.layers, model.heads[0], h, 2).logits_BxC)(h0)
    np.testing.assert_allclose(out, model.heads[0](g2).logits_BxC, rtol=1e-5, atol=1e-5)


def test_grouping_keeps_the_parameters_and_rejects_bad_k():
    model, h0 = _model(4)
    grouped = parallel.group_layers(model.layers, 2)
    shapes = [p.shape for p in jax.tree.leaves(nnx.state(grouped))]
    assert all(s[:2] == (2, 2) for s in shapes)
    assert sum(np.prod(s) for s in shapes) == sum(np.size(p) for p in jax.tree.leaves(nnx.state(model.layers)))
    with pytest.raises(ValueError, match="divide"):
        parallel.group_layers(model.layers, 3)
