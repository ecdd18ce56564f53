"""Smoke run of experiments/rbqe.py: the real script end to end on tiny settings."""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rbqe_smoke_executes_the_simulated_blind_exits(tmp_path):
    from experiments import rbqe

    out = tmp_path / "results"
    rbqe.main([f"--config={ROOT / 'configs/rbqe.py'}:smoke", f"--workdir={tmp_path / 'run'}", f"--outdir={out}",
               "--config.train.steps=4", "--config.data.test_size=50", "--config.data.eval_batch_size=50",
               "--config.eval.val_size=50"])
    res = json.loads((out / "rbqe.json").read_text())["results"]
    assert [r["QF"] for r in res["per_qf"]] == [10, 50] and len(res["static"]) == 3
    # The engine's blind exits equal the simulated first-exit-over-threshold for every row clear of the threshold.
    assert res["executed"]["rows"] == 100 and res["executed"]["exits_equal_clear"] == 1.0
    # The oracle's dPSNR is the per-image best over exits, so never below the blind rule's on average.
    assert res["compare"][1]["dB"] >= 0 and (out / "rbqe_curves.png").stat().st_size > 0
