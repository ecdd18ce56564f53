"""Smoke runs of every experiment: the real script end to end on tiny settings (CI runs these)."""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lgvit_smoke(capsys, tmp_path):
    from experiments import lgvit

    out = tmp_path / "results"
    argv = [f"--config={ROOT / 'configs/lgvit.py'}:smoke", f"--workdir={tmp_path / 'run'}", f"--outdir={out}",
            "--config.stage1.steps=6", "--config.stage2.steps=4", "--config.variants=('lgvit', 'linear')",
            "--config.eval.thresholds=(0.3, 0.9)", "--config.eval.latency_examples=2",
            "--config.eval.throughput_batch=64", "--config.data.test_size=500", "--config.data.eval_batch_size=250"]
    lgvit.main(argv)
    data = json.loads((out / "lgvit.json").read_text())
    assert set(data["results"]) == {"lgvit", "linear"}
    for res in data["results"].values():
        assert len(res["acc_stage2"]) == len(res["exit_layers"]) == 5
        assert len(res["budgeted"]) == 39
        # The while-loop engine's executed exits equal those simulated from the cached softmax.
        assert all(row["sim_agrees"] == 1.0 for row in res["sweep"])
    assert (out / "lgvit_budgeted.png").stat().st_size > 0 and (out / "lgvit_exits.png").stat().st_size > 0
    assert "| heads | stage |" in (out / "lgvit.md").read_text()
    # Results are never overwritten silently; a rerun resumes from the finished checkpoints and refuses.
    with pytest.raises(SystemExit) as exc:
        lgvit.main(argv)
    assert exc.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err


def _shared_head_argv(name, tmp_path, out):
    return [f"--config={ROOT / 'configs' / name}.py:smoke", f"--workdir={tmp_path / name}", f"--outdir={out}",
            f"--config.model_workdir={tmp_path / 'backbone'}", "--config.train.steps=4",
            "--config.data.test_size=500", "--config.data.eval_batch_size=250", "--config.eval.throughput_batch=32"]


def test_mue_and_deer_smoke_share_one_backbone(capsys, tmp_path):
    from experiments import deer, mue

    out = tmp_path / "mue-results"
    mue.main(_shared_head_argv("mue", tmp_path, out) + ["--config.eval.budgets=(2.0,)", "--config.eval.quality=(0.9,)",
                                                        "--config.eval.num_candidates=20"])
    data = json.loads((out / "mue.json").read_text())["results"]
    assert {r["arm"] for r in data["quality"]} == {"MuE (cosine of consecutive states)", "max-softmax"}
    # The engine's executed exits equal those simulated from the cached similarities and softmaxes.
    assert all(r["sim_agrees"] == 1.0 for r in data["quality"] + data["budget"])
    assert (out / "mue_curves.png").stat().st_size > 0 and "## Matched mean layers" in (out / "mue.md").read_text()

    # DeeR resumes the same backbone (bound to the same recipe) and meets its peak cap on test.
    out = tmp_path / "deer-results"
    deer.main(_shared_head_argv("deer", tmp_path, out) + ["--config.eval.budgets=(3.0,)"])
    data = json.loads((out / "deer.json").read_text())["results"]
    assert data["rows"] and all(r["peak_met"] == "yes" and r["sim_agrees"] == 1.0 for r in data["rows"])
    assert all(r["test_peak_layers"] <= r["peak_cap"] for r in data["rows"])
    assert "distinct operating points" in (out / "deer.md").read_text()   # duplicate priors counted once
    # A backbone directory bound to another recipe is refused in one line.
    with pytest.raises(SystemExit) as exc:
        deer.main(_shared_head_argv("deer", tmp_path, tmp_path / "other") + ["--config.train.label_smoothing=0.2",
                                                                             f"--workdir={tmp_path / 'deer2'}"])
    assert exc.value.code == 2 and "model_workdir" in capsys.readouterr().err
