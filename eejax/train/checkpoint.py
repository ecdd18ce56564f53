"""Checkpoints of the train state together with the data-iterator position, for exact resumption.

Layout: `<directory>/<step>/{state,data}` written by one orbax `CheckpointManager`: `state` is the TrainState
pytree (`StandardSave`; params may be a dict or an `nnx.State`), `data` the iterator's `state_dict()` as JSON.
Saves are asynchronous (the device-to-host copy happens before `save` returns); orbax commits a step
atomically, so a process killed mid-save leaves the previous checkpoint as the latest one.
The iterator position is the one of process 0: multi-host input pipelines must be deterministic per step.
"""
import os
from typing import Any, Mapping, NamedTuple

import jax
import orbax.checkpoint as ocp


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

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
        self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(dict(data_state))))

    def restore(self, abstract_state: Any, step: int | None = None) -> Restored:
        """Restores into `abstract_state`'s structure and shardings (a tree of `jax.ShapeDtypeStruct`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               data=ocp.args.JsonRestore()))
        return Restored(step=step, state=out.state, data_state=out.data)

    def metadata(self) -> dict[str, Any]:
        """The `metadata` given when the directory was first created (empty if none)."""
        metadata = self._mngr.metadata()  # RootMetadata in recent orbax, a plain dict in older releases.
        return dict(getattr(metadata, "custom_metadata", metadata) or {})

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape/dtype structs of `tree` with `sharding`, the restore target for orbax."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
