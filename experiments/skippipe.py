"""SkipPipe (arXiv:2502.19913) at small scale: a tiny LM trained with per-micro-batch stage skips (and swaps) vs full
order vs LayerDrop, evaluated in full order and with half of the stages omitted at inference.

    python -m experiments.skippipe --config configs/skippipe.py:smoke --data_dir DIR [--outdir DIR]

See configs/skippipe.py for the runbook. The recipe: every arm trains from the same init with the Trainer
(`lm.skip_path_lm_loss`: one `engine.stage_path` per micro-batch; LayerDrop: `lm.layer_drop_mask`), then every
model is scored on fixed validation windows in full order and under every half-depth stage path (static
`engine.sequence` programs, one compiled evaluation with the path as an argument).
"""
from __future__ import annotations

from typing import NamedTuple

import itertools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.lm import WindowIterator
from eejax.eval import report
from eejax.exits import engine
from eejax.models import lm
from experiments import _common_lm as lm_common
from experiments._common import Report, Run, experiment

class Setup(NamedTuple):
    """What the science reads: the run's config, provenance and workdir, and the corpus."""
    cfg: object
    prov: object
    workdir: object
    corpus: lm_common.Corpus


NAME = "skippipe"


def model_config(cfg, vocab: int) -> lm.LMConfig:
    return lm.LMConfig(vocab_size=vocab, exits=(cfg.model.depth - 1,), **cfg.model.to_dict())


def layerdrop_loss(graphdef, mcfg: lm.LMConfig, rate: float):
    """Uniform LayerDrop (Fan et al. 2019, arXiv:1909.11556): each row drops every layer but the first with
    probability ``rate``; CE at the final exit."""
    rates_N = np.full(mcfg.depth, rate)
    rates_N[0] = 0.0

    def loss_fn(params, batch, ctx):
        mask = lm.layer_drop_mask(ctx.rng, rates_N, batch["tokens"].shape[0])
        model = nnx.merge(graphdef, params)
        h = model.hidden_states(batch["tokens"], layer_mask_NxB=mask)[-1]
        ce = lm.lm_ce(model.exit_logits(h, mcfg.num_exits - 1), batch["targets"])
        return ce, {"ce": ce}

    return loss_fn


def arm_loss(cfg, arm: str, graphdef, mcfg):
    t = cfg.train
    stages = mcfg.depth // t.stage_size
    if arm == "layerdrop":
        return layerdrop_loss(graphdef, mcfg, t.layerdrop)
    keep, swap = {"full": (stages, 0.0), "skip": (t.keep_stages, 0.0), "skip_swap": (t.keep_stages, t.swap_prob)}[arm]
    return lm.skip_path_lm_loss(graphdef, mcfg, stage_size=t.stage_size, keep_stages=keep, swap_prob=swap,
                                micro_batches=t.micro_batches)


def half_paths(cfg) -> list[list[int]]:
    """Every inference path of stage 0 + ``eval.keep_stages - 1`` other stages in stored order."""
    s, n = cfg.train.stage_size, cfg.model.depth
    paths = []
    for others in itertools.combinations(range(1, n // s), cfg.eval.keep_stages - 1):
        paths.append([st * s + r for st in (0, *others) for r in range(s)])
    return paths


def make_eval(graphdef, mcfg):
    @jax.jit
    def ce_under(params, tokens, targets, layer_S):
        model = nnx.merge(graphdef, params)
        steps = layer_S.shape[0]
        program = engine.Program(layer_S, np.zeros(steps, np.int32), np.asarray([steps - 1], np.int32))
        h = model.hidden_states(tokens, program=program)[-1]
        return lm.lm_ce(model.exit_logits(h, mcfg.num_exits - 1), targets)

    return ce_under


def measure(ce_under, params, val, paths, depth: int) -> tuple[float, list[float]]:
    """Validation CE in full order and under each path (mean over the validation batches)."""
    full = list(range(depth))
    mean = lambda layers: float(np.mean([ce_under(params, v["tokens"], v["targets"], jnp.asarray(layers, jnp.int32))
                                         for v in val]))
    return mean(full), [mean(p) for p in paths]


def write_report(cfg, su, runs, paths, wall_s):
    rows = []
    for arm in cfg.arms:
        rs = [r for r in runs if r["arm"] == arm]
        full_ref = {r["seed"]: r["ce_full"] for r in runs if r["arm"] == "full"}
        rows.append({"arm": arm, "ce_full": float(np.mean([r["ce_full"] for r in rs])),
                     "ce_half": float(np.mean([r["ce_half"] for r in rs])),
                     "ppl_change_half": float(np.mean([r["ppl_change_half"] for r in rs])),
                     "ppl_change_half_min": min(r["ppl_change_half"] for r in rs),
                     "ppl_change_half_max": max(r["ppl_change_half"] for r in rs),
                     "ce_full_minus_full_arm": float(np.mean([r["ce_full"] - full_ref[r["seed"]] for r in rs])),
                     "stage_visits_per_micro_batch": rs[0]["stage_visits"]})
    m, t = cfg.model, cfg.train
    md = "\n\n".join([
        "# SkipPipe: skip-trained vs full-order vs LayerDrop, full order and half of the stages at inference",
        su.prov.markdown() + f"  \nData: {su.corpus.description}.  \nScale: {m.depth} layers in "
        f"{m.depth // t.stage_size} stages of {t.stage_size}, width {m.d_model}; {t.steps} steps of batch "
        f"{cfg.data.batch_size} x {cfg.data.seq_len} in {t.micro_batches} micro-batches; seeds {list(cfg.seeds)}; "
        f"half-depth evaluation over {len(paths)} paths; wall-clock {wall_s:.0f} s.",
        "ce_full / ce_half: validation CE in full order / mean over the half-depth paths (seed mean); "
        "ppl_change_half = exp(ce_half - ce_full) - 1, seed mean [min, max]; stage visits: per micro-batch and "
        "training step (a count, not a throughput).",
        report.markdown_table(rows, list(rows[0]), ".3f")])
    return Report(md, {
        "data": su.corpus.description,
        "half_paths": paths, "rows": rows, "runs": runs, "wall_seconds": wall_s})


@experiment(NAME, data=lm_common.corpus)
def main(run: Run, corpus) -> Report:
    su = Setup(run.cfg, run.prov, run.workdir, corpus)
    cfg, corpus = su.cfg, su.corpus
    mcfg = model_config(cfg, corpus.tokenizer.vocab_size)
    it = WindowIterator(corpus.eval_ids, cfg.eval.batch, cfg.data.seq_len, seed=0, shuffle=False,
                        max_batches=cfg.eval.batches)
    val = [next(it) for _ in range(cfg.eval.batches)]
    paths = half_paths(cfg)
    runs, t0 = [], time.perf_counter()
    ce_under = make_eval(lm.build(mcfg, 0)[0], mcfg)       # one compiled evaluation for every arm and path
    for seed in cfg.seeds:
        for arm in cfg.arms:
            graphdef, params = lm.build(mcfg, seed)
            batches = WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=seed)
            params = lm_common.fit(arm_loss(cfg, arm, graphdef, mcfg), params, cfg.train.optim, batches,
                                    cfg.train.steps, pathlib.Path(su.workdir) / f"{arm}-seed{seed}", cfg,
                                    f"{arm} seed {seed}")
            ce_full, ce_paths = measure(ce_under, params, val, paths, mcfg.depth)
            ce_half = float(np.mean(ce_paths))
            stages = mcfg.depth // cfg.train.stage_size
            visits = stages if arm in ("full", "layerdrop") else cfg.train.keep_stages
            runs.append({"arm": arm, "seed": seed, "ce_full": ce_full, "ce_half": ce_half, "ce_paths": ce_paths,
                         "ppl_change_half": math.expm1(ce_half - ce_full), "stage_visits": visits})
            print(f"{arm} seed {seed}: CE full {ce_full:.4f}, half {ce_half:.4f}", flush=True)
    return write_report(cfg, su, runs, paths, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
