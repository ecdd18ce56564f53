"""CoLa (Skip a Layer or Loop it?, arXiv:2507.07996) on SmolLM2: per-sample MCTS over chains of stored layers on
next-token prediction, a matched-budget random-chain control, and a held-out evaluation of one chain chosen on the
search samples.

    python -m experiments.cola --config configs/cola.py:smoke [--outdir DIR]

Every chain runs as an ``engine.sequence`` program on ``engine.run`` (teacher-forced, ``lm.sequence_layer_fn``),
padded to a fixed-size traced table so every chain shares one compiled function. The per-sample search scores a
chain on the very sample it is judged on: it is an ORACLE upper bound, not an accuracy. See configs/cola.py.

Shapes: B samples, T prompt tokens, V vocabulary, N stored layers, S chain steps.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.errors import ConfigError
from eejax.eval import report as report_lib
from eejax.exits import chain_search, engine
from eejax.models import lm as lm_lib
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "cola"
PAPER = "Skip a Layer or Loop it? Test-Time Depth Adaptation of Pretrained LLMs (CoLa; arXiv:2507.07996)"
ARMS = ("mcts", "random")


def chain_fn(graphdef):
    """``f(params, tokens_BxT, label_B, program) -> (top1_B, p_label_B)`` at the last position, the chain given
    as a padded traced program (one compile for all chains)."""

    def f(params, tokens_BxT, label_B, layer_S, repeat_S, exit_E):
        model = nnx.merge(graphdef, params)
        pos_BxT, mask_BxTxT = common.causal_inputs(tokens_BxT)
        head = lambda h: model.shared_head(model.final_norm(h[:, -1])).astype(jnp.float32)   # noqa: E731
        out = engine.run(model.layers, [head], model.embed_tokens(tokens_BxT),
                         engine.Program(layer_S, repeat_S, exit_E), None,
                         layer_fn=lm_lib.sequence_layer_fn(pos_BxT, mask_BxTxT))
        probs = jax.nn.softmax(out.out, -1)
        return jnp.argmax(out.out, -1), jnp.take_along_axis(probs, label_B[:, None], -1)[:, 0]

    return jax.jit(f)


class Evaluator:
    """Runs chains (as padded ``engine.sequence`` programs) on a batch of samples; counts calls and seconds."""

    def __init__(self, lmod, max_len: int):
        self.f, self.params, self.max_len = chain_fn(lmod.graphdef), lmod.params, max_len
        self.calls, self.seconds = 0, 0.0

    def __call__(self, chain, tokens_BxT, label_B):
        prog = common.padded_program(engine.sequence(chain), self.max_len)
        start = time.perf_counter()
        top, p = jax.device_get(self.f(self.params, jnp.asarray(tokens_BxT), jnp.asarray(label_B), *prog[:3]))
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return np.asarray(top) == np.asarray(label_B), np.asarray(p)


def samples(ids, context: int, stride: int, count: int):
    """``count`` prompts of ``context`` tokens starting every ``stride`` tokens, and their next tokens."""
    starts = np.arange(count) * stride
    return np.stack([ids[s:s + context] for s in starts]), np.asarray([ids[s + context] for s in starts])


def search_sample(ev: Evaluator, tokens_T, label, n: int, sc, seed: int) -> dict:
    info = {}

    def reward(chain):
        ok, p = ev(chain, tokens_T[None], np.asarray([label]))
        info[chain] = (bool(ok[0]), float(p[0]))
        return ok[0] * (1 + sc.length_weight * (n - len(chain)) / n) + sc.prob_weight * p[0]

    kw = dict(max_edits=sc.max_edits, widths=tuple(sc.widths), max_len=sc.max_len, seed=seed)
    out = {}
    for arm in ARMS:
        info.clear()
        res = (chain_search.mcts(reward, n, sc.budget, exploration=sc.exploration, widening=sc.widening, **kw)
               if arm == "mcts" else chain_search.random_chains(reward, n, sc.budget, **kw))
        correct = [c for c, (ok, _) in info.items() if ok]
        out[arm] = {"best": list(res.best), "best_len": len(res.best), "best_correct": info[res.best][0],
                    "evaluations": len(res.evaluated), "any_correct": bool(correct),
                    "shortest_correct_len": min(map(len, correct)) if correct else None,
                    "any_correct_changed": any(c != tuple(range(n)) for c in correct)}
    out["full_correct"], out["full_p_label"] = info[tuple(range(n))]
    return out


def _frac(xs):
    return float(np.mean(xs)) if len(xs) else None


def aggregate(per_sample, n: int) -> list[dict]:
    right = [s for s in per_sample if s["full_correct"]]
    wrong = [s for s in per_sample if not s["full_correct"]]
    rows = []
    for arm in ARMS:
        lens = [s[arm]["shortest_correct_len"] for s in right]
        rows.append({"arm": arm, "samples": len(per_sample), "full_correct": len(right),
                     "right_shorter_found": _frac([x < n for x in lens]),
                     "right_mean_shortest_len": float(np.mean(lens)) if lens else None,
                     "wrong": len(wrong), "wrong_flipped_to_right": _frac([s[arm]["any_correct"] for s in wrong]),
                     "oracle_acc": _frac([s[arm]["any_correct"] for s in per_sample]),
                     "best_mean_len": float(np.mean([s[arm]["best_len"] for s in per_sample]))})
    return rows


def plot(path, per_sample, n: int):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.arange(0.5, max(n + 2, max(s[a]["best_len"] for s in per_sample for a in ARMS) + 1.5))
    for arm, color in zip(ARMS, ("C0", "C1")):
        lens = [s[arm]["shortest_correct_len"] for s in per_sample if s["full_correct"]]
        ax.hist(lens, bins=bins, alpha=0.6, color=color, label=f"{arm}: shortest correct chain")
    ax.axvline(n, color="k", lw=1, ls="--", label=f"original ({n} layers)")
    ax.set_xlabel("chain length (layers run)")
    ax.set_ylabel("samples the model gets right")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


@experiment(NAME)
def main(run: Run) -> Report:
    cfg, args = run.cfg, run.args
    lmod = common.model_of(run)
    n, d, sc = lmod.cfg.depth, cfg.data, cfg.search
    if sc.max_len < n:
        raise ConfigError(f"search.max_len={sc.max_len} is shorter than the model's {n} layers")
    total = d.search_samples + d.heldout_samples
    ids = common.wikitext_head(args.data_dir, lmod.tokenizer, total * d.stride + d.context + 1, d.split)
    tok_all, lab_all = samples(ids, d.context, d.stride, total)
    is_search = np.arange(total) % 2 == 0       # interleaved: search and held-out prompts from the same text
    is_search[2 * min(d.search_samples, d.heldout_samples):] = d.search_samples > d.heldout_samples
    tok_s, lab_s, tok_h, lab_h = tok_all[is_search], lab_all[is_search], tok_all[~is_search], lab_all[~is_search]
    print(f"model: {lmod.description}; {len(lab_s)} search + {len(lab_h)} held-out prompts of {d.context} tokens",
          flush=True)

    ev = Evaluator(lmod, sc.max_len)
    start = time.perf_counter()
    per_sample = []
    for i in range(len(lab_s)):
        r = search_sample(ev, tok_s[i], int(lab_s[i]), n, sc, cfg.seed + i)
        per_sample.append({"sample": i, "label": int(lab_s[i])} | r)
        print(f"sample {i}: full {'right' if r['full_correct'] else 'wrong'}; mcts best {r['mcts']['best_len']} "
              f"layers ({'right' if r['mcts']['best_correct'] else 'wrong'}), random best {r['random']['best_len']} "
              f"({'right' if r['random']['best_correct'] else 'wrong'}) [{time.perf_counter() - start:.0f} s]",
              flush=True)
    search_s = time.perf_counter() - start
    rows = aggregate(per_sample, n)
    print(rows, flush=True)

    held_rows, heldout_s = heldout(cfg, ev, per_sample, n, tok_s, lab_s, tok_h, lab_h)
    return report(run, lmod, ev, per_sample, rows, held_rows, search_s, heldout_s, len(lab_s), len(lab_h))


def heldout(cfg, ev, per_sample, n, tok_s, lab_s, tok_h, lab_h):
    """Held-out: one chain chosen on the search samples' labels only, applied to prompts it never saw."""
    start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    original = tuple(range(n))
    full_s = ev(original, tok_s, lab_s)[0]
    full_h = ev(original, tok_h, lab_h)[0]
    held_rows = [{"arm": "original model", "chain_len": n, "search_acc": float(full_s.mean()),
                  "heldout_acc": float(full_h.mean()), "candidates": None, "chain": None}]
    for arm in ARMS:
        cands = sorted({tuple(s[arm]["best"]) for s in per_sample if s[arm]["best_correct"]} - {original})
        if len(cands) > cfg.heldout.max_candidates:
            cands = [cands[j] for j in sorted(rng.choice(len(cands), cfg.heldout.max_candidates, replace=False))]
        if not cands:
            held_rows.append({"arm": f"{arm}: no candidate chain", "chain_len": None, "search_acc": None,
                              "heldout_acc": None, "candidates": 0, "chain": None})
            continue
        accs = [float(ev(c, tok_s, lab_s)[0].mean()) for c in cands]
        pick = max(range(len(cands)), key=lambda j: (accs[j], -len(cands[j])))
        held_rows.append({"arm": f"{arm}: best search-set chain", "chain_len": len(cands[pick]),
                          "search_acc": accs[pick], "heldout_acc": float(ev(cands[pick], tok_h, lab_h)[0].mean()),
                          "candidates": len(cands), "chain": " ".join(map(str, cands[pick]))})
    heldout_s = time.perf_counter() - start
    print(held_rows, flush=True)

    return held_rows, heldout_s


def report(run, lmod, ev, per_sample, rows, held_rows, search_s, heldout_s, n_search, n_heldout) -> Report:
    cfg, n, d, sc = run.cfg, lmod.cfg.depth, run.cfg.data, run.cfg.search
    paper = ("Paper [abs] (math and commonsense benchmarks): for >75% of the samples the LLM gets right, MCTS finds a "
             "shorter chain; for >60% of those it gets wrong, a chain that is right.")
    md = "\n\n".join([
        f"# {PAPER} on {cfg.model.name}",
        run.prov.markdown() + f"  \nModel: {lmod.description}.  \nTask: next-token prediction on wikitext2/{d.split} "
        f"prompts of {d.context} tokens (one every {d.stride} tokens; even ones for search, odd ones held out): "
        f"{n_search} search and {n_heldout} held-out samples. Search: {sc.budget} distinct chain evaluations per "
        f"sample and arm, at most {sc.max_edits} edits (skip / repeat a block of {tuple(sc.widths)} layers, swap "
        f"neighbours), chains of at most {sc.max_len} steps; reward correct x (1 + {sc.length_weight} (N - len) / N) "
        f"+ {sc.prob_weight} p(label). Wall-clock: search {search_s:.0f} s ({ev.calls} chain evaluations, "
        f"{ev.seconds / max(ev.calls, 1):.2f} s each on average incl. the held-out batches), held-out "
        f"{heldout_s:.0f} s.",
        "**This per-sample search is an ORACLE**: every chain is scored on the label of the very sample it is "
        "reported for. Its numbers are upper bounds on what a label-free chain selector could reach, not accuracies "
        "of a method. The random-chain control has the same budget of distinct evaluations and the same reward.",
        paper,
        "## Per-sample search (oracle)\n"
        "right_shorter_found: among the samples the original model gets right, the fraction for which a correct "
        "chain shorter than the original was found; right_mean_shortest_len: its mean length (the original's "
        f"{n} when none); wrong_flipped_to_right: among the samples the model gets wrong, the fraction with a "
        "correct chain; oracle_acc: the fraction of all samples with some correct chain.",
        report_lib.markdown_table(rows, list(rows[0].keys()), ".3f"),
        "![chain lengths](chain_lengths.png)",
        "## Held-out (the chain chosen without the held-out labels)\n"
        "Candidates: the best (correct) chains of the search samples, other than the original; the one with the best "
        "accuracy over all search samples (then the shorter) is applied to the held-out prompts.",
        report_lib.markdown_table(held_rows, ["arm", "chain_len", "search_acc", "heldout_acc", "candidates", "chain"],
                              ".3f"),
    ])
    return Report(md, {
        "model": lmod.description, "rows": rows, "heldout": held_rows, "per_sample": per_sample,
        "timing_s": {"search": search_s, "heldout": heldout_s, "evaluations": ev.calls}},
        {"chain_lengths.png": lambda path: plot(path, per_sample, n)})


if __name__ == "__main__":
    main()
