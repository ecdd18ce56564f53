"""Recompute the cost-model columns of a committed self-speculative results folder from its JSON (no model runs).

    python -m experiments.self_speculative_costs experiments/results/self_speculative-smollm2

The run of 2026-11-28 charged each draft k E/L of a decode step and left out the vocabulary head that every draft
evaluates (SmolLM2's tied 49,152 x 576 head, ~21 % of the weights; issue 22). This rewrites every sweep and
measured row's cost columns with ``experiments._common_smollm2.cost_speedups`` (``eejax.exits.costs``: every head,
DEL's shadow heads too) from the counts the run recorded (tokens per verify, mean k, mean draft layers, the measured
verify seconds), keeps the run's own values under ``*_as_run`` keys, records the recomputation (commit, date,
command) under ``cost_recomputed``, and rewrites the markdown's decoding and sweep tables (marked as recomputed) and
the sweep plot. Running it again recomputes from the same as-run inputs (idempotent). Acceptance, tokens per verify
and measured times are the run's, untouched.
"""
from __future__ import annotations

import datetime
import json
import pathlib
import re
import shlex
import subprocess
import sys

from eejax.eval import report
from eejax.exits import costs
from experiments import _common_smollm2 as ss

SMOLLM2_135M = costs.SMOLLM2_135M
AS_RUN = ("speedup_cost_cpu", "speedup_cost_gpu")
MEASURED_COLS = ("drafter", "exits", "mean_draft_layers", "mean_k", "acceptance", "tokens_per_verify", "seconds",
                 "tokens_per_s", "speedup_measured", "speedup_cost_cpu", "speedup_cost_h200",
                 "speedup_cost_h200_floor", "speedup_cost_cpu_as_run", "speedup_cost_gpu_as_run", "equals_greedy")
SWEEP_COLS = ("prompts", "exits", "E", "k", "acceptance", "tokens_per_verify", "speedup_cost_cpu",
              "speedup_cost_h200", "speedup_cost_h200_floor", "speedup_cost_cpu_as_run", "speedup_cost_gpu_as_run")


def _commit() -> str:
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _keep_as_run(row: dict) -> None:
    for key in AS_RUN:
        if key in row and f"{key}_as_run" not in row:
            row[f"{key}_as_run"] = row.pop(key)
    row.pop("speedup_cost_gpu", None)


def recompute(results: dict) -> dict:
    """The results with every cost column recomputed (in place), the fit re-chosen under the new models."""
    if results.get("model_depth") != SMOLLM2_135M.depth:
        raise ValueError(f"model_depth={results.get('model_depth')}: this recomputation knows SmolLM2-135M (30 "
                         "layers) only")
    dc = results["config"]["decode"]
    cache_len = dc["prompt_tokens"] + dc["new_tokens"]
    verify = {int(b): {int(t): s for t, s in v.items()} for b, v in results["verify_seconds"].items()}
    b_main = max(dc["batches"])
    for r in results["sweep"]:
        _keep_as_run(r)
        r.update(ss.cost_speedups(r["tokens_per_verify"], r["k"], r["E"], SMOLLM2_135M, verify[b_main],
                                  verify[b_main][1], batch=b_main, cache_len=cache_len))
    for b, block in results["measured"].items():
        for r in block["rows"]:
            if "mean_k" not in r:        # the greedy row
                continue
            _keep_as_run(r)
            shadow = len(dc["del_candidates"]) if r["drafter"].startswith("DEL") else 0
            r.update(ss.cost_speedups(r["tokens_per_verify"], r["mean_k"], r["mean_draft_layers"], SMOLLM2_135M,
                                      verify[int(b)], verify[int(b)][1], batch=int(b), cache_len=cache_len,
                                      shadow_heads=shadow))
    fit = [r for r in results["sweep"] if r["prompts"] == "fit" and r["exits"] in ("norm", "lowrank")]
    pick = lambda key: (lambda r: [r["exits"], r["E"], r["k"]])(max(fit, key=lambda r: r[key]))  # noqa: E731
    results["fit"]["recomputed"] = {"best_cpu_cost": pick("speedup_cost_cpu"),
                                    "best_h200_cost": pick("speedup_cost_h200"),
                                    "best_h200_floor": pick("speedup_cost_h200_floor")}
    results["cost_recomputed"] = {
        "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m experiments.self_speculative_costs " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "note": "cost columns recomputed after the run from this JSON with every vocabulary head counted "
                "(eejax.exits.costs); *_as_run = the run's own columns (draft = k E/L of a step, head left out)"}
    return results


def _table_after(md: str, heading: str, table: str, mark: str) -> str:
    """``md`` with the first table after the paragraph starting with ``heading`` replaced by ``mark`` and ``table``
    (an earlier mark between them is replaced too)."""
    paras = md.split("\n\n")
    head = next((i for i, p in enumerate(paras) if p.startswith(heading)), None)
    tab = next((j for j in range(head + 1, len(paras)) if paras[j].startswith("|")), None) if head is not None \
        else None
    if tab is None or any(p.strip() and not p.startswith("*Cost-model columns") for p in paras[head + 1:tab]):
        raise ValueError(f"no table right after {heading!r} in the markdown")
    paras[head + 1:tab + 1] = [mark, table.rstrip("\n")]
    return "\n\n".join(paras)


def rewrite_markdown(md: str, results: dict) -> str:
    rc = results["cost_recomputed"]
    mark = (f"*Cost-model columns recomputed after the run from `self_speculative.json` with every vocabulary head "
            f"counted (`{rc['command']}`, commit {rc['commit']}, {rc['date']}); `*_as_run` are the run's own columns "
            "(a draft charged k E/L of a step, head left out). " + ss.COST_COLUMNS + "*")
    for b, block in results["measured"].items():
        rows = [{k: r.get(k, "") for k in MEASURED_COLS} for r in block["rows"]]
        md = _table_after(md, f"## Held-out decoding, batch {b} ", report.markdown_table(rows, list(MEASURED_COLS),
                                                                                        ".3f"), mark)
    arm, e_b, k_b = results["fit"]["best_cpu_cost"]
    sel = [{k: r[k] for k in SWEEP_COLS} for r in results["sweep"] if r["prompts"] == "test"
           and (r["k"] == k_b or r["E"] == e_b)]
    md = _table_after(md, "## Replay sweep on the held-out prompts", report.markdown_table(sel, list(SWEEP_COLS),
                                                                                          ".3f"), mark)
    new = results["fit"]["recomputed"]
    line = (" *Recomputed after the run with every head counted: best by the CPU cost model "
            f"{tuple(new['best_cpu_cost'])}, "
            f"by the cost model (roofline, H200) {tuple(new['best_h200_cost'])}, by the roofline floor "
            f"{tuple(new['best_h200_floor'])}; the measured rows below use the fit as run.*")
    fit_line = re.compile(r"^(Best static by the CPU cost model:[^\n]*?)(?: \*Recomputed after the run[^\n]*)?$", re.M)
    return fit_line.sub(lambda m: m.group(1) + line, md, count=1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not pathlib.Path(argv[0], "self_speculative.json").is_file():
        print("error: pass one results folder holding self_speculative.json; hint: python -m "
              "experiments.self_speculative_costs experiments/results/self_speculative-smollm2", file=sys.stderr)
        return 2
    folder = pathlib.Path(argv[0])
    results = recompute(json.loads((folder / "self_speculative.json").read_text()))
    md = rewrite_markdown((folder / "self_speculative.md").read_text(), results)
    layers, ks = results["exit_layers"], results["config"]["decode"]["ks"]
    sweep = {arm: {(r["E"], r["k"]): r for r in results["sweep"] if r["prompts"] == "test" and r["exits"] == arm}
             for arm in ss.ARMS}
    ss.plot_sweep(sweep, layers, ks, folder / "both_sweep.png",
                  "held-out prompts (exact replay); cost models recomputed with every head counted")
    (folder / "self_speculative.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "self_speculative.md").write_text(md)
    print(f"rewrote {folder}/self_speculative.{{json,md}} and both_sweep.png; fit recomputed: "
          f"{results['fit']['recomputed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
