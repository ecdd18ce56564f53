"""Smoke runs of the FFN-SkipLLM and LAC (voids) experiments: the real scripts end to end on a tiny random LM."""
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _argv(name, tmp_path, shared_data):
    return [f"--config={ROOT / 'configs' / name}.py:smoke", f"--workdir={tmp_path / 'run'}",
            f"--outdir={tmp_path / 'results'}", f"--data_dir={shared_data}"]


def test_ffn_skipllm_smoke(tmp_path, shared_data):
    from experiments import ffn_skipllm

    ffn_skipllm.main(_argv("ffn_skipllm", tmp_path, shared_data))
    data = json.loads((tmp_path / "results" / "ffn_skipllm.json").read_text())
    full, skip, remeasure = data["ppl"]
    assert full["setting"] == "full" and full["ffn_skipped"] == 0 and skip["ffn_skipped"] > 0
    assert remeasure["max_skip"] == 1 and remeasure["ffn_skipped"] <= skip["ffn_skipped"]
    assert abs(skip["ffn_skipped"] - data["calibration"][0]["target"]) < 0.15   # calibrated on validation
    assert data["decode"][0]["match"] == 1.0                 # the gate with threshold +inf decodes like the model
    assert [r["decoder"] for r in data["timing"]][0] == "greedy (kv.full_step)"
    for png in ("ppl_vs_skipped", "agreement_vs_skipped", "layer_skip_map", "cosine_profile"):
        assert (tmp_path / "results" / f"{png}.png").is_file()


def test_void_lm_smoke(tmp_path, shared_data):
    from experiments import void_lm

    void_lm.main(_argv("void_lm", tmp_path, shared_data))
    data = json.loads((tmp_path / "results" / "void_lm.json").read_text())
    official = [r for r in data["ppl"] if r["mode"].startswith("official")]
    assert [r["alpha"] for r in official] == [0.0, 0.8]
    assert official[0]["layers_active"] >= official[1]["layers_active"]      # more voids as alpha rises
    assert all(np.isfinite(r["token_ppl"]) for r in data["ppl"])
    assert {r["decoder"] for r in data["decode"]} == {"LAC official (RG)", "PP-pattern skip (causal)"}
    assert len(data["void_map_prompt0"]) == 4
    for png in ("ppl_vs_layers_active", "agreement_vs_layers_active", "void_by_layer", "void_map_pp",
                "void_map_rg", "void_map_prompt0"):
        assert (tmp_path / "results" / f"{png}.png").is_file()


def test_bad_gate_config_is_one_line(tmp_path, shared_data, capsys):
    from experiments import ffn_skipllm

    with pytest.raises(SystemExit) as exc:
        ffn_skipllm.main(_argv("ffn_skipllm", tmp_path, shared_data) + ["--config.gate.cold_first=3"])
    assert exc.value.code == 2 and "leave no hot layer" in capsys.readouterr().err
