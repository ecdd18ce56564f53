"""Smoke runs of the Kangaroo and SpecEE experiments on a tiny random LM (the real scripts end to end)."""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _argv(name, tmp_path, shared_data):
    return [f"--config={ROOT / 'configs' / name}.py:smoke", f"--workdir={tmp_path / name}",
            f"--outdir={tmp_path / 'results' / name}", f"--data_dir={shared_data}"]


def test_kangaroo_smoke(tmp_path, shared_data):
    from experiments import kangaroo

    kangaroo.main(_argv("kangaroo", tmp_path, shared_data))
    data = json.loads((tmp_path / "results" / "kangaroo" / "kangaroo.json").read_text())
    spec = [r for r in data["rows"] if r["l"] is not None]
    assert {r["drafter"] for r in spec} == {"adapter", "shared-head"}
    assert all(r["greedy_exact"] for r in data["rows"])               # lossless
    assert all(0 <= r["acceptance"] <= 1 and r["CR"] >= 1 and r["cost_speedup"] > 0 for r in spec)
    assert (tmp_path / "kangaroo" / "adapter_l1.npz").exists()

    # SpecEE reading that drafter names it in its result: sha256, and the Kangaroo run's commit and step.
    from eejax.harness import results
    from experiments import specee

    specee.main(_argv("specee", tmp_path, shared_data) + [f"--config.drafter.workdir={tmp_path / 'kangaroo'}"])
    prov = json.loads((tmp_path / "results" / "specee" / "specee.json").read_text())["provenance"]
    (art,) = prov["inputs"]
    assert art["sha256"] == results.sha256_of(tmp_path / "kangaroo" / "adapter_l1.npz")
    assert art["producer_commit"] == data["provenance"]["commit"] and art["producer_step"] == 2
    assert art["sha256"][:16] in (tmp_path / "results" / "specee" / "specee.md").read_text()


def test_specee_smoke(tmp_path, shared_data):
    from experiments import specee

    specee.main(_argv("specee", tmp_path, shared_data))
    data = json.loads((tmp_path / "results" / "specee" / "specee.json").read_text())
    rows = {(r["method"], r["schedule"]): r for r in data["rows"]}
    assert rows[("predictor forced to 0", "all")]["agreement"] == 1.0   # predictor 0 = full depth
    for key in (("SpecEE", "all"), ("SpecEE", "static")):
        assert 0 <= rows[key]["agreement"] <= 1 and 1 <= rows[key]["mean_layers"] <= 4
