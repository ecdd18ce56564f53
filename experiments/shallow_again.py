"""Make Deep Networks Shallow Again at small scale: a residual ViT stack vs the same blocks run in parallel.

    python -m experiments.shallow_again --config configs/shallow_again.py:smoke [--outdir DIR]

For each variant k in ``cfg.parallel`` (blocks per parallel group, eejax/exits/parallel.py; k = 1 is the sequential
stack) and each seed, one ViT is trained from the SAME initial weights on the SAME batches (the seed sets both), so
the variants differ only in how the blocks are wired. Reported per run: training loss (on a fixed training subset,
after training), validation and test loss / accuracy, parameters, analytic FLOPs, training steps/s and inference
wall-clock at a few batch sizes, every variant run the same way (the engine's static prefix program over its groups,
``parallel.static_run``). The control with ONE block of the same width shows what the extra blocks buy at all.
Not an early-exit method: nothing here is scored on depth savings.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from eejax.eval import report as report_lib
from eejax.exits import costs, parallel
from eejax.models import vit as vit_lib
from experiments import _common_vision as vision
from experiments._common import Report, Run, experiment

CONTROL = "1 block"


def variant_name(k, depth: int) -> str:
    if k == CONTROL:
        return CONTROL
    return "sequential" if k == 1 else ("fully parallel" if k == depth else f"parallel x{k}")


def model_config(cfg, depth: int) -> vit_lib.ViTConfig:
    return vit_lib.ViTConfig(**{**cfg.model.to_dict(), "depth": depth}, num_classes=10, exits=[depth - 1],
                             head_types="linear")


def forward_fn(k: int):
    """Logits of the linear head after the stack run with ``k`` blocks per parallel group (training path: scan)."""
    def forward(model, x):
        return model.heads[0](parallel.train_forward(model.layers, model.embed(x), k)).logits_BxC
    return forward


def static_fn(graphdef, k: int):
    """The timed inference path: the engine's static prefix program over the groups."""
    @jax.jit
    def fn(params, x):
        model = nnx.merge(graphdef, params)
        return parallel.static_run(model.layers, model.heads[0], model.embed(x), k).logits_BxC
    return fn


def flops(mcfg: vit_lib.ViTConfig, k: int) -> float:
    """Analytic FLOPs of one forward: the same blocks whatever the grouping, plus the (k-1) additions per group
    that sum the parallel updates (T x D each)."""
    f = vit_lib.flops(mcfg).cum_flops_E[-1]
    return float(f + (mcfg.depth // k) * (k - 1) * mcfg.tokens * mcfg.d_model)


def run_one(cfg, data, workdir, k, seed: int):
    """Train and score one (variant, seed)."""
    train_ds, val, test, train_sub = data
    depth = 1 if k == CONTROL else cfg.model.depth
    kk = 1 if k == CONTROL else k
    mcfg = model_config(cfg, depth)
    graphdef, params = vit_lib.build(mcfg, seed)     # the same init for every variant of a seed
    name = variant_name(k, cfg.model.depth)
    tag = "single" if k == CONTROL else f"k{k}"
    done = workdir / f"{tag}-s{seed}" / "scores.json"
    if done.exists():              # scored by an earlier (killed or partial) run: keep its measurements
        return json.loads(done.read_text()), done.parent / "metrics.jsonl"
    tr = vision.train_classifier(graphdef, params, forward_fn(kk), train_ds, steps=cfg.train.steps,
                                 batch_size=cfg.data.batch_size, optim=cfg.train.optim, seed=seed,
                                 workdir=workdir / f"{tag}-s{seed}", log_every=cfg.log_every,
                                 desc=f"{name} seed {seed}")
    fwd, bs = forward_fn(kk), cfg.data.eval_batch_size
    score = vision.scorer(graphdef, fwd)
    train_loss, train_acc = vision.evaluate(graphdef, tr.params, fwd, train_sub, bs, fn=score)
    val_loss, val_acc = vision.evaluate(graphdef, tr.params, fwd, val, bs, fn=score)
    test_loss, test_acc = vision.evaluate(graphdef, tr.params, fwd, test, bs, fn=score)
    row = {"variant": name, "k": kk if k != CONTROL else 0, "seed": seed, "depth": depth // kk,
           "params": vision.num_params(tr.params), "MFLOPs": flops(mcfg, kk) / 1e6,
           "train_loss": train_loss, "train_acc": 100 * train_acc, "val_loss": val_loss, "val_acc": 100 * val_acc,
           "test_loss": test_loss, "test_acc": 100 * test_acc, "train_steps_per_s": tr.steps_per_sec,
           "train_wall_s": tr.train_seconds}
    # Inference wall-clock, every variant through the same engine loop; checked against the training path.
    fn = static_fn(graphdef, kk)
    x0 = next(vision.padded(test, max(cfg.eval.timing_batches)))[0]
    np.testing.assert_allclose(np.asarray(fn(tr.params, x0[:8])),
                               np.asarray(jax.jit(lambda p, x: fwd(nnx.merge(graphdef, p), x))(tr.params, x0[:8])),
                               rtol=1e-4, atol=1e-4)
    for b in cfg.eval.timing_batches:
        t = costs.measure(fn, tr.params, jnp.asarray(x0[:b]), warmup=2, iters=cfg.eval.timing_iters)
        row[f"b{b}_ms"] = 1e3 * float(np.median(t.times_s))
    done.write_text(json.dumps(row))
    return row, done.parent / "metrics.jsonl"


def interleaved_timing(cfg, data, workdir, variants, seed: int):
    """Inference wall-clock of every variant (seed ``seed``'s trained weights), measured in interleaved rounds (one
    call of each variant per round, ``costs.measure``), so a change of load on a shared machine hits every variant
    alike; min and median over the rounds."""
    train_ds, _, test, _ = data
    fns = {}
    for k in variants:
        depth, kk = (1, 1) if k == CONTROL else (cfg.model.depth, k)
        graphdef, params = vit_lib.build(model_config(cfg, depth), seed)
        tag = "single" if k == CONTROL else f"k{k}"
        params = vision.train_classifier(graphdef, params, forward_fn(kk), train_ds, steps=cfg.train.steps,
                                         batch_size=cfg.data.batch_size, optim=cfg.train.optim, seed=seed,
                                         workdir=workdir / f"{tag}-s{seed}", log_every=cfg.log_every,
                                         desc="restore").params
        fns[variant_name(k, cfg.model.depth)] = (static_fn(graphdef, kk), params)
    x0 = next(vision.padded(test, max(cfg.eval.timing_batches)))[0]
    rows = []
    for b in cfg.eval.timing_batches:
        x = jnp.asarray(x0[:b])
        times = {name: [] for name in fns}
        for name, (fn, p) in fns.items():
            costs.measure(fn, p, x, warmup=2, iters=1)                 # compile and warm up
        for _ in range(cfg.eval.timing_iters):
            for name, (fn, p) in fns.items():
                times[name] += costs.measure(fn, p, x, warmup=0, iters=1).times_s
        seq = min(times[variant_name(1, cfg.model.depth)])
        rows += [{"batch": b, "variant": name, "min_ms": 1e3 * min(t), "median_ms": 1e3 * float(np.median(t)),
                  "min_vs_sequential": min(t) / seq} for name, t in times.items()]
    return rows


def summarize(rows, keys):
    """Mean and std over seeds of each variant."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        s = {"variant": name, "blocks in parallel": rs[0]["k"] or "-", "sequential groups": rs[0]["depth"],
             "params": rs[0]["params"], "MFLOPs": rs[0]["MFLOPs"], "seeds": len(rs)}
        for key in keys:
            vals = np.asarray([r[key] for r in rs], float)
            s[key] = f"{vals.mean():.4g} ± {vals.std():.2g}" if len(rs) > 1 else f"{vals.mean():.4g}"
        out.append(s)
    return out


def paired_differences(rows, depth):
    """(variant - sequential) per seed: the paper's quantity (its distribution over the grid centres near 0)."""
    seq = {r["seed"]: r for r in rows if r["k"] == 1}
    out = []
    for r in rows:
        if r["k"] in (0, 1) or r["seed"] not in seq:
            continue
        s = seq[r["seed"]]
        out.append({"variant": r["variant"], "seed": r["seed"],
                    "d_train_loss": r["train_loss"] - s["train_loss"], "d_val_loss": r["val_loss"] - s["val_loss"],
                    "d_test_acc": r["test_acc"] - s["test_acc"],
                    "b1_latency_ratio": r["b1_ms"] / s["b1_ms"] if "b1_ms" in r else float("nan")})
    return out


def plot(rows, path, title):
    fig = Figure(figsize=(11, 3.6))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    for i, (key, label) in enumerate([("train_loss", "training loss"), ("val_loss", "validation loss"),
                                      ("test_acc", "test accuracy (%)")]):
        ax = fig.add_subplot(1, 3, i + 1)
        for j, name in enumerate(names):
            vals = [r[key] for r in rows if r["variant"] == name]
            ax.scatter([j] * len(vals), vals, color=f"C{j}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")


@experiment("shallow_again", data=vision.splits)
def main(run: Run, data) -> Report:
    cfg, (train_ds, val, test), workdir = run.cfg, data, run.workdir
    n_sub = min(cfg.eval.train_subset or len(train_ds), len(train_ds))
    train_sub = train_ds.subset(np.arange(n_sub), "train")
    print(vision.describe(cfg, data))
    variants = list(cfg.parallel) + ([CONTROL] if cfg.single_block_control else [])
    rows, logs = [], []
    for seed in cfg.seeds:
        for k in variants:
            row, log = run_one(cfg, (train_ds, val, test, train_sub), workdir, k, seed)
            print(json.dumps(row), flush=True)
            rows.append(row)
            logs += [json.dumps({"run": f"{row['variant']} seed {seed}", **json.loads(line)})
                     for line in (log.read_text().splitlines() if log.exists() else [])]
    timing = interleaved_timing(cfg, (train_ds, val, test, train_sub), workdir, variants, cfg.seeds[0])
    timing_keys = [f"b{b}_ms" for b in cfg.eval.timing_batches]
    keys = ["train_loss", "val_loss", "val_acc", "test_acc", "train_steps_per_s", *timing_keys]
    summary = summarize(rows, keys)
    diffs = paired_differences(rows, cfg.model.depth)
    return report(run, data, n_sub, rows, logs, timing, summary, diffs)


def report(run, data, n_sub, rows, logs, timing, summary, diffs) -> Report:
    cfg, (train_ds, val, test) = run.cfg, data
    d_val = np.asarray([d["d_val_loss"] for d in diffs])
    d_train = np.asarray([d["d_train_loss"] for d in diffs])
    files = {"shallow_again.png": lambda path: plot(
                 rows, path, f"sequential vs parallel blocks on {cfg.data.name} (every seed a dot)"),
             "train_logs.jsonl": lambda path: path.write_text("\n".join(logs) + "\n")}
    m = cfg.model
    md = "\n\n".join([
        f"# Make Deep Networks Shallow Again at small scale on {cfg.data.name}",
        run.prov.markdown() + "  \n"
        f"Data: {cfg.data.name}: train {len(train_ds)} / val {len(val)} (carved from train) / test {len(test)}; "
        f"training loss measured after training on the first {n_sub} training examples.  \n"
        f"Scale: ViT patch {m.patch_size}, width {m.d_model}, {m.num_heads} heads, MLP {m.mlp_dim}, {m.depth} pre-LN "
        f"blocks, one linear head; {cfg.train.steps} steps of batch {cfg.data.batch_size} (AdamW, warmup-cosine, "
        f"lr {cfg.train.optim.lr}), seeds {tuple(cfg.seeds)}; every variant of a seed starts from the same weights "
        "and sees the same batches. Latency: median of "
        f"{cfg.eval.timing_iters} timed calls of the engine's static prefix program over the groups (jit, after "
        "warm-up), on the hardware above.",
        "Paper (arXiv:2309.08414, abstract): 6,912 configurations of conv nets on MNIST and CIFAR-10; deep "
        "(sequential) and shallow (parallel) layouts reached similar training and validation loss. Ours: "
        "transformer blocks instead of conv layers, one small grid (variants x seeds), so only the shape is "
        "comparable.",
        "## Per variant (mean ± std over seeds; every seed is in the json and the plot)",
        report_lib.markdown_table(summary, list(summary[0])),
        "## Paired differences against the sequential stack (same seed, same init, same batches)\n"
        + (f"Over {len(diffs)} pairs: mean (variant - sequential) validation loss {d_val.mean():+.4f} "
           f"(range {d_val.min():+.4f} .. {d_val.max():+.4f}); training loss {d_train.mean():+.4f} "
           f"(range {d_train.min():+.4f} .. {d_train.max():+.4f})." if len(diffs) else "no pairs"),
        report_lib.markdown_table(diffs, list(diffs[0])) if diffs else "",
        f"## Inference wall-clock, interleaved rounds (seed {cfg.seeds[0]}'s weights)\n"
        f"{cfg.eval.timing_iters} rounds, each calling every variant once (engine static prefix program over its "
        "groups, jit, after warm-up); min and median per variant. On a shared, loaded CPU the minimum is the more "
        "stable number; the per-run b*_ms columns above were timed one variant at a time and are noisier.",
        report_lib.markdown_table(timing, list(timing[0]), floatfmt=".3f"),
        "## Every run", report_lib.markdown_table(rows, list(rows[0]), floatfmt=".4g"),
        "Plot: `shallow_again.png` (training loss, validation loss and test accuracy per variant, one dot per seed); "
        "training logs: `train_logs.jsonl`."])
    return Report(md, {"runs": rows, "summary": summary, "paired_differences": diffs, "timing_interleaved": timing,
                       "model": dataclasses.asdict(model_config(cfg, cfg.model.depth))}, files)


if __name__ == "__main__":
    main()
