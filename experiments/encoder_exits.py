"""Early-exit text encoders on SST-2: DeeBERT / PABEE policies, PALBERT's Q-exit, over the eejax engine.

    python -m experiments.encoder_exits --config configs/encoder_exits.py:sst2 [--outdir DIR]

For each training arm (``multi_exit``: PABEE's depth-weighted CE over all exits; ``ponder``: PALBERT's PonderNet
loss over the halting distribution) the script fine-tunes the encoder with the eejax Trainer, caches every exit's
logits on SST-2 dev, and evaluates three exit policies, each EXECUTED by the while-loop engine
(``Encoder.dynamic``) and checked against the policy simulated from the cached scan-path outputs:

* DeeBERT (arXiv:2004.12993): exit at the first layer whose prediction entropy is below S (``neg_entropy >= -S``);
* PABEE (arXiv:2006.04152): exit once the argmax has stayed unchanged for ``t`` consecutive exits (``patience``);
* PALBERT Q-exit (arXiv:2204.03276), ponder models only: exit at the first layer where the halting CDF reaches q
  (``learned`` measure on the heads' ``gate = logit(CDF)``).

It reports accuracy, mean layers run, layer speed-up (PABEE/PALBERT's definition: L / mean layers) and measured
batch-1 latency against the static full-depth model, and for two arms PALBERT vs PABEE at matched mean layers.
Shapes: B batch, T tokens, E exits, C classes, N examples.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.sst2 import load_sst2
from eejax.eval import report as report_lib
from eejax.exits import confidence as conf_lib
from eejax.exits import costs, engine, losses, policies
from eejax.models import encoder as enc
from eejax.models import pretrained_encoder as pe
from eejax.nn import param_count
from experiments import _common_encoder as common
from experiments._common import Report, Run, experiment

NUM_CLASSES = 2

# ----------------------------------------------------------------------------------------------------- data


def load(cfg, args):
    """The tokenizer, SST-2 train (a seeded subset) and dev, read before anything is written."""
    tok = common.tokenizer()
    return (tok, *load_data(cfg, args.data_dir, tok))


def load_data(cfg, data_dir, tok):
    d = cfg.data
    train_x, train_y = load_sst2(data_dir, "train")
    dev_x, dev_y = load_sst2(data_dir, "dev")
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_x))[:d.train_size])
    train = {**tok([train_x[i] for i in pick], d.max_len), "label": train_y[pick]}
    n_dev = d.eval_size or len(dev_x)
    dev = {**tok(dev_x[:n_dev], d.eval_max_len), "label": dev_y[:n_dev]}
    return train, dev


# ---------------------------------------------------------------------------------------------------- model


def build_model(cfg, tok):
    m = cfg.model
    kw = dict(num_classes=NUM_CLASSES, exits=m.exits, pool=m.pool, shared_layers=m.shared_layers, ponder=m.ponder,
              lambda_hidden=m.lambda_hidden)
    if m.pretrained:
        return pe.load_encoder(pe.minilm_dir(), cfg.seed, shared_from=m.shared_from, **kw)
    ecfg = enc.EncoderConfig(vocab_size=tok.vocab_size, max_len=max(cfg.data.max_len, cfg.data.eval_max_len),
                             d_model=m.d_model, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim, **kw)
    return enc.build(ecfg, cfg.seed)


def make_loss(graphdef, arm, tcfg):
    def loss_fn(params, batch, ctx):
        del ctx
        model = nnx.merge(graphdef, params)
        exit_layers = model.cfg.exit_layers
        outs = model.all_exits(batch["ids"], batch["mask"], batch["type_ids"])
        acc_E = jnp.mean(jnp.argmax(outs.logits_ExBxC, -1) == batch["label"][None], axis=1)
        if arm == "multi_exit":   # PABEE's training: CE at every exit, weighted by depth
            loss, ce_E = losses.multi_exit_ce(outs.logits_ExBxC, batch["label"],
                                              losses.exit_weights(exit_layers, tcfg.weighting))
            return loss, {"ce_first": ce_E[0], "ce_last": ce_E[-1], "acc_first": acc_E[0], "acc_last": acc_E[-1]}
        terms = losses.ponder_loss(outs.logits_ExBxC, enc.halting_probs(outs.gate_ExB), batch["label"],
                                   prior_lambda=tcfg.ponder_prior, beta=tcfg.ponder_beta)
        return terms.total, {"rec": terms.rec, "kl": terms.kl, "acc_last": acc_E[-1]}
    return loss_fn


# ----------------------------------------------------------------------------------------------- evaluation

POLICIES = {"deebert": "neg_entropy", "pabee": "patience", "palbert_q": "learned"}


def policy_settings(cfg, ponder: bool):
    """(policy, human setting, engine threshold) triples."""
    out = [("deebert", f"S={s:g}", -s) for s in cfg.eval.entropy]
    out += [("pabee", f"t={t}", float(t)) for t in cfg.eval.patience]
    if ponder:
        out += [("palbert_q", f"q={q:g}", q) for q in cfg.eval.q]
    return out


def eval_batches(dev, bs):
    n = len(dev["label"])
    for start in range(0, n, bs):
        part = {k: v[start:start + bs] for k, v in dev.items()}
        m = len(part["label"])
        yield {k: np.concatenate([v, np.zeros((bs - m,) + v.shape[1:], v.dtype)]) for k, v in part.items()}, m


def evaluate(graphdef, params, dev, cfg, settings, exit_layers_E):
    """Per-exit accuracy, and every policy setting executed by the while loop (and simulated from cached logits)."""
    @jax.jit
    def scan_fn(p, b):
        outs = nnx.merge(graphdef, p).all_exits(b["ids"], b["mask"], b["type_ids"])
        scores = {name: engine.scores_from_outputs(outs, conf_lib.get_measure(m)) for name, m in POLICIES.items()}
        return outs.logits_ExBxC, scores

    dyn_fns = {name: jax.jit(lambda p, b, thr, m=m: nnx.merge(graphdef, p).dynamic(
        b["ids"], b["mask"], thr, measure=m, type_ids_BxT=b["type_ids"])) for name, m in POLICIES.items()}

    logits, scores = [], {k: [] for k in POLICIES}
    for b, m in eval_batches(dev, cfg.data.eval_batch_size):
        lg, sc = scan_fn(params, b)
        logits.append(np.asarray(lg)[:, :m])
        for k in POLICIES:
            scores[k].append(np.asarray(sc[k])[:, :m])
    logits_ExNxC = np.concatenate(logits, axis=1)
    scores = {k: np.concatenate(v, axis=1) for k, v in scores.items()}
    labels = dev["label"]
    acc_E = (logits_ExNxC.argmax(-1) == labels[None]).mean(1)

    rows = []
    for policy, setting, thr in settings:
        exits, preds = [], []
        for b, m in eval_batches(dev, cfg.data.eval_batch_size):
            out = dyn_fns[policy](params, b, jnp.float32(thr))
            exits.append(np.asarray(out.exit_B)[:m])
            preds.append(np.asarray(jnp.argmax(out.logits_BxC, -1))[:m])
        exit_N, pred_N = np.concatenate(exits), np.concatenate(preds)
        sim = engine.simulate(policies.score_threshold(thr, len(exit_layers_E)), scores[policy])
        sim_N = np.asarray(sim.exit_B)
        rows.append({"policy": policy, "setting": setting, "threshold": thr, "acc": 100 * (pred_N == labels).mean(),
                     "mean_layers": float(np.mean(np.asarray(exit_layers_E)[exit_N] + 1)),
                     "sim_agrees": float((sim_N == exit_N).mean()), "exit_N": exit_N})
    return acc_E, rows


def latencies(graphdef, params, dev, cfg, settings, num_exits):
    """Measured batch-1 latency (ms per sentence over `latency_examples` dev sentences, compile excluded) of every
    policy setting run by the while-loop engine, each paired with the static full-depth model timed on the same
    sentences interleaved (static, dynamic, static, ...), so load from other processes hits both alike."""
    n = min(cfg.eval.latency_examples, len(dev["label"]))
    singles = [{k: v[i:i + 1] for k, v in dev.items()} for i in range(n)]
    static = jax.jit(lambda p, b: nnx.merge(graphdef, p).static(b["ids"], b["mask"], num_exits - 1, b["type_ids"]))
    dyn = {name: jax.jit(lambda p, b, thr, m=m: nnx.merge(graphdef, p).dynamic(
        b["ids"], b["mask"], thr, measure=m, type_ids_BxT=b["type_ids"]).logits_BxC) for name, m in POLICIES.items()}

    def once(fn, b, *extra):
        return costs.measure(fn, params, b, *extra, warmup=0, iters=1).mean_s

    out = {}
    jax.block_until_ready(static(params, singles[0]))
    for policy, setting, thr in settings:
        thr = jnp.float32(thr)
        jax.block_until_ready(dyn[policy](params, singles[0], thr))   # compile
        t_static = t_dyn = 0.0
        for b in singles:
            t_static += once(static, b)
            t_dyn += once(dyn[policy], b, thr)
        out[f"{policy} {setting}"] = (1e3 * t_dyn / n, 1e3 * t_static / n)
    return out


# ---------------------------------------------------------------------------------------------------- main


def matched(rows, ref_policy, policy):
    """``policy``'s rows beside ``ref_policy``'s accuracy interpolated at the same mean layers (within its range)."""
    ref = sorted((r["mean_layers"], r["acc"]) for r in rows if r["policy"] == ref_policy)
    if len(ref) < 2:
        return []
    xs, ys = zip(*ref)
    out = []
    for r in rows:
        if r["policy"] == policy and xs[0] <= r["mean_layers"] <= xs[-1]:
            ref_acc = float(np.interp(r["mean_layers"], xs, ys))
            out.append({"setting": r["setting"], "mean_layers": r["mean_layers"], f"{policy}_acc": r["acc"],
                        f"{ref_policy}_acc_interp": ref_acc, "difference": r["acc"] - ref_acc})
    return out


@experiment("encoder_exits", data=load)
def main(run: Run, data) -> Report:
    cfg, (tok, train, dev) = run.cfg, data
    print(f"SST-2: train {len(train['label'])} (max_len {cfg.data.max_len}) / dev {len(dev['label'])} "
          f"(max_len {cfg.data.eval_max_len}); devices: {jax.device_count()} x {jax.devices()[0].device_kind}")

    results, rows_exit, rows_pol, compare = {}, [], [], []
    for arm in cfg.arms:
        graphdef, params = build_model(cfg, tok)
        model_cfg = nnx.merge(graphdef, params).cfg
        n_params = param_count(params)
        params, train_s = common.fine_tune(make_loss(graphdef, arm, cfg.train), params, train, cfg, run.workdir / arm,
                                           f"{arm}")
        settings = policy_settings(cfg, model_cfg.ponder)
        acc_E, rows = evaluate(graphdef, params, dev, cfg, settings, model_cfg.exit_layers)
        lat = latencies(graphdef, params, dev, cfg, settings, len(model_cfg.exit_layers))
        for r in rows:
            r["arm"] = arm
            r["speedup_layers"] = model_cfg.depth / r["mean_layers"]
            r["b1_latency_ms"], r["b1_static_ms"] = lat[f"{r['policy']} {r['setting']}"]
            r["b1_speedup"] = r["b1_static_ms"] / r["b1_latency_ms"]
        rows_pol += rows
        rows_exit.append({"arm": arm, **{f"exit@L{l + 1}": 100 * a for l, a in zip(model_cfg.exit_layers, acc_E)}})
        results[arm] = {"exit_layers": list(model_cfg.exit_layers), "acc_per_exit": acc_E.tolist(),
                        "params": n_params, "train_seconds": train_s, "latency_ms": lat,
                        "policies": [{k: v for k, v in r.items() if k != "exit_N"} for r in rows]}
        print(f"{arm}: trained {cfg.train.steps} steps in {train_s:.0f} s; dev acc per exit "
              f"{np.round(100 * acc_E, 1).tolist()}")
        if model_cfg.ponder:
            compare += [{"arm": arm, **c} for c in matched(rows, "pabee", "palbert_q")]
    if "ponder" in cfg.arms and "multi_exit" in cfg.arms:   # PALBERT (ponder arm, Q-exit) vs PABEE (multi-exit arm)
        pabee = [r for r in rows_pol if r["arm"] == "multi_exit" and r["policy"] == "pabee"]
        palbert = [r for r in rows_pol if r["arm"] == "ponder" and r["policy"] == "palbert_q"]
        compare += [{"arm": "ponder Q-exit vs multi_exit PABEE", **c} for c in matched(pabee + palbert, "pabee",
                                                                                        "palbert_q")]
    return report(run, train, dev, results, rows_exit, rows_pol, compare)


def report(run, train, dev, results, rows_exit, rows_pol, compare) -> Report:
    cfg = run.cfg
    m = cfg.model
    arch = ("MiniLM-L6-H384 (all-MiniLM-L6-v2 weights)" if m.pretrained and not m.shared_layers else
            f"one MiniLM layer (#{m.shared_from}) shared across 6 repeats + PALBERT Lambda layer" if m.pretrained
            else f"random tiny encoder d={m.d_model} depth={m.depth}")
    pol_cols = ["arm", "policy", "setting", "acc", "mean_layers", "speedup_layers", "b1_latency_ms", "b1_static_ms",
                "b1_speedup", "sim_agrees"]
    parts = [
        f"# Early-exit text encoders on SST-2 ({cfg.name})",
        run.prov.markdown() + "  \n"
        f"Data: SST-2 train subset {len(train['label'])} phrases (max {cfg.data.max_len} tokens), dev "
        f"{len(dev['label'])} sentences (max {cfg.data.eval_max_len} tokens).  \n"
        f"Scale: {arch}; arms {list(cfg.arms)}; {cfg.train.steps} steps of batch {cfg.data.batch_size}, AdamW lr "
        f"{cfg.train.optim.lr:g} ({cfg.train.optim.schedule}), word embeddings "
        f"{'frozen' if cfg.train.freeze_word_embeddings else 'trained'}; training wall-clock "
        + ", ".join(f"{a} {results[a]['train_seconds']:.0f} s" for a in cfg.arms) + ".",
        "Papers (abstracts): DeeBERT saves up to ~40% inference time with minimal degradation in model quality "
        "(arXiv:2004.12993, BERT-base / RoBERTa-base on GLUE); PABEE improves ALBERT's accuracy and robustness with "
        "a better accuracy-speed trade-off than earlier exits (arXiv:2006.04152; no number in the abstract); "
        "PALBERT outperforms PABEE on a wide range of GLUE tasks (arXiv:2204.03276; no number in the abstract).",
        "## Dev accuracy (%) of every exit (static truncation)", report_lib.markdown_table(rows_exit,
                                                                                        list(rows_exit[0].keys())),
        "## Policies, executed by the while-loop engine\n"
        "mean_layers: layers run per sentence (the exit taken); speedup_layers = L / mean_layers (the papers' "
        "definition); b1_latency_ms: measured per-sentence latency at batch 1 (mean over "
        f"{min(cfg.eval.latency_examples, len(dev['label']))} dev sentences, compile excluded); b1_static_ms: the static "
        "full-depth model timed on the same sentences interleaved with it; b1_speedup = b1_static_ms / "
        "b1_latency_ms; sim_agrees: fraction of sentences whose executed exit equals the one simulated from the cached "
        "scan-path outputs.",
        report_lib.markdown_table(rows_pol, pol_cols)]
    if compare:
        parts += ["## PALBERT Q-exit vs PABEE at matched mean layers\nPABEE's accuracy is interpolated linearly "
                  "between its patience settings at the Q-exit's mean layers (only settings inside PABEE's range).",
                  report_lib.markdown_table(compare, list(compare[0].keys()))]
    md = "\n\n".join(parts)
    return Report(md, {"results": results, "matched": compare})


if __name__ == "__main__":
    main()
