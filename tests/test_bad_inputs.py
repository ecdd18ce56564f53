"""Bad inputs get one clear line, and nothing a user had is changed (issue 11: runs that cannot lie).

Command line: every case runs an experiment's real ``main(argv)`` in-process (a subprocess costs seconds of imports
each; a handful of true subprocess runs check the exit status and stderr end to end). Each must exit with status 2,
print one line ``error: <cause>; <hint>`` naming the cause and no traceback, and leave an earlier run's results,
checkpoints and recorded config byte-identical. API: a ValueError naming the argument.
"""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from eejax.harness import config, run

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {name: str(ROOT / "configs" / f"{name}.py") for name in ("lgvit", "deediff", "per_token_exit", "skipdecode",
                                                                     "mue", "deer", "kangaroo", "encoder_exits",
                                                                     "self_speculative", "cecollm")}

# (paper, extra argv, a fragment the one-line message must hold)
CLI_CASES = [
    # LGViT: ranges, types, known names, every variant, optimizer, model/data consistency, flags.
    ("lgvit", ["--config.data.batch_size=-4"], "config.data.batch_size=-4: must be an integer >= 1"),
    ("lgvit", ["--config.data.batch_size=0"], "config.data.batch_size=0"),
    ("lgvit", ["--config.data.batch_size=abc"], "expected a int"),
    ("lgvit", ["--config.data.eval_batch_size=0"], "config.data.eval_batch_size=0"),
    ("lgvit", ["--config.stage1.steps=0"], "config.stage1.steps=0: must be an integer >= 1"),
    ("lgvit", ["--config.stage1.steps=-5"], "config.stage1.steps=-5"),
    ("lgvit", ["--config.stage2.steps=0"], "config.stage2.steps=0"),
    ("lgvit", ["--config.eval.thresholds=(1.5,)"], "config.eval.thresholds[0]=1.5: must be a finite number in [0, 1]"),
    ("lgvit", ["--config.eval.thresholds=(-0.5, 0.9)"], "config.eval.thresholds[0]=-0.5"),
    ("lgvit", ["--config.eval.thresholds=()"], "config.eval.thresholds=(): must be a non-empty list"),
    ("lgvit", ["--config.eval.thresholds=(0.5, 'a')"], "config.eval.thresholds[1]='a'"),
    ("lgvit", ["--config.eval.thresholds=nan"], "--config.eval.thresholds=nan: expected a tuple"),
    ("lgvit", ["--config.eval.thresholds=(1e999,)"], "config.eval.thresholds[0]=inf"),
    ("lgvit", ["--config.eval.thresholds=0.5"], "expected a tuple, got float"),
    ("lgvit", ["--config.seed=-1"], "config.seed=-1: must be an integer >= 0"),
    ("lgvit", ["--config.data.val_fraction=0.0"], "config.data.val_fraction=0.0: must be a finite number in (0, 1)"),
    ("lgvit", ["--config.data.val_fraction=1.5"], "config.data.val_fraction=1.5"),
    ("lgvit", ["--config.data.train_size=-1"], "config.data.train_size=-1"),
    ("lgvit", ["--config.variants=('lgvit', 'bogus')"], "config.variants[1]='bogus': must be one of lgvit"),
    ("lgvit", ["--config.variants=()"], "config.variants=(): must be a non-empty list"),
    ("lgvit", ["--config.stage1.optim.lr=-1"], "config.stage1.optim: lr=-1.0 must be a finite number > 0"),
    ("lgvit", ["--config.stage1.optim.lr=0"], "lr=0.0 must be a finite number > 0"),
    ("lgvit", ["--config.stage2.optim.lr=1e999"], "lr=inf"),
    ("lgvit", ["--config.stage1.optim.name=lamb"], "name='lamb' is not one of"),
    ("lgvit", ["--config.stage1.optim.schedule=linear"], "schedule='linear' is not one of"),
    ("lgvit", ["--config.stage1.optim.weight_decay=-0.1"], "weight_decay=-0.1"),
    ("lgvit", ["--config.stage2.optim.total_steps=10", "--config.stage2.optim.warmup_steps=50"],
     "needs total_steps > warmup_steps"),
    ("lgvit", ["--config.model.d_model=50"], "not divisible by self.num_heads"),
    ("lgvit", ["--config.model.patch_size=5"], "not divisible by self.patch_size"),
    ("lgvit", ["--config.model.exits=bogus"], "bad exit spec 'bogus'"),
    ("lgvit", ["--config.model.depth=0"], "config.model.depth=0"),
    ("lgvit", ["--config.model.channels=3"], "does not match mnist_embedded images (28, 28, 1)"),
    ("lgvit", ["--config.data.name=imagenet"], "config.data.name='imagenet': must be one of"),
    ("lgvit", ["--config.stage1.weighting=bogus"], "config.stage1.weighting='bogus'"),
    ("lgvit", ["--config.stage2.alpha=2.0"], "config.stage2.alpha=2.0"),
    ("lgvit", ["--config.stage2.temperature=0"], "config.stage2.temperature=0.0"),
    ("lgvit", ["--config.model.pool=max"], "config.model.pool='max'"),
    ("lgvit", ["--config.log_every=0"], "config.log_every=0"),
    ("lgvit", ["--config.ckpt_every=-1"], "config.ckpt_every=-1"),
    ("lgvit", ["--config.eval.throughput_batch=0"], "config.eval.throughput_batch=0"),
    ("lgvit", ["--config.nope=1"], "unknown config key 'nope'"),
    ("lgvit", ["--config.data.batch_sise=4"], "did you mean 'data.batch_size'"),
    ("lgvit", ["--config.data.batch_size"], "write overrides as --config.key=value"),
    ("lgvit", ["--data_dir=/nonexistent"], "--data_dir is not used by data.name='mnist_embedded'"),
    ("lgvit", ["--config.data.name=fashion_mnist", "--data_dir=/nonexistent"],
     "data directory /nonexistent does not exist"),
    ("lgvit", ["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    ("lgvit", ["--config.seed=1"], "was run with a different config: seed (0 -> 1)"),
    ("lgvit", ["--config.stage1.steps=5"], "stage1.steps (6 -> 5)"),
    # DeeDiff
    ("deediff", ["--config.eval.target_ratios=(1.5,)"], "config.eval.target_ratios[0]=1.5: must be a finite number "
                                                         "in (0, 1]"),
    ("deediff", ["--config.eval.target_ratios=(0.0,)"], "config.eval.target_ratios[0]=0.0"),
    ("deediff", ["--config.eval.target_ratios=()"], "config.eval.target_ratios=()"),
    ("deediff", ["--config.train.batch_size=0"], "config.train.batch_size=0"),
    ("deediff", ["--config.train.steps=-1"], "config.train.steps=-1"),
    ("deediff", ["--config.sample.steps=0"], "config.sample.steps=0"),
    ("deediff", ["--config.sample.steps=5000"], "config.sample.steps=5000: must be an integer in [1, 1000]"),
    ("deediff", ["--config.model.depth=4"], "U-ViT needs an odd depth"),
    ("deediff", ["--config.diffusion.schedule=quadratic"], "config.diffusion.schedule='quadratic'"),
    ("deediff", ["--config.diffusion.parameterization=x0"], "config.diffusion.parameterization='x0'"),
    ("deediff", ["--config.train.optim.ema_decay=1.0"], "ema_decay=1.0 must be a finite number in [0, 1)"),
    ("deediff", ["--config.eval.mse_timesteps=(0, 1000)"], "config.eval.mse_timesteps[1]=1000"),
    ("deediff", ["--config.eval.two_depth_shallow=0"], "config.eval.two_depth_shallow=0"),
    ("deediff", ["--config.loss.lam=-1"], "config.loss.lam=-1.0"),
    ("deediff", ["--config.sample.eta=nan"], "--config.sample.eta=nan: expected a float"),
    ("deediff", ["--config.seed=-3"], "config.seed=-3"),
    ("deediff", ["--data_dir=/nonexistent"], "--data_dir is not used by data.name='mnist_embedded'"),
    # Per-token exit (the LM experiments)
    ("per_token_exit", ["--config.eval.prompt_len=0"], "config.eval.prompt_len=0: must be an integer >= 1"),
    ("per_token_exit", ["--config.eval.new_tokens=0"], "config.eval.new_tokens=0"),
    ("per_token_exit", ["--config.eval.thresholds.max_softmax=(1.5,)"], "config.eval.thresholds.max_softmax[0]=1.5"),
    ("per_token_exit", ["--config.eval.thresholds.max_softmax=()"], "config.eval.thresholds.max_softmax=()"),
    ("per_token_exit", ["--config.eval.thresholds.cosine=(-2.0,)", "--config.eval.measures=('cosine',)"],
     "config.eval.thresholds.cosine[0]=-2.0: must be a finite number in [-1, 1]"),
    ("per_token_exit", ["--config.eval.measures=('max_softmax', 'bogus')"], "config.eval.measures[1]='bogus'"),
    ("per_token_exit", ["--config.eval.kv_modes=('teleport',)"], "config.eval.kv_modes[0]='teleport'"),
    ("per_token_exit", ["--config.eval.static_exits=(7,)"], "config.eval.static_exits[0]=7: must be an integer in "
                                                             "[0, 2]"),
    ("per_token_exit", ["--config.eval.ltt_delta=0"], "config.eval.ltt_delta=0.0"),
    ("per_token_exit", ["--config.eval.ltt_epsilons=(1.5,)"], "config.eval.ltt_epsilons[0]=1.5"),
    ("per_token_exit", ["--config.data.tokenizer=word"], "config.data.tokenizer='word'"),
    ("per_token_exit", ["--config.model.num_kv_heads=3"], "not divisible by self.num_kv_heads"),
    ("per_token_exit", ["--config.train.layer_drop=1.0"], "config.train.layer_drop=1.0"),
    ("per_token_exit", ["--config.data.seq_len=1"], "config.data.seq_len=1: must be an integer >= 2"),
    ("per_token_exit", ["--config.seed=-1"], "config.seed=-1"),
    ("per_token_exit", ["--config.classifier.optim.lr=-1"], "config.classifier.optim: lr=-1.0"),
    ("per_token_exit", ["--config.data.name=imdb"], "config.data.name='imdb'"),
    ("per_token_exit", ["--data_dir=/nonexistent"], "--data_dir /nonexistent is not a directory"),
    # SkipDecode
    ("skipdecode", ["--config.skipdecode.speedups=(0.5,)"], "config.skipdecode.speedups[0]=0.5"),
    ("skipdecode", ["--config.skipdecode.keep_bottom=10"], "config.skipdecode.keep_bottom=10"),
    ("skipdecode", ["--config.eval.exit_thresholds=(2.0,)"], "config.eval.exit_thresholds[0]=2.0"),
    ("skipdecode", ["--config.eval.prompt_len=20"], "config.data.seq_len=32: must equal eval.prompt_len"),
    ("skipdecode", ["--config.skipdecode.finetune_steps=0"], "config.skipdecode.finetune_steps=0"),
    ("skipdecode", ["--config.eval.exit_measure=bogus"], "config.eval.exit_measure='bogus'"),
    # CE-CoLLM (cloud-edge split)
    ("cecollm", ["--config.split.ks=(3,)"], "config.split.ks[0]=3: must be an integer in [1, 2]"),
    ("cecollm", ["--config.split.thresholds=(1.5,)"], "config.split.thresholds[0]=1.5"),
    ("cecollm", ["--config.split.cloud_kv=('copy',)"], "config.split.cloud_kv[0]='copy'"),
    ("cecollm", ["--config.split.uplink_mbps=(0.0,)"], "config.split.uplink_mbps[0]=0.0"),
    ("cecollm", ["--config.split.rtt_ms=-1"], "config.split.rtt_ms=-1.0"),
    ("cecollm", ["--config.model.exits=every:2"], "config.model.exits"),
    # MuE and DeeR (one shared-head backbone)
    ("mue", ["--config.eval.budgets=(0.5,)"], "config.eval.budgets[0]=0.5: must be a finite number in [1, 4]"),
    ("mue", ["--config.eval.quality=(1.5,)"], "config.eval.quality[0]=1.5"),
    ("mue", ["--config.model.depth=1"], "config.model.depth=1: must be >= 2"),
    ("mue", ["--config.train.label_smoothing=1.0"], "config.train.label_smoothing=1.0"),
    ("deer", ["--config.eval.max_layers=(1,)"], "config.eval.max_layers[0]=1: must be an integer in [2, 4]"),
    ("deer", ["--config.eval.max_layers=(9,)"], "config.eval.max_layers[0]=9"),
    ("deer", ["--config.eval.budgets=(7.0,)"], "config.eval.budgets[0]=7.0"),
    ("deer", ["--config.model.num_heads=3"], "not divisible by"),
    # Issue 23: accepted configs that silently did something else, flags that misled.
    ("lgvit", ["--workdir="], "--workdir '' is empty"),
    ("lgvit", ["--outdir= "], "--outdir ' ' is empty"),
    ("lgvit", [f"--config={CONFIGS['deediff']}:smoke"], "--config given 2 times"),
    ("lgvit", ["--config.name=../../x"], "config.name='../../x': must be one plain folder name"),
    ("lgvit", ["--config.name=a/b"], "config.name='a/b'"),
    ("lgvit", ["--config.seed=99999999999999999999"], "config.seed=99999999999999999999: must be an integer in "
                                                      "[0, 2147483647]"),
    ("deediff", ["--config.seed=4294967296"], "config.seed=4294967296"),
    ("lgvit", ["--config.stage1.optim.total_steps=5", "--config.stage1.optim.warmup_steps=2"],
     "config.stage1.optim.total_steps=5 < config.stage1.steps=6"),
    ("lgvit", ["--config.variants=('lgvit', 'linear', 'lgvit')"], "config.variants[2]='lgvit' is repeated"),
    ("lgvit", ["--config.eval.thresholds=(0.5, 0.5000001)"], "config.eval.thresholds[1]=0.5000001 and 0.5 are the "
                                                             "same at the tables' precision"),
    ("deer", ["--config.eval.max_layers=(2, 3, 2)"], "config.eval.max_layers[2]=2 is repeated"),
    ("lgvit", ["--conf=x"], "unrecognized arguments: --conf=x"),
    # Issue 23: sizes nobody bounded, values checked against the model and the data before any work.
    ("kangaroo", ["--config.decode.gamma=100000"], "config.decode.gamma=100000: must be <= decode.new_tokens=6"),
    ("kangaroo", ["--config.model.depth=2"], "config.model.depth=2: is ignored by model.name='random'"),
    ("kangaroo", ["--config.drafter.exit_layers=(5,)"], "must be < the random model's 4 layers"),
    ("encoder_exits", ["--config.data.max_len=1000"], "config.data.max_len=1000: must be an integer in [1, 512]"),
    ("self_speculative", ["--config.decode.batches=(5,)"], "the largest batch 5 exceeds the prompts"),
    ("self_speculative", ["--config.decode.ks=(2, 3)"], "config.decode.ks=(2, 3): must include 1"),
    ("self_speculative", ["--config.decode.ks=(1, 50)"], "must be <= decode.new_tokens=6"),
    ("self_speculative", ["--config.decode.ks=(1, 2, 1)"], "holds a value twice"),
    ("deediff", ["--config.sample.eta=1e9"], "config.sample.eta=1000000000.0: must be a finite number in [0, 1]"),
    ("deediff", ["--config.data.ref_size=3"], "config.data.ref_size=3: must be 0 (the whole test split) or >= "
                                              "sample.num_samples=20"),
    ("lgvit", ["--config.stage2.temperature=1e-30"], "config.stage2.temperature=1e-30: must be a finite number >= "
                                                     "0.01"),
    ("lgvit", ["--config.eval.throughput_batch=5000"], "config.eval.throughput_batch=5000 exceeds the 500 test "
                                                       "images"),
    ("lgvit", ["--config.data.test_size=1"], "config.eval.throughput_batch=64 exceeds the 1 test images"),
]


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_runs(tmp_path_factory):
    """A workdir per paper as an earlier smoke run left it: recorded config, a checkpoint, results."""
    root = tmp_path_factory.mktemp("earlier")
    for name, path in CONFIGS.items():
        work = root / name
        (work / "ckpt" / "5").mkdir(parents=True)
        (work / "ckpt" / "5" / "state").write_bytes(os.urandom(256))
        (work / "results").mkdir()
        (work / "results" / f"{name}.md").write_text(f"# {name} earlier result\n")
        (work / "results" / f"{name}.json").write_text(json.dumps({"earlier": True}))
        cfg, args = config.parse_cli([f"--config={path}:smoke"])
        (work / run.RUN_CONFIG).write_text(json.dumps(run.config_record(cfg, args.not_in_checkpoints)))
    return root


def _main(paper):
    if paper in ("kangaroo", "encoder_exits", "self_speculative"):
        import importlib

        return importlib.import_module(f"experiments.{paper}").main
    if paper == "lgvit":
        from experiments import lgvit as mod
    elif paper == "deediff":
        from experiments import deediff as mod
    elif paper == "per_token_exit":
        from experiments import per_token_exit as mod
    elif paper == "mue":
        from experiments import mue as mod
    elif paper == "deer":
        from experiments import deer as mod
    else:
        from experiments import skipdecode as mod
    return mod.main


def _assert_one_line_exit_2(capsys, call, fragment):
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: ") and "; " in lines[-1], err
    assert len([line for line in lines if line.startswith("error:")]) == 1, err
    assert fragment in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize("paper,extra,fragment", CLI_CASES,
                         ids=[f"{p}:{' '.join(a)}" for p, a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_and_changes_nothing(paper, extra, fragment, earlier_runs, capsys, request):
    work = earlier_runs / paper
    before = _digest(work)
    argv = [f"--config={CONFIGS[paper]}:smoke", f"--workdir={work}"] + extra
    if paper in ("per_token_exit", "skipdecode") and not any(a.startswith("--data_dir") for a in extra):
        argv.append(f"--data_dir={request.getfixturevalue('shared_data')}")
    _assert_one_line_exit_2(capsys, lambda: _main(paper)(argv), fragment)
    assert _digest(work) == before
    assert not (work / run.LOCK).exists()  # the refused run released its lock


def test_cli_config_file_errors(capsys, tmp_path):
    from experiments import lgvit

    for argv, fragment in [([f"--config={ROOT / 'configs/missing.py'}"], "config file not found"),
                           ([f"--config={CONFIGS['lgvit']}:bogus"], "unknown arg 'bogus'"),
                           ([f"--config={CONFIGS['lgvit']}:smoke", f"--workdir={tmp_path / 'f'}"], "is a file")]:
        (tmp_path / "f").write_text("not a directory")
        _assert_one_line_exit_2(capsys, lambda: lgvit.main(argv), fragment)


def test_workdir_without_record_is_refused(capsys, tmp_path):
    from experiments import lgvit

    (tmp_path / "ckpt" / "5").mkdir(parents=True)
    before = _digest(tmp_path)
    _assert_one_line_exit_2(capsys, lambda: lgvit.main([f"--config={CONFIGS['lgvit']}:smoke",
                                                        f"--workdir={tmp_path}"]), "holds files but no run_config")
    assert _digest(tmp_path) == before


def test_config_binding_and_fresh(tmp_path):
    cfg = config.load(f"{CONFIGS['lgvit']}:smoke")
    assert run.open_workdir(tmp_path / "w", cfg) == tmp_path / "w"
    run.release_locks()
    assert run.open_workdir(tmp_path / "w", cfg) == tmp_path / "w"  # same config: the same workdir, resumable
    run.release_locks()
    other = config.load(f"{CONFIGS['lgvit']}:smoke")
    with other.unlocked():
        other.stage1.steps, other.model.depth = 5, 4
    with pytest.raises(run.ConfigMismatchError, match=r"model.depth \(6 -> 4\), stage1.steps \(6 -> 5\)"):
        run.open_workdir(tmp_path / "w", other)
    run.release_locks()
    fresh = run.open_workdir(tmp_path / "w", other, fresh=True)
    assert fresh == tmp_path / "w" / "fresh-1" and (fresh / run.RUN_CONFIG).exists()
    assert (fresh / run.LOCK).exists() and not (tmp_path / "w" / run.LOCK).exists()
    run.release_locks()
    # log_every and the runbook do not change what a checkpoint holds.
    with other.unlocked():
        other.log_every = 7
    assert run.open_workdir(fresh, other) == fresh
    run.release_locks()
    # Nor do the fields a paper lists in NOT_IN_CHECKPOINTS (LGViT: eval), so a finished run can be re-evaluated.
    _, args = config.parse_cli([f"--config={CONFIGS['lgvit']}:smoke"])
    assert args.not_in_checkpoints == ("eval",)
    assert run.open_workdir(tmp_path / "e", other, record=run.config_record(other, ("eval",))) == tmp_path / "e"
    run.release_locks()
    with other.unlocked():
        other.eval.thresholds = (0.5,)
    assert run.open_workdir(tmp_path / "e", other, record=run.config_record(other, ("eval",))) == tmp_path / "e"
    run.release_locks()


def test_second_run_on_a_workdir_is_refused_while_the_first_holds_it(capsys, tmp_path):
    from experiments import lgvit

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from eejax.harness import run; run.WorkdirLock(sys.argv[1]).acquire(); "
                               "print('locked', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = [f"--config={CONFIGS['lgvit']}:smoke", f"--workdir={tmp_path}"]
        line = _assert_one_line_exit_2(capsys, lambda: lgvit.main(argv), f"is in use by pid {holder.pid}")
        assert "wait for that run to finish" in line
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and the next run takes it over.
    lock = run.WorkdirLock(tmp_path).acquire()
    assert json.loads((tmp_path / run.LOCK).read_text())["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().err
    lock.release()
    assert not (tmp_path / run.LOCK).exists()


# ---------------------------------------------------------------------------------------------- subprocesses


def _python(args, env_extra=None, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EEJAX_NO_PROGRESS": "1", **(env_extra or {})}
    env.pop("EEJAX_DEBUG", None) if "EEJAX_DEBUG" not in (env_extra or {}) else None
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_cli_subprocess_exit_status_and_debug(tmp_path):
    argv = ["-m", "experiments.lgvit", f"--config={CONFIGS['lgvit']}:smoke", "--config.data.batch_size=-4",
            f"--workdir={tmp_path}"]
    proc = _python(argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config.data.batch_size=-4: must be an integer >= 1; fix the value in the config file or the "
        "--config.KEY=VALUE override")
    debug = _python(argv, {"EEJAX_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    assert "Traceback" in _python(argv + ["--debug"]).stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_cli_subprocess_data_error(tmp_path):
    proc = _python(["-m", "experiments.per_token_exit", f"--config={CONFIGS['per_token_exit']}:smoke",
                    f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: missing: {tmp_path}")


# ------------------------------------------------------------------------------------------------------ API


@pytest.fixture(scope="module")
def vit_model():
    from flax import nnx

    from eejax.models import vit as vit_lib

    cfg = vit_lib.ViTConfig(image_size=28, channels=1, patch_size=7, d_model=16, depth=2, num_heads=2, mlp_dim=16,
                            exits="all", head_types="linear", local_hidden=8)
    return nnx.merge(*vit_lib.build(cfg, 0))


@pytest.fixture(scope="module")
def lm_model():
    from flax import nnx

    from eejax.models import lm as lm_lib

    cfg = lm_lib.LMConfig(vocab_size=11, d_model=16, depth=2, num_heads=2, num_kv_heads=1, mlp_dim=16)
    return nnx.merge(*lm_lib.build(cfg, 0))


def test_api_vit_inputs(vit_model):
    good = np.zeros((2, 28, 28, 1), np.float32)
    cases = [
        (lambda: vit_model.all_exits(np.zeros((2, 28, 28, 1), np.uint8)), "images have dtype uint8"),
        (lambda: vit_model.all_exits(np.full((2, 28, 28, 1), np.nan, np.float32)), "images contain NaN"),
        (lambda: vit_model.all_exits(np.zeros((2, 32, 32, 1), np.float32)), r"images of shape \(2, 32, 32, 1\)"),
        (lambda: vit_model.all_exits(np.zeros((28, 28, 1), np.float32)), r"images of shape \(28, 28, 1\)"),
        (lambda: vit_model.dynamic(good, 1.5), r"threshold=1.5 outside \[0.0, 1.0\]"),
        (lambda: vit_model.dynamic(good, -0.5), "threshold=-0.5 outside"),
        (lambda: vit_model.dynamic(good, float("nan")), "threshold=nan contains NaN"),
        (lambda: vit_model.dynamic(good, np.array([0.5, 0.5, 0.5])), r"threshold has shape \(3,\)"),
        (lambda: vit_model.dynamic(good, "high"), "threshold must be a number"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_api_lm_token_ids(lm_model):
    from eejax.decoding import per_token

    step = lambda m, t, s, i: per_token.full_depth_step(m, t, s, i)  # noqa: E731
    lengths = np.full((2,), 3, np.int32)
    cases = [
        (lambda: lm_model(np.array([[1, 2, 11]], np.int32)),
         r"tokens hold ids in \[1, 11\]; the vocabulary is \[0, 11\)"),
        (lambda: lm_model(np.array([[-1, 2]], np.int32)), r"ids in \[-1, 2\]"),
        (lambda: lm_model(np.array([[1.0, 2.0]], np.float32)), "tokens must be integer token ids"),
        (lambda: per_token.generate(lm_model, np.array([[1, 2, 50], [1, 2, 3]], np.int32), lengths, 2, step),
         r"prompt_BxP hold ids in \[1, 50\]"),
        (lambda: per_token.generate(lm_model, np.ones((2, 3), np.int32), lengths, 0, step), "num_new=0"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_api_data_optim_and_exits():
    from eejax.data import pipeline
    from eejax.data.lm import WindowIterator
    from eejax.exits import engine
    from eejax.train import default_optim_config, make_optimizer

    ds = pipeline.get_dataset("mnist_embedded", "validation")

    def optim(**kw):
        cfg = default_optim_config()
        cfg.update(**kw)
        return lambda: make_optimizer(cfg)

    cases = [
        (lambda: pipeline.BatchIterator(ds, -8), "batch_size=-8 must be an integer >= 1"),
        (lambda: pipeline.BatchIterator(ds, 0), "batch_size=0"),
        (lambda: pipeline.BatchIterator(ds, 2.5), "batch_size=2.5"),
        (lambda: WindowIterator(np.arange(100), -1, 8), "batch_size=-1"),
        (lambda: WindowIterator(np.arange(100), 2, 0), "seq_len=0"),
        (optim(lr=-1.0), "lr=-1.0 must be a finite number > 0"),
        (optim(lr=float("nan")), "lr=nan"),
        (optim(weight_decay=-1.0), "weight_decay=-1.0"),
        (optim(b1=1.5), "b1=1.5"),
        (optim(grad_clip=float("inf")), "grad_clip=inf"),
        (lambda: engine.exit_layers_from([], 4), r"exits=\[\] names no exit"),
        (lambda: engine.exit_layers_from([7], 4), r"exit layers \[7\] outside"),
        (lambda: pipeline.split_train_val(pipeline.get_dataset("mnist_embedded", "train"), 1.0, 0), "val_fraction"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_cli_wrapper_one_line_for_user_errors_traceback_for_bugs(capsys, monkeypatch):
    from eejax.train import NonFiniteLossError

    monkeypatch.delenv("EEJAX_DEBUG", raising=False)

    def raising(exc):
        @run.cli
        def main(argv=None):
            raise exc
        return main

    line = _assert_one_line_exit_2(capsys, lambda: raising(ValueError("x=3 is\nbad"))([]), "error: x=3 is bad; ")
    assert line.endswith("fix the value (see the config's runbook and --help)")
    line = _assert_one_line_exit_2(capsys, lambda: raising(NonFiniteLossError("step 3: loss=nan"))([]), "loss=nan")
    assert "grad_clip" in line
    with pytest.raises(KeyError):  # a bug, not a bad input: the traceback stays
        raising(KeyError("bug"))([])
    with pytest.raises(ValueError):
        raising(ValueError("x"))(["--debug"])


# ------------------------------------------------------------------------------------------ issue 23: harness


def test_empty_config_argument_is_refused(capsys):
    from experiments import lgvit

    _assert_one_line_exit_2(capsys, lambda: lgvit.main([f"--config={CONFIGS['lgvit']}:"]),
                            "empty config argument after ':'")
    proc = subprocess.run([str(ROOT / "launch.sh"), "--dry-run", "lgvit:"], capture_output=True, text=True,
                          env={**os.environ, "EEJAX_PYTHON": sys.executable})
    assert proc.returncode == 2 and "empty config argument" in proc.stderr


def test_refused_run_does_not_bind_its_workdir(capsys, tmp_path):
    """A check that fails after the workdir was opened (a bad model_workdir) leaves no record behind, so the
    corrected command is not refused as "a different config"."""
    from experiments import mue

    (tmp_path / "file").write_text("not a folder")
    work = tmp_path / "new" / "w"
    argv = [f"--config={CONFIGS['mue']}:smoke", f"--workdir={work}", f"--config.model_workdir={tmp_path / 'file'}"]
    _assert_one_line_exit_2(capsys, lambda: mue.main(argv), "model_workdir")
    assert not (tmp_path / "new").exists()  # the folders it created are gone with the record
    existing = tmp_path / "existing"
    existing.mkdir()
    argv = [f"--config={CONFIGS['mue']}:smoke", f"--workdir={existing}", f"--config.model_workdir={tmp_path / 'file'}"]
    _assert_one_line_exit_2(capsys, lambda: mue.main(argv), "model_workdir")
    assert existing.is_dir() and not list(existing.iterdir())  # an empty folder it did not create stays


def test_run_config_that_is_not_a_record_is_one_line(capsys, tmp_path):
    from experiments import lgvit

    for junk in ("[]", "3", '{"config": []}', "\x00\xff"):
        (tmp_path / run.RUN_CONFIG).write_text(junk)
        _assert_one_line_exit_2(capsys, lambda: lgvit.main([f"--config={CONFIGS['lgvit']}:smoke",
                                                            f"--workdir={tmp_path}"]), str(tmp_path / run.RUN_CONFIG))
        assert (tmp_path / run.RUN_CONFIG).read_text() == junk


def test_results_file_in_the_way_is_refused_before_any_work(capsys, tmp_path):
    from experiments import lgvit

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "results").write_text("a file where the results folder goes")
    _assert_one_line_exit_2(capsys, lambda: lgvit.main([f"--config={CONFIGS['lgvit']}:smoke",
                                                        f"--workdir={tmp_path / 'w'}"]), "is a file, not a folder")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["results"]  # not bound either
    (tmp_path / "out" / "lgvit.md").mkdir(parents=True)
    _assert_one_line_exit_2(capsys, lambda: lgvit.main([f"--config={CONFIGS['lgvit']}:smoke",
                                                        f"--workdir={tmp_path / 'w2'}", f"--outdir={tmp_path / 'out'}"]),
                            "is a folder where the results file goes")


def test_fresh_rerun_resumes_the_subfolder_of_its_config(tmp_path, capsys):
    base = config.load(f"{CONFIGS['lgvit']}:smoke")
    assert run.open_workdir(tmp_path, base) == tmp_path
    run.release_locks()
    other = config.load(f"{CONFIGS['lgvit']}:smoke")
    with other.unlocked():
        other.seed = 1
    third = config.load(f"{CONFIGS['lgvit']}:smoke")
    with third.unlocked():
        third.seed = 2
    for cfg, want in ((other, "fresh-1"), (other, "fresh-1"), (third, "fresh-2"), (other, "fresh-1"),
                      (third, "fresh-2")):
        assert run.open_workdir(tmp_path, cfg, fresh=True) == tmp_path / want
        run.release_locks()
    assert "(resumed)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh-1", "fresh-2", run.RUN_CONFIG]


def _write_lock(directory, **holder):
    (directory / run.LOCK).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "command": "python x",
                                                  "started": "2026-01-01 00:00:00 UTC", **holder}))


def test_locks_that_cannot_be_judged_name_break_lock(tmp_path, capsys):
    from eejax.errors import WorkdirLockedError

    cases = {
        "garbage": lambda d: (d / run.LOCK).write_text("}}} not json"),
        "directory": lambda d: (d / run.LOCK).mkdir(),
        "other_host": lambda d: _write_lock(d),
    }
    for name, make in cases.items():
        d = tmp_path / name
        d.mkdir()
        make(d)
        with pytest.raises(WorkdirLockedError) as exc:
            run.WorkdirLock(d).acquire()
        line = run.error_line(exc.value)
        assert "--break-lock" in line, line
        assert "wait for that run to finish" in line
        lock = run.WorkdirLock(d).acquire(break_lock=True)
        assert json.loads((d / run.LOCK).read_text())["pid"] == os.getpid()
        lock.release()
        assert "--break-lock: removed the lock" in capsys.readouterr().err
    (tmp_path / "full" / run.LOCK).mkdir(parents=True)
    (tmp_path / "full" / run.LOCK / "x").write_text("")
    with pytest.raises(WorkdirLockedError, match="remove it by hand"):
        run.WorkdirLock(tmp_path / "full").acquire(break_lock=True)


def test_lock_of_a_reused_pid_is_stale(tmp_path, capsys):
    """The recorded pid is alive but is another process: its start time (or, for locks of older code, its
    command) differs from the holder's."""
    import socket

    host = socket.gethostname()
    for holder in ({"process_start": "another-boot:1"}, {"command": "python -m experiments.other --x=1"}):
        _write_lock(tmp_path, host=host, **holder)
        lock = run.WorkdirLock(tmp_path).acquire()
        assert "now belongs to another process" in capsys.readouterr().err
        lock.release()
    # Its own live holder (same start) is respected.
    _write_lock(tmp_path, host=host, process_start=run._process_start(os.getpid()))
    with pytest.raises(run.WorkdirLockedError):
        run.WorkdirLock(tmp_path).acquire()


def test_break_lock_flag_reaches_every_lock_of_the_run(capsys, tmp_path):
    from experiments import mue

    work, shared = tmp_path / "w", tmp_path / "shared"
    for d in (work, shared):
        d.mkdir()
        _write_lock(d)
    argv = [f"--config={CONFIGS['mue']}:smoke", f"--workdir={work}", f"--config.model_workdir={shared}",
            "--config.train.steps=0"]
    line = _assert_one_line_exit_2(capsys, lambda: mue.main(argv[:-1]), "is in use by pid")
    assert "--break-lock" in line and "cannot be checked from here" in line
    # With --break-lock both locks (the workdir's, then the shared model_workdir's) are taken over; the run then
    # stops at a bad value that is checked after the model_workdir was opened.
    (shared / "ckpt").mkdir()  # a shared folder without a record: refused after its lock was taken
    line = _assert_one_line_exit_2(capsys, lambda: mue.main(argv[:-1] + ["--break-lock"]), "holds files but no")
    assert "model_workdir" in line
    assert not (work / run.LOCK).exists() and not (shared / run.LOCK).exists()


_HOLD = """
import sys, time
from eejax.harness import config, run

@run.cli
def main(argv=None):
    cfg, args = config.parse_cli(argv)
    run.prepare(cfg, args, "lgvit")
    print("ready", flush=True)
    time.sleep(120)

main()
"""


def _holder(tmp_path, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EEJAX_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, f"--config={CONFIGS['lgvit']}:smoke",
                             f"--workdir={tmp_path / 'w'}", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


@pytest.mark.parametrize("sig,code,what", [("SIGTERM", 143, "stopped by SIGTERM"),
                                           ("SIGINT", 130, "interrupted (Ctrl-C)")])
def test_signals_release_the_locks_with_one_line(sig, code, what, tmp_path):
    import signal

    proc = _holder(tmp_path, f"--outdir={tmp_path / 'out'}")
    assert (tmp_path / "w" / run.LOCK).exists() and (tmp_path / "out" / ".lgvit.lock").exists()
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {what}") and "Traceback" not in err, err
    assert not (tmp_path / "w" / run.LOCK).exists() and not (tmp_path / "out" / ".lgvit.lock").exists()


def test_two_runs_writing_one_outdir_are_refused(capsys, tmp_path):
    from experiments import lgvit

    proc = _holder(tmp_path, f"--outdir={tmp_path / 'out'}")
    try:
        argv = [f"--config={CONFIGS['lgvit']}:smoke", f"--workdir={tmp_path / 'other'}",
                f"--outdir={tmp_path / 'out'}"]
        _assert_one_line_exit_2(capsys, lambda: lgvit.main(argv), f"is in use by pid {proc.pid}")
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "other").exists()  # refused: not bound either


# ---------------------------------------------------------------------------------------- issue 23: the API


def test_api_model_configs_refuse_sizes_by_name():
    from eejax.models import cbnet, diffusion, encoder, lm, perceiver, vit

    cases = [
        (lambda: vit.ViTConfig(num_classes=0), "num_classes=0 must be an integer >= 2"),
        (lambda: vit.ViTConfig(d_model=-8), "d_model=-8 must be an integer >= 1"),
        (lambda: vit.ViTConfig(patch_size=0), "patch_size=0"),
        (lambda: vit.ViTConfig(depth=0), "depth=0"),
        (lambda: vit.ViTConfig(mlp_dim=0), "mlp_dim=0"),
        (lambda: vit.ViTConfig(d_model=64.0), "d_model=64.0 must be an integer"),
        (lambda: lm.LMConfig(d_model=-8), "d_model=-8"),
        (lambda: lm.LMConfig(vocab_size=1), "vocab_size=1 must be an integer >= 2"),
        (lambda: lm.LMConfig(norm_eps=0.0), "norm_eps=0.0 must be a finite number > 0"),
        (lambda: lm.LMConfig(rope_base=float("nan")), "rope_base=nan"),
        (lambda: encoder.EncoderConfig(num_classes=0), "num_classes=0"),
        (lambda: encoder.EncoderConfig(max_len=0), "max_len=0"),
        (lambda: perceiver.PerceiverConfig(num_classes=0), "num_classes=0"),
        (lambda: perceiver.PerceiverConfig(width=-8), "width=-8"),
        (lambda: diffusion.UViTConfig(num_classes=-1), "num_classes=-1 must be an integer >= 0"),
        (lambda: diffusion.UViTConfig(d_model=-8), "d_model=-8"),
        (lambda: cbnet.AutoencoderConfig(image_shape=(28, 28)), r"image_shape=\(28, 28\) must be"),
        (lambda: cbnet.AutoencoderConfig(hidden=(64, 0)), r"hidden\[1\]=0"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_api_inputs_lists_and_empty_batches(vit_model, lm_model):
    cases = [
        (lambda: vit_model.all_exits(np.zeros((2, 28, 28, 1), np.float32).tolist()),
         "images must be a numpy or JAX array, got list"),
        (lambda: vit_model.all_exits(np.zeros((0, 28, 28, 1), np.float32)), "hold no example"),
        (lambda: vit_model.dynamic(np.zeros((0, 28, 28, 1), np.float32), 0.5), "hold no example"),
        (lambda: lm_model([[1, 2, 3]]), "tokens must be a numpy or JAX array, got list"),
        (lambda: lm_model(np.zeros((0, 3), np.int32)), "hold no example"),
        (lambda: lm_model(np.zeros((2, 0), np.int32)), r"hold no token \(T=0\)"),
        (lambda: lm_model(np.array([1, 2, 3], np.int32)), "must have 2 axes"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_api_data_iterators_refuse_what_they_would_cast():
    from eejax.data import pipeline
    from eejax.data.lm import WindowIterator

    cases = [
        (lambda: WindowIterator(np.linspace(0.0, 1.0, 100), 2, 8), "ids_N must be a numpy array of integer token "
                                                                   "ids, got float64"),
        (lambda: WindowIterator(list(range(100)), 2, 8), "got list"),
        (lambda: WindowIterator(-np.arange(100), 2, 8), r"ids_N hold ids in \[-99, 0\]"),
        (lambda: WindowIterator(np.arange(100), 2, 8, seed=-1), "seed=-1 must be an integer >= 0"),
        (lambda: pipeline.BatchIterator(pipeline.get_dataset("mnist_embedded", "validation"), 8, seed=-1),
         "seed=-1 must be an integer >= 0"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
