"""Intervals of the comparisons the results READMEs make, recomputed from the committed result JSON (no model runs).

    python -m experiments.intervals [--only FOLDER ...]

Many results were written before every comparison carried its uncertainty. This script reads each folder's
committed JSON (recorded, with its sha256 and its own provenance, as an input of this run) and writes
``intervals.md`` / ``intervals.json`` beside it: each "A beats B" of the README with its difference and 95%
interval (``eejax.eval.bootstrap``), and its reading ("no difference at this scale" when the interval holds 0).

Which interval, by what the JSON kept:
* per-example outcomes (CoLa's per-sample chains): the paired bootstrap;
* per-example values summarised as a histogram (Kangaroo's top-1 probabilities of accepted and rejected drafts):
  the bootstrap of the two independent samples the histograms stand for (bin-centre values);
* only two accuracies / rates and the number of examples: the normal interval of two independent proportions. On
  one shared test set that interval is CONSERVATIVE (paired errors correlate positively): a difference outside it
  is real, one inside it may still be one a paired test would separate, which the tables say as "no difference at
  this scale". Example counts are the datasets' (Fashion-MNIST / MNIST test 10,000, SST-2 dev 872, ...), as each
  result's own Data line states;
* a few seeds (Make Deep Networks Shallow Again): the mean of the paired seed differences and a t interval.
The numbers in the tables are the JSONs' (nothing is typed in); the README quotes these tables.
"""
from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Callable

import numpy as np
import scipy.stats

from eejax.eval import bootstrap, report
from eejax.harness import results

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
FMNIST_TEST = MNIST_TEST = CIFAR10_TEST = 10_000
SST2_DEV = 872

Section = tuple[str, str, list[dict]]   # title, explanation, rows


def _row(claim: str, a: float, b: float, d: bootstrap.Difference, lower_is_better: bool = False, **extra) -> dict:
    """One comparison: A, B, A - B and its interval, and the reading (better / worse / no difference)."""
    if not d.separated:
        reading = "no difference at this scale"
    else:
        better = (d.diff < 0) if lower_is_better else (d.diff > 0)
        reading = "A better" if better else "B better"
    return {"comparison": claim, **extra, "A": a, "B": b, "A_minus_B": d.diff, "ci95_lo": d.lo, "ci95_hi": d.hi,
            "reading": reading}


def _props(a_pct: float, b_pct: float, n: int, n_b: int | None = None) -> bootstrap.Difference:
    """Two percentages over n (and n_b) examples: the difference in points and its conservative interval."""
    d = bootstrap.proportion_difference(a_pct / 100, b_pct / 100, n, n_b=n_b)
    return d._replace(diff=100 * d.diff, lo=100 * d.lo, hi=100 * d.hi)


def _count(rows: list[dict], what: str) -> str:
    n = len(rows)
    better = sum(r["reading"] == "A better" for r in rows)
    worse = sum(r["reading"] == "B better" for r in rows)
    return (f"{what}: A better at {better} of {n}, B better at {worse}, no difference at this scale at "
            f"{n - better - worse}.")


# --------------------------------------------------------------------------------------------------- folders


def window_cascade(data: dict) -> list[Section]:
    """Window vs plain threshold cascade at the window's own target metric, every (cascade, target, width); and
    the window cascade vs its largest member alone."""
    r = data["results"]
    singles = {s["model"]: s for s in r["singles"]}
    largest = {"S->M": singles["single M"], "S->M->L": singles["single L"]}
    # Cov@5: a coverage of the 10,000 test images; Risk@80: an error rate among the 8,000 most confident;
    # FPR@95: a fraction of the 10,000 MNIST (OOD) test images.
    n = {"cov@5": FMNIST_TEST, "risk@80": int(0.8 * FMNIST_TEST), "fpr@95": MNIST_TEST}
    lower = {"cov@5": False, "risk@80": True, "fpr@95": True}
    by = {(x["cascade"], x["target"], x["width"], x["kind"]): x for x in r["rows"]}
    vs_thr, vs_big = [], []
    for (cas, tgt, w, kind), win in by.items():
        if kind != "window":
            continue
        thr = by[(cas, tgt, w, "threshold")]
        m = tgt
        vs_thr.append(_row(f"{cas} {m} w={w:g}: window - threshold", win[m], thr[m],
                           _props(win[m], thr[m], n[m]), lower[m]))
        big = largest[cas]
        vs_big.append(_row(f"{cas} {m} w={w:g}: window - {big['model']}", win[m], big[m],
                           _props(win[m], big[m], n[m]), lower[m]))
    return [("Window vs plain threshold cascade, at the window's target metric (%)",
             _count(vs_thr, "Window (A) vs threshold (B)") + " Two-proportion intervals (conservative).", vs_thr),
            ("Window cascade vs its largest member alone, at the target metric (%)",
             _count(vs_big, "Window cascade (A) vs largest member (B)"), vs_big)]


def deer(data: dict) -> list[Section]:
    """DeeR's operating points counted once each (several budgets select the same prior), against the static
    depth at the same mean layers."""
    rows = data["results"]["rows"]
    distinct: dict[tuple, dict] = {}
    for x in rows:
        distinct.setdefault((x["peak_cap"], x["prior"]), x)
    out = []
    for (cap, prior), x in sorted(distinct.items()):
        out.append(_row(f"cap {cap}, prior {prior:g}: dynamic - static at {x['test_mean_layers']:.2f} layers",
                        x["test_acc"], x["static_acc_at_same_layers"],
                        _props(x["test_acc"], x["static_acc_at_same_layers"], FMNIST_TEST),
                        budgets=", ".join(f"{y['budget_layers']:g}" for y in rows
                                          if (y["peak_cap"], y["prior"]) == (cap, prior)),
                        avg_met=x["avg_met"]))
    above = sum(r["A"] > r["B"] for r in out)
    return [("Distinct operating points vs static depth at the same mean layers (test accuracy, %)",
             f"{len(rows)} (budget, cap) rows are {len(out)} distinct (cap, prior) points; the dynamic accuracy is "
             f"above the interpolated static depth at {above} of {len(out)}. " + _count(out, "Dynamic (A) vs static "
             "(B)") + " Two-proportion intervals over the 10,000 test images (conservative).", out)]


def mue(data: dict) -> list[Section]:
    out = [_row(f"{m['mean_layers']:g} mean layers: MuE - max-softmax", m["MuE_acc"], m["maxprob_acc"],
                _props(m["MuE_acc"], m["maxprob_acc"], FMNIST_TEST)) for m in data["results"]["matched"]]
    return [("MuE vs max-softmax exits at matched mean layers (test accuracy, %, interpolated)",
             _count(out, "MuE (A) vs max-softmax (B)") + " Two-proportion intervals (conservative).", out)]


def jei_dnn(data: dict) -> list[Section]:
    rows = data["results"]["rows"]
    by = {}
    for x in rows:
        by.setdefault(x["lambda"], {})[x["arm"]] = x
    out = []
    for lam, arms in by.items():
        jei = arms["JEI gates"]
        (other,) = [v for k, v in arms.items() if k != "JEI gates"]
        out.append(_row(f"lambda {lam:g}: JEI gates - {other['arm']}", jei["test_acc"], other["test_acc"],
                        _props(jei["test_acc"], other["test_acc"], FMNIST_TEST)))
    return [("JEI-DNN gates vs max-softmax thresholds on the same IMs at matched FLOPs (test accuracy, %)",
             _count(out, "JEI (A) vs max-softmax (B)") + " Two-proportion intervals (conservative).", out)]


def dynamic_perceiver(data: dict) -> list[Section]:
    n = 5_000    # the first 5,000 test images (the md's Data line)
    out = [_row(f"{m['MFLOPs']:.2f} MFLOPs: latent - feature exits", m["perceiver_acc"], m["feature_exits_acc"],
                _props(m["perceiver_acc"], m["feature_exits_acc"], n)) for m in data["results"]["matched"]]
    return [("Latent-branch vs feature-branch exits at matched FLOPs (budgeted test accuracy, %)",
             _count(out, "Latent (A) vs feature (B)") + " Two-proportion intervals over 5,000 test images "
             "(conservative).", out)]


def lgvit(data: dict) -> list[Section]:
    r = data["results"]
    n_test = {"fashion_mnist": FMNIST_TEST, "cifar10": CIFAR10_TEST}[data["config"]["data"]["name"]]
    out = []
    for a, b in (("vitee", "lgvit"), ("lgvit", "linear")):
        for e, layer in enumerate(r[a]["exit_layers"]):
            pa, pb = 100 * r[a]["acc_stage2"][e], 100 * r[b]["acc_stage2"][e]
            out.append(_row(f"exit after layer {layer + 1}: {a} - {b} heads", pa, pb, _props(pa, pb, n_test),
                            MFLOPs_A=r[a]["cum_flops"][e] / 1e6, MFLOPs_B=r[b]["cum_flops"][e] / 1e6))
    return [("Head types per exit after stage 2 (static test accuracy, %)",
             _count(out[:len(out) // 2], "ViT-EE (A) vs LGViT (B) heads") + " "
             + _count(out[len(out) // 2:], "LGViT (A) vs linear (B) heads") + " MFLOPs: cost to that exit with "
             "every head on the way (ViT-EE's heads are the most expensive). Two-proportion intervals over the "
             "10,000 test images (conservative).", out)]


def kangaroo(data: dict) -> list[Section]:
    centres = (np.arange(10) + 0.5) / 10
    conf, acc = [], []
    rows = {(x["drafter"], x["l"], x["eta"]): x for x in data["rows"] if x["l"] is not None}
    for key, (acc_h, rej_h) in data["conf_hist"].items():
        drafter, l_txt, _ = key.split()   # "<drafter> l=<l> eta=<eta>"
        l = int(l_txt[2:])
        a, r = bootstrap.expand_histogram(acc_h, centres), bootstrap.expand_histogram(rej_h, centres)
        d = bootstrap.bootstrap_difference(a, r)
        conf.append(_row(f"{key}: accepted - first rejected", float(a.mean()), float(r.mean()), d,
                         accepted=len(a), rejected=len(r)))
    for l in sorted({k[1] for k in rows}):
        ad = next(x for k, x in rows.items() if k[0] == "adapter" and k[1] == l and x["eta_from"] == "fit on val")
        sh = next(x for k, x in rows.items() if k[0] == "shared-head" and k[1] == l)
        na, ns = (sum(map(sum, data["conf_hist"][f"{x['drafter']} l={l} eta={x['eta']:g}"])) for x in (ad, sh))
        acc.append(_row(f"l={l}: adapter (eta {ad['eta']:g}) - shared-head (eta {sh['eta']:g}) acceptance",
                        100 * ad["acceptance"], 100 * sh["acceptance"],
                        _props(100 * ad["acceptance"], 100 * sh["acceptance"], na, ns), drafts_A=na, drafts_B=ns))
    return [("Top-1 probability of accepted vs first-rejected drafts (test prompts)",
             "Bootstrap of the two independent samples the 10-bin histograms of `kangaroo.json` stand for "
             "(bin-centre values, as the table's top1 columns). " + _count(conf, "Accepted (A) vs rejected (B)"),
             conf),
            ("Acceptance rate: adapter vs shared-head drafter at equal depth (%, drafts = accepted + first "
             "rejected)", "Rates as the table's acceptance column; the number of drafts from the histograms. "
             + _count(acc, "Adapter (A) vs shared-head (B)") + " Two-proportion intervals.", acc)]


def cola(data: dict) -> list[Section]:
    ps = data["per_sample"]
    right = [s for s in ps if s["full_correct"]]
    wrong = [s for s in ps if not s["full_correct"]]

    def shorter(s, arm):
        return float(s[arm]["shortest_correct_len"] is not None and s[arm]["shortest_correct_len"] < 30)

    def flipped(s, arm):
        return float(s[arm]["any_correct"])

    out = []
    for what, group, f in (("right samples with a shorter correct chain", right, shorter),
                           ("wrong samples flipped to right", wrong, flipped),
                           ("samples with some correct chain (oracle accuracy)", ps,
                            lambda s, arm: float(s[arm]["any_correct"] or s["full_correct"]))):
        a = [100 * f(s, "mcts") for s in group]
        b = [100 * f(s, "random") for s in group]
        out.append(_row(f"{what} ({len(group)} samples): MCTS - random", float(np.mean(a)), float(np.mean(b)),
                        bootstrap.paired_bootstrap(a, b)))
    return [("MCTS vs the matched-budget random chains (%, paired over samples)",
             _count(out, "MCTS (A) vs random (B)") + " Paired bootstrap over the samples (per_sample in "
             "`cola.json`).", out)]


def _policy(pols, name, setting):
    return next(p for p in pols if p["policy"] == name and p["setting"] == setting)


def encoder_sst2(data: dict) -> list[Section]:
    pols = data["results"]["multi_exit"]["policies"]
    last = 100 * data["results"]["multi_exit"]["acc_per_exit"][-1]
    out = []
    for s in ("S=0.5", "S=0.6"):
        p = _policy(pols, "deebert", s)
        out.append(_row(f"DeeBERT {s} ({p['mean_layers']:.2f} layers) - last exit", p["acc"], last,
                        _props(p["acc"], last, SST2_DEV)))
    for pa, pb in ((("pabee", "t=2"), ("deebert", "S=0.4")), (("pabee", "t=5"), ("deebert", "S=0.01"))):
        a, b = _policy(pols, *pa), _policy(pols, *pb)
        out.append(_row(f"PABEE {pa[1]} ({a['mean_layers']:.2f} layers) - DeeBERT {pb[1]} "
                        f"({b['mean_layers']:.2f} layers)", a["acc"], b["acc"], _props(a["acc"], b["acc"], SST2_DEV)))
    return [("Dev accuracy comparisons of the reading (%, 872 dev sentences)",
             _count(out, "A vs B") + " Two-proportion intervals (conservative).", out)]


def encoder_palbert(data: dict) -> list[Section]:
    out = [_row(f"{m['setting']} ({m['mean_layers']:.2f} layers): Q-exit - PABEE (interpolated)", m["palbert_q_acc"],
                m["pabee_acc_interp"], _props(m["palbert_q_acc"], m["pabee_acc_interp"], SST2_DEV))
           for m in data["matched"]]
    return [("PALBERT's Q-exit vs PABEE at matched mean layers (dev accuracy, %)",
             _count(out, "Q-exit (A) vs PABEE (B)") + " Two-proportion intervals (conservative).", out)]


def encoder_retrieval(data: dict) -> list[Section]:
    r = data["results"]
    n = 735   # queries (the md's Data line)
    out = []
    for e in range(len(r["multi_exit"]["per_exit"])):
        for k in ("R@1", "R@10"):
            a, b = r["multi_exit"]["per_exit"][e][k], r["final_only"]["per_exit"][e][k]
            out.append(_row(f"exit {e + 1} {k}: multi-exit - final-only", a, b, _props(a, b, n)))
    return [("Multi-exit vs final-only training, recall per exit (%, 735 queries)",
             _count(out, "Multi-exit (A) vs final-only (B)") + " Two-proportion intervals (conservative).", out)]


def eeea_net(data: dict) -> list[Section]:
    s = {x["arm"]: x for x in data["summary"]}
    n = data["config"]["data"]["val_size"]
    out = []
    for k in ("best_val_acc_<20k", "best_val_acc_<30k", "best_val_acc_<50k", "best_val_acc"):
        a, b = s["ee"][k], s["normal"][k]
        out.append(_row(f"{k}: EE-PI - no filter", a, b, _props(a, b, n)))
    return [("EE-PI vs no filter, best validation accuracy (%, 2,000 validation images)",
             _count(out, "EE-PI (A) vs no filter (B)") + " Two-proportion intervals (conservative).", out)]


def shallow_again(data: dict) -> list[Section]:
    out = []
    for variant in sorted({p["variant"] for p in data["paired_differences"]}):
        for key, lower in (("d_val_loss", True), ("d_train_loss", True), ("d_test_acc", False)):
            x = np.array([p[key] for p in data["paired_differences"] if p["variant"] == variant], np.float64)
            half = float(scipy.stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
            d = bootstrap.Difference(float(x.mean()), float(x.mean()) - half, float(x.mean()) + half, 0.95,
                                     x.size, f"t interval over {x.size} seeds")
            out.append(_row(f"{variant} - sequential, {key[2:]} (mean of {x.size} seeds)", float("nan"),
                            float("nan"), d, lower, seeds_min=float(x.min()), seeds_max=float(x.max())))
    for r in out:
        del r["A"], r["B"]
    return [("Parallel layouts minus the sequential stack, paired by seed",
             _count(out, "Parallel (A) vs sequential (B)") + " Mean of the per-seed differences (same init, same "
             "batches) and its t interval (2 degrees of freedom: wide).", out)]


def specee(data: dict) -> list[Section]:
    off = data["offline"]
    n = int(sum(off["all"]["exit_hist"]))   # validation-book tokens
    a, b = 100 * off["static"]["agreement"], 100 * off["all"]["agreement"]
    out = [_row("offline agreement: static 6-layer schedule - all 29", a, b, _props(a, b, n), tokens=n)]
    return [("SpecEE schedules, offline token agreement with the full model (%, validation book)",
             _count(out, "static (A) vs all (B)") + " Two-proportion interval (conservative).", out)]


def depth_efficiency(data: dict) -> list[Section]:
    c = {x["layer"]: x for x in data["contributions"]}
    first = [c[l]["layer_rel"] for l in range(2, 16)]
    second = [c[l]["layer_rel"] for l in range(16, 31)]
    d = bootstrap.bootstrap_difference(first, second)
    out = [_row("||a+m||/||h|| of layers 2-15 - layers 16-30 (mean over layers)", float(np.mean(first)),
                float(np.mean(second)), d)]
    return [("First-half vs second-half contribution (layer 1 left out), over layers",
             "Bootstrap over the layers of each half (`contributions` in `depth_efficiency.json`). "
             + _count(out, "First half (A) vs second half (B)"), out)]


FOLDERS: dict[str, tuple[str, Callable[[dict], list[Section]]]] = {
    "window_cascade-fashion_mnist": ("window_cascade.json", window_cascade),
    "deer-fashion_mnist": ("deer.json", deer),
    "mue-fashion_mnist": ("mue.json", mue),
    "jei_dnn-fashion_mnist": ("jei_dnn.json", jei_dnn),
    "dynamic_perceiver-fashion_mnist": ("dynamic_perceiver.json", dynamic_perceiver),
    "lgvit-fashion_mnist": ("lgvit.json", lgvit),
    "lgvit-cifar10": ("lgvit.json", lgvit),
    "kangaroo-smollm2": ("kangaroo.json", kangaroo),
    "cola-smollm2": ("cola.json", cola),
    "encoder-sst2": ("encoder_exits.json", encoder_sst2),
    "encoder-sst2-palbert": ("encoder_exits.json", encoder_palbert),
    "encoder-retrieval": ("encoder_retrieval.json", encoder_retrieval),
    "eeea_net-fashion_mnist": ("eeea_net.json", eeea_net),
    "shallow_again-fashion_mnist": ("shallow_again.json", shallow_again),
    "shallow_again-mnist": ("shallow_again.json", shallow_again),
    "specee-smollm2": ("specee.json", specee),
    "depth_efficiency-smollm2": ("depth_efficiency.json", depth_efficiency),
}


def write(folder: str, base: results.Provenance) -> pathlib.Path:
    """``base``: the run's provenance, taken once at the start (the files this run writes would make a later
    ``git status`` dirty); each folder's record gets its own inputs list."""
    name, fn = FOLDERS[folder]
    path = RESULTS / folder / name
    prov = base._replace(inputs=[])
    data = results.read_result_input(prov, path, "the committed result this table recomputes from", root=ROOT)
    sections = fn(data)
    md = "\n\n".join(
        [f"# Intervals of the comparisons in `{folder}/README.md`", prov.markdown(),
         "Recomputed from the committed `" + name + "` by `experiments/intervals.py` (no model run); A - B with its "
         "95% interval; reading: \"A better\" / \"B better\" only when the interval excludes 0, else \"no "
         "difference at this scale\"."]
        + [f"## {title}\n{text}\n\n" + report.markdown_table(rows, list(rows[0]), ".3f")
           for title, text, rows in sections])
    results.write_results(RESULTS / folder, "intervals", md, {
        "provenance": prov._asdict(), "source": name,
        "sections": [{"title": t, "text": x, "rows": r} for t, x, r in sections]}, overwrite=True)
    return RESULTS / folder / "intervals.md"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, choices=sorted(FOLDERS), metavar="FOLDER")
    args = p.parse_args(argv)
    base = results.provenance("experiments.intervals", argv)
    for folder in args.only or sorted(FOLDERS):
        print(f"wrote {write(folder, base)}")


if __name__ == "__main__":
    main()
