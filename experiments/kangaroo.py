"""Kangaroo on a frozen pretrained LM: train adapter drafters on cached features, fit eta / l on validation prompts,
then decode held-out prompts with double-early-exit self-speculation.

    python -m experiments.kangaroo --config configs/kangaroo.py:smoke [--outdir DIR]

See configs/kangaroo.py for the runbook (protocol, scale, wall-clock). The recipe pieces (model, corpus windows,
feature cache, adapter training, prompts, timing) live in experiments/_common_smollm2.py, shared with
experiments/specee.py, which uses a Kangaroo drafter as its draft head.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.decoding import kangaroo as kg
from eejax.errors import ConfigError
from eejax.eval import report as report_lib
from eejax.exits import costs, engine
from eejax.harness import results as result_files
from eejax.models import lm as lm_lib
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "kangaroo"
DRAFTERS = ("adapter", "shared-head")


# ------------------------------------------------------------------------------------------------ adapter training


def adapters(model: common.LM, cfg, args, workdir: pathlib.Path, log=print, prov=None) -> tuple[dict, dict, dict]:
    """Cache features, then train (or load from the workdir) one adapter per exit layer. Returns
    ``({l: adapter}, {l: training log}, cache info)``. Each adapter trained here gets a ``.provenance.json`` record
    (sha256, this run's commit, the step) so a run that reads it (SpecEE's drafter) can name what it read."""
    layers = tuple(cfg.drafter.exit_layers)
    if max(layers) >= model.cfg.depth:
        raise ConfigError(f"drafter.exit_layers {layers} must be < the model's depth {model.cfg.depth}")
    d = cfg.data
    train = common.cache_draft_features(
        model, common.gutenberg_windows(args.data_dir, model.tokenizer, "train", d.train_windows, d.context),
        layers, cfg.train.topk, d.cache_batch, workdir / "cache_train.npz", log)
    val = common.cache_draft_features(
        model, common.gutenberg_windows(args.data_dir, model.tokenizer, "validation", d.val_windows, d.context),
        layers, cfg.train.topk, d.cache_batch, workdir / "cache_val.npz", log)
    out, logs = {}, {}
    lm = nnx.merge(model.graphdef, model.params)
    for i, l in enumerate(layers):
        path = workdir / f"adapter_l{l}.npz"
        log_path = workdir / f"adapter_l{l}.json"
        if path.exists() and log_path.exists():
            out[l], logs[l] = common.load_tree(path, kg.init_adapter(lm, l)), json.loads(log_path.read_text())
            continue
        out[l], logs[l] = common.train_adapter(model, i, l, train, val, cfg.train, cfg.seed + l,
                                               workdir / f"adapter_l{l}", log)
        common.save_tree(path, out[l])
        log_path.write_text(json.dumps(logs[l]))
        if prov is not None:
            result_files.write_artefact_record(path, prov, step=cfg.train.steps)
    info = {"train_vocab": int(np.unique(train["top_idx"]).size) if cfg.train.restrict_vocab else None,
            "train_tokens": int(train["top_idx"].shape[0] * train["top_idx"].shape[1]),
            "val_tokens": int(val["top_idx"].shape[0] * val["top_idx"].shape[1]),
            "cache_seconds": float(train["seconds"]) + float(val["seconds"]),
            "topk_mass_train": float(np.mean(np.sum(train["top_p"].astype(np.float32), -1)))}
    return out, logs, info


# ------------------------------------------------------------------------------------------------ decoding


def teacher_forced_drafts(model: common.LM, adapter: dict, exit_layer: int, seq_BxT: np.ndarray):
    """Draft argmax and top-1 probability at every position of ``seq`` (the drafter on the true prefix)."""
    def f(params, adapter, seq):
        lm = nnx.merge(model.graphdef, params)
        valid = jnp.ones(seq.shape, bool)
        pos, mask = lm.positions(valid), lm_lib.causal_mask(valid)
        h, _ = engine.run_layers(lm.layers, lm.embed_tokens(seq), program=engine.sequence(range(exit_layer)),
                                 layer_fn=lambda layer, x, ctx: layer(x, pos, mask))
        p = jax.nn.softmax(kg.adapter_logits(lm, adapter, h).astype(jnp.float32), -1)
        return jnp.argmax(p, -1), jnp.max(p, -1)
    a, c = jax.jit(f)(model.params, adapter, jnp.asarray(seq_BxT))
    return np.asarray(a), np.asarray(c)


def simulate(argmax_BxT, conf_BxT, seq_BxT, prompt_len: int, num_new: int, eta: float, gamma: int) -> dict:
    """Kangaroo's rounds per row (batch 1) over the greedy continuation, from teacher-forced drafts: exact for the
    accepted prefix and the first rejected draft; later drafts of a round use the true-prefix confidence."""
    rounds = drafted = accepted = 0
    for a, c, x in zip(argmax_BxT, conf_BxT, seq_BxT):
        t = 0                                   # index of `last` in the continuation (position prompt_len + t)
        while t < num_new - 1:
            pos = prompt_len + t
            n_draft, n_acc, matching = 0, 0, True
            for j in range(gamma):
                i = pos + j
                if i + 1 >= len(x):
                    break
                n_draft += 1
                matching = matching and a[i] == x[i + 1]
                n_acc += int(matching)
                if c[i] < eta:
                    break
            rounds, drafted, accepted = rounds + 1, drafted + n_draft, accepted + n_acc
            t += n_acc + 1
    return {"rounds": rounds, "drafted": drafted, "accepted": accepted}


def cost_speedup(mcfg, exit_layer, rows: int, num_new: int, drafted, rounds) -> float:
    """Cost model (roofline, H200 calibrated 2026-12-04; ``eejax.exits.costs``, the one cost model of every
    decoder) at batch 1: every draft step's l layers, adapter and vocabulary head, every round's verify of its drafts
    + 1 positions, against greedy's L layers + head per token."""
    counts = costs.kangaroo_counts(exit_layer, tokens=rows * (num_new - 1), draft_steps=float(drafted),
                                   rounds=float(rounds))
    return costs.predicted_speedup(mcfg, counts, batch=1).value


def _hist_ratio(hist):
    """Mean top-1 probability (bin centres) of accepted and of first-rejected drafts."""
    centres = (np.arange(kg.CONF_BINS) + 0.5) / kg.CONF_BINS
    return [float(np.sum(h * centres) / max(np.sum(h), 1)) for h in hist]


@experiment(NAME)
def main(run: Run) -> Report:
    cfg, args, workdir = run.cfg, run.args, run.workdir
    model = common.model_of(run)
    layers = tuple(cfg.drafter.exit_layers)
    trained, train_logs, cache_info = adapters(model, cfg, args, workdir, prov=run.prov)
    drafters = {("adapter", l): trained[l] for l in layers}
    drafters.update({("shared-head", l): common.shared_head_adapter(model, l) for l in layers})
    fit_rows, best_eta, best_l = fit_eta(cfg, args, model, drafters, layers)
    rows, hists = test_decode(cfg, args, model, drafters, layers, best_eta)
    return write(cfg, run.prov, model, rows, fit_rows, best_eta, best_l, train_logs, cache_info, hists,
                 run.seconds())


def fit_eta(cfg, args, model, drafters, layers):
    """Fit eta (per drafter and l) and l on VALIDATION prompts: greedy once, drafts teacher-forced, simulated."""
    dc = cfg.decode
    val_p = common.wikitext_prompts(args.data_dir, model.tokenizer, "validation", dc.val_prompts, dc.prompt_len)
    val_gen, _, _ = common.greedy_decode(model, val_p, dc.new_tokens)
    val_seq = np.concatenate([val_p, val_gen], 1)
    fit_rows, best_eta = [], {}
    for (name, l), a in drafters.items():
        am, conf = teacher_forced_drafts(model, a, l, val_seq)
        for eta in dc.etas:
            s = simulate(am, conf, val_seq, dc.prompt_len, dc.new_tokens, eta, dc.gamma)
            fit_rows.append({"drafter": name, "l": l, "eta": eta, "acceptance": s["accepted"] / max(s["drafted"], 1),
                             "CR": (s["accepted"] + s["rounds"]) / s["rounds"],
                             "cost_speedup": cost_speedup(model.cfg, l, len(val_p), dc.new_tokens, s["drafted"],
                                                          s["rounds"])})
        mine = [r for r in fit_rows if r["drafter"] == name and r["l"] == l]
        best_eta[(name, l)] = max(mine, key=lambda r: r["cost_speedup"])["eta"]
        print(f"fit {name} l={l}: eta {best_eta[(name, l)]} "
              f"(val cost speed-up {max(r['cost_speedup'] for r in mine):.3f})")
    best_l = max(layers, key=lambda l: max(r["cost_speedup"] for r in fit_rows
                                           if r["drafter"] == "adapter" and r["l"] == l))

    return fit_rows, best_eta, best_l


def test_decode(cfg, args, model, drafters, layers, best_eta):
    """Report on TEST prompts (held out), executed."""
    dc = cfg.decode
    test_p = common.wikitext_prompts(args.data_dir, model.tokenizer, "test", dc.test_prompts, dc.prompt_len)
    b = len(test_p)
    lengths = jnp.full((b,), dc.prompt_len, jnp.int32)
    ref, greedy_s, greedy_compile = common.greedy_decode(model, test_p, dc.new_tokens)
    print(f"plain greedy: batch {b} x {dc.new_tokens} tokens in {greedy_s:.2f} s (compile {greedy_compile:.1f} s)")
    rows, hists = [{"drafter": "none (plain greedy)", "l": None, "eta": None, "seconds": greedy_s,
                    "tokens_per_s": b * dc.new_tokens / greedy_s, "wall_speedup": 1.0, "cost_speedup": 1.0,
                    "greedy_exact": True, "eta_from": None, "acceptance": None, "CR": None, "mean_draft_len": None,
                    "top1_accepted": None, "top1_first_rejected": None}], {}
    for l in layers:
        f = kg.kangaroo_fn(model.graphdef, dc.new_tokens, exit_layer=l, gamma=dc.gamma)
        compiled, compile_s = None, 0.0
        for name in DRAFTERS:
            for eta, how in ((best_eta[(name, l)], "fit on val"), (dc.eta, "paper default")):
                if how == "paper default" and (eta == best_eta[(name, l)] or name != "adapter"):
                    continue
                args_ = (model.params, drafters[(name, l)], jnp.asarray(test_p), lengths, jnp.float32(eta))
                warmup = compiled is None                      # a warm-up call after compiling, not timed
                if compiled is None:
                    start = time.perf_counter()
                    compiled = jax.jit(f).lower(*args_).compile()
                    compile_s = time.perf_counter() - start
                t = costs.measure(compiled, *args_, warmup=int(warmup), iters=1)
                out, seconds = t.output, t.mean_s
                rb, db, ab = (np.asarray(x) for x in (out.rounds_B, out.drafted_B, out.accepted_B))
                row = {"drafter": name, "l": l, "eta": eta, "eta_from": how,
                       "acceptance": float(out.acceptance_rate), "CR": float(out.tokens_per_verify),
                       "mean_draft_len": float(db.sum() / rb.sum()), "seconds": seconds,
                       "tokens_per_s": b * dc.new_tokens / seconds, "wall_speedup": greedy_s / seconds,
                       "cost_speedup": cost_speedup(model.cfg, l, b, dc.new_tokens, db.sum(), rb.sum()),
                       "batch_draft_steps": int(out.draft_steps), "batch_rounds": int(out.batch_rounds),
                       "verify_tokens": int(out.verify_tokens), "compile_s": compile_s,
                       "greedy_exact": bool((np.asarray(out.tokens_BxG) == ref).all()),
                       "top1_accepted": _hist_ratio(np.asarray(out.conf_hist_2xC))[0],
                       "top1_first_rejected": _hist_ratio(np.asarray(out.conf_hist_2xC))[1]}
                hists[f"{name} l={l} eta={eta}"] = np.asarray(out.conf_hist_2xC).tolist()
                rows.append(row)
                print(f"test {name} l={l} eta={eta}: acceptance {row['acceptance']:.3f}, CR {row['CR']:.2f}, "
                      f"wall x{row['wall_speedup']:.2f}, cost x{row['cost_speedup']:.2f}, exact {row['greedy_exact']}")
    return rows, hists


def write(cfg, prov, model, rows, fit_rows, best_eta, best_l, train_logs, cache_info, hists, total_s) -> Report:
    dc = cfg.decode
    fitted = [r for r in rows if r.get("eta_from") == "fit on val" or r["l"] is None]
    final = {l: train_logs[l][-1] for l in train_logs}
    train_rows = [{"l": l, "steps": cfg.train.steps, "val_soft_ce_before": train_logs[l][0]["val_soft_ce"],
                   "val_soft_ce_after": final[l]["val_soft_ce"],
                   "val_exp_accept_before": train_logs[l][0]["val_expected_acceptance"],
                   "val_exp_accept_after": final[l]["val_expected_acceptance"],
                   "val_top1_before": train_logs[l][0]["val_top1_agreement"],
                   "val_top1_after": final[l]["val_top1_agreement"],
                   "train_seconds": final[l].get("seconds", 0.0)} for l in train_logs]
    cols = ["drafter", "l", "eta", "acceptance", "CR", "mean_draft_len", "seconds", "tokens_per_s", "wall_speedup",
            "cost_speedup", "greedy_exact", "top1_accepted", "top1_first_rejected"]
    speed_note = ("wall_speedup: MEASURED CPU wall-clock against plain greedy timed once at the start "
                  f"({result_files.device_description()}, shared with other jobs, one timed call per run): load "
                  "noise, not a speed-up of Kangaroo; a value above 1 is the load falling during the run. "
                  "cost_speedup: the parameter-read cost model (`eejax.decoding.kangaroo.cost_speedup`: memory-bound GPU at batch 1, "
                  "the shared head counted in every draft step). top1_*: mean top-1 probability of accepted / first "
                  "rejected drafts from 10-bin histograms; their intervals need the histograms (conf_hist).")
    md = "\n\n".join([
        f"# Kangaroo (arXiv:2404.18911) on {cfg.model.name}",
        prov.markdown() + "  \n"
        f"Model: {model.description}.  \nTraining data: Gutenberg train books, {cache_info['train_tokens']} tokens "
        f"({cfg.data.train_windows} windows of {cfg.data.context}); validation book pg11, {cache_info['val_tokens']} "
        f"tokens; full-model top-{cfg.train.topk} targets (mean mass {cache_info['topk_mass_train']:.3f}); training "
        f"softmax over {cache_info['train_vocab'] or 'all'} tokens (those in the training windows' top-k), "
        f"{cfg.train.steps} steps of {cfg.train.batch} windows; validation metrics over the full vocabulary. "
        f"Feature cache built in {cache_info['cache_seconds']:.0f} s.  \n"
        f"Decoding: WikiText-2 validation prompts ({dc.val_prompts}) to fit eta / l, test prompts ({dc.test_prompts}, "
        f"held out) to report; {dc.prompt_len}-token prompts, {dc.new_tokens} new tokens, batch {dc.test_prompts}, "
        f"gamma {dc.gamma}. Total wall-clock {total_s / 60:.1f} min.",
        "## Adapter training (validation book; expected acceptance = sum over the full model's top-k of "
        "min(p_full, p_draft))", report_lib.markdown_table(train_rows, list(train_rows[0]), ".3f"),
        f"## Test (held out), eta fit on validation per drafter and l; best l on validation (adapter): {best_l}\n"
        + speed_note, report_lib.markdown_table(fitted, cols, ".3f"),
        "## Test at the paper's eta = %g" % dc.eta,
        report_lib.markdown_table([r for r in rows if r["l"] is not None and r["eta"] == dc.eta], cols, ".3f"),
        "## Validation fit (simulated from teacher-forced drafts, batch 1)",
        report_lib.markdown_table(fit_rows, ["drafter", "l", "eta", "acceptance", "CR", "cost_speedup"], ".3f"),
    ])
    return Report(md, {"rows": rows, "fit": fit_rows, "best_eta": {f"{k[0]} l={k[1]}": v for k, v in best_eta.items()},
                       "best_l": best_l, "train_logs": {str(k): v for k, v in train_logs.items()},
                       "cache": cache_info, "conf_hist": hists, "total_seconds": total_s})


if __name__ == "__main__":
    main()
