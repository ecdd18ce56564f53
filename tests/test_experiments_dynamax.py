"""DYNAMAX's bad-input refusals (its smoke run is in tests/test_experiments.py, with every paper's)."""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _argv(tmp_path, shared_data, *extra):
    return [f"--config={ROOT / 'configs' / 'dynamax.py'}:smoke", f"--workdir={tmp_path / 'run'}",
            f"--outdir={tmp_path / 'results'}", f"--data_dir={shared_data}", *extra]


@pytest.mark.parametrize("override,needle", [
    ("--config.eval.gates=['max_softmax','mlp']", "classifier.kinds does not train"),
    ("--config.classifier.optim.grad_clip=1.0", "grad_clip"),
    ("--config.transformer.depth=3", "transformer.depth"),
    ("--config.eval.modes.transformer=['freeze']", "eval.modes.transformer"),
])
def test_dynamax_bad_config_is_one_line(capsys, tmp_path, shared_data, override, needle):
    from experiments import dynamax

    with pytest.raises(SystemExit) as exc:
        dynamax.main(_argv(tmp_path, shared_data, override))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error:") and "\n" not in err and needle in err
    assert not (tmp_path / "results").exists()
