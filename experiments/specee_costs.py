"""Predicted H200 speed-ups of a committed SpecEE results folder, from its JSON (no model runs).

    python -m experiments.specee_costs experiments/results/specee-smollm2

The SpecEE run of 2026-11-29 (commit 2dd1e60) wrote as ``cost_speedup`` a parameter-read ratio (greedy's
parameters read per token over SpecEE's) and counted no host stop. The experiment now writes the calibrated H200
roofline instead (``eejax.decoding.specee.predicted_speedup``: the drafter, every target layer, predictor and full
head, and the host stops). This writes ``predicted_h200.md`` / ``.json`` beside the run's files (which are not
changed): for every decoding row, from the counts the run recorded (mean layers, predictor evaluations per token, the
offline full-head passes, the exit histogram), that prediction under the full-head mode the run used (``"cond"``:
a full head where a predictor passed and at the last layer, two host stops per decision point) and under
``"always"`` (a full head at every scheduled layer reached and at the last layer, one stop), with the spec-sheet
floor of each (no launch or stop cost). Batch 1 and a 256-slot cache, as the experiment; SmolLM2-135M's shape
(``costs.SMOLLM2_135M``). Predictions, not measurements.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from eejax.decoding import specee
from eejax.eval import report
from eejax.exits import costs
from eejax.harness import results

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLS = ("method", "schedule", "mean_layers", "preds_per_token", "head_check", "full_heads", "host_stops_per_token",
        "predicted_h200", "floor_h200_spec", "as_run_param_ratio")


def predict(data: dict) -> list[dict]:
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


def write(folder: pathlib.Path, prov: results.Provenance) -> pathlib.Path:
    path = folder / "specee.json"
    data = json.loads(path.read_text())
    src = data.get("provenance", {})
    art = results.record_input(prov, path, "the committed SpecEE result these predictions are computed from",
                               producer={k: src.get(k, results.NOT_RECORDED) for k in ("commit", "command", "date")})
    try:
        prov.inputs[-1] = art._replace(path=path.resolve().relative_to(ROOT).as_posix())
    except ValueError:   # a folder outside the repository keeps its own path
        pass
    rows = predict(data)
    md = "\n\n".join([
        "# SpecEE: predicted H200 speed-ups from the committed counts", prov.markdown(),
        "Computed by `experiments/specee_costs.py` from `specee.json` (no model run): "
        "`eejax.decoding.specee.predicted_speedup` (cost model: roofline, H200 calibrated 2026-12-04, batch 1, "
        "256-slot cache), counting the drafter (its layers, adapter and head), every target layer, predictor and "
        "full head, and the host stops; `floor_h200_spec` is the same counts on the spec-sheet floor (no launch or "
        "stop cost). `as_run_param_ratio` is the run's own `cost_speedup` (parameters read, no stops). "
        "Predictions, not measurements.",
        report.markdown_table(rows, list(COLS), ".3f")])
    results.write_results(folder, "predicted_h200", md, {"provenance": prov._asdict(), "source": "specee.json",
                                                         "rows": rows}, overwrite=True)
    return folder / "predicted_h200.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=pathlib.Path, help="a SpecEE results folder holding specee.json")
    args = p.parse_args(argv)
    if not (args.folder / "specee.json").is_file():
        p.error(f"{args.folder}: no specee.json there (pass a folder written by experiments/specee.py)")
    try:
        print(f"wrote {write(args.folder, results.provenance('experiments.specee_costs', argv))}")
    except (KeyError, ValueError, ZeroDivisionError) as err:
        p.error(f"{args.folder / 'specee.json'}: not a SpecEE result this tool can read ({type(err).__name__}: {err})")
    return 0


if __name__ == "__main__":
    main()
