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
