"""Checkpoints that are verified and fall back, results replaced only by a finished run (issue 11)."""
import json
import os
import pathlib
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_script_for_tests as script
from eejax.harness import results
from eejax.train import CHECKSUM_FILE, NoGoodCheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _params(state):
    return jax.tree.map(np.asarray, state.params)


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE]
    return max(files, key=lambda p: p.stat().st_size)


def _bit_flip(step_dir):
    f = _largest_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def _truncate(step_dir):
    f = _largest_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _drop_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """A 10-step run with checkpoints at 5 and 10, and its final params."""
    workdir = tmp_path_factory.mktemp("straight")
    with script.make_trainer(workdir) as trainer:
        return workdir, _params(trainer.fit(script.Batches(), 10))


@pytest.mark.parametrize("corrupt", [_bit_flip, _truncate, _drop_metadata], ids=["bit_flip", "truncation",
                                                                                 "missing_metadata"])
def test_corrupt_newest_checkpoint_falls_back_to_previous_good_step(corrupt, straight_run, tmp_path, capfd):
    src, final = straight_run
    subprocess.run(["cp", "-a", f"{src}/.", str(tmp_path)], check=True)
    corrupt(tmp_path / "ckpt" / "10")
    with script.make_trainer(tmp_path) as trainer:
        assert trainer.checkpointer.latest_good_step() == 5  # what a NaN stop would name as "last good"
        state = trainer.fit(script.Batches(), 10)
        assert trainer.checkpointer.all_steps() == [5, 10]
    out, err = capfd.readouterr()
    assert "resumed from step 5" in out
    warnings = [line for line in err.splitlines() if "checkpoint step 10" in line]
    assert len(warnings) == 1 and "is unusable (corrupt: " in warnings[0]
    assert (tmp_path / "ckpt" / "corrupt-10").is_dir()  # kept for inspection, out of orbax's way
    # Retrained from step 5: the same parameters, bit for bit, as the uninterrupted run.
    jax.tree.map(np.testing.assert_array_equal, _params(state), final)


def test_no_good_checkpoint_is_one_clear_error(straight_run, tmp_path):
    src, _ = straight_run
    subprocess.run(["cp", "-a", f"{src}/.", str(tmp_path)], check=True)
    _bit_flip(tmp_path / "ckpt" / "10")
    _drop_metadata(tmp_path / "ckpt" / "5")
    with script.make_trainer(tmp_path) as trainer:
        with pytest.raises(NoGoodCheckpointError) as exc:
            trainer.fit(script.Batches(), 10)
    msg = str(exc.value)
    assert "\n" not in msg and "step 10 corrupt: sha256 mismatch" in msg and "step 5 corrupt: missing file" in msg
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["10", "5"]  # untouched


def test_checkpoints_are_sealed(straight_run):
    src, _ = straight_run
    for step in (5, 10):
        sums = json.loads((src / "ckpt" / str(step) / CHECKSUM_FILE).read_text())["sha256"]
        assert "state/_METADATA" in sums and len(sums) > 3


# --------------------------------------------------------------------------------------------------- results


def _write(outdir, tag, crash=None):
    code = ("import sys; from eejax.harness import results; "
            "results.write_results(sys.argv[1], 'res', f'# {sys.argv[2]}\\n', {'tag': sys.argv[2]}, overwrite=True)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(results.CRASH_ENV, None)
    if crash:
        env[results.CRASH_ENV] = crash
    return subprocess.run([sys.executable, "-c", code, str(outdir), tag], env=env, capture_output=True, text=True)


def _pair(outdir):
    return (outdir / "res.md").read_text(), json.loads((outdir / "res.json").read_text())["tag"]


def test_killed_during_results_write_keeps_old_results(tmp_path):
    assert _write(tmp_path, "old").returncode == 0
    assert _pair(tmp_path) == ("# old\n", "old")
    for f in ("res.md", "res.json"):  # results are for everyone to read
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644
    killed = _write(tmp_path, "new", crash="staged")  # every file written, nothing renamed yet
    assert killed.returncode == 17
    assert _pair(tmp_path) == ("# old\n", "old")
    assert list(tmp_path.glob(".staging-*"))  # the dead run's staging folder ...
    results.recover_results(tmp_path)
    assert not list(tmp_path.glob(".staging-*")) and _pair(tmp_path) == ("# old\n", "old")  # ... is dropped


def test_killed_between_the_renames_is_completed_never_a_half_pair(tmp_path):
    assert _write(tmp_path, "old").returncode == 0
    killed = _write(tmp_path, "new", crash="renaming")  # the json moved, the md not yet
    assert killed.returncode == 17
    assert (tmp_path / results.JOURNAL).exists()
    results.recover_results(tmp_path)  # (done by the next run that opens this outdir)
    assert _pair(tmp_path) == ("# new\n", "new") and not (tmp_path / results.JOURNAL).exists()


def test_failed_run_leaves_results_alone(tmp_path):
    results.write_results(tmp_path, "res", "# old\n", {"tag": "old"})
    with pytest.raises(RuntimeError):
        with results.StagedResults(tmp_path, overwrite=True) as stage:
            stage.write_results("res", "# new\n", {"tag": "new"})
            raise RuntimeError("evaluation failed")
    assert _pair(tmp_path) == ("# old\n", "old") and not list(tmp_path.glob(".staging-*"))
    with pytest.raises(FileExistsError, match="res.md exists"):
        results.write_results(tmp_path, "res", "# new\n", {"tag": "new"})


# ------------------------------------------------------------------------------ checkpoints: issue 23 faults


def _copy(src, dst):
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)


def test_a_step_is_committed_with_its_checksum(tmp_path, monkeypatch):
    """The seal is written into orbax's temporary step folder before orbax renames it: no step is ever committed
    without it, so a kill anywhere after a save cannot leave an unverified step (issue 23)."""
    from eejax.train import Checkpointer

    # Without the fallback that seals after the commit, only the pre-commit seal can have written it.
    monkeypatch.setattr(Checkpointer, "_seal_when_committed", lambda self: self._mngr.wait_until_finished())
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, {"w": np.arange(4.0)}, {"pos": 3})
    ckpt.wait()
    assert (tmp_path / "ckpt" / "3" / CHECKSUM_FILE).exists()
    ckpt.close()
    assert Checkpointer(tmp_path / "ckpt").verify(3) is None


def test_unsealed_newest_step_is_not_preferred_over_a_sealed_older_one(straight_run, tmp_path, capfd):
    src, final = straight_run
    _copy(src, tmp_path)
    (tmp_path / "ckpt" / "10" / CHECKSUM_FILE).unlink()  # killed between orbax's commit and the seal ...
    _bit_flip(tmp_path / "ckpt" / "10")                   # ... and damaged since: it must not be used
    with script.make_trainer(tmp_path) as trainer:
        state = trainer.fit(script.Batches(), 10)
    out, err = capfd.readouterr()
    assert "resumed from step 5" in out
    lines = [line for line in err.splitlines() if "step 10" in line]
    assert len(lines) == 1 and "has no checksum" in lines[0] and "unsealed-10" in lines[0], err
    assert (tmp_path / "ckpt" / "unsealed-10").is_dir()
    jax.tree.map(np.testing.assert_array_equal, _params(state), final)


def test_only_unsealed_steps_are_restored_with_a_note(straight_run, tmp_path, capfd):
    src, final = straight_run
    _copy(src, tmp_path)
    for step in (5, 10):
        (tmp_path / "ckpt" / str(step) / CHECKSUM_FILE).unlink()
    with script.make_trainer(tmp_path) as trainer:
        state = trainer.fit(script.Batches(), 10)
    out, err = capfd.readouterr()
    assert "resumed from step 10" in out and "restored it unverified" in err
    jax.tree.map(np.testing.assert_array_equal, _params(state), final)


@pytest.mark.parametrize("how", ["permission", "dangling_link"])
def test_an_unreadable_file_makes_a_bad_step_not_an_abort(how, straight_run, tmp_path, capfd, monkeypatch):
    from eejax.train import checkpoint

    src, final = straight_run
    _copy(src, tmp_path)
    victim = _largest_file(tmp_path / "ckpt" / "10")
    if how == "permission":  # (chmod 000 does not stop root, so the read itself is made to fail)
        real_open, denied = open, []

        def open_denied(path, *a, **kw):
            if os.path.abspath(path) == str(victim) and not denied:  # the old step's file, not the rewritten one
                denied.append(path)
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **kw)

        monkeypatch.setattr(checkpoint, "open", open_denied, raising=False)
    else:
        victim.unlink()
        victim.symlink_to(tmp_path / "nowhere")
    with script.make_trainer(tmp_path) as trainer:
        state = trainer.fit(script.Batches(), 10)
    out, err = capfd.readouterr()
    assert "resumed from step 5" in out and "step 10" in err and "unreadable file" in err
    jax.tree.map(np.testing.assert_array_equal, _params(state), final)


def test_checkpoint_of_another_model_or_dtype_is_one_clear_refusal(straight_run, tmp_path):
    import jax.numpy as jnp

    from eejax.train import CheckpointMismatchError

    src, _ = straight_run
    _copy(src, tmp_path)
    wider = {"w": np.zeros((script.D, script.C), np.float32), "b": np.zeros((script.C + 1,), np.float32)}
    with script.make_trainer(tmp_path, params=wider) as trainer:
        with pytest.raises(CheckpointMismatchError, match=r"holds params.b as float32\[4\], the model to resume has "
                                                          r"float32\[5\]"):
            trainer.fit(script.Batches(), 15)
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), script.init_params())
    with script.make_trainer(tmp_path, params=bf16) as trainer:
        with pytest.raises(CheckpointMismatchError, match=r"as float32\[4\], the model to resume has bfloat16\[4\] "
                                                          r"\(a resume would cast it silently\)"):
            trainer.fit(script.Batches(), 15)
    # Not corruption: nothing was set aside.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("_")) == ["10", "5"]


_CLI_TRAIN = """
import errno, sys
sys.path.insert(0, {tests!r})
import train_script_for_tests as script
from eejax.harness import run
if sys.argv[2] == "disk_full":
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as h
    async def full(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device")
    h.JsonCheckpointHandler._save_fn = full

@run.cli
def main(argv=None):
    script.main(sys.argv[1], 10)

main()
"""


@pytest.mark.parametrize("fault", ["disk_full", "folder_is_a_file"])
def test_checkpoint_write_faults_are_one_line_with_the_right_hint_and_no_hang(fault, tmp_path):
    work = tmp_path / "w"
    if fault == "folder_is_a_file":
        work.mkdir()
        (work / "ckpt").write_text("not a folder")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EEJAX_NO_PROGRESS": "1"}
    env.pop("EEJAX_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", _CLI_TRAIN.format(tests=str(ROOT / "tests")), str(work), fault],
                          env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    if fault == "disk_full":
        assert "no space left on device writing checkpoint step 5" in lines[0] and "free space" in lines[0]
    else:
        assert f"the checkpoint folder {work / 'ckpt'} is not a folder" in lines[0]
        assert "move that file away" in lines[0]
