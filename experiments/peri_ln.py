"""Peri-LN (arXiv:2502.02732) at small scale: Pre-LN / Post-LN / Peri-LN tiny LMs at equal steps over a learning-rate
sweep and seeds; hidden-state variance by depth, stability, and what each placement does to early exits and
single-layer skips (an analysis).

    python -m experiments.peri_ln --config configs/peri_ln.py:smoke --data_dir DIR [--outdir DIR]

See configs/peri_ln.py for the runbook. The recipe: for every placement x learning rate x seed, build the LM
(`LMConfig.norm`), train it on final-exit CE with the one Trainer (resumable per run in
<workdir>/<norm>-lr<lr>-seed<seed>; a run whose loss or gradient turns NaN/inf stops there and is recorded as
diverged), then measure on fixed validation windows the per-layer statistics of the residual stream, every layer's
read-out through the shared final norm and head, and the CE with each layer skipped
(`hidden_states(layer_mask_NxB=...)`).
"""
from __future__ import annotations

from typing import NamedTuple

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eejax.data.lm import WindowIterator
from eejax.eval import report
from eejax.models import lm
from eejax.nn import param_count
from eejax.errors import NonFiniteLossError
from eejax.train import Trainer, make_optimizer, one_device_mesh, read_metrics
from experiments import _common_lm as lm_common
from experiments._common import Report, Run, experiment

class Setup(NamedTuple):
    """What the science reads: the run's config, provenance and workdir, and the corpus."""
    cfg: object
    prov: object
    workdir: object
    corpus: lm_common.Corpus


NAME = "peri_ln"


def model_config(cfg, vocab: int, norm: str) -> lm.LMConfig:
    """One exit, at the last layer: every layer is read through the final norm and the shared head (no untrained
    per-exit norms that weight decay would shrink)."""
    return lm.LMConfig(vocab_size=vocab, norm=norm, exits=(cfg.model.depth - 1,), **cfg.model.to_dict())


def make_loss(graphdef):
    """Final-exit CE: the only trained loss (the early exits are read-outs)."""

    def loss_fn(params, batch, ctx):
        del ctx
        return lm.lm_ce(nnx.merge(graphdef, params)(batch["tokens"]), batch["targets"]), {}

    return loss_fn


def sweep_optimizer(optim_cfg, lr: float) -> optax.GradientTransformation:
    """The config's AdamW with the schedule's shape at peak 1 (``train.optim.lr == 1``), its update scaled by the
    run's peak learning rate ``lr``: every run of the sweep shares one optimizer recipe and only ``lr`` moves. (The
    trainer's logged ``lr`` is therefore the schedule's shape; the run's peak is the record's ``lr``.)"""
    return optax.chain(make_optimizer(optim_cfg), optax.scale(lr))


def make_eval(graphdef, depth: int):
    """Per-layer statistics of one validation batch: residual-stream variance over the width (mean over tokens) and
    largest |h| for the embedding and every layer's output, relative update ||h_l - h_{l-1}|| / ||h_{l-1}||, every
    layer's read-out CE through the final norm and shared head, and the CE with layer l alone skipped."""

    @jax.jit
    def evaluate(params, tokens, targets):
        model = nnx.merge(graphdef, params)
        h0 = model.embed_tokens(tokens).astype(jnp.float32)
        h_NxBxTxD = model.hidden_states(tokens).astype(jnp.float32)
        h_all = jnp.concatenate([h0[None], h_NxBxTxD])
        var_N1 = jnp.mean(jnp.var(h_all, axis=-1), axis=(1, 2))
        maxabs_N1 = jnp.max(jnp.abs(h_all), axis=(1, 2, 3))
        norm = jnp.linalg.norm(h_all, axis=-1)
        rel_N = jnp.mean(jnp.linalg.norm(h_all[1:] - h_all[:-1], axis=-1) / norm[:-1], axis=(1, 2))
        read = lambda h: model.shared_head(model.final_norm(h))
        exit_ce_N = jax.lax.map(lambda h: lm.lm_ce(read(h), targets), h_NxBxTxD)

        def skip_ce(l):      # one compiled forward for every skipped layer (a loop, not depth copies)
            mask = jnp.arange(depth)[:, None] != l
            return lm.lm_ce(read(model.hidden_states(tokens, layer_mask_NxB=jnp.broadcast_to(
                mask, (depth, tokens.shape[0])))[-1]), targets)

        skip_ce_N = jax.lax.map(skip_ce, jnp.arange(depth))
        return dict(var=var_N1, maxabs=maxabs_N1, rel_update=rel_N, exit_ce=exit_ce_N, skip_ce=skip_ce_N)

    return evaluate


def eval_batches(ids: np.ndarray, batch: int, seq_len: int, count: int) -> list[dict]:
    it = WindowIterator(ids, batch, seq_len, seed=0, shuffle=False, max_batches=count)
    return [next(it) for _ in range(count)]


def train_and_measure(cfg, corpus, norm: str, lr: float, seed: int, loss_fn, evaluate, val, workdir) -> dict:
    """One run of the sweep on the one Trainer, on one device (a tiny LM: its batch need not divide the devices),
    resumable in ``workdir``. A NaN/inf loss or gradient stops the run (``NonFiniteLossError``): it is
    recorded as diverged (``nonfinite`` holds the error), its measurements NaN, and its train log is what the
    Trainer logged before the blow-up."""
    mcfg = model_config(cfg, corpus.tokenizer.vocab_size, norm)
    _, params = lm.build(mcfg, seed)
    batches = WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=seed)
    t0, nonfinite = time.perf_counter(), None
    with Trainer(loss_fn, params, sweep_optimizer(cfg.train.optim, lr), workdir=workdir, seed=seed,
                 mesh=one_device_mesh(), log_every=cfg.log_every, ckpt_every=cfg.train.steps) as tr:
        try:
            params = tr.fit(batches, cfg.train.steps, desc=f"{norm} lr={lr:g} seed={seed}").params
        except NonFiniteLossError as e:
            params, nonfinite = None, str(e)
    if params is None:
        n = cfg.model.depth
        out = {"var": np.full(n + 1, np.nan), "maxabs": np.full(n + 1, np.nan), "rel_update": np.full(n, np.nan),
               "exit_ce": np.full(n, np.nan), "skip_ce": np.full(n, np.nan)}
    else:
        stats = [jax.tree.map(np.asarray, evaluate(params, v["tokens"], v["targets"])) for v in val]
        out = {k: np.mean([s[k] for s in stats], axis=0) for k in stats[0]}
    final_ce = float(out["exit_ce"][-1])
    diverged = not math.isfinite(final_ce) or final_ce > math.log(corpus.tokenizer.vocab_size)
    print(f"{norm:>4} lr={lr:g} seed={seed}: val CE {final_ce:.4f}{' DIVERGED' if diverged else ''} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    log = [{"step": r["step"], "loss": float(r["loss"]), "grad_norm": float(r["grad_norm"])}
           for r in read_metrics(workdir)]
    return {"norm": norm, "lr": lr, "seed": seed, "val_ce": final_ce, "diverged": diverged, "nonfinite": nonfinite,
            "train_seconds": time.perf_counter() - t0, "train_log": log,
            **{k: [float(x) for x in v] for k, v in out.items()}}


# ----------------------------------------------------------------------------------------------------- report


def _cell(vals) -> str:
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return "nan"
    return f"{np.mean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"


def summarise(cfg, runs: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """Rows per (placement, lr): seed mean and range of final CE, divergences, variance growth; paired differences
    against Pre-LN per seed; and per-layer profiles (seed means) for the per-layer tables."""
    by = {(r["norm"], r["lr"], r["seed"]): r for r in runs}
    rows, diffs, profiles = [], [], {}
    for lr in cfg.train.lrs:
        for norm in cfg.norms:
            rs = [by[(norm, lr, s)] for s in cfg.seeds]
            ok = [r for r in rs if not r["diverged"]]
            growth = [r["var"][-1] / r["var"][1] for r in ok]
            rows.append({"norm": norm, "lr": lr, "val_ce_mean": float(np.mean([r["val_ce"] for r in rs])),
                         "val_ce_min": min(r["val_ce"] for r in rs), "val_ce_max": max(r["val_ce"] for r in rs),
                         "diverged": sum(r["diverged"] for r in rs), "seeds": len(rs),
                         "var_growth_mean": float(np.mean(growth)) if growth else float("nan"),
                         "var_last_mean": float(np.mean([r["var"][-1] for r in ok])) if ok else float("nan"),
                         "maxabs_last_mean": float(np.mean([r["maxabs"][-1] for r in ok])) if ok else float("nan")})
            profiles[f"{norm}@{lr:g}"] = {k: np.mean([r[k] for r in rs], axis=0).tolist()
                                          for k in ("var", "maxabs", "rel_update", "exit_ce", "skip_ce")}
            if norm != "pre":
                d = [by[(norm, lr, s)]["val_ce"] - by[("pre", lr, s)]["val_ce"] for s in cfg.seeds]
                diffs.append({"norm": norm, "lr": lr, "minus_pre_mean": float(np.mean(d)), "minus_pre_min": min(d),
                              "minus_pre_max": max(d), "per_seed": [float(x) for x in d]})
    return rows, diffs, profiles


def layer_table(profiles: dict, key: str, depth: int, with_embedding: bool) -> str:
    cols = (["emb"] if with_embedding else []) + [f"L{l + 1}" for l in range(depth)]
    rows = [{"run": name, **dict(zip(cols, prof[key]))} for name, prof in profiles.items()]
    return report.markdown_table(rows, ["run", *cols], ".3f")


PAPER = ("Peri-LN (arXiv:2502.02732, abstract): on 400M-3.2B models, \"more balanced variance growth, steadier "
         "gradient flow, and convergence stability\" than Pre-LN and Post-LN, up to +2.8 points on a 5-task average.")


def write_report(cfg, su, runs, wall_s):
    rows, diffs, profiles = summarise(cfg, runs)
    m, t = cfg.model, cfg.train
    n_params = param_count(lm.build(model_config(cfg, su.corpus.tokenizer.vocab_size, "pre"), 0)[1])
    md = "\n\n".join([
        "# Peri-LN vs Pre-LN vs Post-LN: tiny character LMs (an analysis)",
        su.prov.markdown() + f"  \nData: {su.corpus.description}; evaluation on {cfg.eval.batches} x "
        f"{cfg.eval.batch} validation windows of {cfg.data.seq_len} characters.  \n"
        f"Scale: {m.depth} layers, width {m.d_model}, {m.num_heads} query / {m.num_kv_heads} KV heads, MLP "
        f"{m.mlp_dim}, {n_params:,} parameters (Pre-LN; Peri-LN adds {2 * m.depth * m.d_model:,}); {t.steps} "
        f"steps of batch {cfg.data.batch_size} x {cfg.data.seq_len}, seeds {list(cfg.seeds)}, peak learning rates "
        f"{[float(x) for x in t.lrs]} after a {t.optim.warmup_steps}-step linear warm-up; wall-clock of the whole sweep {wall_s:.0f} s.  \n"
        f"Paper: {PAPER}",
        "## Final validation CE (nats/char) per placement and peak learning rate\n"
        "val_ce: seed mean [min, max]; diverged: runs whose CE is non-finite or above ln(vocab); var_growth: "
        "residual-stream variance after the last layer / after the first (seed mean over non-diverged runs); "
        "var_last, maxabs_last: variance and largest |h| after the last layer.",
        report.markdown_table([{**r, "val_ce": _cell([x["val_ce"] for x in runs if x["norm"] == r["norm"]
                                                      and x["lr"] == r["lr"]])} for r in rows],
                              ["norm", "lr", "val_ce", "diverged", "var_growth_mean", "var_last_mean",
                               "maxabs_last_mean"], ".3f"),
        "## Placement minus Pre-LN, paired by seed (same init and data order)\n"
        f"Mean and range over {len(cfg.seeds)} seeds (a range, not a confidence interval).",
        report.markdown_table(diffs, ["norm", "lr", "minus_pre_mean", "minus_pre_min", "minus_pre_max"], ".3f"),
        "## Residual-stream variance by depth (seed mean; emb = the embedding)",
        layer_table(profiles, "var", m.depth, True),
        "## Largest |h| by depth (seed mean)",
        layer_table(profiles, "maxabs", m.depth, True),
        "## Relative update ||h_l - h_(l-1)|| / ||h_(l-1)|| (seed mean)",
        layer_table(profiles, "rel_update", m.depth, False),
        "## Early exits: CE of each layer read through the final norm and shared head (seed mean)",
        layer_table(profiles, "exit_ce", m.depth, False),
        "## Layer skips: final CE with layer l alone skipped (seed mean)",
        layer_table(profiles, "skip_ce", m.depth, False)])
    return Report(md, {
        "data": su.corpus.description,
        "parameters_pre": n_params, "wall_seconds": wall_s, "rows": rows, "minus_pre": diffs,
        "profiles": profiles, "runs": runs})


@experiment(NAME, data=lm_common.corpus)
def main(run: Run, corpus) -> Report:
    su = Setup(run.cfg, run.prov, run.workdir, corpus)
    cfg = su.cfg
    val = eval_batches(su.corpus.eval_ids, cfg.eval.batch, cfg.data.seq_len, cfg.eval.batches)
    runs, t0 = [], time.perf_counter()
    for norm in cfg.norms:
        graphdef, _ = lm.build(model_config(cfg, su.corpus.tokenizer.vocab_size, norm), 0)
        loss_fn, evaluate = make_loss(graphdef), make_eval(graphdef, cfg.model.depth)
        for lr in cfg.train.lrs:
            for seed in cfg.seeds:
                runs.append(train_and_measure(cfg, su.corpus, norm, float(lr), int(seed), loss_fn, evaluate, val,
                                              su.workdir / f"{norm}-lr{float(lr):g}-seed{int(seed)}"))
    return write_report(cfg, su, runs, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
