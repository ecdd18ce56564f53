"""Kangaroo on a frozen pretrained LM: train adapter drafters on cached features, fit eta / l on validation prompts,
then decode held-out prompts with double-early-exit self-speculation.

    python -m experiments.kangaroo --config configs/kangaroo.py:smoke [--outdir DIR]

See configs/kangaroo.py for the runbook (protocol, scale, wall-clock). The recipe pieces (model, corpus windows,
feature cache, adapter training, prompts, timing) are shared with experiments/specee.py, which uses a Kangaroo
drafter as its draft head.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eejax.harness import config as config_lib
from eejax.harness import run
from eejax.data.text import ByteTokenizer, detokenize_wikitext, load_text
from eejax.decoding import kangaroo as kg
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.eval import report
from eejax.exits import costs, engine
from eejax.harness import results as result_files
from eejax.models import lm as lm_lib
from eejax.models import pretrained

NAME = "kangaroo"
DRAFTERS = ("adapter", "shared-head")


# ------------------------------------------------------------------------------------------------ model and data


class Model(NamedTuple):
    graphdef: object
    params: object
    tokenizer: object
    cfg: lm_lib.LMConfig
    description: str


def load_model(cfg) -> Model:
    """SmolLM2 (frozen, float32), or for smoke runs a tiny random LM over bytes."""
    if cfg.model.name == "random":
        mcfg = lm_lib.LMConfig(vocab_size=256, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64,
                               mlp="swiglu", exits=[3])
        gd, params = lm_lib.build(mcfg, cfg.seed)
        return Model(gd, params, ByteTokenizer(), mcfg, "a tiny random LM (4 layers, D=32, bytes)")
    pre = pretrained.load(cfg.model.name, depth=cfg.model.depth or None)
    return Model(pre.graphdef, pre.params, pre.tokenizer, pre.cfg,
                 f"{cfg.model.name} (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32, {pre.cfg.depth} "
                 f"layers, D={pre.cfg.d_model}, V={pre.cfg.vocab_size}), frozen")


def windows(data_dir, tokenizer, split: str, num: int, context: int) -> np.ndarray:
    """``num`` consecutive windows of ``context + 1`` tokens from the start of a Gutenberg split."""
    text = load_text(data_dir, "gutenberg", split)
    ids = np.asarray(tokenizer.encode(text[:num * (context + 1) * 8]), np.int32)
    if len(ids) < num * (context + 1):
        raise ValueError(f"gutenberg/{split}: {len(ids)} tokens do not fill {num} windows of {context + 1}")
    return ids[:num * (context + 1)].reshape(num, context + 1)


def prompts(data_dir, tokenizer, split: str, num: int, length: int) -> np.ndarray:
    """``num`` prompts of ``length`` tokens from WikiText-2 ``split`` (detokenized): the start of each of the first
    paragraphs that have at least ``length`` tokens (article text, not headings)."""
    text = detokenize_wikitext(load_text(data_dir, "wikitext2", split))
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        ids = tokenizer.encode(line)
        if len(ids) >= length:
            out.append(np.asarray(ids[:length], np.int32))
        if len(out) == num:
            return np.stack(out)
    raise ValueError(f"wikitext2/{split}: only {len(out)} paragraphs with >= {length} tokens (need {num})")


# ------------------------------------------------------------------------------------------------ feature cache


def _features_fn(graphdef, layers, topk):
    def f(params, tokens_BxT):
        model = nnx.merge(graphdef, params)
        h0 = model.embed_tokens(tokens_BxT)
        valid = jnp.ones(tokens_BxT.shape, bool)
        pos, mask = model.positions(valid), lm_lib.causal_mask(valid)
        h_last, h_NxBxTxD = engine.run_layers(model.layers, h0, layer_fn=lambda layer, h, ctx: layer(h, pos, mask))
        logits = model.shared_head(model.final_norm(h_last)).astype(jnp.float32)
        p, idx = jax.lax.top_k(jax.nn.softmax(logits, -1), topk)
        hs = jnp.stack([h_NxBxTxD[l - 1] for l in layers]).astype(jnp.float16)
        return hs, idx.astype(jnp.int32), p.astype(jnp.float16), jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.jit(f)


def cache_features(model: Model, tokens_WxT1: np.ndarray, layers, topk: int, batch: int, path: pathlib.Path,
                   log=print) -> dict:
    """The frozen model once over the windows: hidden states after the first l layers (float16, ``LxWxTxD``) and
    the full model's top-k next-token probabilities (``WxTxK``); stored at ``path`` and reused."""
    if path.exists():
        z = np.load(path)
        if list(z["layers"]) == list(layers) and z["h_LxWxTxD"].shape[1] == len(tokens_WxT1) and \
                z["top_idx"].shape[-1] == topk:
            return dict(z)
    fn = _features_fn(model.graphdef, tuple(layers), topk)
    parts, start = [], time.perf_counter()
    for i in range(0, len(tokens_WxT1), batch):
        parts.append(jax.device_get(fn(model.params, jnp.asarray(tokens_WxT1[i:i + batch, :-1]))))
        log(f"  cached {min(i + batch, len(tokens_WxT1))}/{len(tokens_WxT1)} windows "
            f"({time.perf_counter() - start:.0f} s)")
    hs, idx, p, argmax = (np.concatenate(x, axis=1 if j == 0 else 0) for j, x in enumerate(zip(*parts)))
    out = {"layers": np.asarray(layers), "tokens": tokens_WxT1, "h_LxWxTxD": hs, "top_idx": idx, "top_p": p,
           "argmax": argmax, "seconds": np.asarray(time.perf_counter() - start)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


# ------------------------------------------------------------------------------------------------ adapter training


def _soft_ce(model, adapter, h, idx, p, vocab_U=None):
    """Soft CE against the full model's (renormalised) top-k; with ``vocab_U`` the softmax runs over that subset
    and ``idx`` indexes into it."""
    logits = kg.adapter_logits(model, adapter, h.astype(jnp.float32), vocab_U=vocab_U)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    q = p.astype(jnp.float32)
    q = q / jnp.sum(q, -1, keepdims=True)
    ce = -jnp.mean(jnp.sum(q * jnp.take_along_axis(logp, idx, -1), -1))
    draft_top = jnp.take_along_axis(jnp.exp(logp), idx, -1)
    accept = jnp.mean(jnp.sum(jnp.minimum(p.astype(jnp.float32), draft_top), -1))   # sum_v min(p_full, p_draft)
    top1 = jnp.mean(jnp.argmax(logp, -1) == idx[..., 0])
    return ce, {"expected_acceptance": accept, "top1_agreement": top1}


def train_adapter(model: Model, layer_index: int, exit_layer: int, train: dict, val: dict, tcfg, seed: int,
                  log=print) -> tuple[dict, list[dict]]:
    """Adam on the adapter only (the frozen model's head, norm and layers untouched); returns the adapter and the
    log (train loss, validation soft CE / expected acceptance / top-1 agreement)."""
    lm = nnx.merge(model.graphdef, model.params)
    adapter = kg.init_adapter(lm, exit_layer)
    opt = optax.adam(tcfg.lr)
    opt_state = opt.init(adapter)
    # The training softmax runs over the tokens in the full model's top-k on the TRAINING windows (a CPU budget:
    # the tied head is 49k x 576); validation metrics use the full vocabulary.
    vocab_U = np.unique(train["top_idx"]) if getattr(tcfg, "restrict_vocab", False) else None
    sub_idx = (np.searchsorted(vocab_U, train["top_idx"]).astype(np.int32) if vocab_U is not None
               else train["top_idx"])

    @jax.jit
    def step(params, adapter, opt_state, h, idx, p):
        (loss, aux), g = jax.value_and_grad(
            lambda a: _soft_ce(nnx.merge(model.graphdef, params), a, h, idx, p,
                               None if vocab_U is None else jnp.asarray(vocab_U)), has_aux=True)(adapter)
        upd, opt_state = opt.update(g, opt_state, adapter)
        return optax.apply_updates(adapter, upd), opt_state, loss, aux

    @jax.jit
    def evaluate(params, adapter, h, idx, p):
        return _soft_ce(nnx.merge(model.graphdef, params), adapter, h, idx, p)

    def val_metrics(a):
        ce, aux = evaluate(model.params, a, val["h_LxWxTxD"][layer_index], val["top_idx"], val["top_p"])
        return {"val_soft_ce": float(ce), **{f"val_{k}": float(v) for k, v in aux.items()}}

    rng = np.random.default_rng(seed)
    n = train["h_LxWxTxD"].shape[1]
    rows = [{"step": 0, **val_metrics(adapter)}]
    start = time.perf_counter()
    for s in range(1, tcfg.steps + 1):
        b = rng.choice(n, tcfg.batch, replace=False)
        adapter, opt_state, loss, _ = step(model.params, adapter, opt_state, train["h_LxWxTxD"][layer_index][b],
                                           sub_idx[b], train["top_p"][b])
        if s % tcfg.log_every == 0 or s == tcfg.steps:
            rows.append({"step": s, "train_soft_ce": float(loss), **val_metrics(adapter),
                         "seconds": time.perf_counter() - start})
            log(f"  l={exit_layer} step {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                                            if k != "step"))
    return adapter, rows


def shared_head_adapter(model: Model, exit_layer: int) -> dict:
    """The shared-head-only drafter of the same depth as an adapter whose attention adds nothing (output projection
    zero) and whose norm is the model's final norm: first l layers + final norm + shared head."""
    a = kg.init_adapter(nnx.merge(model.graphdef, model.params), exit_layer)
    a["attn"]["o"] = jax.tree.map(jnp.zeros_like, a["attn"]["o"])
    return a


def save_tree(path: pathlib.Path, tree) -> None:
    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    np.savez(path, **flat)


def load_tree(path: pathlib.Path, like):
    z = np.load(path)
    paths = ["/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
    return jax.tree_util.tree_unflatten(jax.tree.structure(like), [jnp.asarray(z[p]) for p in paths])


def adapters(model: Model, cfg, args, workdir: pathlib.Path, log=print, prov=None) -> tuple[dict, dict, dict]:
    """Cache features, then train (or load from the workdir) one adapter per exit layer. Returns
    ``({l: adapter}, {l: training log}, cache info)``. Each adapter trained here gets a ``.provenance.json`` record
    (sha256, this run's commit, the step) so a run that reads it (SpecEE's drafter) can name what it read."""
    layers = tuple(cfg.drafter.exit_layers)
    if max(layers) >= model.cfg.depth:
        raise config_lib.ConfigError(f"drafter.exit_layers {layers} must be < the model's depth {model.cfg.depth}")
    d = cfg.data
    train = cache_features(model, windows(args.data_dir, model.tokenizer, "train", d.train_windows, d.context),
                           layers, cfg.train.topk, d.cache_batch, workdir / "cache_train.npz", log)
    val = cache_features(model, windows(args.data_dir, model.tokenizer, "validation", d.val_windows, d.context),
                         layers, cfg.train.topk, d.cache_batch, workdir / "cache_val.npz", log)
    out, logs = {}, {}
    lm = nnx.merge(model.graphdef, model.params)
    for i, l in enumerate(layers):
        path = workdir / f"adapter_l{l}.npz"
        log_path = workdir / f"adapter_l{l}.json"
        if path.exists() and log_path.exists():
            out[l], logs[l] = load_tree(path, kg.init_adapter(lm, l)), json.loads(log_path.read_text())
            continue
        out[l], logs[l] = train_adapter(model, i, l, train, val, cfg.train, cfg.seed + l, log)
        save_tree(path, out[l])
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


def timed(fn, *args):
    """AOT-compile ``fn`` for ``args``, one warm-up call, then one timed call (compile excluded, blocked until
    ready)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - start, compile_s


def greedy(model: Model, prompt_BxP: np.ndarray, num_new: int):
    lengths = jnp.full((prompt_BxP.shape[0],), prompt_BxP.shape[1], jnp.int32)
    f = per_token.decode_fn(model.graphdef, per_token.full_depth_step, num_new)
    gen, seconds, compile_s = timed(f, model.params, jnp.asarray(prompt_BxP), lengths)
    return np.asarray(gen.tokens_BxG), seconds, compile_s


def teacher_forced_drafts(model: Model, adapter: dict, exit_layer: int, seq_BxT: np.ndarray):
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


@run.cli
def main(argv=None):
    cfg, args = config_lib.parse_cli(argv, description=__doc__)
    prov = result_files.provenance(f"experiments.{NAME}", argv)
    workdir, outdir = run.prepare(cfg, args, NAME)
    print(f"device: {prov.device}")
    t0 = time.perf_counter()
    model = load_model(cfg)
    dc = cfg.decode
    layers = tuple(cfg.drafter.exit_layers)
    trained, train_logs, cache_info = adapters(model, cfg, args, workdir, prov=prov)
    drafters = {("adapter", l): trained[l] for l in layers}
    drafters.update({("shared-head", l): shared_head_adapter(model, l) for l in layers})

    # ---- fit eta (per drafter and l) and l on VALIDATION prompts: greedy once, drafts teacher-forced, simulated.
    val_p = prompts(args.data_dir, model.tokenizer, "validation", dc.val_prompts, dc.prompt_len)
    val_gen, _, _ = greedy(model, val_p, dc.new_tokens)
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

    # ---- report on TEST prompts (held out), executed.
    test_p = prompts(args.data_dir, model.tokenizer, "test", dc.test_prompts, dc.prompt_len)
    b = len(test_p)
    lengths = jnp.full((b,), dc.prompt_len, jnp.int32)
    ref, greedy_s, greedy_compile = greedy(model, test_p, dc.new_tokens)
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
                if compiled is None:
                    start = time.perf_counter()
                    compiled = jax.jit(f).lower(*args_).compile()
                    compile_s = time.perf_counter() - start
                    jax.block_until_ready(compiled(*args_))     # warm-up call, not timed
                start = time.perf_counter()
                out = jax.block_until_ready(compiled(*args_))
                seconds = time.perf_counter() - start
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
    if jax.process_index() != 0:
        return
    write(cfg, args, prov, outdir, model, rows, fit_rows, best_eta, best_l, train_logs, cache_info, hists,
          time.perf_counter() - t0)


def write(cfg, args, prov, outdir, model, rows, fit_rows, best_eta, best_l, train_logs, cache_info, hists, total_s):
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
                  f"({result_files.device_description()}, shared with other jobs, one timed call per run): load noise, not "
                  "a speed-up of Kangaroo; a value above 1 is the load falling during the run. cost_speedup: the "
                  "parameter-read cost model (`eejax.decoding.kangaroo.cost_speedup`: memory-bound GPU at batch 1, "
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
        "min(p_full, p_draft))", report.markdown_table(train_rows, list(train_rows[0]), ".3f"),
        f"## Test (held out), eta fit on validation per drafter and l; best l on validation (adapter): {best_l}\n"
        + speed_note, report.markdown_table(fitted, cols, ".3f"),
        "## Test at the paper's eta = %g" % dc.eta,
        report.markdown_table([r for r in rows if r["l"] is not None and r["eta"] == dc.eta], cols, ".3f"),
        "## Validation fit (simulated from teacher-forced drafts, batch 1)",
        report.markdown_table(fit_rows, ["drafter", "l", "eta", "acceptance", "CR", "cost_speedup"], ".3f"),
    ])
    stage = result_files.StagedResults(outdir, overwrite=args.overwrite)
    stage.write_results(NAME, md, {"rows": rows, "fit": fit_rows, "best_eta": {f"{k[0]} l={k[1]}": v for k, v in
                                                                                best_eta.items()},
                                   "best_l": best_l, "train_logs": {str(k): v for k, v in train_logs.items()},
                                   "cache": cache_info, "conf_hist": hists, "provenance": prov._asdict(),
                                   "config": cfg.to_dict(), "total_seconds": total_s})
    for f in stage.commit():
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
