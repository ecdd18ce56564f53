"""Smoke runs of experiments/jei_dnn.py and experiments/window_cascade.py: the real scripts end to end on tiny
settings (embedded MNIST; uniform-noise OOD for the cascade)."""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--config.data.test_size=500", "--config.data.eval_batch_size=250", "--config.log_every=2",
          "--config.ckpt_every=4"]


def test_jei_dnn_smoke(tmp_path):
    from experiments import jei_dnn

    out = tmp_path / "results"
    jei_dnn.main([f"--config={ROOT / 'configs/jei_dnn.py'}:smoke", f"--workdir={tmp_path / 'run'}", f"--outdir={out}",
                  "--config.train.steps=4", "--config.jei.lambdas=(0.1,)", "--config.jei.warmup_steps=10",
                  "--config.jei.rounds=1", "--config.jei.gate_steps=5", "--config.jei.im_steps=5",
                  "--config.eval.num_candidates=20", "--config.eval.throughput_batch=32", *COMMON])
    rows = json.loads((out / "jei_dnn.json").read_text())["results"]["rows"]
    assert [r["arm"] for r in rows] == ["JEI gates", "max-softmax"]
    for r in rows:
        # The engine's executed exits equal the simulated ones, so do the accuracies; conformal sets are non-empty.
        assert r["sim_agrees"] == 1.0 and r["executed_acc"] == r["test_acc"]
        assert r["set@0.1"] >= 1.0 and 0 <= r["test_ece_%"] <= 100
    assert (out / "jei_conformal.png").stat().st_size > 0 and "## Per lambda" in (out / "jei_dnn.md").read_text()


def test_window_cascade_smoke(tmp_path):
    from experiments import window_cascade

    out = tmp_path / "results"
    window_cascade.main([f"--config={ROOT / 'configs/window_cascade.py'}:smoke", f"--workdir={tmp_path / 'run'}",
                         f"--outdir={out}", "--config.train.steps=4", "--config.eval.widths=(0.2,)",
                         "--config.eval.throughput_batch=32", *COMMON])
    res = json.loads((out / "window_cascade.json").read_text())["results"]
    assert {r["kind"] for r in res["rows"]} == {"window", "threshold"}
    assert len(res["rows"]) == 2 * 3          # one cascade (S->M) x 3 target metrics x 2 kinds
    assert all(r["sim_agrees"] == 1.0 for r in res["executed"])
    assert (out / "window_fpr_at_95.png").stat().st_size > 0


def test_bad_configs_are_one_line_errors(capsys, tmp_path):
    """Bad config values stop both scripts before any work, with one line naming the field."""
    import pytest

    from experiments import jei_dnn, window_cascade

    cases = [(jei_dnn, "jei_dnn", ["--config.jei.lambdas=(-1.0,)"], "config.jei.lambdas[0]=-1.0"),
             (jei_dnn, "jei_dnn", ["--config.eval.alphas=(1.5,)"], "config.eval.alphas[0]=1.5"),
             (window_cascade, "window_cascade", ["--config.members.d_model=(16,)"], "one entry per member"),
             (window_cascade, "window_cascade", ["--config.ood=cifar"], "config.ood='cifar'"),
             (window_cascade, "window_cascade", ["--config.eval.metrics=('auc',)"], "config.eval.metrics[0]")]
    for mod, name, extra, fragment in cases:
        with pytest.raises(SystemExit) as exc:
            mod.main([f"--config={ROOT / 'configs' / name}.py:smoke", f"--workdir={tmp_path / name}", *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and fragment in err and "Traceback" not in err, err
