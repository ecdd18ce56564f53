"""LGViT at small scale: heterogeneous exit heads, two-stage training, dynamic early exit on a ViT.

    python -m experiments.lgvit --config configs/lgvit.py:smoke [--config.stage1.steps=100] [--outdir DIR]

For each head variant (LGViT heads / linear heads / ViT-EE heads): stage 1 trains backbone + all exits end to end
(LGViT's alternating weighted CE), stage 2 freezes the backbone and distils into the early heads. Then every exit's
softmax is cached on validation and test, and the script reports per-exit accuracy, accuracy vs speed-up over
confidence thresholds (simulated from cached logits AND executed by the while-loop engine, which must agree), the
MSDNet budgeted curve against static truncated-depth baselines, measured latency/throughput, and plots.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.harness import config as config_lib
from eejax.harness import run
from eejax.data import pipeline
from eejax.eval import budgeted, report
from eejax.harness import results as result_files
from eejax.exits import costs, losses
from eejax.models import vit as vit_lib
from eejax.train import Trainer, make_optimizer, maybe_initialize

# ----------------------------------------------------------------------------------------------------- data


def load_data(cfg, data_dir):
    d = cfg.data
    if d.name == "mnist_embedded":
        if data_dir is not None:
            raise config_lib.ConfigError("--data_dir is not used by data.name='mnist_embedded' (it ships with the "
                                         "package); drop it or set --config.data.name to a file dataset")
        full = pipeline.get_dataset("mnist_embedded", "all")
        num_val = int(round(d.val_fraction * (len(full) - 2000)))  # of the pool before the fixed test part
        train, val, test = pipeline.split_embedded(full, cfg.seed, num_val=num_val)
    else:
        full = pipeline.get_dataset(d.name, "train", data_dir)
        train, val = pipeline.split_train_val(full, d.val_fraction, cfg.seed)
        test = pipeline.get_dataset(d.name, "test", data_dir)
    if d.train_size:
        train = train.subset(np.arange(min(d.train_size, len(train))), "train")
    if d.test_size:
        test = test.subset(np.arange(min(d.test_size, len(test))), "test")
    return train, val, test


def _host_slice():
    """Each host loads its slice of every global batch (multi-host runs)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def padded_eval_images(ds, cfg):
    """One in-order pass as ``(images, n_real)``, the last batch zero-padded so one compiled program serves all."""
    bs = cfg.data.eval_batch_size
    for batch in pipeline.BatchIterator(ds, bs, shuffle=False, drop_remainder=False):
        x = batch["image"]
        n = x.shape[0]
        yield (np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)]) if n < bs else x), n


# ---------------------------------------------------------------------------------------------------- model


def early_heads_mask(params, num_exits: int):
    """Trainable in stage 2: the heads of the early exits only (backbone and final classifier frozen)."""
    def trainable(path, _):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        return len(keys) > 1 and keys[0] == "heads" and int(keys[1]) < num_exits - 1
    return jax.tree_util.tree_map_with_path(trainable, params)


def stage1_loss(graphdef, mcfg, weighting):
    def loss_fn(params, batch, ctx):
        outs = nnx.merge(graphdef, params).all_exits(batch["image"])
        if weighting == "alternating":
            weights = losses.lgvit_stage1_weights(ctx.step, mcfg.exit_layers)
        else:
            weights = losses.exit_weights(mcfg.exit_layers, weighting)
        loss, ce_E = losses.multi_exit_ce(outs.logits_ExBxC, batch["label"], weights)
        acc_E = jnp.mean(jnp.argmax(outs.logits_ExBxC, -1) == batch["label"][None], axis=1)
        return loss, {"ce_first": ce_E[0], "ce_last": ce_E[-1], "acc_first": acc_E[0], "acc_last": acc_E[-1]}
    return loss_fn


def stage2_loss(graphdef, mcfg, s2):
    def loss_fn(params, batch, ctx):
        del ctx
        model = nnx.merge(graphdef, params)
        outs = model.all_exits(batch["image"])
        final_feat = jax.lax.stop_gradient(outs.feat_ExBxD[-1])
        t = losses.lgvit_stage2_loss(outs.logits_ExBxC, outs.feat_ExBxD, final_feat, batch["label"],
                                     mcfg.head_kinds, temperature=s2.temperature, alpha=s2.alpha,
                                     hetero_weight=s2.hetero_weight, homo_weight=s2.homo_weight)
        gate = losses.gate_loss(outs.gate_ExB, jax.lax.stop_gradient(outs.logits_ExBxC), batch["label"])
        return t.total + gate, {"ce": t.ce, "kd": t.kd, "hetero": t.hetero, "homo": t.homo, "gate": gate}
    return loss_fn


# ----------------------------------------------------------------------------------------------- evaluation


def cached_probs(graphdef, params, ds, cfg):
    """Every exit's softmax for every example: ``probs_ExNxC`` (the last batch is padded to keep one compile)."""
    @jax.jit
    def probs_fn(params, x):
        return jax.nn.softmax(nnx.merge(graphdef, params).all_exits(x).logits_ExBxC, axis=-1)

    return np.concatenate([np.asarray(probs_fn(params, x))[:, :n] for x, n in padded_eval_images(ds, cfg)], axis=1)


def executed_exits(graphdef, params, ds, cfg, threshold):
    """Run the while-loop engine for real; returns (exit_N, correct_N)."""
    @jax.jit
    def dyn(params, x, thr):
        out = nnx.merge(graphdef, params).dynamic(x, thr)
        return out.exit_B, jnp.argmax(out.logits_BxC, -1)

    exits, preds = [], []
    for x, n in padded_eval_images(ds, cfg):
        e, p = dyn(params, x, threshold)
        exits.append(np.asarray(e)[:n])
        preds.append(np.asarray(p)[:n])
    return np.concatenate(exits), np.concatenate(preds) == ds.labels_N


def timings(graphdef, params, ds, cfg, thresholds):
    """Measured, executed: batch-1 latency per example and batched throughput, static full depth vs dynamic."""
    e_last = len(vit_lib.ViTConfig(**_mkw(cfg, "linear")).exit_layers) - 1
    static = jax.jit(lambda p, x: nnx.merge(graphdef, p).static(x, e_last))
    dyn = jax.jit(lambda p, x, t: nnx.merge(graphdef, p).dynamic(x, t).logits_BxC)
    it = pipeline.BatchIterator(ds, cfg.eval.throughput_batch, shuffle=False)
    xb = next(iter(it))["image"]
    singles = [xb[i:i + 1] for i in range(min(cfg.eval.latency_examples, xb.shape[0]))]

    def latency(fn, *extra):
        fn(params, singles[0], *extra).block_until_ready()   # compile
        return float(np.mean([costs.measure(fn, params, x, *extra, warmup=0, iters=1).mean_s for x in singles]))

    out = {"static_full": {"latency_ms": 1e3 * latency(static),
                           "throughput": costs.throughput(static, xb.shape[0], params, xb)}}
    for t in thresholds:
        out[f"{t:g}"] = {"latency_ms": 1e3 * latency(dyn, jnp.float32(t)),
                         "throughput": costs.throughput(dyn, xb.shape[0], params, xb, jnp.float32(t))}
    return out


def _mkw(cfg, head_types):
    return dict(cfg.model.to_dict(), num_classes=10, head_types=head_types)


# ---------------------------------------------------------------------------------------------------- main


def run_variant(variant, cfg, data, workdir, mcfg):
    train, val, test = data
    graphdef, params = vit_lib.build(mcfg, cfg.seed)
    batches = pipeline.BatchIterator(train, cfg.data.batch_size, seed=cfg.seed, **_host_slice())
    with Trainer(stage1_loss(graphdef, mcfg, cfg.stage1.weighting), params, make_optimizer(cfg.stage1.optim),
                 workdir=workdir / variant / "stage1", seed=cfg.seed, log_every=cfg.log_every,
                 ckpt_every=cfg.ckpt_every) as tr:
        params1 = tr.fit(batches, cfg.stage1.steps, desc=f"{variant} stage 1").params
    probs1 = cached_probs(graphdef, params1, test, cfg)

    num_exits = len(mcfg.exit_layers)
    batches = pipeline.BatchIterator(train, cfg.data.batch_size, seed=cfg.seed + 1, **_host_slice())
    with Trainer(stage2_loss(graphdef, mcfg, cfg.stage2), params1,
                 make_optimizer(cfg.stage2.optim, trainable=early_heads_mask(params1, num_exits)),
                 workdir=workdir / variant / "stage2", seed=cfg.seed, log_every=cfg.log_every,
                 ckpt_every=cfg.ckpt_every) as tr:
        params2 = tr.fit(batches, cfg.stage2.steps, desc=f"{variant} stage 2").params
    return graphdef, params2, probs1


@run.cli
def main(argv=None):
    cfg, args = config_lib.parse_cli(argv, description=__doc__)  # every value validated before any work
    data = load_data(cfg, args.data_dir)
    maybe_initialize()  # Multi-host: before the first device query below (the Trainer would be too late).
    prov = result_files.provenance("experiments.lgvit", argv)
    workdir, outdir = run.prepare(cfg, args, "lgvit")  # lock + config bound to the workdir
    train, val, test = data
    print(f"data {cfg.data.name}: train {len(train)} / val {len(val)} / test {len(test)}; devices: "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")

    labels_val, labels_test = val.labels_N, test.labels_N
    rows_exit, rows_thr, rows_budget, curves, statics, hist, results = [], [], [], {}, [], {}, {}
    for variant in cfg.variants:
        mcfg = vit_lib.ViTConfig(**_mkw(cfg, variant))
        ec = vit_lib.flops(mcfg)
        graphdef, params, probs1_test = run_variant(variant, cfg, data, workdir, mcfg)
        probs_val = cached_probs(graphdef, params, val, cfg)
        probs_test = cached_probs(graphdef, params, test, cfg)
        acc1 = (probs1_test.argmax(-1) == labels_test[None]).mean(1)
        acc2 = (probs_test.argmax(-1) == labels_test[None]).mean(1)
        for stage, acc in (("stage 1", acc1), ("stage 2", acc2)):
            rows_exit.append({"heads": variant, "stage": stage,
                              **{f"exit@L{l + 1}": 100 * a for l, a in zip(mcfg.exit_layers, acc)}})

        # Confidence-threshold sweep: simulated from cached softmax, and executed by the while-loop engine.
        conf_test = probs_test.max(-1)
        full_flops = ec.static_flops_E[-1]
        times = timings(graphdef, params, test, cfg, cfg.eval.thresholds)
        sweep = []
        for t in cfg.eval.thresholds:
            sim_exit = budgeted.simulate_exits(conf_test, np.full(len(mcfg.exit_layers), t))
            run_exit, run_correct = executed_exits(graphdef, params, test, cfg, t)
            layers = np.asarray(mcfg.exit_layers)[run_exit]
            row = {"heads": variant, "threshold": t, "acc": 100 * run_correct.mean(),
                   "mean_layers": layers.mean() + 1,
                   "speedup_layers": costs.layer_speedup(layers, mcfg.depth),
                   "speedup_flops": full_flops / costs.expected_flops(run_exit, ec.cum_flops_E),
                   "b1_latency_speedup": times["static_full"]["latency_ms"] / times[f"{t:g}"]["latency_ms"],
                   "b256_throughput_speedup": times[f"{t:g}"]["throughput"] / times["static_full"]["throughput"],
                   "sim_agrees": float((sim_exit == run_exit).mean())}
            sweep.append(row)
        rows_thr += sweep
        hist[variant] = executed_exits(graphdef, params, test, cfg, 0.9)[0]

        # MSDNet budgeted protocol: thresholds chosen on validation, applied to test.
        curve = budgeted.budgeted_curve(probs_val, labels_val, probs_test, labels_test, ec.cum_flops_E)
        static = budgeted.static_points(probs_test, labels_test, ec.static_flops_E)
        curves[f"{variant} (dynamic)"] = [(p.expected_flops, 100 * p.accuracy) for p in curve]
        if variant == cfg.variants[0]:
            statics = [(p.expected_flops, 100 * p.accuracy, f"L{l + 1}") for p, l in zip(static, mcfg.exit_layers)]
        xs, ys = zip(*sorted(curves[f"{variant} (dynamic)"]))
        above = [s for s in static[:-1] if xs[0] <= s.expected_flops <= xs[-1]
                 and np.interp(s.expected_flops, xs, ys) > 100 * s.accuracy]
        rows_budget.append({"heads": variant, "static_points_beaten": f"{len(above)}/{len(static) - 1}",
                            "acc@min_budget": ys[0], "acc@max_budget": ys[-1],
                            "full_depth_acc": 100 * static[-1].accuracy,
                            "full_depth_MFLOPs": static[-1].expected_flops / 1e6})
        results[variant] = {"exit_layers": list(mcfg.exit_layers), "head_kinds": list(mcfg.head_kinds),
                            "acc_stage1": acc1.tolist(), "acc_stage2": acc2.tolist(),
                            "cum_flops": ec.cum_flops_E.tolist(), "static_flops": ec.static_flops_E.tolist(),
                            "sweep": sweep, "timings": times,
                            "budgeted": [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p._asdict()
                                         for p in curve]}

    if jax.process_index() != 0:  # every host computed the same results; one writes them
        return
    # Everything goes to a staging folder and replaces earlier results only once all of it is written.
    stage = result_files.StagedResults(outdir, overwrite=args.overwrite)
    report.plot_accuracy_vs_flops(curves, statics, stage.dir / "lgvit_budgeted.png",
                                  title=f"LGViT-small on {cfg.data.name}: budgeted (MSDNet protocol)")
    report.plot_exit_histogram(hist, len(vit_lib.ViTConfig(**_mkw(cfg, "lgvit")).exit_layers),
                               stage.dir / "lgvit_exits.png", title="exit histogram at threshold 0.9 (executed)")
    exit_cols = list(rows_exit[0].keys())
    md = "\n\n".join([
        f"# LGViT at small scale on {cfg.data.name}",
        prov.markdown() + "  \n"
        f"Data: {cfg.data.name}: train {len(train)} / val {len(val)} (carved from train) / test {len(test)}.  \n"
        f"Scale: ViT depth {cfg.model.depth}, width {cfg.model.d_model}, patch {cfg.model.patch_size}, "
        f"{cfg.stage1.steps} + {cfg.stage2.steps} steps of batch {cfg.data.batch_size}; exits after layers "
        f"{[l + 1 for l in vit_lib.ViTConfig(**_mkw(cfg, 'lgvit')).exit_layers]}.",
        "Paper (arXiv:2308.00255, abstract): LGViT reaches competitive accuracy with about 1.8x speed-up on "
        "ViT-B/16, DeiT-B and Swin-B over CIFAR-100, Food-101 and ImageNet-1K. Ours is a 6-layer ViT trained from "
        "scratch, so absolute accuracies are not comparable; the orderings are.",
        "## Per-exit test accuracy (%)", report.markdown_table(rows_exit, exit_cols),
        "## Accuracy vs speed-up over confidence thresholds (executed by the while-loop engine)\n"
        "speedup_layers is LGViT's definition (L / mean layers run); speedup_flops counts every head evaluated "
        "on the way; b1_latency_speedup and b256_throughput_speedup are measured wall-clock against the static "
        "full-depth model (a batched masked loop only saves time when the whole batch has exited); sim_agrees is "
        "the fraction of test samples whose executed exit equals the one simulated from cached softmax.",
        report.markdown_table(rows_thr, list(rows_thr[0].keys())),
        "## Budgeted evaluation (MSDNet protocol: 39 priors, thresholds fit on validation)\n"
        "static_points_beaten counts static truncated-depth models whose accuracy the dynamic curve exceeds at "
        "the same FLOPs. Plot: `lgvit_budgeted.png`; exit histogram: `lgvit_exits.png`.",
        report.markdown_table(rows_budget, list(rows_budget[0].keys()))])
    files = stage.write_results("lgvit", md, {"provenance": prov._asdict(), "config": cfg.to_dict(),
                                              "results": results})
    stage.commit()
    print(md)
    print(f"wrote {files.md_path}, {files.json_path} and plots to {outdir}")


if __name__ == "__main__":
    main()
