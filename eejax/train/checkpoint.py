"""Checkpoints of the train state together with the data-iterator position, for exact resumption.

Layout: `<directory>/<step>/{state,data}` written by one orbax `CheckpointManager`: `state` is the TrainState
pytree (`StandardSave`; params may be a dict or an `nnx.State`), `data` the iterator's `state_dict()` as JSON.
Saves are asynchronous (the device-to-host copy happens before `save` returns); orbax commits a step
atomically, so a process killed mid-save leaves the previous checkpoint as the latest one.
The iterator position is the one of process 0: multi-host input pipelines must be deterministic per step.

Verified: once a save has finished, the sha256 of every file of its step directory is written beside them
(`<step>/eejax_sha256.json`, "sealing" the step). A restore checks it first; a step whose files differ (a bit flip,
a truncated or missing file, say `_METADATA`) or that orbax cannot read is reported in one line on stderr, moved
aside to `<directory>/corrupt-<step>`, and the newest good step is used instead (`restore_latest_good`). With no
good step left, `NoGoodCheckpointError` says so in one line. A step without a checksum (a run killed after orbax
committed the save but before it was sealed) is restored unverified if orbax can read it.
"""
import hashlib
import json
import os
import sys
from typing import Any, Mapping, NamedTuple

import jax
import orbax.checkpoint as ocp

from eejax.errors import CheckpointError, NoGoodCheckpointError


CHECKSUM_FILE = "eejax_sha256.json"




def step_digest(step_dir: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``step_dir`` except the checksum file itself."""
    out = {}
    for root, dirs, names in os.walk(step_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel in (CHECKSUM_FILE, f".{CHECKSUM_FILE}.tmp"):
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: dict[str, Any]


class Checkpointer:
    """`save(step, state, data_state)` / `restore(abstract_state)` over an orbax CheckpointManager."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2,
                 metadata: Mapping[str, Any] | None = None):
        self.directory = os.path.abspath(directory)
        self._mngr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            metadata=dict(metadata) if metadata else None)
        self._unsealed: list[int] = []
        self._is_chief = jax.process_index() == 0

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
        self._seal()  # the previous save must be finished (and sealed) before this one starts anyway
        self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(dict(data_state))))
        self._unsealed.append(step)

    def _seal(self) -> None:
        """Waits for pending saves and writes the checksum file of each finished step."""
        self._mngr.wait_until_finished()
        for step in self._unsealed:
            step_dir = self.step_dir(step)
            if self._is_chief and os.path.isdir(step_dir):  # (a step may already be garbage-collected)
                digest = step_digest(step_dir)
                tmp = os.path.join(step_dir, f".{CHECKSUM_FILE}.tmp")
                with open(tmp, "w") as f:
                    json.dump({"sha256": digest}, f, indent=0, sort_keys=True)
                os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))
        self._unsealed = []

    def verify(self, step: int) -> str | None:
        """None if step's files match its checksum; else what is wrong. "unsealed" when it has no checksum."""
        step_dir = self.step_dir(step)
        try:
            with open(os.path.join(step_dir, CHECKSUM_FILE)) as f:
                want = json.load(f)["sha256"]
        except FileNotFoundError:
            return "unsealed"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable checksum file ({_first_line(e)})"
        have = step_digest(step_dir)
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

    def _orbax_restore(self, abstract_state: Any, step: int) -> Restored:
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
        except Exception as e:  # noqa: BLE001 (orbax raises many kinds; all mean "cannot use this step")
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be restored: "
                                  f"{_first_line(e)}") from e

    def restore_latest_good(self, abstract_state: Any) -> Restored | None:
        """The newest step that verifies and restores; None if there is no step at all.

        Each bad step is reported in one line on stderr; once a good step is found, the bad newer ones are moved to
        `corrupt-<step>` so training can write those steps again. No good step: `NoGoodCheckpointError`.
        """
        self._seal()
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        bad: list[tuple[int, str]] = []
        for step in steps:
            problem = self.verify(step)
            if problem not in (None, "unsealed"):
                bad.append((step, f"corrupt: {problem}"))
            else:
                try:
                    restored = self._orbax_restore(abstract_state, step)
                except Exception as e:  # noqa: BLE001
                    bad.append((step, f"cannot be restored: {_first_line(e)}"))
                else:
                    if problem == "unsealed":
                        print(f"note: checkpoint step {step} in {self.directory} has no checksum (the run stopped "
                              "before it was sealed); restored unverified", file=sys.stderr, flush=True)
                    self._set_aside(bad, step)
                    return restored
        what = "; ".join(f"step {s} {why}" for s, why in bad)
        raise NoGoodCheckpointError(f"no usable checkpoint in {self.directory}: {what}")

    def _set_aside(self, bad: list[tuple[int, str]], good_step: int) -> None:
        """Moves each bad step to `corrupt-<step>`, one line each on stderr."""
        if not bad or not self._is_chief:
            return
        for step, why in bad:
            dest, k = os.path.join(self.directory, f"corrupt-{step}"), 1
            while os.path.exists(dest):
                dest, k = os.path.join(self.directory, f"corrupt-{step}-{k}"), k + 1
            os.rename(self.step_dir(step), dest)
            print(f"warning: checkpoint step {step} in {self.directory} is unusable ({why}); moved it to {dest} "
                  f"and resumed from step {good_step}", file=sys.stderr, flush=True)
        self._mngr.reload()

    def metadata(self) -> dict[str, Any]:
        """The `metadata` given when the directory was first created (empty if none)."""
        metadata = self._mngr.metadata()  # RootMetadata in recent orbax, a plain dict in older releases.
        return dict(getattr(metadata, "custom_metadata", metadata) or {})

    def wait(self) -> None:
        """Waits for pending saves and seals them (writes their checksums)."""
        self._seal()

    def close(self) -> None:
        self._seal()
        self._mngr.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape/dtype structs of `tree` with `sharding`, the restore target for orbax."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
