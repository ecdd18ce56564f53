"""Adds the provenance fields that result JSONs written before issue 22 lack, where they are knowable, marked as added.

    python -m experiments.backfill_provenance [--check]

Runs since issue 22 record ``dirty``, ``versions`` and ``inputs`` themselves (``eejax.harness.results``). For the
JSONs written before, this script adds only what is known without rerunning: the dirty flag from the run's own
commit string (``+dirty``), the jax version the run recorded, and the inputs the folder README says the run read
from another run (with sha256 ``"not recorded"``: nobody hashed them then). Each added field is named in
``added_after_run`` and nothing the run wrote is changed. ``--check`` only lists what would change.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from eejax.harness import results

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
NR = results.NOT_RECORDED
NOTE = ("added after the run (issue 22): dirty from the run's own commit string, versions = the jax version the run "
        "recorded (other packages not recorded), inputs from the folder README (sha256 not recorded at the time)")


def _input(path: str, role: str, commit: str = NR, step: int | None = None, command: str = NR,
           date: str = NR) -> dict:
    return {"path": path, "role": role, "sha256": NR, "producer_commit": commit, "producer_step": step,
            "producer_command": command, "producer_date": date}


CBNET_FIRST = _input("runs/cbnet-<dataset> (the first run's checkpoints: BranchyNet CNN, small classifier, "
                     "autoencoder)", "models resumed from the first run", commit="346e6f2", step=400)
# Inputs the READMEs say each run read from another run (relative to experiments/results/).
INPUTS: dict[str, list[dict]] = {
    "deer-fashion_mnist/deer.json": [_input(
        "/tmp/wt15/shared-head-vit-fmnist (model_workdir)", "backbone checkpoint trained by MuE's run",
        commit="c0779d9", step=1200, date="2026-11-28 08:47 UTC",
        command="python -m experiments.mue --config configs/mue.py:fashion_mnist --data_dir /work/shared/data "
                "--workdir /tmp/wt15/mue-fmnist --config.model_workdir=/tmp/wt15/shared-head-vit-fmnist "
                "--outdir experiments/results/mue-fashion_mnist")],
    "specee-smollm2/specee.json": [_input(
        "runs/kangaroo-smollm2/adapter_l2.npz",
        "drafter (Kangaroo adapter); which Kangaroo run wrote it is not known")],
    "window_cascade-fashion_mnist/window_cascade.json": [_input(
        "members S and M (checkpoints copied from a first workdir)", "members trained by an earlier training-only "
        "process calling the script's setup() (10:26-10:55 UTC)", step=1000)],
    "jei_dnn-fashion_mnist/jei_dnn.json": [_input(
        "/tmp/wt15a/jei-fmnist (backbone checkpoint)", "backbone trained by an earlier process calling the script's "
        "setup() with the same config and workdir (10:27-11:04 UTC)", step=1200)],
    "shallow_again-fashion_mnist/shallow_again.json": [_input(
        "/tmp/wt15c/sa-fashion_mnist (each run's stored scores)", "scores of the 12 runs, trained and scored by the "
        "first invocation", commit="1aabc25", step=300)],
    "shallow_again-mnist/shallow_again.json": [_input(
        "/tmp/wt15c/sa-mnist (each run's stored scores)", "scores of the 12 runs, trained and scored by the first "
        "invocation", commit="1aabc25", step=300)],
    "self_speculative-smollm2/self_speculative.json": [_input(
        "runs/smollm2-exits", "trained exits and the feature cache of the exit-training invocations")],
    "lgvit-fashion_mnist/lgvit.json": [_input(
        "the training run's final checkpoints (three head variants)", "models re-evaluated", commit="45c718a",
        step=3100)],
    "lgvit-cifar10/lgvit.json": [_input(
        "the training run's final checkpoints (three head variants)", "models re-evaluated", commit="45c718a",
        step=2500)],
    "deediff-mnist/deediff.json": [_input(
        "the first invocation's checkpoints (feature CNN, U-ViT)", "models re-evaluated", commit="c602253",
        step=10000)],
    "eeea_net-fashion_mnist/eeea_net.json": [_input(
        "/tmp/wt15c/ee-fmnist (5 cached candidates of the normal arm)", "candidates trained by the first "
        "3-generation process, reused as measured", commit="28fb1ce", step=100)],
    "cbnet-mnist/earlier_runs/control_ae_budget/cbnet.json": [CBNET_FIRST],
    "cbnet-mnist/earlier_runs/control_cnn_budget/cbnet.json": [CBNET_FIRST],
    "cbnet-fashion_mnist/earlier_runs/control_cnn_budget/cbnet.json": [CBNET_FIRST],
}


def backfill(data: dict, rel: str) -> list[str]:
    """Adds the missing knowable fields to ``data["provenance"]``; returns the names added."""
    prov = data.get("provenance")
    if not isinstance(prov, dict):
        return []
    added = []
    if "dirty" not in prov:
        prov["dirty"] = prov["commit"].endswith("+dirty")
        added.append("dirty")
    if "versions" not in prov:
        prov["versions"] = {"jax": prov["jax_version"]}
        added.append("versions")
    if "inputs" not in prov:
        prov["inputs"] = INPUTS.get(rel, [])
        added.append("inputs")
    if added:
        prov["added_after_run"] = sorted(set(prov.get("added_after_run", [])) | set(added))
        prov["added_after_run_note"] = NOTE
    return added


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="list what would change, write nothing")
    args = p.parse_args(argv)
    for path in sorted(RESULTS.rglob("*.json")):
        rel = path.relative_to(RESULTS).as_posix()
        data = json.loads(path.read_text())
        added = backfill(data, rel)
        if added:
            print(f"{rel}: {', '.join(added)}")
            if not args.check:
                path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
