import pathlib

import pytest

from eejax.harness import config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_config_has_a_smoke_variant():
    files = sorted((ROOT / "configs").glob("*.py"))
    files = [f for f in files if not f.name.startswith("_")]
    assert files
    for f in files:
        assert config.load(f"{f}:smoke") is not None
        assert (config.load(str(f)).get("runbook") or "")  # every config carries its runbook


def test_overrides_typed_and_checked(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import ml_collections\n"
                 "def get_config(arg=None):\n"
                 "    return ml_collections.ConfigDict({'model': {'depth': 6, 'name': 'vit', 'lr': 0.1,\n"
                 "        'exits': (1, 2), 'use': True}, 'arg': arg})\n")
    cfg, args = config.parse_cli([f"--config={f}:smoke", "--config.model.depth=3", "--config.model.lr=1",
                                  "--config.model.exits=(3,4)", "--config.model.use=false", "--workdir=/tmp/x"])
    assert cfg.arg == "smoke" and cfg.model.depth == 3 and cfg.model.lr == 1.0
    assert cfg.model.exits == (3, 4) and cfg.model.use is False and args.workdir == "/tmp/x"
    with pytest.raises(config.ConfigError, match="did you mean 'model.depth'"):
        config.parse_cli([f"--config={f}", "--config.model.dpth=3"])
    with pytest.raises(config.ConfigError, match="expected a int"):
        config.parse_cli([f"--config={f}", "--config.model.depth=abc"])
    with pytest.raises(config.ConfigError, match="unknown config key 'nope'"):
        config.parse_cli([f"--config={f}", "--config.nope=1"])
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(str(tmp_path / "missing.py"))
