"""Smoke run of experiments/eco_m2f.py: the real script end to end on tiny settings."""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_eco_m2f_smoke_executes_the_simulated_exits(tmp_path):
    from experiments import eco_m2f

    out = tmp_path / "results"
    eco_m2f.main([f"--config={ROOT / 'configs/eco_m2f.py'}:smoke", f"--workdir={tmp_path / 'run'}",
                  f"--outdir={out}", "--config.train.steps=4", "--config.data.test_size=200",
                  "--config.data.eval_batch_size=100", "--config.eval.throughput_batch=16",
                  "--config.eval.gate_steps=5"])
    res = json.loads((out / "eco_m2f.json").read_text())["results"]
    assert [r["arm"] for r in res["arms"]][:1] == ["gate"] and len(res["arms"]) == 4   # 2 betas x (gate, oracle)
    # The grouped executor driven by the gate takes the simulated exit of every row and predicts the same class.
    for row in res["executed"]:
        assert row["exits_equal"] == 1.0 and row["preds_equal"] == 1.0 and row["max_abs_prob_diff"] < 1e-4
    # The oracle's exits are step B's labels on test, exactly.
    assert res["per_beta"]["0"]["oracle_exits_test"] != [] and len(res["compare"]) == 2
    assert len(res["timing"]) == 1 and (out / "eco_m2f_curves.png").stat().st_size > 0
