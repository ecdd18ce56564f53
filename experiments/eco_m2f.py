"""ECO-M2F at small scale: a gate on the pooled input tokens picks each image's depth before the encoder runs.

    python -m experiments.eco_m2f --config configs/eco_m2f.py:smoke [--outdir DIR]

Step A: the shared-head multi-exit ViT (experiments/_common_vision.py; one head after every layer). Step B: on
validation, the quality of exit e is the true class's probability there, and each example's label is
``argmax_e [q_e - beta * (e + 1)]`` (``gate_first.gate_labels``). Step C: ``gate_first.DepthGate`` (pooled embedding
tokens, one linear layer) trained with cross-entropy on those labels; only B and C are redone per beta (their wall
clock is reported). On test, per beta: the gate's accuracy and mean depth; the oracle (step B's labels computed on
TEST and applied directly: it reads the answer, so it bounds what a gate could do; it is no method); every static
depth. Each gate is then executed by the grouped executor (``gate_first.Grouped``: rows sorted by their predicted
exit, static-depth chunks, one host stop per batch) and must reproduce the simulated exits and predictions.

Per row, as the paper describes: the released code (GYeow/ECO-M2F) takes ``gates.argmax()`` over the flattened
``B x E`` tensor, one depth for the whole batch, which is the per-row rule only at batch size 1.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eejax.eval import bootstrap, report
from eejax.exits import costs, engine, gate_first
from eejax.train import ArrayIterator, Trainer, one_device_mesh
from experiments import _common_vision as vision
from experiments._common import Report, Run, experiment


def pooled_inputs(graphdef, params, ds, cfg) -> np.ndarray:
    """The gate's input for every example: the embedding tokens (patches and CLS) average-pooled, ``N x D``."""
    @jax.jit
    def fn(params, x):
        return gate_first.pool_tokens(nnx.merge(graphdef, params).embed(x))
    return np.concatenate([np.asarray(fn(params, x))[:n] for x, n in vision.padded_eval_images(ds, cfg)])


def train_gate(pooled_NxD: np.ndarray, labels_N: np.ndarray, num_exits: int, *, steps: int, lr: float, seed: int,
               workdir):
    """Step C: ``DepthGate`` fit by full-batch Adam (every row every step: ``ArrayIterator(draw="all")``) on
    cross-entropy to the derived labels, on the one Trainer (resumable in ``workdir``); returns the gate (an nnx
    module) and the wall-clock seconds of the fit (compilation included)."""
    start = time.perf_counter()
    gdef, state = nnx.split(gate_first.DepthGate(pooled_NxD.shape[1], num_exits, rngs=nnx.Rngs(seed)))

    def loss_fn(s, batch, ctx):
        del ctx
        logits = nnx.merge(gdef, s).from_pooled(batch["x_NxD"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label_N"]).mean(), {}

    batches = ArrayIterator({"x_NxD": pooled_NxD, "label_N": labels_N}, len(labels_N), draw="all")
    with Trainer(loss_fn, state, optax.adam(lr), workdir=workdir, seed=seed, mesh=one_device_mesh(),
                 log_every=steps, ckpt_every=steps) as tr:
        state = jax.block_until_ready(tr.fit(batches, steps, desc="gate").params)
    return nnx.merge(gdef, state), time.perf_counter() - start


def gate_exits(gate, pooled_NxD: np.ndarray) -> np.ndarray:
    return np.asarray(gate_first.predict_exits(gate.from_pooled(jnp.asarray(pooled_NxD))))


def arm_row(name, beta, exit_N, correct_ExN, flops_E, extra_flops, static_acc_E):
    """Accuracy, mean depth and FLOPs of exits ``exit_N``; the static accuracy at the same mean depth (linear
    interpolation between the two neighbouring depths: a random mix of the two static models)."""
    n = exit_N.shape[0]
    depth = float(np.mean(exit_N + 1))
    return {"arm": name, "beta": beta, "mean_depth": depth,
            "test_acc": 100 * float(correct_ExN[exit_N, np.arange(n)].mean()),
            "static_acc_at_depth": 100 * float(np.interp(depth, np.arange(1, len(static_acc_E) + 1), static_acc_E)),
            "MFLOPs": (float(np.mean(flops_E[exit_N])) + extra_flops) / 1e6,
            "exit_histogram": np.bincount(exit_N, minlength=correct_ExN.shape[0]).tolist()}


def static_mix_correct(depth: float, correct_ExN: np.ndarray) -> np.ndarray:
    """Per example, the expected correctness of the static mix at mean depth ``depth`` (paired with the arm)."""
    lo = int(np.clip(np.floor(depth), 1, correct_ExN.shape[0]))
    hi = min(lo + 1, correct_ExN.shape[0])
    w = depth - lo
    return (1 - w) * correct_ExN[lo - 1] + w * correct_ExN[hi - 1]


def executed(model, gate, ds, cfg, program):
    """Exit and softmax per example from the grouped executor driven by the gate (one host stop per batch)."""
    heads = vision.shared_heads(model, False)
    policy = gate_first.gate_policy(gate)
    embed = jax.jit(model.embed)
    exits, probs, chunks, padding = [], [], 0, 0
    for x, n in vision.padded_eval_images(ds, cfg):
        h0 = embed(x)
        exit_B = gate_first.planned_exits(policy, h0, program.num_exits)
        g = gate_first.run_grouped(model.layers, heads, h0, program, exit_B)
        exits.append(np.asarray(g.exit_B)[:n])
        probs.append(np.asarray(jax.nn.softmax(g.out.logits_BxC.astype(jnp.float32), -1))[:n])
        chunks, padding = chunks + g.plan.num_chunks, padding + g.plan.padding
    return np.concatenate(exits), np.concatenate(probs), chunks, padding


def timings(model, gate, xb, program, iters: int) -> dict:
    """Measured seconds per batch of ``xb``: the grouped executor (gate, host stop and chunks), the per-row masked
    loop with the same gate (``engine.Masked``: every row waits for the batch's deepest), and the static full depth."""
    heads = vision.shared_heads(model, False)
    policy = gate_first.gate_policy(gate)
    embed = jax.jit(model.embed)

    def grouped(x):
        return engine.run(model.layers, heads, embed(x), program, policy, gate_first.Grouped()).out.logits_BxC

    masked = jax.jit(lambda x: engine.run(model.layers, heads, model.embed(x), program, policy,
                                          engine.Masked()).out.logits_BxC)
    full = jax.jit(lambda x: model.static(x, 0))
    return {name: costs.measure(fn, xb, warmup=1, iters=iters).mean_s
            for name, fn in (("grouped_s", grouped), ("masked_s", masked), ("static_full_s", full))}


def beta_arms(run: Run, su, beta, pooled_val, pooled_test, correct_test, static_acc, flops_E, gflops, model,
              program) -> dict:
    """One beta: labels on val, the gate's fit, gate and oracle rows on test, their paired comparisons and the
    grouped executor's agreement with the simulated exits."""
    cfg, val, test, n_layers = run.cfg, su.val, su.test, su.mcfg.depth
    q_val = su.probs_val[:, np.arange(len(val)), val.labels_N]          # E x N, the true class's probability
    q_test = su.probs_test[:, np.arange(len(test)), test.labels_N]
    labels_val = gate_first.gate_labels(q_val, beta)
    gate, fit_s = train_gate(pooled_val, labels_val, n_layers, steps=cfg.eval.gate_steps, lr=cfg.eval.gate_lr,
                             seed=cfg.seed, workdir=run.keyed_dir(f"gate-beta{beta:g}", {
                                 "beta": beta, "steps": cfg.eval.gate_steps, "lr": cfg.eval.gate_lr}))
    e_gate = gate_exits(gate, pooled_test)
    e_oracle = gate_first.gate_labels(q_test, beta)
    g = arm_row("gate", beta, e_gate, correct_test, flops_E, gflops, static_acc)
    g.update(gate_val_label_acc=100 * float(np.mean(gate_exits(gate, pooled_val) == labels_val)),
             gate_test_label_acc=100 * float(np.mean(e_gate == e_oracle)), gate_fit_s=fit_s)
    o = arm_row("oracle (test labels applied; reads the answer)", beta, e_oracle, correct_test, flops_E, 0.0,
                static_acc)
    o.update(gate_val_label_acc=None, gate_test_label_acc=None, gate_fit_s=None)
    ok_gate = correct_test[e_gate, np.arange(len(test))].astype(np.float64)
    ok_oracle = correct_test[e_oracle, np.arange(len(test))].astype(np.float64)
    d_static = bootstrap.paired_bootstrap(ok_gate, static_mix_correct(g["mean_depth"], correct_test))
    d_oracle = bootstrap.paired_bootstrap(ok_oracle, ok_gate)
    cmp = {"beta": beta, "gate_depth": g["mean_depth"],
           "gate_minus_static_pp": 100 * d_static.diff, "lo": 100 * d_static.lo,
           "hi": 100 * d_static.hi, "reading": d_static.reading("gate", "static"),
           "oracle_minus_gate_pp": 100 * d_oracle.diff, "lo_o": 100 * d_oracle.lo,
           "hi_o": 100 * d_oracle.hi}
    # Executed: the grouped executor driven by the gate must take the simulated exits and give the cached
    # softmax there (the same layers and head; float differences only from batch composition).
    e_run, p_run, chunks, padding = executed(model, gate, test, cfg, program)
    p_sim = su.probs_test[e_gate, np.arange(len(test))]
    ex = {"beta": beta, "exits_equal": float(np.mean(e_run == e_gate)),
          "preds_equal": float(np.mean(p_run.argmax(-1) == p_sim.argmax(-1))),
          "max_abs_prob_diff": float(np.max(np.abs(p_run - p_sim))), "chunks": chunks, "padding_rows": padding}
    per_beta = {"labels_val_histogram": np.bincount(labels_val, minlength=n_layers).tolist(),
                "gate_exits_test": e_gate.tolist(), "oracle_exits_test": e_oracle.tolist()}
    print(f"beta={beta:g}: gate depth {g['mean_depth']:.2f} acc {g['test_acc']:.2f}; oracle depth "
          f"{o['mean_depth']:.2f} acc {o['test_acc']:.2f}; exec exits equal {ex['exits_equal']:.3f}")
    return {"gate": gate, "rows": [g, o], "compare": cmp, "executed": ex, "per_beta": per_beta}


def timing_rows(model, gates: dict, xb, program, cfg) -> list[dict]:
    """Measured seconds per batch for the timing betas (grouped, masked and static full depth)."""
    rows_time = []
    for beta in cfg.eval.timing_betas:
        if beta not in gates:
            continue
        t = timings(model, gates[beta], xb, program, cfg.eval.timing_iters)
        e_b = gate_exits(gates[beta], np.asarray(gate_first.pool_tokens(jax.jit(model.embed)(xb))))
        rows_time.append({"beta": beta, "batch_mean_depth": float(np.mean(e_b + 1)),
                          "batch_max_depth": int(e_b.max() + 1), **t,
                          "grouped_/_full": t["grouped_s"] / t["static_full_s"],
                          "masked_/_full": t["masked_s"] / t["static_full_s"]})
    return rows_time


def markdown(run: Run, su, r: dict, gflops: float, batch: int) -> str:
    cfg, n_layers = run.cfg, su.mcfg.depth
    rows_static, rows, rows_cmp, rows_exec, rows_time = (r["static"], r["arms"], r["compare"], r["executed"],
                                                         r["timing"])
    cols = ["arm", "beta", "mean_depth", "test_acc", "static_acc_at_depth", "MFLOPs"]
    return "\n\n".join([
        f"# ECO-M2F at small scale on {cfg.data.name}",
        run.prov.markdown() + "  \n"
        f"Data: {cfg.data.name}: train {len(su.train)} / val {len(su.val)} (carved from train; labels of step B and "
        f"the gate's fit) / test {len(su.test)}.  \n"
        f"Scale: ViT depth {n_layers}, width {cfg.model.d_model}, patch {cfg.model.patch_size}, one linear head "
        f"shared by every layer, {cfg.train.steps} steps of batch {cfg.data.batch_size}; gate: one linear layer on "
        f"the pooled embedding ({gflops} FLOPs), {cfg.eval.gate_steps} full-batch Adam steps per beta. MFLOPs per "
        "image: the truncated model at the exit (layers and that exit's head, no head at earlier depths) plus the "
        "gate for the gate arm.",
        "## Static depth (test)", report.markdown_table(rows_static, list(rows_static[0]), ".4g"),
        "## Gate and oracle per beta (test)\nstatic_acc_at_depth: the static accuracy interpolated at the arm's mean "
        "depth. The oracle applies step B's labels computed on test: it reads the answer.",
        report.markdown_table(rows, cols + ["gate_val_label_acc", "gate_test_label_acc", "gate_fit_s"], ".4g"),
        "## Gate vs static at equal mean depth, oracle vs gate (paired bootstrap, 95%, percentage points)",
        report.markdown_table(rows_cmp, list(rows_cmp[0]), ".4g"),
        "## Executed by the grouped executor (test): agreement with the simulated exits",
        report.markdown_table(rows_exec, list(rows_exec[0]), ".4g"),
        f"## Measured seconds per batch of {batch} (shared CPU; grouped includes the gate and its host stop)",
        report.markdown_table(rows_time, list(rows_time[0]), ".4g") if rows_time else "(none)"])


@experiment("eco_m2f", data=vision.splits)
def main(run: Run, data) -> Report:
    su = vision.shared_head_setup(run, data)
    cfg, test, graphdef, params, n_layers = run.cfg, su.test, su.graphdef, su.params, su.mcfg.depth
    correct_test = su.probs_test.argmax(-1) == test.labels_N[None]
    static_acc = correct_test.mean(1)
    pooled_val, pooled_test = pooled_inputs(graphdef, params, su.val, cfg), pooled_inputs(graphdef, params, test, cfg)
    gflops = gate_first.gate_flops(su.mcfg.d_model, n_layers)
    flops_E = np.asarray(su.ec.static_flops_E)     # a truncated model: layers up to the exit and that exit's head
    model = nnx.merge(graphdef, params)
    program = engine.prefix(n_layers, vision.exit_layers(su.mcfg))
    arms = {beta: beta_arms(run, su, beta, pooled_val, pooled_test, correct_test, static_acc, flops_E, gflops, model,
                            program) for beta in cfg.eval.betas}
    rows = [row for a in arms.values() for row in a["rows"]]
    results = {"static": [{"depth": e + 1, "test_acc": 100 * float(static_acc[e]), "MFLOPs": flops_E[e] / 1e6}
                          for e in range(n_layers)],
               "arms": rows, "compare": [a["compare"] for a in arms.values()],
               "executed": [a["executed"] for a in arms.values()],
               "timing": timing_rows(model, {b: a["gate"] for b, a in arms.items()}, su.xb, program, cfg),
               "per_beta": {f"{b:g}": a["per_beta"] for b, a in arms.items()}, "full_test_acc": float(static_acc[-1]),
               "gate_MFLOPs": gflops / 1e6, "static_flops": flops_E.tolist()}
    curves = {"gate (beta sweep)": [(r["MFLOPs"] * 1e6, r["test_acc"]) for r in rows if r["arm"] == "gate"],
              "oracle (labels applied)": [(r["MFLOPs"] * 1e6, r["test_acc"]) for r in rows if r["arm"] != "gate"]}
    statics = [(flops_E[e], 100 * static_acc[e], f"L{e + 1}") for e in range(n_layers)]
    title = f"ECO-M2F gate vs oracle vs static depth on {cfg.data.name} (test)"
    return Report(markdown(run, su, results, gflops, su.xb.shape[0]), {"results": results}, files={
        "eco_m2f_curves.png": lambda path: report.plot_accuracy_vs_flops(curves, statics, path, title=title)})


if __name__ == "__main__":
    main()
