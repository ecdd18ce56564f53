"""experiments/ffn_skipllm.py refuses a gate that leaves no hot layer in one line (the smoke runs of FFN-SkipLLM and
LAC: tests/test_experiments.py)."""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _argv(name, tmp_path, shared_data):
    return [f"--config={ROOT / 'configs' / name}.py:smoke", f"--workdir={tmp_path / 'run'}",
            f"--outdir={tmp_path / 'results'}", f"--data_dir={shared_data}"]


def test_bad_gate_config_is_one_line(tmp_path, shared_data, capsys):
    from experiments import ffn_skipllm

    with pytest.raises(SystemExit) as exc:
        ffn_skipllm.main(_argv("ffn_skipllm", tmp_path, shared_data) + ["--config.gate.cold_first=3"])
    assert exc.value.code == 2 and "leave no hot layer" in capsys.readouterr().err
