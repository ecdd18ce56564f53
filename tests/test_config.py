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


def _config_file(tmp_path, body: str, validate: str = "") -> str:
    f = tmp_path / "c.py"
    f.write_text("import ml_collections\nfrom eejax.harness.config import Validator\n"
                 f"def get_config(arg=None):\n    return ml_collections.ConfigDict({body})\n" + validate)
    return str(f)


def test_rules_every_config_obeys(tmp_path):
    """Issue 23: a name that escapes runs/, a seed JAX overflows on, a cosine schedule shorter than its training."""
    f = _config_file(tmp_path, "{'name': 'x', 'seed': 0, 'train': {'steps': 40, 'optim': {'schedule': "
                               "'warmup_cosine', 'total_steps': 40}}, 'other': {'optim': {'schedule': 'constant', "
                               "'total_steps': 0}, 'steps': 9}}")
    cfg, _ = config.parse_cli([f"--config={f}"])
    assert cfg.train.steps == 40
    for override, match in [("name=../../x", "must be one plain folder name"), ("name=a/b", "config.name='a/b'"),
                            ("name=", "config.name=''"), ("seed=-1", r"\[0, 2147483647\]"),
                            ("seed=99999999999999999999", "config.seed=99999999999999999999"),
                            ("train.optim.total_steps=10", "config.train.optim.total_steps=10 < config.train.steps=40"
                                                           ": the warmup_cosine schedule reaches learning rate 0")]:
        with pytest.raises(config.ConfigError, match=match):
            config.parse_cli([f"--config={f}", f"--config.{override}"])
    # A constant schedule has no length; a longer schedule than the training is allowed.
    config.parse_cli([f"--config={f}", "--config.other.steps=100", "--config.train.optim.total_steps=50"])


def test_sweeps_hold_each_value_once(tmp_path):
    f = _config_file(tmp_path, "{'t': (0.5, 0.9), 'v': ('a', 'b'), 'n': (1, 2), 'w': (64, 64)}",
                     "def validate(c):\n    v = Validator(c)\n    v.floats('t', 0, 1)\n    v.choices('v', 'abc')\n"
                     "    v.ints('n', lo=1, unique=True)\n    v.ints('w', lo=1)\n")
    config.parse_cli([f"--config={f}"])  # per-layer widths may repeat
    for override, match in [("t=(0.5, 0.5000001)", r"config.t\[1\]=0.5000001 and 0.5 are the same at the tables' "
                                                   "precision"),
                            ("v=('a', 'b', 'a')", r"config.v\[2\]='a' is repeated \(config.v\[0\]\)"),
                            ("n=(1, 1)", r"config.n\[1\]=1 is repeated")]:
        with pytest.raises(config.ConfigError, match=match):
            config.parse_cli([f"--config={f}", f"--config.{override}"])


def test_flags_that_would_mislead(tmp_path):
    f = _config_file(tmp_path, "{'name': 'x'}")
    for argv, match in [([f"--config={f}", f"--config={f}"], "--config given 2 times"),
                        ([f"--config={f}", "--workdir="], "--workdir '' is empty"),
                        ([f"--config={f}", "--data_dir", " "], "--data_dir ' ' is empty"),
                        ([f"--config={f}:"], "empty config argument after ':'"),
                        ([f"--config={f}", "--work=x"], "unrecognized arguments: --work=x")]:
        with pytest.raises(config.ConfigError, match=match):
            config.parse_cli(argv)
    _, args = config.parse_cli([f"--config={f}", "--break-lock"])
    assert args.break_lock


def test_sizes_have_sanity_ceilings_checked_before_the_config_builds_anything(tmp_path):
    """Issue 23: lgvit --config.model.depth=10**9 exhausted memory while its validate() built the exit list."""
    for spec, override, match in [("lgvit.py:smoke", "model.depth=1000000000", "config.model.depth=1000000000: must "
                                                                              "be <= 1024"),
                                  ("per_token_exit.py:smoke", "model.d_model=1000000000", "must be <= 65536"),
                                  ("per_token_exit.py:smoke", "data.seq_len=100000", "must be <= 32768"),
                                  ("first.py:smoke", "model.random.depth=-1", "depth=-1 must be an integer >= 1"),
                                  ("encoder_exits.py:smoke", "train.optim.lr=-1", "lr=-1.0 must be a finite number"),
                                  ("encoder_retrieval.py:smoke", "model.exits=bogus", "bad exit spec 'bogus'")]:
        with pytest.raises(config.ConfigError, match=match):
            config.parse_cli([f"--config={ROOT / 'configs' / spec}", f"--config.{override}"])
