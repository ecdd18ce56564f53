"""experiments/jei_dnn.py and experiments/window_cascade.py refuse bad config values in one line (their smoke runs:
tests/test_experiments.py)."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--config.data.test_size=500", "--config.data.eval_batch_size=250", "--config.log_every=2",
          "--config.ckpt_every=4"]


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
