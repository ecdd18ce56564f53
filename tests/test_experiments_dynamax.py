"""Smoke run of the DYNAMAX experiment: the real script end to end on tiny settings (CI runs this), and its bad-input
refusals."""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _argv(tmp_path, shared_data, *extra):
    return [f"--config={ROOT / 'configs' / 'dynamax.py'}:smoke", f"--workdir={tmp_path / 'run'}",
            f"--outdir={tmp_path / 'results'}", f"--data_dir={shared_data}", *extra]


def test_dynamax_smoke(capsys, tmp_path, shared_data):
    from experiments import dynamax

    dynamax.main(_argv(tmp_path, shared_data))
    out = tmp_path / "results"
    data = json.loads((out / "dynamax.json").read_text())
    models = data["models"]
    assert set(models) == {"mamba", "transformer"}
    # Equal parameters: the transformer's MLP width is matched to the Mamba block.
    assert abs(models["mamba"]["params"] - models["transformer"]["params"]) <= 0.01 * models["mamba"]["params"]
    assert 0 < models["mamba"]["head_share"] < 1
    arms = {(p["arch"], p["mode"], p["gate"]) for p in data["operating_points"]}
    assert arms == {("mamba", "propagate", "max_softmax"), ("mamba", "propagate", "mamba"),
                    ("mamba", "freeze", "max_softmax"), ("mamba", "freeze", "mamba"),
                    ("transformer", "propagate", "max_softmax"), ("transformer", "propagate", "mamba")}
    for p in data["operating_points"]:
        if p["threshold"] is not None:
            assert 0 < p["compute"] < 1.5 and 0 <= p["agreement"] <= 1 and p["speedup_h200"] > 0
            lo, hi = p["dnll_vs_full"][1:]
            assert lo <= p["dnll_vs_full"][0] <= hi
    statics = [r for r in data["static"] if r["exit"] != "full model"]
    assert len(statics) == 2 * 2 and all(r["compute"] < 1 for r in statics)
    assert {r["arm"] for r in data["host_stops"]} >= {"full model", "propagate/mamba"}
    assert data["provenance"]["commit"]
    assert (out / "dynamax_quality_vs_compute.png").is_file()
    assert "| arch | mode | gate | fit |" in (out / "dynamax.md").read_text()
    with pytest.raises(SystemExit) as exc:
        dynamax.main(_argv(tmp_path, shared_data))
    assert exc.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err


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
