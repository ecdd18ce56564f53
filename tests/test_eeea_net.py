"""EEEA-Net's search pieces: the parameter formula against the real model, the EE-PI filter, NSGA-II ranking, the
search's reproducibility (the experiment's smoke run: tests/test_experiments.py)."""
import pathlib
import zlib

import jax
import numpy as np
from flax import nnx

from eejax.models import vit as vit_lib
from experiments import eeea_net as ee

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPACE = ee.Space({"depth": (1, 2, 3, 4, 5, 6), "d_model": (16, 32, 48, 64), "num_heads": (1, 2, 4),
                  "mlp_ratio": (1, 2, 4), "patch_size": (4, 7, 14)}, 28, 1)


def _real_count(g, image_size=28, channels=1):
    cfg = ee.vit_config(g, image_size, channels)
    state = nnx.state(nnx.eval_shape(lambda: vit_lib.ViT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def test_param_formula_equals_the_built_model():
    rng = np.random.default_rng(0)
    genomes = [SPACE.sample(rng) for _ in range(6)] + [ee.Genome(1, 16, 1, 1, 14), ee.Genome(6, 64, 4, 4, 4)]
    for g in genomes:
        assert ee.param_count(g, 28, 1) == _real_count(g), g
    g = ee.Genome(2, 32, 2, 2, 4)
    assert ee.param_count(g, 32, 3) == _real_count(g, 32, 3)     # CIFAR-shaped input too


def test_ee_filter_drops_exactly_the_over_budget_candidates():
    budget = 30000
    init = ee.initial_population(SPACE, 8, np.random.default_rng(3), budget)
    # Replay the same draws: every draw at or over the budget was rejected, every other one kept (unless a repeat).
    rng = np.random.default_rng(3)
    draws = [SPACE.sample(rng) for _ in range(init.draws)]
    over = [g for g in draws if SPACE.params(g) >= budget]
    kept = list(dict.fromkeys(g for g in draws if SPACE.params(g) < budget))
    assert init.rejected == len(over) > 0
    assert init.population == kept and len(kept) == 8
    assert init.duplicates == init.draws - init.rejected - 8
    # Without the filter the same seed keeps the first 8 distinct draws, over-budget ones included.
    free = ee.initial_population(SPACE, 8, np.random.default_rng(3), None)
    assert free.rejected == 0 and any(SPACE.params(g) >= budget for g in free.population)


def test_rank_and_crowding():
    objs = [(0.1, 5), (0.2, 3), (0.3, 1), (0.2, 5), (0.4, 4)]
    rank, crowd = ee.rank_and_crowding(objs)
    assert rank.tolist() == [0, 0, 0, 1, 1]
    assert np.isinf(crowd[0]) and np.isinf(crowd[2]) and np.isfinite(crowd[1])
    assert ee.pareto([(10, 0.5), (20, 0.6), (15, 0.4), (30, 0.6)]) == [0, 1]


def _fake_eval(g):   # a deterministic stand-in for proxy training
    return ee.Evaluation(val_acc=(zlib.crc32(g.key.encode()) % 1000) / 1000, val_loss=0.0, seconds=0.0)


def test_search_is_reproducible_for_a_fixed_seed():
    kw = dict(population=6, generations=3, retain=0.5, mutate_prob=0.3, max_params=40000)
    runs = [ee.search(SPACE, _fake_eval, seed=s, **kw) for s in (7, 7, 8)]
    keys = [[h["genome"] for h in r[1]] for r in runs]
    assert keys[0] == keys[1] and runs[0][2] == runs[1][2]
    assert keys[0] != keys[2]
    assert len(keys[0]) == len(set(keys[0])) == 6 + 2 * 3       # no candidate trained twice
    assert all(SPACE.params(g) < 40000 for g in runs[0][0].population)
