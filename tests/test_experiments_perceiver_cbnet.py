"""Smoke runs of experiments/dynamic_perceiver.py and experiments/cbnet.py (embedded MNIST, a few steps)."""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dynamic_perceiver_smoke(tmp_path):
    from experiments import dynamic_perceiver

    out = tmp_path / "results"
    dynamic_perceiver.main([f"--config={ROOT / 'configs/dynamic_perceiver.py'}:smoke", f"--workdir={tmp_path / 'run'}",
                            f"--outdir={out}", "--config.train.steps=3", "--config.data.test_size=200",
                            "--config.data.eval_batch_size=200", "--config.eval.executed_priors=(1.0,)",
                            "--config.eval.throughput_batch=16"])
    data = json.loads((out / "dynamic_perceiver.json").read_text())["results"]
    assert set(data["arms"]) == {"perceiver", "feature_exits"}
    for arm in data["arms"].values():
        assert len(arm["budgeted"]) == 39 and len(arm["acc_E"]) == 3
        # The engine's executed exits equal the simulated ones (the script also asserts it).
        assert all(r["sim_agrees"] == 1.0 for r in arm["executed"])
    # The latent branch costs FLOPs: the Perceiver's full model is dearer than the feature-exit one.
    assert data["arms"]["perceiver"]["static_flops"][-1] > data["arms"]["feature_exits"]["static_flops"][-1]
    assert (out / "dynamic_perceiver_budgeted.png").stat().st_size > 0


def test_cbnet_smoke_targets_from_train(tmp_path, monkeypatch):
    from eejax.harness import config as config_lib
    from experiments import _common_vision as vision
    from experiments import cbnet

    seen = []
    real = cbnet.build_targets
    monkeypatch.setattr(cbnet, "build_targets", lambda g, p, ds, c: seen.append(ds.split) or real(g, p, ds, c))
    out = tmp_path / "results"
    spec = f"{ROOT / 'configs/cbnet.py'}:smoke"
    cbnet.main([f"--config={spec}", f"--workdir={tmp_path / 'run'}", f"--outdir={out}", "--config.train.steps=3",
                "--config.train_ae.steps=3", "--config.data.test_size=200", "--config.data.eval_batch_size=200",
                "--config.eval.executed_priors=(1.0,)", "--config.eval.latency_batch=16",
                "--config.eval.latency_iters=1"])
    data = json.loads((out / "cbnet.json").read_text())["results"]
    # Conversion targets: built from the train split only, one image of each class.
    assert seen == ["train"] and data["targets"]["split"] == "train"
    train, _, _ = vision.load_data(config_lib.load(spec), None)
    assert train.labels_N[data["targets"]["index"]].tolist() == list(range(10))
    with pytest.raises(ValueError, match="train split only"):
        real(None, None, train.subset([0], "test"), None)
    names = [r["model"] for r in data["rows"]]
    assert any(n.startswith("CBNet: autoencoder") for n in names)
    assert all(r["sim_agrees"] == 1.0 for r in data["rows"] if r["model"].startswith("BranchyNet"))
    cb = next(r for r in data["rows"] if r["model"].startswith("CBNet: autoencoder"))
    trunc = next(r for r in data["rows"] if r["model"].startswith("small classifier = CNN truncated"))
    assert cb["MFLOPs"] == pytest.approx(trunc["MFLOPs"] + data["autoencoder"]["MFLOPs"])   # the AE is counted
    assert (out / "cbnet_conversions.png").stat().st_size > 0
