"""Self-speculative decoding on the frozen SmolLM2-135M: exits trained on the frozen model, the LayerSkip-style
static (E, k) baseline and DEL's per-row dynamic (exit, length).

    python -m experiments.self_speculative --config configs/self_speculative.py:smoke [--outdir DIR]

See configs/self_speculative.py for the runbook (protocol, scale, wall-clock). The mechanisms are in the library:
``eejax.decoding.exit_training`` (cache, evaluate and load exits; trained by the one Trainer through
experiments/_common_smollm2.py) and ``eejax.decoding.speculative`` (the loop, the static and DEL drafters); this
script is the recipe and the tables.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.text import load_text
from eejax.decoding import exit_training as et
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token, speculative
from eejax.errors import ConfigError
from eejax.eval import report as report_lib
from eejax.exits import costs, engine
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "self_speculative"
ARMS = common.ARMS
EXIT_FIELDS = ("seed", "model", "exits")  # what the trained exits depend on


# ------------------------------------------------------------------------------------------------- model, data


# the paper's headline numbers, written beside ours
PAPER = ('Papers: LayerSkip (arXiv:2404.16710, abstract): self-speculative decoding up to **2.16x** (CNN/DM), '
         '**1.82x** (coding), **2.0x** (TOPv2) on models trained with its recipe; DEL (arXiv:2504.05598, '
         'abstract): **2.16-2.50x** over autoregressive decoding. Ours: acceptance, tokens per verify and '
         'measured / cost-model speed-ups in the tables below, on a frozen model with exits trained afterwards'
         ' (the README sets them side by side).')

def load_model(c):
    """``(graphdef, params, tokenizer, cfg)``: SmolLM2 with exits after ``exits.layers`` layers (lowrank heads, so
    the norm-only arm is the adapter at zero), or for smoke a tiny random LM with byte tokens."""
    exits = tuple(l - 1 for l in c.exits.layers)
    depth = c.model.random_depth
    if depth and exits[-1] >= depth - 1:
        raise ConfigError(f"exits.layers {tuple(c.exits.layers)} must be < model.random_depth={depth}")
    lm = common.load_lm("random" if depth else c.model.name, depth=depth, seed=c.seed, exits=exits,
                        exit_head="lowrank", exit_rank=c.exits.rank)
    gd, params = lm.graphdef, lm.params
    if depth:
        model = nnx.merge(gd, params)
        model.embed.embedding[...] = model.embed.embedding[...] * 5     # sharper than at init
        gd, params = nnx.split(model)
    elif exits[-1] >= lm.cfg.depth - 1:
        raise ConfigError(f"exits.layers {tuple(c.exits.layers)} must be < the model's depth {lm.cfg.depth}")
    return gd, params, lm.tokenizer, lm.cfg


def exits_dir(run):
    """``exits_workdir`` (locked, bound to the fields the trained exits depend on) or ``<workdir>/exits``."""
    c = run.cfg
    base = {k: c[k].to_dict() if hasattr(c[k], "to_dict") else c[k] for k in EXIT_FIELDS}
    return run.shared_workdir(c.exits_workdir, base, run.workdir / "exits", what="exits_workdir")


# ------------------------------------------------------------------------------------------------- exits


def train_exits(c, data_dir, d, gd, params, tok, log) -> dict:
    """Cache the frozen model's hidden states once (in ``d``), train the two arms, evaluate before and after."""
    e = c.exits
    d.mkdir(parents=True, exist_ok=True)
    windows = {"train": common.spread_windows(load_text(data_dir, "gutenberg", "train"), tok, e.train_windows,
                                              e.context + 1),
               "eval": common.contiguous_windows(load_text(data_dir, "wikitext2", "test"), tok, e.eval_windows,
                                                 e.context + 1)}
    caches, info_path = {}, d / "cache_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    for split, w in windows.items():
        path, wpath = d / f"features_{split}.npz", d / f"windows_{split}.npy"
        if path.exists() and wpath.exists() and np.array_equal(np.load(wpath), w):
            caches[split] = et.load_cache(path)
            log(f"{split}: loaded the cached hidden states of {caches[split].final_NxD.shape[0]} tokens from {path}")
            continue
        start = time.perf_counter()
        caches[split] = et.cache_features(gd, params, w, e.cache_batch, log=lambda m, s=split: log(f"{s}: {m}"))
        et.save_cache(path, caches[split])
        np.save(wpath, w)
        info[split] = {"tokens": int(caches[split].final_NxD.shape[0]), "seconds": time.perf_counter() - start}
        info_path.write_text(json.dumps(info, indent=1))
    model = nnx.merge(gd, params)
    p_before = et.init_exit_params(model, rank=0)
    out = {"cache": info, "arms": {"untrained": p_before}, "train": {}}
    for arm, rank in (("norm", 0), ("lowrank", e.rank)):
        ppath, lpath = d / f"exit_params_{arm}.npz", d / f"train_log_{arm}.json"
        if ppath.exists() and lpath.exists():
            with np.load(ppath) as z:
                out["arms"][arm] = et.params_from_numpy(dict(z))
            out["train"][arm] = json.loads(lpath.read_text())
            log(f"exits {arm}: loaded trained parameters from {ppath}")
            continue
        log(f"exits {arm}: training {e.steps} steps of {e.batch_tokens} cached tokens")
        p0 = et.init_exit_params(model, rank=rank, seed=c.seed)
        p, hist, seconds = common.train_exits(gd, params, caches["train"], p0, steps=e.steps,
                                              batch_tokens=e.batch_tokens, lr=e.lr, workdir=d / f"train_{arm}",
                                              seed=c.seed, log_every=e.log_every,
                                              log=lambda m, a=arm: log(f"{a}: {m}"))
        np.savez(ppath, **et.params_to_numpy(p))
        rec = {"steps": e.steps, "batch_tokens": e.batch_tokens, "lr": e.lr, "rank": rank,
               "seconds": seconds, "log": hist,
               "trained_params_per_exit": int(p.scale_ExD.shape[1]) * (1 + 2 * rank)}
        lpath.write_text(json.dumps(rec, indent=1))
        out["arms"][arm], out["train"][arm] = p, rec
    epath = d / "exit_eval.json"
    if epath.exists():
        out["eval"] = json.loads(epath.read_text())
    else:
        out["eval"] = {arm: et.evaluate_exits(gd, params, caches["eval"], p, e.eval_batch_tokens, e.eval_tokens)
                       for arm, p in out["arms"].items()}
        epath.write_text(json.dumps(out["eval"], indent=1))
    log("exit top-1 agreement with the full model: " + "; ".join(
        f"{a}: " + " ".join(f"{x:.2f}" for x in out["eval"][a]["agree"]) for a in out["eval"]))
    return out


def arm_params(gd, params, p):
    return et.load_exit_params(gd, params, p)


# ------------------------------------------------------------------------------------------------- replay


def greedy_fn(gd, num_new):
    return jax.jit(lambda p, t, l: per_token.generate(nnx.merge(gd, p), t, l, num_new,
                                                       per_token.full_depth_step).tokens_BxG)


def greedy(gd, params, prompts, num_new, batch):
    fn = greedy_fn(gd, num_new)
    out = []
    for i in range(0, len(prompts), batch):
        t, l = kv_lib.pad_prompts(prompts[i:i + batch])
        out.append(np.asarray(fn(params, jnp.asarray(t), jnp.asarray(l))))
    return np.concatenate(out)


_JITS = {}


def _exit_argmax_fn(gd):
    """Jitted once per graphdef: every early exit's argmax at every position of a teacher-forced pass."""
    if gd in _JITS:
        return _JITS[gd]

    @jax.jit
    def fn(p, seq_BxT):
        model = nnx.merge(gd, p)
        _, h_NxBxTxD = engine.run_layers(model.layers, model.embed_tokens(seq_BxT),
                                         layer_fn=et.causal_layer(seq_BxT))
        early = model.cfg.exit_layers[:-1]
        return jnp.stack([jnp.argmax(model.exit_logits(h_NxBxTxD[l], e), -1).astype(jnp.int32)
                          for e, l in enumerate(early)])

    _JITS[gd] = fn
    return fn


def exit_predictions(gd, params_arm, prompts, cont_NxG, batch):
    """``E x N x G``: each early exit's greedy token for continuation token t given the true prefix (one
    teacher-forced pass over prompt + greedy continuation), i.e. what a draft from that exit proposes there."""
    fn = _exit_argmax_fn(gd)

    p_len = len(prompts[0])
    seq = np.concatenate([np.asarray(prompts, np.int32), cont_NxG], 1)
    preds = [np.asarray(fn(params_arm, jnp.asarray(seq[i:i + batch]))) for i in range(0, len(seq), batch)]
    return np.concatenate(preds, 1)[:, :, p_len - 1:p_len - 1 + cont_NxG.shape[1]]


def replay(pred_NxG: np.ndarray, cont_NxG: np.ndarray, k: int) -> dict:
    """Exact replay of greedy self-speculative decoding (static exit, length k) from the exit's teacher-forced
    tokens: per round, drafts are accepted while they equal the greedy continuation (capped at k)."""
    rounds = drafted = accepted = 0
    for pred, g in zip(pred_NxG, cont_NxG):
        n_tok, count = len(g), 1
        while count < n_tok:
            n = 0
            while n < k and count + n < n_tok and pred[count + n] == g[count + n]:
                n += 1
            rounds, drafted, accepted, count = rounds + 1, drafted + k, accepted + n, count + n + 1
    return {"rounds": rounds, "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / max(drafted, 1), "tokens_per_verify": (accepted + rounds) / max(rounds, 1)}


def verify_costs(gd, params, prompts, lengths_t, batch):
    """Seconds of one full-depth ``kv.extend`` of t tokens per row at ``batch`` (AOT-compiled, median of 3)."""
    t_, l_ = kv_lib.pad_prompts(prompts[:batch])
    model = nnx.merge(gd, params)
    _, st = jax.jit(lambda p, t, l: kv_lib.prefill(nnx.merge(gd, p), t, l, t.shape[1] + max(lengths_t) + 2))(
        params, jnp.asarray(t_), jnp.asarray(l_))
    del model
    out = {}
    for t in lengths_t:
        toks = jnp.ones((batch, t), jnp.int32)
        fn = jax.jit(lambda p, x, s: kv_lib.extend(nnx.merge(gd, p), x, s)[0]).lower(params, toks, st).compile()
        out[t] = float(np.median(costs.measure(fn, params, toks, st, warmup=1, iters=3).times_s))
    return out


# ------------------------------------------------------------------------------------------------- decoding


def timed_decode(make, gd, params, prompts, batch, num_new):
    """Tokens and summed wall-clock of ``make(model, tokens, lengths)`` over the prompts in batches (AOT compiled
    once per shape, compile excluded); returns ``(tokens_NxG, seconds, outputs)``."""
    fn = jax.jit(lambda p, t, l: make(nnx.merge(gd, p), t, l))
    compiled, toks, outs, seconds = None, [], [], 0.0
    for i in range(0, len(prompts) // batch * batch, batch):
        t, l = (jnp.asarray(a) for a in kv_lib.pad_prompts(prompts[i:i + batch]))
        if compiled is None:
            compiled = fn.lower(params, t, l).compile()
        timing = costs.measure(compiled, params, t, l, warmup=0, iters=1)
        seconds += timing.mean_s
        o = jax.device_get(timing.output)
        outs.append(o)
        toks.append(np.asarray(o.tokens_BxG))
    return np.concatenate(toks), seconds, outs


def merge_spec(outs) -> dict:
    cat = lambda f: np.concatenate([np.asarray(getattr(o, f)) for o in outs])  # noqa: E731
    rounds, drafted, accepted = cat("rounds_B"), cat("drafted_B"), cat("accepted_B")
    return {"rounds": rounds, "drafted": drafted, "accepted": accepted, "draft_layers": cat("draft_layers_B"),
            "exit_trace": cat("exit_trace_BxG"), "k_trace": cat("k_trace_BxG")}


def spec_row(label, arm, m, seconds, greedy_s, tokens, ref, mcfg, verify_s, step_s, n_tok, **cost_kw) -> dict:
    rounds, drafted, accepted = m["rounds"].sum(), m["drafted"].sum(), m["accepted"].sum()
    tpv = (accepted + rounds) / max(rounds, 1)
    k_mean = drafted / max(rounds, 1)
    e_mean = m["draft_layers"].sum() / max(drafted, 1)
    row = {"drafter": label, "exits": arm, "mean_draft_layers": e_mean, "mean_k": k_mean,
           "acceptance": accepted / max(drafted, 1), "tokens_per_verify": tpv, "seconds": seconds,
           "tokens_per_s": n_tok / seconds, "speedup_measured": greedy_s / seconds}
    row.update(common.cost_speedups(tpv, k_mean, e_mean, mcfg, verify_s, step_s, **cost_kw))
    row["equals_greedy"] = float(np.mean(np.all(tokens == ref, 1)))
    return row


# ------------------------------------------------------------------------------------------------- plots


# ------------------------------------------------------------------------------------------------- main


@experiment(NAME, result_name=lambda c: "del" if c.variant == "del" else NAME)
def main(run: Run) -> Report:
    c, data_dir = run.cfg, run.args.data_dir
    log_lines = []

    def log(msg):
        line = f"[{run.seconds():7.0f} s] {msg}"
        log_lines.append(line)
        print(line, flush=True)

    gd, params, tok, mcfg = load_model(c)
    depth, layers = mcfg.depth, tuple(c.exits.layers)
    idx = {l: i for i, l in enumerate(layers)}          # layers run -> exit index
    log(f"model: {c.model.name if not c.model.random_depth else 'random'} depth {depth}, exits after {layers}")
    ex = train_exits(c, data_dir, exits_dir(run), gd, params, tok, log)
    arm_p = {arm: arm_params(gd, params, p) for arm, p in ex["arms"].items()}

    dc = c.decode
    p_len = dc.prompt_tokens
    half = dc.fit_prompts // 2
    fit_prompts = (common.paragraph_prompts(load_text(data_dir, "gutenberg", "validation"), tok,
                                            dc.fit_prompts - half, p_len)
                   + common.paragraph_prompts(load_text(data_dir, "wikitext2", "validation"), tok, half, p_len))
    test_prompts = common.paragraph_prompts(load_text(data_dir, "wikitext2", "test"), tok, dc.test_prompts, p_len)
    sweeps, verify_s, best, best_gpu = offline_sweep(c, gd, params, arm_p, layers, idx, mcfg, fit_prompts,
                                                     test_prompts, log)
    measured = measure(c, gd, params, arm_p, mcfg, idx, best, verify_s, test_prompts, log)
    return report(run, ex, sweeps, measured, verify_s, best, best_gpu, depth, layers, log_lines)


def offline_sweep(c, gd, params, arm_p, layers, idx, mcfg, fit_prompts, test_prompts, log):
    """Exact replay of every (arm, E, k) on the fitting and the held-out prompts, the verify costs, and the static
    (arm, E, k) fit on the fitting prompts by the CPU (and the GPU) cost model."""
    dc = c.decode
    g_new, b_main, p_len = dc.new_tokens, max(dc.batches), dc.prompt_tokens
    # ---- offline sweep (exact replay) on the fitting prompts and on the held-out prompts
    sweeps, conts = {}, {}
    for split, prompts in (("fit", fit_prompts), ("test", test_prompts)):
        conts[split] = greedy(gd, params, prompts, g_new, b_main)
        sweeps[split] = {}
        for arm in ARMS:
            preds = exit_predictions(gd, arm_p[arm], prompts, conts[split], b_main)
            sweeps[split][arm] = {(l, k): replay(preds[idx[l]], conts[split], k) for l in layers for k in dc.ks}
        log(f"replayed every (E, k) on the {split} prompts")
    ks_cost = sorted(set(dc.ks) | set(dc.measure_ks) | set(range(1, dc.del_max_k + 1)))
    verify_s = {b: verify_costs(gd, params, test_prompts, [k + 1 for k in ks_cost] + [1], b) for b in dc.batches}
    log(f"verify seconds per extend of t tokens: {verify_s}")
    for split in sweeps:
        for arm in ARMS:
            for (l, k), r in sweeps[split][arm].items():
                r.update(common.cost_speedups(r["tokens_per_verify"], k, l, mcfg, verify_s[b_main], verify_s[b_main][1],
                                       batch=b_main, cache_len=p_len + g_new))
    # Fit (arm, E, k) on the fitting prompts by the CPU cost model at the main batch.
    best = max(((arm, l, k) for arm in ("norm", "lowrank") for l in layers for k in dc.ks),
               key=lambda a: sweeps["fit"][a[0]][(a[1], a[2])]["speedup_cost_cpu"])
    best_gpu = max(((arm, l, k) for arm in ("norm", "lowrank") for l in layers for k in dc.ks),
                   key=lambda a: sweeps["fit"][a[0]][(a[1], a[2])]["speedup_cost_h200"])
    arm_b, e_b, k_b = best
    log(f"fit: best static (arm, E, k) = {best} by the CPU cost model, {best_gpu} by the cost model (roofline, H200)")

    return sweeps, verify_s, best, best_gpu


def measure(c, gd, params, arm_p, mcfg, idx, best, verify_s, test_prompts, log):
    """Measured decoding on the held-out prompts: greedy, the fitted static drafter and its variants, DEL."""
    dc = c.decode
    g_new, b_main, p_len = dc.new_tokens, max(dc.batches), dc.prompt_tokens
    arm_b, e_b, k_b = best
    n_measure = {b: (dc.test_prompts if b == b_main else min(dc.batch1_prompts, dc.test_prompts)) // b * b
                 for b in dc.batches}
    measured, ref_tokens = {}, {}
    for b in dc.batches:
        prompts = test_prompts[:n_measure[b]]
        n_tok = len(prompts) * g_new
        ref, greedy_s, _ = timed_decode(lambda m, t, l: per_token.generate(m, t, l, g_new, per_token.full_depth_step),
                                        gd, params, prompts, b, g_new)
        ref_tokens[b] = ref
        rows = [{"drafter": "greedy (full model)", "exits": "-", "seconds": greedy_s, "tokens_per_s": n_tok / greedy_s,
                 "speedup_measured": 1.0, "equals_greedy": 1.0}]
        step_s = verify_s[b][1]

        def spec(label, arm, drafter):
            toks, secs, outs = timed_decode(
                lambda m, t, l: speculative.self_speculative(m, t, l, g_new, drafter=drafter), gd, arm_p[arm],
                prompts, b, g_new)
            m = merge_spec(outs)
            row = spec_row(label, arm, m, secs, greedy_s, toks, ref, mcfg, verify_s[b], step_s, n_tok, batch=b,
                           cache_len=p_len + g_new,
                           shadow_heads=len(dc.del_candidates) if label.startswith("DEL") else 0)
            log(f"batch {b}: {row}")
            return row, m

        configs = [(f"static E={e_b} k={k_b} (fit)", arm_b, speculative.static(idx[e_b], k_b)),
                   (f"static E={e_b} k={k_b}", "untrained", speculative.static(idx[e_b], k_b))]
        if c.variant in ("layerskip", "both") and b == b_main:
            configs += [(f"static E={l} k={k_b}", arm_b, speculative.static(idx[l], k_b))
                        for l in dc.measure_layers if l != e_b]
            configs += [(f"static E={e_b} k={k}", arm_b, speculative.static(idx[e_b], k))
                        for k in dc.measure_ks if k != k_b]
        dels = {}
        if c.variant in ("del", "both"):
            cands = [idx[l] for l in dc.del_candidates]
            for label, vpt in (("DEL (paper TPL: verify = L)", 0.0), ("DEL (CPU TPL: verify = (d+1) L)", 1.0)):
                configs.append((label, arm_b, speculative.dynamic(mcfg, cands, dc.del_max_k, decay=dc.del_decay,
                                                                  alpha0=dc.del_alpha0, verify_per_token=vpt)))
        for label, arm, drafter in configs:
            row, m = spec(label, arm, drafter)
            rows.append(row)
            if label.startswith("DEL"):
                dels[label] = m
        measured[b] = {"rows": rows, "prompts": len(prompts), "del": {
            k: {"exit_hist": {int(l): int(n) for l, n in zip(*np.unique(v["exit_trace"][v["exit_trace"] >= 0],
                                                                           return_counts=True))},
                "k_hist": {int(l): int(n) for l, n in zip(*np.unique(v["k_trace"][v["k_trace"] > 0],
                                                                     return_counts=True))},
                "rows_with_several_exits": float(np.mean([len(set(r[r >= 0].tolist())) > 1
                                                          for r in v["exit_trace"]])),
                "exit_trace_row0": v["exit_trace"][0].tolist(), "k_trace_row0": v["k_trace"][0].tolist()}
            for k, v in dels.items()}}

    return measured


def report(run, ex, sweeps, measured, verify_s, best, best_gpu, depth, layers, log_lines) -> Report:
    c, dc = run.cfg, run.cfg.decode
    g_new, p_len = dc.new_tokens, dc.prompt_tokens
    arm_b, e_b, k_b = best
    ev = ex["eval"]
    exit_rows = [{"exit_after_layers": l,
                  **{f"agree_{a}": 100 * ev[a]["agree"][i] for a in ARMS},
                  **{f"KL_{a}": ev[a]["kl"][i] for a in ARMS},
                  **{f"ppl_{a}": ev[a]["ppl"][i] for a in ARMS}} for i, l in enumerate(layers)]
    sweep_rows = []
    for split in ("fit", "test"):
        for arm in ARMS:
            for l in layers:
                for k in dc.ks:
                    r = sweeps[split][arm][(l, k)]
                    sweep_rows.append({"prompts": split, "exits": arm, "E": l, "k": k, **{
                        x: r[x] for x in ("acceptance", "tokens_per_verify", "speedup_cost_cpu", "speedup_cost_h200",
                                          "speedup_cost_h200_floor")}})
    results = {"model_depth": depth, "exit_layers": layers,
               "exits": {"cache": ex["cache"], "train": ex["train"], "eval_wikitext2_test": ev},
               "fit": {"best_cpu_cost": best, "best_gpu_cost": best_gpu},
               "verify_seconds": {str(b): {str(t): s for t, s in v.items()} for b, v in verify_s.items()},
               "sweep": sweep_rows, "measured": {str(b): v for b, v in measured.items()}, "log": log_lines}
    files = {f"{c.variant}_sweep.png": lambda path: common.plot_sweep(
        sweeps["test"], layers, dc.ks, path, "held-out prompts (exact replay of greedy self-speculation)")}
    short = lambda r: {k: r.get(k, "") for k in ("drafter", "exits", "mean_draft_layers", "mean_k",  # noqa: E731
                                                  "acceptance", "tokens_per_verify", "seconds", "tokens_per_s",
                                                  "speedup_measured", "speedup_cost_cpu", "speedup_cost_h200",
                                                  "speedup_cost_h200_floor",
                                                  "equals_greedy")}
    tr = ex["train"]
    parts = [
        f"# Self-speculative decoding on SmolLM2-135M ({c.variant})",
        run.prov.markdown() + f"  \nTotal wall-clock of this run: {run.seconds():.0f} s.",
        PAPER,
        "## Exits trained on the frozen model (WikiText-2 test, "
        f"{ev['norm']['tokens']} tokens, windows of {c.exits.context})\n"
        f"Cache: {json.dumps(ex['cache'])}. Training: " + "; ".join(
            f"{a}: {tr[a]['steps']} steps x {tr[a]['batch_tokens']} tokens, lr {tr[a]['lr']}, {tr[a]['seconds']:.0f} s"
            for a in tr) + f". Full model perplexity on these tokens: {ev['norm']['full_ppl']:.2f}. agree = top-1 "
        "agreement (%) with the full model; KL = KL(p_full || p_exit) in nats; ppl = the exit's own perplexity.",
        report_lib.markdown_table(exit_rows, list(exit_rows[0].keys()), ".2f"),
        f"## Fit (fitting prompts: {dc.fit_prompts} from Gutenberg validation + WikiText-2 validation)\n"
        f"Best static by the CPU cost model: exits {arm_b}, E={e_b}, k={k_b}; by the cost model (roofline, H200): "
        f"{best_gpu}. " + common.COST_COLUMNS,
    ]
    for b in dc.batches:
        parts.append(f"## Held-out decoding, batch {b} ({measured[b]['prompts']} WikiText-2 test prompts of "
                     f"{p_len} tokens x {g_new} new tokens; wall-clock summed over batches, compile excluded)")
        rows = [short(r) for r in measured[b]["rows"]]
        parts.append(report_lib.markdown_table(rows, list(rows[0].keys()), ".3f"))
        if measured[b]["del"]:
            parts.append("DEL choices (layers of the chosen exit, draft lengths: counts over rounds and rows): " +
                         json.dumps(measured[b]["del"]))
    sel = [r for r in sweep_rows if r["prompts"] == "test" and (r["k"] == k_b or r["E"] == e_b)]
    parts += ["## Replay sweep on the held-out prompts (rows at the fitted k and at the fitted E)",
              report_lib.markdown_table(sel, list(sel[0].keys()), ".3f"),
              f"Verify seconds (one extend of t tokens per row at full depth): {json.dumps(results['verify_seconds'])}"]
    return Report("\n\n".join(parts), results, files)


if __name__ == "__main__":
    main()
