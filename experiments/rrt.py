"""Relaxed Recursive Transformers (arXiv:2410.20672) at small scale: a pretrained LM converted to a looped block of
tied layers (strict recursion, Average / Stepwise init) and relaxed by per-loop SVD-initialised LoRA, against the
full model and a truncated model of equal unique parameters after equal uptraining steps; and the layer-slot count
of continuous depth-wise batching with per-loop exits against a masked batch.

    python -m experiments.rrt --config configs/rrt.py:smoke --data_dir DIR [--outdir DIR]

See configs/rrt.py for the runbook. Per seed: the "pretrained" model (trained from scratch, or SmolLM2 loaded),
every arm built from it by ``eejax.models.recursive.convert`` and scored right after conversion, then uptrained on
the one Trainer (``recursive.recursive_lm_loss``: the last loop's CE) on the same batches and scored again.
"""
from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eejax.data.lm import WindowIterator
from eejax.data.text import load_tokens
from eejax.eval import bootstrap, report
from eejax.models import lm
from eejax.models import recursive as rr
from experiments import _common_lm as lm_common
from experiments import _common_smollm2 as smollm2
from experiments._common import Report, Run, experiment

NAME = "rrt"

PAPER = ("arXiv:2410.20672 (abstract): recursive Gemma 1B beats similar-size vanilla models (TinyLlama 1.1B, "
         "Pythia 1B) and KD baselines and recovers most of Gemma 2B; continuous depth-wise batching with early exit "
         "gives 2-3x throughput in a theoretical analysis")


class Arm(NamedTuple):
    name: str
    unique: int
    loops: int
    init: str
    rank: int


class Source(NamedTuple):
    corpus: lm_common.Corpus
    model: smollm2.LM | None     # the pretrained model, or None when it is trained here from scratch


def arms(cfg, depth: int) -> list[Arm]:
    k, loops = cfg.unique, cfg.loops
    specs = {"full": Arm("full", depth, 1, "lower", 0), "truncated": Arm("truncated", k, 1, "lower", 0)}
    specs |= {f"recursive-{i}": Arm(f"recursive-{i}", k, loops, i, 0) for i in cfg.inits}
    specs |= {f"relaxed-r{r}": Arm(f"relaxed-r{r}", k, loops, cfg.relaxed_init, r) for r in cfg.ranks}
    return list(specs.values())


def load(cfg, args) -> Source:
    """The corpus (and the pretrained model): char-level Tiny Shakespeare for a model trained here; WikiText-2
    under the pretrained model's tokenizer otherwise (uptraining on validation, scoring on test)."""
    if cfg.source == "scratch":
        return Source(lm_common.load_corpus(cfg, args.data_dir), None)
    model = smollm2.load_lm(cfg.source)
    train = load_tokens(args.data_dir, "wikitext2", "validation", model.tokenizer, detokenize=True)
    val = load_tokens(args.data_dir, "wikitext2", cfg.data.eval_split, model.tokenizer, detokenize=True)
    desc = (f"WikiText-2 validation ({train.size:,} tokens, uptraining) and {cfg.data.eval_split} ({val.size:,} "
            f"tokens, scored), {model.description}")
    return Source(lm_common.Corpus(model.tokenizer, train, val, desc), model)


def pretrained(run: Run, src: Source, seed: int):
    """``(LMConfig, params)`` of the model every arm is converted from."""
    if src.model is not None:
        return src.model.cfg, src.model.params
    cfg = run.cfg
    mcfg = lm.LMConfig(vocab_size=src.corpus.tokenizer.vocab_size, exits=(cfg.model.depth - 1,), exit_head="final",
                       **cfg.model.to_dict())
    gd, params = lm.build(mcfg, seed)
    batches = WindowIterator(src.corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=seed)
    return mcfg, lm_common.fit(lm.multi_exit_lm_loss(gd, mcfg), params, cfg.train.pretrain_optim, batches,
                               cfg.train.pretrain_steps, pathlib.Path(run.workdir) / f"seed{seed}" / "pretrained",
                               cfg, f"pretrained seed {seed}")


def make_eval(graphdef, loops: int):
    """Per-token NLL and max-softmax ``X x B x T`` at every loop exit for one validation batch."""
    @jax.jit
    def fn(params, tokens, targets):
        logp = jax.nn.log_softmax(rr.loop_exit_logits(graphdef, params, tokens, loops).astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, targets[None, ..., None], -1)[..., 0], jnp.exp(logp.max(-1))
    return fn


def score(fn, params, val) -> tuple[np.ndarray, np.ndarray]:
    """``X x W x T`` per-token NLL and max-softmax over the validation windows."""
    out = [jax.device_get(fn(params, v["tokens"], v["targets"])) for v in val]
    return tuple(np.concatenate([o[i] for o in out], axis=1) for i in range(2))


def ppl(nll_WxT) -> float:
    return float(np.exp(nll_WxT.mean()))


def compare_pairs(cfg) -> list[tuple[str, str]]:
    """The expected ordering, each pair ``(better, worse)``: full < relaxed(large r) < ... < relaxed(small r) <
    recursive (the relaxed arms' init), full < every relaxed arm, every recursive arm < truncated, and the init
    ordering."""
    relaxed = [f"relaxed-r{r}" for r in sorted(cfg.ranks, reverse=True)]
    chain = ["full", *relaxed, f"recursive-{cfg.relaxed_init}"] if cfg.relaxed_init in cfg.inits else [
        "full", *relaxed]
    pairs = list(zip(chain, chain[1:])) + [("full", r) for r in relaxed[1:]]
    pairs += [(f"recursive-{i}", "truncated") for i in cfg.inits]
    if {"average", "stepwise"} <= set(cfg.inits):
        pairs.append(("recursive-stepwise", "recursive-average"))
    return pairs


def comparisons(cfg, after) -> list[dict]:
    out = []
    for a, b in compare_pairs(cfg):
        a_W = np.mean([after[(a, s)][-1].mean(-1) for s in cfg.seeds], axis=0)   # seed-mean per-window NLL
        b_W = np.mean([after[(b, s)][-1].mean(-1) for s in cfg.seeds], axis=0)
        d = bootstrap.paired_bootstrap(a_W, b_W, transform=np.exp, seed=0)
        per_seed = [ppl(after[(a, s)][-1]) - ppl(after[(b, s)][-1]) for s in cfg.seeds]
        out.append({"arm": a, "minus": b, "ppl_diff": d.diff, "ci95_lo": d.lo, "ci95_hi": d.hi,
                    "per_seed": per_seed, "expected": f"{a} better",
                    "reading": d.reading(a, b).replace(" above ", " worse than ").replace(" below ", " better than ")})
    return out


def batching(cfg, mcfg, arm: Arm, nll_XxWxT, conf_XxWxT) -> list[dict]:
    """Per-loop exits by max-softmax after each loop, then the slot counts of both batchings over the validation
    tokens (each token a row of the queue, in order) and the per-row LoRA cost of depth-wise batching."""
    dense, lora = rr.lora_row_flops(mcfg, arm.rank)
    rows = []
    for thr in cfg.batching.thresholds:
        hit_XxQ = conf_XxWxT.reshape(conf_XxWxT.shape[0], -1) >= thr
        hit_XxQ[-1] = True
        exit_Q = np.argmax(hit_XxQ, axis=0)          # the first loop whose exit is confident enough
        nll_XxQ = nll_XxWxT.reshape(nll_XxWxT.shape[0], -1)
        m = rr.masked_counts(exit_Q, cfg.batching.slots, arm.loops)
        d = rr.depthwise_counts(exit_Q, cfg.batching.slots, arm.loops)
        rows.append({"threshold": thr, "exit_loop1_frac": float(np.mean(exit_Q == 0)),
                     "ppl_exit_mix": float(np.exp(np.take_along_axis(nll_XxQ, exit_Q[None], 0).mean())),
                     "ppl_last_loop": float(np.exp(nll_XxQ[-1].mean())),
                     "masked_util": m.utilisation, "depthwise_util": d.utilisation,
                     "masked_calls": m.block_calls, "depthwise_calls": d.block_calls,
                     "calls_ratio": m.block_calls / d.block_calls, "adapters_per_call": d.adapters_per_call,
                     "lora_row_overhead": lora / dense,
                     # block multiply-adds, masked (one adapter per call, merged) over depth-wise (per-row LoRA)
                     "macs_ratio": m.block_calls * dense / (d.block_calls * (dense + lora))})
    return rows


def write_report(run, src, mcfg, specs, runs, after, batch_rows, wall_s) -> Report:
    cfg = run.cfg
    rows = []
    for a in specs:
        rs = [r for r in runs if r["arm"] == a.name]
        rows.append({"arm": a.name, "unique": a.unique, "loops": a.loops, "init": a.init, "rank": a.rank,
                     "unique_params": rs[0]["unique_params"],
                     "ppl_converted": float(np.mean([r["ppl_converted"] for r in rs])),
                     "ppl_uptrained": float(np.mean([r["ppl_uptrained"] for r in rs])),
                     "ppl_loop1": float(np.mean([r["ppl_loop1"] for r in rs])) if a.loops > 1 else None})
    compare = comparisons(cfg, after)
    dense, _ = rr.lora_row_flops(mcfg, 0)
    head = mcfg.d_model * mcfg.vocab_size
    t = cfg.train
    origin = f"trained here, {t.pretrain_steps} steps" if src.model is None else cfg.source
    scale = (f"pretrained model: {origin}"
             f" ({mcfg.depth} layers, width {mcfg.d_model}); every arm uptrained {t.steps} steps of batch "
             f"{cfg.data.batch_size} x {cfg.data.seq_len}; seeds {list(cfg.seeds)}; validation {cfg.eval.batches} x "
             f"{cfg.eval.batch} windows of {cfg.data.seq_len}; wall-clock {wall_s:.0f} s.")
    md = "\n\n".join([
        f"# Relaxed Recursive Transformers: {mcfg.depth} layers -> {cfg.unique} x {cfg.loops}, perplexity after "
        "conversion and after equal uptraining",
        run.prov.markdown() + f"  \nData: {src.corpus.description}.  \nScale: {scale}  \nPaper: {PAPER}.",
        "Validation perplexity (seed mean) right after conversion and after uptraining, at the last loop; `ppl_loop1`: "
        "the exit after loop 1 (the same final norm + head) after uptraining. `unique_params`: stored parameters, "
        "LoRA included.",
        report.markdown_table(rows, list(rows[0]), ".3f"),
        "Each pair of the expected ordering, better-expected arm minus the other, perplexity after uptraining (exp "
        "of the seed-mean per-window NLL), paired bootstrap 95% interval over the validation windows; per-seed "
        "differences beside it.",
        report.markdown_table([{k: v for k, v in c.items() if k != "per_seed"} |
                               {"per_seed": ", ".join(f"{x:+.3f}" for x in c["per_seed"])} for c in compare],
                              ["arm", "minus", "ppl_diff", "ci95_lo", "ci95_hi", "per_seed", "reading"], ".3f"),
        f"Depth-wise batching (a count, not CPU time) for `{cfg.batching.arm}` over the validation tokens "
        f"(seed {cfg.seeds[0]}): a token exits after loop 1 when its max-softmax there reaches the threshold. "
        f"Layer-slot utilisation of a masked batch of {cfg.batching.slots} rows vs continuous depth-wise batching "
        f"over {cfg.batching.slots} slots, block calls of each, distinct loop adapters per depth-wise call (rows at "
        "different loops need different LoRA adapters: batched per-row LoRA), that per-row LoRA's multiply-adds "
        "relative to the tied block's dense ones, and `macs_ratio`: the masked batch's block multiply-adds over "
        "depth-wise batching's with the per-row LoRA (a masked call has every row at one loop, so its adapter is "
        f"merged into the tied weights, a cost of R / slots of a block per row left out). The head costs "
        f"{head / dense:.2f} of a block per token here (about 8 of 30 blocks in SmolLM2-135M) and every exit pays it.",
        report.markdown_table(batch_rows, list(batch_rows[0]), ".3f")])
    return Report(md, {"data": src.corpus.description, "rows": rows, "compare": compare, "batching": batch_rows,
                       "runs": runs, "head_over_block": head / dense, "wall_seconds": wall_s})


@experiment(NAME, data=load)
def main(run: Run, src: Source) -> Report:
    cfg = run.cfg
    it = WindowIterator(src.corpus.eval_ids, cfg.eval.batch, cfg.data.seq_len, seed=0, shuffle=False,
                        max_batches=cfg.eval.batches)
    val = [next(it) for _ in range(cfg.eval.batches)]
    runs, after, batch_rows = [], {}, None
    for seed in cfg.seeds:
        mcfg, params = pretrained(run, src, seed)
        specs = arms(cfg, mcfg.depth)
        for a in specs:
            c = rr.convert(mcfg, params, num_unique=a.unique, loops=a.loops, init=a.init, rank=a.rank)
            fn = make_eval(c.graphdef, a.loops)
            nll0, _ = score(fn, c.params, val)
            batches = WindowIterator(src.corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=1000 + seed)
            trained = lm_common.fit(rr.recursive_lm_loss(c.graphdef, a.loops), c.params, cfg.train.optim, batches,
                                    cfg.train.steps, pathlib.Path(run.workdir) / f"seed{seed}" / a.name, cfg,
                                    f"{a.name} seed {seed}")
            nll, conf = score(fn, trained, val)
            after[(a.name, seed)] = nll
            runs.append({"arm": a.name, "seed": seed, "unique_params": rr.unique_params(c.params),
                         "ppl_converted": ppl(nll0[-1]), "ppl_uptrained": ppl(nll[-1]), "ppl_loop1": ppl(nll[0])})
            print(f"{a.name} seed {seed}: ppl converted {ppl(nll0[-1]):.3f} uptrained {ppl(nll[-1]):.3f} "
                  f"loop-1 exit {ppl(nll[0]):.3f}; {runs[-1]['unique_params']:,} unique params", flush=True)
            if a.name == cfg.batching.arm and batch_rows is None:
                batch_rows = batching(cfg, mcfg, a, nll, conf)
    return write_report(run, src, mcfg, specs, runs, after, batch_rows, run.seconds())


if __name__ == "__main__":
    main()
