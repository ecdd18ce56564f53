"""SpecEE on a frozen pretrained LM: per-layer predictors on the draft candidates' logits, trained on cached
features, then per-token early-exit decoding of held-out prompts with the SpecEE policy on the engine.

    python -m experiments.specee --config configs/specee.py:smoke [--outdir DIR]

See configs/specee.py for the runbook. The draft head is a Kangaroo drafter (trained as experiments/kangaroo.py trains
its adapters, or read from a Kangaroo run), standing in for the paper's EAGLE head.
"""
from __future__ import annotations

import pathlib
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eejax.decoding import kangaroo as kg
from eejax.decoding import specee
from eejax.errors import ConfigError
from eejax.eval import report as report_lib
from eejax.exits import engine
from eejax.harness import results as result_files
from eejax.models import lm as lm_lib
from eejax.train import ArrayIterator, Trainer, one_device_mesh, read_metrics
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "specee"


def drafter(model: common.LM, cfg, args, workdir: pathlib.Path, prov=None) -> tuple[dict, str]:
    """The Kangaroo adapter at ``drafter.exit_layer``: from a finished Kangaroo run, else trained here. A drafter
    read from a file (another run's, or an earlier run of this workdir) is recorded in ``prov.inputs`` with its
    sha256 and its producer's commit and step (``result_files.record_input``)."""
    d = cfg.drafter
    lm = nnx.merge(model.graphdef, model.params)
    like = kg.init_adapter(lm, d.exit_layer)
    for path in ([pathlib.Path(d.workdir) / f"adapter_l{d.exit_layer}.npz"] if d.workdir else []) + \
            [workdir / f"adapter_l{d.exit_layer}.npz"]:
        if path.exists():
            src = f"Kangaroo adapter read from {path}"
            if prov is not None:
                art = result_files.record_input(prov, path, "drafter (Kangaroo adapter)")
                src += (f" (sha256 {art.sha256[:16]}, produced at commit {art.producer_commit}, "
                        f"step {art.producer_step})")
            return common.load_tree(path, like), src
    dc = cfg.data
    feats = {}
    for split, num in (("train", dc.train_windows), ("validation", dc.val_windows)):
        feats[split] = common.cache_draft_features(
            model, common.gutenberg_windows(args.data_dir, model.tokenizer, split, num, dc.context), (d.exit_layer,),
            d.topk, dc.cache_batch, workdir / f"drafter_cache_{split}.npz")
    tcfg = types.SimpleNamespace(steps=d.steps, batch=min(d.batch, dc.train_windows), lr=d.lr,
                                 log_every=max(d.steps // 4, 1))
    adapter, _ = common.train_adapter(model, 0, d.exit_layer, feats["train"], feats["validation"], tcfg, cfg.seed,
                                      workdir / "drafter")
    common.save_tree(workdir / f"adapter_l{d.exit_layer}.npz", adapter)
    if prov is not None:
        result_files.write_artefact_record(workdir / f"adapter_l{d.exit_layer}.npz", prov, step=d.steps)
    return adapter, f"Kangaroo adapter trained here ({d.steps} steps on {dc.train_windows} windows)"


def _offline_fn(graphdef, exit_layer: int, k: int):
    def f(params, adapter, tokens_BxT):
        model = nnx.merge(graphdef, params)
        valid = jnp.ones(tokens_BxT.shape, bool)
        pos, mask = model.positions(valid), lm_lib.causal_mask(valid)
        _, h_NxBxTxD = engine.run_layers(model.layers, model.embed_tokens(tokens_BxT),
                                         layer_fn=lambda layer, h, ctx: layer(h, pos, mask))
        draft = kg.adapter_logits(model, adapter, h_NxBxTxD[exit_layer - 1]).astype(jnp.float32)
        cand_BxTxK = jax.lax.top_k(draft, k)[1].astype(jnp.int32)
        x = model.final_norm(h_NxBxTxD)
        rows = specee.head_rows(model, cand_BxTxK.reshape(-1, k)).reshape(cand_BxTxK.shape + (-1,))
        cand_logits = jnp.einsum("nbtd,btkd->nbtk", x.astype(jnp.float32), rows.astype(jnp.float32))
        argmax = jax.lax.map(lambda xn: jnp.argmax(model.shared_head(xn), -1).astype(jnp.int32), x)
        return cand_BxTxK, cand_logits, argmax
    return jax.jit(f)


def offline_features(model, adapter, tokens_WxT1, cfg, path: pathlib.Path, log=print) -> dict:
    """Candidates (``WxTxK``), every layer's candidate logits (``NxWxTxK``) and full argmax (``NxWxT``)."""
    if path.exists():
        return dict(np.load(path))
    fn = _offline_fn(model.graphdef, cfg.drafter.exit_layer, cfg.drafter.k)
    parts, start = [], time.perf_counter()
    for i in range(0, len(tokens_WxT1), cfg.data.cache_batch):
        parts.append(jax.device_get(fn(model.params, adapter, jnp.asarray(tokens_WxT1[i:i + cfg.data.cache_batch,
                                                                                         :-1]))))
        log(f"  features {min(i + cfg.data.cache_batch, len(tokens_WxT1))}/{len(tokens_WxT1)} windows "
            f"({time.perf_counter() - start:.0f} s)")
    cand, logits, argmax = (np.concatenate(x, axis=0 if j == 0 else 1) for j, x in enumerate(zip(*parts)))
    out = {"cand": cand, "cand_logits": logits, "argmax": argmax, "seconds": np.asarray(time.perf_counter() - start)}
    np.savez(path, **out)
    return out


def first_exitable(f: dict) -> np.ndarray:
    """Per token: the first layer from which every layer's argmax equals the final one and is a candidate
    (N - 1 when none earlier): SpecEE's offline exit histogram."""
    n = f["argmax"].shape[0]
    ok = (f["argmax"] == f["argmax"][-1:]) & np.any(f["argmax"][..., None] == f["cand"][None], -1)
    stays = np.flip(np.cumprod(np.flip(ok, 0), 0), 0).astype(bool)     # ok at this layer and every later one
    return np.where(stays.any(0), np.argmax(stays, 0), n - 1).reshape(-1)


def schedule_features(f: dict, schedule) -> tuple[np.ndarray, np.ndarray]:
    """Features ``SxMxF`` (M tokens) with the previous-scheduled-layer change, and labels ``SxM``."""
    k = f["cand"].shape[-1]
    logits = f["cand_logits"][list(schedule)].reshape(len(schedule), -1, k)
    prev = np.zeros_like(logits[0])
    feats = []
    for s in range(len(schedule)):
        fs, p = specee.features(jnp.asarray(logits[s]), jnp.asarray(prev))
        feats.append(np.asarray(fs))
        prev = np.asarray(p)
    labels = (f["argmax"][list(schedule)] == f["argmax"][-1:]).reshape(len(schedule), -1)
    return np.stack(feats), labels.astype(np.float32)


def train_predictors(feats_SxMxF, labels_SxM, pcfg, seed: int, workdir) -> tuple[specee.Predictors, list]:
    """BCE per scheduled layer (all layers' MLPs trained jointly, full batch, Adam), resumable in ``workdir``; the
    log holds the loss at every quarter of the steps and the last."""
    s_count, m_count, f_dim = feats_SxMxF.shape
    pred = specee.init_predictors(jax.random.key(seed), s_count, f_dim // 3, pcfg.hidden)

    def loss_fn(p, batch, ctx):
        del ctx
        x, y = jnp.swapaxes(batch["x_MxSxF"], 0, 1), jnp.swapaxes(batch["y_MxS"], 0, 1)
        logit = jax.vmap(lambda s, xs: specee.logit(p, s, xs))(jnp.arange(s_count), x)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logit, y)), {}

    # The trainer's batch axis leads: the tokens (M), every one of them each step.
    batches = ArrayIterator({"x_MxSxF": np.swapaxes(feats_SxMxF, 0, 1), "y_MxS": np.swapaxes(labels_SxM, 0, 1)},
                            m_count, draw="all")
    with Trainer(loss_fn, pred, optax.adam(pcfg.lr), workdir=workdir, seed=seed, mesh=one_device_mesh(),
                 log_every=max(pcfg.steps // 4, 1), ckpt_every=max(pcfg.steps, 1)) as tr:
        pred = tr.fit(batches, pcfg.steps, desc="predictors").params
    log = {r["step"]: {"step": r["step"], "bce": r["loss"]} for r in read_metrics(workdir)}
    return pred, list(log.values())


def simulate(pred, feats_SxMxF, f: dict, schedule, threshold: float) -> dict:
    """The policy per token on teacher-forced features: exit layer, agreement with the final token, full-head
    evaluations (predictor passes) per token."""
    n = f["argmax"].shape[0]
    scores = np.stack([np.asarray(specee.score(pred, s, jnp.asarray(feats_SxMxF[s]))) for s in range(len(schedule))])
    argmax = f["argmax"][list(schedule)].reshape(len(schedule), -1)
    cand = f["cand"].reshape(-1, f["cand"].shape[-1])
    final = f["argmax"][-1].reshape(-1)
    want = scores > threshold
    fire = want & np.any(argmax[..., None] == cand[None], -1)
    fired = fire.any(0)
    first = np.argmax(fire, 0)
    exit_layer = np.where(fired, np.asarray(schedule)[first], n - 1)
    tok = np.where(fired, argmax[first, np.arange(len(final))], final)
    reached = np.where(fired, first + 1, len(schedule))
    passes = np.asarray([want[:r, m].sum() for m, r in enumerate(reached)])
    acc = [float(np.mean((scores[s] > threshold) == (argmax[s] == final))) for s in range(len(schedule))]
    return {"agreement": float(np.mean(tok == final)), "mean_layers": float(np.mean(exit_layer + 1)),
            "full_head_per_token": float(np.mean(passes + ~fired)), "predictor_evals_per_token": float(np.mean(reached)),
            "exit_hist": np.bincount(exit_layer, minlength=n).tolist(), "predictor_accuracy": acc}


def decode_run(model, adapter, pred, prompt_BxP, cfg, schedule):
    dc, d = cfg.decode, cfg.drafter
    lengths = jnp.full((prompt_BxP.shape[0],), prompt_BxP.shape[1], jnp.int32)
    f = specee.decode_fn(model.graphdef, dc.new_tokens, exit_layer=d.exit_layer, schedule=tuple(schedule), k=d.k,
                         head_check=dc.head_check)
    return common.timed(f, model.params, adapter, pred, jnp.asarray(prompt_BxP), lengths)


@experiment(NAME)
def main(run: Run) -> Report:
    cfg, args, workdir = run.cfg, run.args, run.workdir
    model = common.model_of(run)
    n, d = model.cfg.depth, cfg.drafter
    if not 1 <= d.exit_layer < n - 1:
        raise ConfigError(f"drafter.exit_layer {d.exit_layer} must lie in [1, {n - 1})")
    adapter, drafter_src = drafter(model, cfg, args, workdir, prov=run.prov)
    print(drafter_src)
    feats = {split: offline_features(model, adapter, common.gutenberg_windows(args.data_dir, model.tokenizer, split,
                                                                              num, cfg.data.context), cfg,
                                     workdir / f"features_{split}.npz")
             for split, num in (("train", cfg.data.train_windows), ("validation", cfg.data.val_windows))}
    hist_train = np.bincount(first_exitable(feats["train"]), minlength=n)
    static = sorted(int(l) for l in np.argsort(-hist_train[:n - 1], kind="stable")[:cfg.predictor.static_layers])
    schedules = {"all": list(range(n - 1)), "static": static}
    print(f"offline first-exitable histogram (train): {hist_train.tolist()}; static schedule {static}")

    preds, offline, train_logs = fit_schedules(cfg, feats, schedules, workdir)
    rows, hists = decode(cfg, args, model, adapter, preds, offline, schedules)
    return report(run, model, drafter_src, hist_train, static, schedules, offline, train_logs, rows, hists)


def fit_schedules(cfg, feats, schedules, workdir):
    """Per schedule: the predictors trained on the train features, checked offline on the validation book."""
    preds, offline, train_logs = {}, {}, {}
    for name, sched in schedules.items():
        x, y = schedule_features(feats["train"], sched)
        preds[name], train_logs[name] = train_predictors(x, y, cfg.predictor, cfg.seed, workdir / f"predictors-{name}")
        xv, _ = schedule_features(feats["validation"], sched)
        offline[name] = simulate(preds[name], xv, feats["validation"], sched, cfg.predictor.threshold)
        print(f"offline (validation book) {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in offline[name].items()
                                                                 if isinstance(v, float)))

    return preds, offline, train_logs


def decode(cfg, args, model, adapter, preds, offline, schedules):
    """Per-token early-exit decoding of the held-out prompts (batch and batch 1), against plain greedy."""
    n, d, dc = model.cfg.depth, cfg.drafter, cfg.decode
    test_p = common.wikitext_prompts(args.data_dir, model.tokenizer, "test", dc.test_prompts, dc.prompt_len)
    b = len(test_p)
    ref, greedy_s, _ = common.greedy_decode(model, test_p, dc.new_tokens)
    ref1_s = sum(common.greedy_decode(model, test_p[i:i + 1], dc.new_tokens)[1] for i in range(dc.latency_prompts))
    print(f"full depth: batch {b} {greedy_s:.2f} s; batch 1 x {dc.latency_prompts} prompts {ref1_s:.2f} s")
    head_check = specee.model_head_check(nnx.merge(model.graphdef, model.params), dc.head_check)   # at batch 1
    rows = [{"method": "full depth (plain greedy)", "schedule": "", "predictors": 0, "agreement": 1.0,
             "rows_identical": 1.0, "mean_layers": float(n), "batch_layers": float(n), "preds_per_token": 0.0,
             "seconds": greedy_s, "wall_speedup": 1.0, "b1_seconds": ref1_s or None, "b1_wall_speedup": 1.0 if ref1_s else None,
             "host_stops_per_token": 0.0, "cost_speedup": 1.0}]
    hists = {}
    chk = specee.Predictors(*preds["all"])._replace(b2_S=jnp.full_like(preds["all"].b2_S, -1e9))
    runs = [("SpecEE", name, preds[name], sched) for name, sched in schedules.items()] + \
           [("predictor forced to 0", "all", chk, schedules["all"])]
    for method, name, pred, sched in runs:
        out, seconds, compile_s = decode_run(model, adapter, pred, test_p, cfg, sched)
        toks, exits = np.asarray(out.tokens_BxG), np.asarray(out.exit_layer_BxG)[:, 1:]
        b1 = sum(decode_run(model, adapter, pred, test_p[i:i + 1], cfg, sched)[1] for i in range(dc.latency_prompts)) \
            if method == "SpecEE" and dc.latency_prompts else None
        mean_layers = float(np.mean(exits + 1))
        preds_tok = float(np.mean(np.asarray(out.preds_BxG)[:, 1:]))
        if head_check == "always":   # a full head at every scheduled layer reached, and at the last layer
            full_heads = preds_tok + float(np.mean(exits == n - 1))
        else:                        # only where a predictor passed (offline), and at the last layer
            full_heads = offline[name]["full_head_per_token"] if method == "SpecEE" else 1.0
        cost = specee.cost_per_token(model.cfg, exit_layer=d.exit_layer, k=d.k, hidden=cfg.predictor.hidden,
                                     mean_layers=mean_layers, mean_preds=preds_tok, mean_full=full_heads)
        rows.append({"method": method, "schedule": name, "predictors": len(sched),
                     "agreement": float(np.mean(toks == ref)), "rows_identical": float(np.mean((toks == ref).all(1))),
                     "mean_layers": mean_layers, "batch_layers": float(np.mean(np.asarray(out.layers_run_G)[1:])),
                     "preds_per_token": preds_tok, "seconds": seconds, "wall_speedup": greedy_s / seconds,
                     "b1_seconds": b1, "b1_wall_speedup": ref1_s / b1 if b1 else None,
                     "cost_speedup": specee.predicted_speedup(   # the drafter, every predictor, head and stop
                         model.cfg, exit_layer=d.exit_layer, mean_layers=mean_layers, preds_per_token=preds_tok,
                         full_heads=full_heads, predictor_params=cost["predictor_per_eval"],
                         head_check=head_check).value,
                     "cost_model": "cost model (roofline, H200 calibrated 2026-12-04), batch 1, host stops counted",
                     "host_stops_per_token": specee.host_stops_per_token(head_check, preds_tok),
                     "head_check": head_check,
                     "compile_s": compile_s, "cost_params": cost})
        hists[f"{method} {name}"] = np.bincount(exits.reshape(-1), minlength=n).tolist()
        print(f"{method} {name}: agreement {rows[-1]['agreement']:.3f}, layers {mean_layers:.2f}, wall "
              f"x{rows[-1]['wall_speedup']:.2f}, cost x{rows[-1]['cost_speedup']:.2f}")
    return rows, hists


def report(run, model, drafter_src, hist_train, static, schedules, offline, train_logs, rows, hists) -> Report:
    cfg, d, dc = run.cfg, run.cfg.drafter, run.cfg.decode
    b = dc.test_prompts
    c = kg.layer_params(model.cfg)
    pred_params = d.k * model.cfg.d_model + 3 * d.k * cfg.predictor.hidden + 2 * cfg.predictor.hidden + 1
    md = "\n\n".join([
        f"# SpecEE (arXiv:2504.08850) on {cfg.model.name}",
        run.prov.markdown() + "  \n"
        f"Model: {model.description}.  \nDraft head: {drafter_src}; Kangaroo drafter with l = {d.exit_layer} "
        f"(the paper's EAGLE head stand-in), top-{d.k} candidates.  \n"
        f"Offline features: {cfg.data.train_windows} x {cfg.data.context} Gutenberg train tokens (predictor "
        f"training), {cfg.data.val_windows} x {cfg.data.context} tokens of the validation book (offline check).  \n"
        f"Decoding: {b} WikiText-2 test prompts of {dc.prompt_len} tokens, {dc.new_tokens} new tokens; batch {b} and "
        f"batch 1 on the first {dc.latency_prompts} prompts. K/V of exited tokens: state propagation (CALM). "
        f"Total wall-clock {run.seconds() / 60:.1f} min.  \n"
        f"Predictor: {pred_params:,} parameters read per evaluation (k head rows + MLP) vs {c['layer']:,} per layer "
        f"and {c['head']:,} for the full head.",
        f"## Offline exit histogram (train; first layer from which the argmax is final and a candidate)\n\n"
        f"{hist_train.tolist()}  \nstatic schedule: {static}",
        "## Offline check (validation book, teacher-forced)",
        report_lib.markdown_table([{"schedule": k, **{kk: vv for kk, vv in v.items() if isinstance(vv, float)}}
                               for k, v in offline.items()],
                              ["schedule", "agreement", "mean_layers", "full_head_per_token",
                               "predictor_evals_per_token"], ".3f"),
        "## Decoding (test prompts)\n\ncost_speedup: predicted H200 speed-up over greedy at batch 1 (cost model: "
        "roofline, H200 calibrated 2026-12-04), counting the drafter, every predictor and full head, and the host "
        f"stops (head_check {rows[-1].get('head_check')!r}: host_stops_per_token); a prediction, not a measurement.",
        report_lib.markdown_table(rows, ["method", "schedule", "predictors", "agreement", "rows_identical",
                                     "mean_layers", "batch_layers", "preds_per_token", "seconds", "wall_speedup",
                                     "b1_seconds", "b1_wall_speedup", "host_stops_per_token", "cost_speedup"],
                                  ".3f"),
        "## Exit-layer histograms (test, generated tokens)",
        "\n".join(f"- {k}: {v}" for k, v in hists.items()),
    ])
    return Report(md, {"rows": rows, "offline": offline, "exit_hist_test": hists, "hist_train": hist_train.tolist(),
                       "schedules": schedules, "predictor_logs": train_logs, "drafter": drafter_src,
                       "total_seconds": run.seconds()})


if __name__ == "__main__":
    main()
