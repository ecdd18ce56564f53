"""Checkpoints of the train state together with the data-iterator position, for exact resumption.

Layout: `<directory>/<step>/{state,data}` written by one orbax `CheckpointManager`: `state` is the TrainState
pytree (`StandardSave`; params may be a dict or an `nnx.State`), `data` the iterator's `state_dict()` as JSON.
Saves are asynchronous (the device-to-host copy happens before `save` returns); orbax commits a step
atomically, so a process killed mid-save leaves the previous checkpoint as the latest one.
The iterator position is the one of process 0: multi-host input pipelines must be deterministic per step.

Verified: when orbax has written every file of a step, and before it commits the step (renames its temporary
folder), the sha256 of each file is written beside them (`<step>/eejax_sha256.json`, "sealing" the step, from orbax's
post-finalization callback), so every step orbax commits is sealed with it. Two files orbax itself rewrites at the
commit (`_CHECKPOINT_METADATA`, `commit_success.txt` of the step folder) are not covered; orbax checks the first on
restore. (Where the temporary folder is not found, a background thread seals the step right after its commit.)
A restore checks the checksum first; a step
whose files differ (a bit flip, a truncated or missing file, say `_METADATA`), whose files cannot be read, or that
orbax cannot read is reported in one line on stderr, moved aside to `<directory>/corrupt-<step>`, and the newest
good step is used instead (`restore_latest_good`). An unsealed step is never preferred silently: a sealed older
step is used and the unsealed one moved to `unsealed-<step>` with a warning; only when no sealed step restores is
an unsealed one used, with a note saying it was restored unverified. With no good step left,
`NoGoodCheckpointError` says so in one line.

Before orbax reads a step, the shapes and dtypes it stores are compared with the ones to restore into: a checkpoint
of another model (a changed width) or another dtype (a bfloat16 model resuming a float32 run, which orbax would
cast silently) is refused with one line naming the first differing array (`CheckpointMismatchError`). Write
failures (disk full, the checkpoint folder replaced by a file, no permission) are one `DiskFullError` /
`CheckpointError` line; orbax's own error logs are kept off stderr unless EEJAX_DEBUG=1 (``--debug``).
"""
import errno
import hashlib
import json
import logging
import os
import sys
import threading
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from eejax.errors import CheckpointError, CheckpointMismatchError, DiskFullError, NoGoodCheckpointError


CHECKSUM_FILE = "eejax_sha256.json"
DEBUG_ENV = "EEJAX_DEBUG"
# Written by orbax at the step folder's root after the seal (the commit timestamp, the success marker).
ORBAX_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary step folder: <directory>/<step><TMP_SUFFIX>




def step_digest(step_dir: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``step_dir`` except the checksum file itself and the files
    orbax rewrites when it commits the step (``ORBAX_COMMIT_FILES``)."""
    out = {}
    for root, dirs, names in os.walk(step_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel in (CHECKSUM_FILE, f".{CHECKSUM_FILE}.tmp") or rel in ORBAX_COMMIT_FILES:
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def write_checksums(step_dir: str | os.PathLike) -> None:
    """Seals ``step_dir``: its ``step_digest`` in ``CHECKSUM_FILE`` (written to a temporary name, then renamed)."""
    digest = step_digest(step_dir)
    tmp = os.path.join(step_dir, f".{CHECKSUM_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump({"sha256": digest}, f, indent=0, sort_keys=True)
    os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _disk_full(e: BaseException) -> bool:
    return any(getattr(x, "errno", None) == errno.ENOSPC or "No space left on device" in str(x) for x in _chain(e))


def _not_a_folder_error(directory: str) -> CheckpointError:
    err = CheckpointError(f"the checkpoint folder {directory} is not a folder (a file is in its place)")
    err.hint = "the checkpoint folder is not a folder: move that file away or choose another --workdir"
    return err


def check_folder(directory: str | os.PathLike) -> None:
    """`CheckpointError` when `directory` (or a parent) exists as something other than a folder."""
    path = os.path.abspath(directory)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        raise _not_a_folder_error(path)


def _write_error(e: BaseException, directory: str, step: int | None) -> CheckpointError | DiskFullError:
    """One clear error for a failed checkpoint write, whatever orbax wrapped it in."""
    what = f"checkpoint step {step}" if step is not None else "the checkpoint folder"
    if _disk_full(e):
        full = DiskFullError(f"no space left on device writing {what} in {directory}")
        full.errno = errno.ENOSPC
        return full
    try:
        check_folder(directory)
    except CheckpointError as not_folder:
        return not_folder
    if any(isinstance(x, PermissionError) for x in _chain(e)):
        err = CheckpointError(f"no permission to write {what} in {directory}")
        err.hint = "make that folder writable or choose another --workdir"
        return err
    return CheckpointError(f"writing {what} in {directory} failed: {_first_line(e)}")


class _DropOrbaxErrors(logging.Filter):
    """Orbax logs every failure of its background threads with a traceback (dozens for one full disk) before the
    exception reaches us; we raise one line instead. EEJAX_DEBUG=1 keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
        return not (orbax and record.levelno >= logging.ERROR and os.environ.get(DEBUG_ENV, "") in ("", "0"))


_ORBAX_FILTER = _DropOrbaxErrors()


def _quiet_orbax() -> None:
    for name in ("absl", "orbax"):
        logger = logging.getLogger(name)
        if _ORBAX_FILTER not in logger.filters:
            logger.addFilter(_ORBAX_FILTER)


def _key_name(entry) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def array_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` of a tree of arrays or shape structs, named as orbax names them."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): (tuple(x.shape), np.dtype(x.dtype)) for path, x in leaves}


def stored_specs(state_dir: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of the arrays an orbax `StandardSave` folder holds (from its metadata only)."""
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    tree = getattr(metadata, "tree", metadata)
    out = {}
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "name") and hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out[str(leaf.name)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return out


def spec_mismatch(stored: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> str | None:
    """What differs between a checkpoint's arrays and the ones to restore into; None when they agree (or when the
    names cannot be matched at all, which leaves the verdict to orbax)."""
    # Parameters first: the message should name a weight, not its optimizer moment.
    common = sorted(set(stored) & set(wanted), key=lambda n: (not n.startswith("params"), n))
    if not common:
        return None
    for name in common:
        (s_shape, s_dtype), (w_shape, w_dtype) = stored[name], wanted[name]
        if s_shape != w_shape or s_dtype != w_dtype:
            return (f"it holds {name} as {s_dtype.name}{list(s_shape)}, the model to resume has "
                    f"{w_dtype.name}{list(w_shape)}" + (" (a resume would cast it silently)"
                                                         if s_shape == w_shape else ""))
    if missing := sorted(set(wanted) - set(stored)):
        return f"it has no {missing[0]}" + (f" (and {len(missing) - 1} more arrays)" if len(missing) > 1 else "")
    if extra := sorted(set(stored) - set(wanted)):
        return f"it holds {extra[0]}, which the model to resume has not" + (
            f" (and {len(extra) - 1} more arrays)" if len(extra) > 1 else "")
    return None


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: dict[str, Any]


class Checkpointer:
    """`save(step, state, data_state)` / `restore(abstract_state)` over an orbax CheckpointManager."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2,
                 metadata: Mapping[str, Any] | None = None):
        self.directory = os.path.abspath(directory)
        check_folder(self.directory)
        _quiet_orbax()
        try:
            self._mngr = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep, create=True,
                    async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_before_commit)),
                metadata=dict(metadata) if metadata else None)
        except Exception as e:  # noqa: BLE001 (orbax raises many kinds; all mean "cannot write here")
            raise _write_error(e, self.directory, None) from e
        self._is_chief = jax.process_index() == 0
        self._saving: int | None = None          # the step of the save in flight (read by orbax's callback)
        self._unsealed: list[int] = []           # saved, not yet sealed (guarded by joining the sealer thread)
        self._sealer: threading.Thread | None = None
        self._sealer_error: BaseException | None = None
        self._failed = False                     # a write failed: orbax's manager is not waited on again

    def latest_step(self) -> int | None:
        self._seal()
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        self._seal()
        return list(self._mngr.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
        """Starts an asynchronous save of `step`; it is sealed in the background as soon as orbax commits it."""
        self._seal()  # the previous save must be finished (and sealed) before this one starts anyway
        check_folder(self.directory)
        self._saving = step
        try:
            self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          data=ocp.args.JsonSave(dict(data_state))))
        except Exception as e:  # noqa: BLE001
            self._failed = True
            raise _write_error(e, self.directory, step) from e
        self._unsealed.append(step)
        self._sealer = threading.Thread(target=self._seal_when_committed, name=f"eejax-seal-{step}", daemon=True)
        self._sealer.start()

    def _seal_before_commit(self) -> None:
        """Orbax's post-finalization callback (its save thread): every file of the step is in its temporary folder,
        which orbax renames next, so the checksum is committed with the step."""
        tmp_dir = os.path.join(self.directory, f"{self._saving}{TMP_SUFFIX}")
        if self._is_chief and self._saving is not None and os.path.isdir(tmp_dir):
            write_checksums(tmp_dir)

    def _seal_when_committed(self) -> None:
        """Background thread: waits for orbax's commit, then seals each committed step the callback did not."""
        try:
            self._mngr.wait_until_finished()
            for step in self._unsealed:
                step_dir = self.step_dir(step)
                if self._is_chief and os.path.isdir(step_dir) and not os.path.exists(
                        os.path.join(step_dir, CHECKSUM_FILE)):  # (a step may already be garbage-collected)
                    write_checksums(step_dir)
            self._unsealed = []
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread by _seal)
            self._sealer_error = e

    def _seal(self) -> None:
        """Waits for the pending save and its seal; a failed save raises its one-line error here."""
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        if self._sealer_error is not None:
            e, self._sealer_error = self._sealer_error, None
            steps, self._unsealed = self._unsealed, []
            self._failed = True
            raise _write_error(e, self.directory, steps[0] if steps else None) from e

    def verify(self, step: int) -> str | None:
        """None if step's files match its checksum; else what is wrong. "unsealed" when it has no checksum. Any
        error reading the step (a permission, a vanished file) makes it a bad step, never an abort."""
        step_dir = self.step_dir(step)
        try:
            with open(os.path.join(step_dir, CHECKSUM_FILE)) as f:
                want = json.load(f)["sha256"]
            if not isinstance(want, dict):
                raise TypeError(f"sha256 is a {type(want).__name__}")
            want = {k: v for k, v in want.items() if k not in ORBAX_COMMIT_FILES}  # (sealed by older code)
        except FileNotFoundError:
            return "unsealed"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable checksum file ({_first_line(e)})"
        try:
            have = step_digest(step_dir)
        except OSError as e:
            return f"unreadable file ({_first_line(e)})"
        if missing := sorted(set(want) - set(have)):
            return f"missing file {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        if bad := sorted(k for k in want if have[k] != want[k]):
            return f"sha256 mismatch in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        if extra := sorted(set(have) - set(want)):
            return f"unexpected file {extra[0]}"
        return None

    def latest_good_step(self) -> int | None:
        """The newest step whose files match its checksum (or that has none yet); no restore is attempted."""
        self._seal()
        for step in sorted(self.all_steps(), reverse=True):
            if self.verify(step) in (None, "unsealed"):
                return step
        return None

    def _check_specs(self, abstract_state: Any, step: int) -> None:
        try:
            stored = stored_specs(os.path.join(self.step_dir(step), "state"))
        except Exception:  # noqa: BLE001 (unreadable metadata: orbax's restore reports it as a bad step)
            return
        if problem := spec_mismatch(stored, array_specs(abstract_state)):
            raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory} was written by another "
                                          f"model: {problem}")

    def _orbax_restore(self, abstract_state: Any, step: int) -> Restored:
        self._check_specs(abstract_state, step)
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               data=ocp.args.JsonRestore()))
        return Restored(step=step, state=out.state, data_state=out.data)

    def restore(self, abstract_state: Any, step: int | None = None) -> Restored:
        """Restores into `abstract_state`'s structure and shardings (a tree of `jax.ShapeDtypeStruct`).

        `step=None`: the newest good step (`restore_latest_good`); an explicit step that fails its checksum or
        cannot be read raises `CheckpointError`.
        """
        if step is None:
            restored = self.restore_latest_good(abstract_state)
            if restored is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            return restored
        self._seal()
        problem = self.verify(step)
        if problem not in (None, "unsealed"):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: {problem}")
        try:
            return self._orbax_restore(abstract_state, step)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 (orbax raises many kinds; all mean "cannot use this step")
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be restored: "
                                  f"{_first_line(e)}") from e

    def restore_latest_good(self, abstract_state: Any) -> Restored | None:
        """The newest sealed step that verifies and restores (else the newest unsealed one that restores, with a
        note); None if there is no step at all.

        Each bad step is reported in one line on stderr; once a good step is found, the bad newer ones are moved to
        `corrupt-<step>` (unsealed ones to `unsealed-<step>`) so training can write those steps again. No good
        step: `NoGoodCheckpointError`. A checkpoint of another model: `CheckpointMismatchError` (nothing moved).
        """
        self._seal()
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        bad: list[tuple[int, str]] = []
        unsealed: list[int] = []
        for step in steps:
            problem = self.verify(step)
            if problem == "unsealed":
                unsealed.append(step)  # tried only if no sealed step restores
                continue
            if problem is not None:
                bad.append((step, f"corrupt: {problem}"))
                continue
            if (restored := self._try_restore(abstract_state, step, bad)) is not None:
                self._set_aside(bad, step, [s for s in unsealed if s > step])
                return restored
        for step in unsealed:
            if (restored := self._try_restore(abstract_state, step, bad)) is not None:
                print(f"note: checkpoint step {step} in {self.directory} has no checksum (the run stopped before "
                      "it was sealed) and no sealed step could be restored; restored it unverified", file=sys.stderr,
                      flush=True)
                self._set_aside(bad, step, [])
                return restored
        bad += [(s, "cannot be restored (unsealed)") for s in unsealed if s not in {b for b, _ in bad}]
        what = "; ".join(f"step {s} {why}" for s, why in sorted(bad, reverse=True))
        raise NoGoodCheckpointError(f"no usable checkpoint in {self.directory}: {what}")

    def _try_restore(self, abstract_state: Any, step: int, bad: list[tuple[int, str]]) -> Restored | None:
        try:
            return self._orbax_restore(abstract_state, step)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001
            bad.append((step, f"cannot be restored: {_first_line(e)}"))
            return None

    def _set_aside(self, bad: list[tuple[int, str]], good_step: int, unsealed: list[int]) -> None:
        """Moves each bad newer step to `corrupt-<step>` and each unsealed newer one to `unsealed-<step>`, one line
        each on stderr."""
        bad = [(s, why) for s, why in bad if s > good_step]
        if not (bad or unsealed) or not self._is_chief:
            return
        moves = [(s, "corrupt", f"is unusable ({why})") for s, why in bad]
        moves += [(s, "unsealed", "has no checksum (the run stopped while sealing it), so it is not trusted")
                  for s in unsealed]
        for step, prefix, why in sorted(moves, reverse=True):
            dest, k = os.path.join(self.directory, f"{prefix}-{step}"), 1
            while os.path.exists(dest):
                dest, k = os.path.join(self.directory, f"{prefix}-{step}-{k}"), k + 1
            os.rename(self.step_dir(step), dest)
            print(f"warning: checkpoint step {step} in {self.directory} {why}; moved it to {dest} and resumed from "
                  f"step {good_step}", file=sys.stderr, flush=True)
        self._mngr.reload()

    def metadata(self) -> dict[str, Any]:
        """The `metadata` given when the directory was first created (empty if none)."""
        self._seal()
        metadata = self._mngr.metadata()  # RootMetadata in recent orbax, a plain dict in older releases.
        return dict(getattr(metadata, "custom_metadata", metadata) or {})

    def wait(self) -> None:
        """Waits for pending saves and seals them (writes their checksums)."""
        self._seal()

    def close(self) -> None:
        """Seals pending saves and closes orbax's manager. After a failed write it does neither (orbax would wait
        minutes for the signals of the step that failed): the error already raised says what happened."""
        if self._failed:
            return
        try:
            self._seal()
        finally:
            if not self._failed:
                self._mngr.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape/dtype structs of `tree` with `sharding`, the restore target for orbax."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
