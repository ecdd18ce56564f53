"""Smoke run of the DeeDiff experiment: the real script end to end on tiny settings (CI runs this)."""
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_deediff_smoke(capsys, tmp_path):
    from experiments import deediff

    out = tmp_path / "results"
    argv = [f"--config={ROOT / 'configs/deediff.py'}:smoke", f"--workdir={tmp_path / 'run'}", f"--outdir={out}",
            "--config.train.steps=6", "--config.classifier.steps=4",
            "--config.sample.num_samples=20"]
    deediff.main(argv)
    data = json.loads((out / "deediff.json").read_text())
    res = data["results"]
    families = ("DeeDiff per-sample", "DeeDiff batch-mean", "uniform", "t-banded", "two-depth")
    assert set(res) == {"full depth"} | {f"{f} @{r}" for f in families for r in (0.5, 0.8)}
    depth = data["config"]["model"]["depth"]
    assert res["full depth"]["layers/step"] == depth
    for name, r in res.items():
        assert 1 <= r["layers/step"] <= depth and np.isfinite(r["cFID"]) and r["images/s"] > 0
        assert r["executed_layers/step"] >= r["layers/step"] - 1e-9
        assert (out / f"samples_{name.replace(' ', '_')}.png").stat().st_size > 0
    # Batch-mean exits the whole batch together, so the loop runs exactly the nominal depth.
    for r in (0.5, 0.8):
        bm = res[f"DeeDiff batch-mean @{r}"]
        assert bm["executed_layers/step"] == pytest.approx(bm["layers/step"])
        # Baselines are matched to the DeeDiff per-sample row's average depth (integer depths allow).
        match = res[f"DeeDiff per-sample @{r}"]["layers/step"]
        assert abs(res[f"t-banded @{r}"]["layers/step"] - match) <= 1
    for f in ("deediff_depth_vs_t.png", "deediff_exit_mse_vs_t.png", "deediff_cfid_vs_ratio.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "deediff.md").read_text()
    assert "| policy | target |" in md and "NOT Inception FID" in md and "Command:" in md
    with pytest.raises(SystemExit) as exc:
        deediff.main(argv)
    assert exc.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    # A rerun with --overwrite re-evaluates the finished run without training, and says so in the table.
    deediff.main(argv + ["--overwrite"])
    assert "no training in this run" in (out / "deediff.md").read_text()
