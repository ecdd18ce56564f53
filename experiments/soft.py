"""Sorted LLaMA / SoFT (arXiv:2309.08968) at small scale: after a last-layer "pretraining" stage, three arms at
equal steps (SFT, SFT + intermediate classifier tuning, SoFT) scored by validation perplexity of every nested
sub-model, and the half-depth sub-model of each arm as a self-speculative drafter of its own full model.

    python -m experiments.soft --config configs/soft.py:smoke --data_dir DIR [--outdir DIR]

See configs/soft.py for the runbook. The recipe, per seed: one model trained with the final-exit loss (the
"pretrained" stage), then from it, on the same batches: ``sft`` (final-exit loss), ``soft`` (the mean of the
next-token CEs at the nested depths, all read through the one final norm + head: ``lm.multi_exit_lm_loss`` on a
model built with ``exit_head="final"``), and ``ict`` (SFT's model frozen, a head of its own per early exit, started
from the shared one and trained with ``make_optimizer(trainable=...)``). All on the one Trainer.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.lm import WindowIterator
from eejax.decoding import speculative
from eejax.eval import bootstrap, report
from eejax.models import lm
from experiments import _common_lm as lm_common
from experiments._common import Report, Run, experiment

NAME = "soft"


class Models(NamedTuple):
    """The three model definitions of one run: one parameter tree for ``last`` and ``nested`` (``exit_head="final"``
    adds no parameter), a larger one for ``ict`` (an own norm + output matrix per early exit)."""
    last: lm.LMConfig      # one exit, the final layer: pretraining and SFT
    nested: lm.LMConfig    # exits at the nested depths, all through the final norm + shared head: SoFT, read-outs
    ict: lm.LMConfig       # exits at the nested depths, each early exit with its own head


def model_configs(cfg, vocab: int) -> Models:
    exits = tuple(d - 1 for d in cfg.depths)
    base = lm.LMConfig(vocab_size=vocab, exits=(cfg.model.depth - 1,), exit_head="final", **cfg.model.to_dict())
    return Models(base, dataclasses.replace(base, exits=exits),
                  dataclasses.replace(base, exits=exits, exit_head="own"))


def ict_init(ict_graphdef, ict_fresh, sft_params, num_early: int):
    """ICT's parameters (shaped as ``ict_fresh``): SFT's backbone, and every early exit's own head started as the
    shared one (final norm scale, output matrix = the tied embedding transposed), so tuning starts from
    SFT's read-out."""
    model = nnx.merge(ict_graphdef, ict_fresh)
    nnx.update(model, sft_params)
    heads = model.exit_heads
    heads.norm.scale[...] = jnp.tile(model.final_norm.scale[...][None], (num_early, 1))
    heads.proj.kernel[...] = jnp.tile(model.embed.embedding[...].T[None], (num_early, 1, 1))
    return nnx.state(model, nnx.Param)


def make_eval(graphdef):
    """Per-window mean NLL at every exit: ``E x B`` for one validation batch."""
    @jax.jit
    def nll(params, tokens, targets):
        logits = nnx.merge(graphdef, params).all_exits(tokens).logits_ExBxTxV
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, targets[None, ..., None], -1)[..., 0].mean(-1)
    return nll


def exit_nll(nll_fn, params, val) -> np.ndarray:
    """``E x W``: per-window NLL at every exit over the validation windows."""
    return np.concatenate([np.asarray(nll_fn(params, v["tokens"], v["targets"])) for v in val], axis=1)


def make_spec(graphdef, draft_exit: int, k: int, new_tokens: int):
    """Greedy self-speculative decoding with the sub-model at exit ``draft_exit`` drafting ``k`` tokens a round
    (``speculative.self_speculative``); per-row accepted and drafted counts."""
    @jax.jit
    def spec(params, prompt_BxP):
        lengths = jnp.full((prompt_BxP.shape[0],), prompt_BxP.shape[1], jnp.int32)
        out = speculative.self_speculative(nnx.merge(graphdef, params), prompt_BxP, lengths, new_tokens,
                                           draft_exit=draft_exit, k=k)
        return out.accepted_B, out.drafted_B
    return spec


def acceptance(spec_fn, params, prompts) -> tuple[np.ndarray, np.ndarray]:
    acc, dra = zip(*[jax.device_get(spec_fn(params, jnp.asarray(p))) for p in prompts])
    return np.concatenate(acc).astype(np.float64), np.concatenate(dra).astype(np.float64)


def layer_cost(m: lm.LMConfig) -> tuple[float, float]:
    """Multiply-adds per token of one block (projections and MLP, attention scores excluded) and of the head."""
    k, h, j = m.head_dim, m.num_heads, m.num_kv_heads
    block = m.d_model * (h + 2 * j) * k + h * k * m.d_model + 2 * m.d_model * m.mlp_dim
    return float(block), float(m.d_model * m.vocab_size)


def write_report(cfg, run, corpus, models, runs, nll, spec, wall_s):
    depths, arms = list(cfg.depths), list(cfg.arms)
    rows = []
    for arm in arms:
        row = {"arm": arm}
        for i, d in enumerate(depths):
            row[f"ppl@{d}"] = float(np.mean([r["ppl"][i] for r in runs if r["arm"] == arm]))
        rows.append(row)
    compare = []
    for other in [a for a in arms if a != "soft"]:
        for i, d in enumerate(depths):
            a_W = np.mean([nll[("soft", s)][i] for s in cfg.seeds], axis=0)      # seed-mean per-window NLL
            b_W = np.mean([nll[(other, s)][i] for s in cfg.seeds], axis=0)
            diff = bootstrap.paired_bootstrap(a_W, b_W, transform=np.exp, seed=0)
            per_seed = [float(np.exp(nll[("soft", s)][i].mean()) - np.exp(nll[(other, s)][i].mean()))
                        for s in cfg.seeds]
            compare.append({"soft_minus": other, "depth": d, "ppl_diff": diff.diff, "ci95_lo": diff.lo,
                            "ci95_hi": diff.hi, "per_seed": per_seed,
                            "reading": diff.reading("soft", other).replace(" above ", " worse than ")
                            .replace(" below ", " better than ")})
    block, head = layer_cost(models.nested)
    full = cfg.model.depth * block + head
    costs = [{"depth": d, "relative_cost": (d * block + head) / full} for d in depths]
    m, t = cfg.model, cfg.train
    spec_rows = []
    for arm in [a for a in arms if (a, cfg.seeds[0]) in spec]:
        acc = np.concatenate([spec[(arm, s)][0] for s in cfg.seeds])
        dra = np.concatenate([spec[(arm, s)][1] for s in cfg.seeds])
        spec_rows.append({"arm": arm, "acceptance": float(acc.sum() / dra.sum()),
                          "per_seed": [float(spec[(arm, s)][0].sum() / spec[(arm, s)][1].sum()) for s in cfg.seeds]})
    spec_compare = []
    for other in [r["arm"] for r in spec_rows if r["arm"] != "soft"]:
        s0 = cfg.seeds
        rate = lambda arm, s: spec[(arm, s)][0] / np.maximum(spec[(arm, s)][1], 1)
        a_acc = np.mean([rate("soft", s) for s in s0], axis=0)
        b_acc = np.mean([rate(other, s) for s in s0], axis=0)
        d = bootstrap.paired_bootstrap(a_acc, b_acc, seed=0)
        spec_compare.append({"soft_minus": other, "acceptance_diff": d.diff, "ci95_lo": d.lo, "ci95_hi": d.hi,
                             "reading": d.reading("soft", other)})
    half = cfg.depths[cfg.spec.draft_exit]
    md = "\n\n".join([
        "# Sorted LLaMA / SoFT: per-depth validation perplexity of SFT, SFT+ICT and SoFT sub-models",
        run.prov.markdown() + f"  \nData: {corpus.description}.  \nScale: {m.depth} layers, width {m.d_model}; "
        f"pretrained stage {t.pretrain_steps} steps (final-exit loss), then each arm {t.steps} steps of batch "
        f"{cfg.data.batch_size} x {cfg.data.seq_len}; seeds {list(cfg.seeds)}; validation "
        f"{cfg.eval.batches} x {cfg.eval.batch} windows of {cfg.data.seq_len}; wall-clock {wall_s:.0f} s.",
        "Validation perplexity of the sub-model of the first n layers (seed mean); `pretrained` is the model all "
        "arms start from, read out at each depth through its final norm and head.",
        report.markdown_table(rows, list(rows[0]), ".3f"),
        "SoFT minus each arm, perplexity (exp of the seed-mean per-window NLL), paired bootstrap 95% interval over "
        "the validation windows; per-seed differences beside it.",
        report.markdown_table([{k: v for k, v in c.items() if k != "per_seed"} |
                               {"per_seed": ", ".join(f"{x:+.3f}" for x in c["per_seed"])} for c in compare],
                              ["soft_minus", "depth", "ppl_diff", "ci95_lo", "ci95_hi", "per_seed", "reading"],
                              ".3f"),
        "Cost of a sub-model per token relative to the full model (multiply-adds of the blocks' projections and "
        f"MLPs plus the shared head; the head is {head / block:.2f} of a block here, about 8 of 30 blocks in "
        "SmolLM2-135M).",
        report.markdown_table(costs, ["depth", "relative_cost"], ".3f"),
        f"Second shape: greedy self-speculative decoding of each arm's own full model with its depth-{half} "
        f"sub-model drafting {cfg.spec.k} tokens a round ({cfg.spec.new_tokens} new tokens after "
        f"{cfg.spec.prompt_len}-character prompts, {cfg.spec.batches} x {cfg.eval.batch} prompts per seed): "
        "acceptance rate (accepted / drafted), and SoFT minus each arm with a paired bootstrap over prompts "
        "(per-prompt rate, seed mean).",
        report.markdown_table([r | {"per_seed": ", ".join(f"{x:.3f}" for x in r["per_seed"])} for r in spec_rows],
                              ["arm", "acceptance", "per_seed"], ".3f"),
        report.markdown_table(spec_compare, list(spec_compare[0]) if spec_compare else [], ".3f")])
    return Report(md, {"data": corpus.description, "rows": rows, "compare": compare, "costs": costs,
                       "spec": spec_rows, "spec_compare": spec_compare, "runs": runs, "wall_seconds": wall_s})


@experiment(NAME, data=lm_common.corpus)
def main(run: Run, corpus) -> Report:
    cfg = run.cfg
    models = model_configs(cfg, corpus.tokenizer.vocab_size)
    it = WindowIterator(corpus.eval_ids, cfg.eval.batch, cfg.data.seq_len, seed=0, shuffle=False,
                        max_batches=cfg.eval.batches)
    val = [next(it) for _ in range(cfg.eval.batches)]
    sp = cfg.spec
    windows = lm_common.eval_windows(corpus.eval_ids, cfg.eval.batch, sp.prompt_len, sp.new_tokens,
                                     cfg.eval.batches, sp.batches)
    gd_last, gd_nested = lm.build(models.last, 0)[0], lm.build(models.nested, 0)[0]
    gd_ict, ict_fresh = lm.build(models.ict, 0)
    nll_fns = {"nested": make_eval(gd_nested), "ict": make_eval(gd_ict)}
    spec_fns = {"nested": make_spec(gd_nested, sp.draft_exit, sp.k, sp.new_tokens),
                "ict": make_spec(gd_ict, sp.draft_exit, sp.k, sp.new_tokens)}
    last_loss = lm.multi_exit_lm_loss(gd_last, models.last)
    losses = {"sft": last_loss, "soft": lm.multi_exit_lm_loss(gd_nested, models.nested, weighting="uniform"),
              "ict": lm.multi_exit_lm_loss(gd_ict, models.ict, weighting="uniform")}
    t = cfg.train
    runs, nll, spec, t0 = [], {}, {}, time.perf_counter()
    for seed in cfg.seeds:
        wd = pathlib.Path(run.workdir) / f"seed{seed}"
        _, params = lm.build(models.last, seed)
        pre = lm_common.fit(last_loss, params, t.pretrain_optim, WindowIterator(
            corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=seed), t.pretrain_steps, wd / "pretrained",
            cfg, f"pretrained seed {seed}")
        trained = {"pretrained": pre}
        for arm in ("sft", "soft", "ict"):
            if arm not in cfg.arms:
                continue
            batches = WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=1000 + seed)
            if arm == "ict":   # on SFT's model, backbone frozen: only the early exits' own heads learn
                start = ict_init(gd_ict, ict_fresh, trained["sft"], len(cfg.depths) - 1)
                trained[arm] = lm_common.fit(losses[arm], start, t.optim, batches, t.steps, wd / arm, cfg,
                                             f"{arm} seed {seed}", trainable=lambda p: p.startswith("exit_heads"))
            else:
                trained[arm] = lm_common.fit(losses[arm], pre, t.optim, batches, t.steps, wd / arm, cfg,
                                             f"{arm} seed {seed}")
        for arm in cfg.arms:
            kind = "ict" if arm == "ict" else "nested"
            nll[(arm, seed)] = exit_nll(nll_fns[kind], trained[arm], val)
            ppl = np.exp(nll[(arm, seed)].mean(1)).tolist()
            runs.append({"arm": arm, "seed": seed, "ppl": ppl})
            line = f"{arm} seed {seed}: ppl " + " ".join(f"@{d} {p:.3f}" for d, p in zip(cfg.depths, ppl))
            if arm != "pretrained":
                spec[(arm, seed)] = acceptance(spec_fns[kind], trained[arm], windows.prompts)
                a, d = spec[(arm, seed)]
                line += f"; self-spec acceptance {a.sum() / d.sum():.3f}"
            print(line, flush=True)
    return write_report(cfg, run, corpus, models, runs, nll, spec, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
