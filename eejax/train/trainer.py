"""The one trainer: train state, a data-parallel step jitted once, the resumable loop, evaluation.

    tx = make_optimizer(cfg.optim)
    trainer = Trainer(loss_fn, params, tx, workdir=workdir, ckpt_every=500)
    state = trainer.fit(batches, num_steps)          # resumes from workdir/ckpt if a checkpoint is there
    sums = trainer.evaluate(eval_fn, eval_batches)

`loss_fn(params, batch, ctx) -> (loss, {name: scalar})` is the one signature: `params` is what is trained, any
pytree (a dict, an `nnx.State` from `nnx.split`); `batch` a dict of arrays; `ctx` a `StepContext`: `ctx.step` the
updates applied so far (losses with a schedule, e.g. LGViT's alternating stage 1, exit-weight warm-ups), `ctx.rng`
this step's key, `ctx.frozen` the `fit(..., frozen=...)` pytree (None without it). `batches` yields dicts of numpy
arrays with a leading batch axis B (this process's slice) and has `state_dict()` / `load_state_dict()`, saved with
every checkpoint so a rerun continues on the same data (`ArrayIterator` serves arrays already in memory).

Frozen parameters (a pretrained backbone under trained exit heads, the other half of an alternating fit) go in
`fit(..., frozen=...)`: an argument of the jitted step, placed once on the mesh and never donated, so they are
neither trained, nor baked into the program as constants, nor consumed by the step.

Step k is the k-th update: it draws the k-th batch, uses `fold_in(rng, k - 1)` and produces `state.step == k`;
the checkpoint of step k holds that state. A run killed anywhere and rerun with the same command ends with the
same parameters, bit for bit, as an uninterrupted run (tests/test_trainer.py checks this). Checkpoints are verified
on restore: a corrupt newest step is reported, set aside, and training resumes from the newest good one
(eejax/train/checkpoint.py; tests/test_run_integrity.py).

Env vars: EEJAX_NO_PROGRESS=1 hides the progress bar; EEJAX_CRASH_AT_STEP=k (tests only) hard-exits the process
with code 17 right after step k, as a kill would, to test resumption.
"""
import functools
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from eejax import checks
from eejax.errors import NonFiniteLossError
from eejax.train.checkpoint import Checkpointer, abstract_like
from eejax.train.distributed import maybe_initialize
from eejax.train.metrics import MetricsWriter, Throughput
from eejax.train.optim import learning_rate

class StepContext(NamedTuple):
    """What a loss gets beside the trained params and the batch (the third argument of every loss_fn)."""
    step: jax.Array  # int32[]: updates applied so far (0 at the first step)
    rng: jax.Array   # this step's key: fold_in(seed key, step)
    frozen: Any      # fit(..., frozen=...) as given (on the mesh), or None


LossFn = Callable[[Any, Mapping[str, jax.Array], StepContext], tuple[jax.Array, Mapping[str, jax.Array]]]
EvalFn = Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]]
MASK_KEY = "_mask"  # float32[B] added to every eval batch: 1 for real examples, 0 for padding.
CRASH_EXIT_CODE = 17


class TrainState(NamedTuple):
    step: jax.Array  # int32[]: updates applied so far.
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key (orbax saves it as a plain array); step k uses fold_in(rng, k - 1).




# ---------------------------------------------------------------------------------------------------- step


def _train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, state: TrainState,
                batch: Mapping[str, jax.Array], frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update; ordinary single-device code, XLA inserts the gradient all-reduce over the batch sharding."""
    ctx = StepContext(state.step, jax.random.fold_in(state.rng, state.step), frozen)
    (loss, aux), grads = jax.value_and_grad(lambda p: loss_fn(p, batch, ctx), has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # grad_norm is checked with the loss: a finite loss with NaN gradients would poison the next checkpoint.
    metrics = {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    lr = learning_rate(opt_state)
    if lr is not None:
        metrics["lr"] = lr
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def _checked_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` whose outputs are checked while tracing: a non-scalar loss or metric is one ValueError naming
    it, not value_and_grad's TypeError or a failed float() at the first log step."""

    @functools.wraps(loss_fn)
    def checked(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise ValueError("loss_fn must return (loss, {name: scalar metric})")
        if np.shape(out[0]) != ():
            raise ValueError(f"loss_fn returned a loss of shape {np.shape(out[0])}; it must be a scalar (take the "
                             "mean)")
        if bad := sorted(k for k, v in out[1].items() if np.shape(v) != ()):
            raise ValueError(f"loss_fn's metric {bad[0]!r} has shape {np.shape(out[1][bad[0]])}; metrics are "
                             "logged as scalars (take the mean)")
        return out

    return checked


class _Pending(NamedTuple):
    """A dispatched step whose metrics are not yet on the host."""
    step: int
    metrics: dict[str, jax.Array]
    batch_size: int


class Trainer:
    """Data-parallel trainer over a 1-D ("data",) mesh: state replicated, batches sharded on their leading axis.

    Files in `workdir`: `ckpt/<step>/` (orbax; `extra_metadata` in `ckpt/metadata`), `metrics.jsonl`, `tb/`.
    """

    def __init__(self, loss_fn: LossFn, params: Any, optimizer: optax.GradientTransformation, *,
                 workdir: str | os.PathLike, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                 log_every: int = 50, ckpt_every: int = 500, max_to_keep: int = 2,
                 extra_metadata: Mapping[str, Any] | None = None):
        maybe_initialize()  # Multi-host: must precede the first device query (no-op on one process).
        checks.integer(log_every, "log_every", lo=1)
        checks.integer(ckpt_every, "ckpt_every", lo=1)
        checks.integer(max_to_keep, "max_to_keep", lo=1)
        checks.integer(seed, "seed", lo=0, hi=2**32 - 1)  # (larger seeds are truncated by PRNGKey without x64)
        if mesh is None:  # Auto axes: the jax>=0.11 default (Explicit) breaks the grad of integer-label CE.
            mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
        self.mesh = mesh
        if "data" not in self.mesh.axis_names:
            raise ValueError(f"mesh needs a 'data' axis, got {self.mesh.axis_names=}")
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.workdir = os.path.abspath(workdir)
        self.log_every, self.ckpt_every = log_every, ckpt_every
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "ckpt"), max_to_keep=max_to_keep,
                                         metadata=extra_metadata)
        self.state: TrainState | None = None  # the latest state returned by fit().
        self._params0 = params
        self._init = jax.jit(
            lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), jax.random.PRNGKey(seed)),
            out_shardings=self.replicated)
        # Frozen parameters are an argument (replicated, not donated), so one program serves any of their values.
        loss_fn = _checked_loss(loss_fn)
        self._step = jax.jit(lambda s, b, f: _train_step(loss_fn, optimizer, s, b, f),
                             in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                             out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
        self._eval_fns: dict[EvalFn, Callable] = {}
        self._is_chief = jax.process_index() == 0

    # ------------------------------------------------------------------------------------------------ state

    def init_state(self) -> TrainState:
        """A fresh state from the constructor's params (not read from the checkpoint directory)."""
        return self._init(self._params0)

    def restore(self, step: int | None = None) -> TrainState:
        """The checkpointed state of `step` (default: the latest), replicated on the mesh."""
        return self.checkpointer.restore(self._abstract_state(), step).state

    def _abstract_state(self) -> TrainState:
        return abstract_like(jax.eval_shape(self._init, self._params0), self.replicated)

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Global arrays sharded on the leading axis; each process passes its local slice (multi-host ready)."""
        n = self.mesh.shape["data"]

        def put(path, x):
            x = np.asarray(x)
            if x.ndim == 0 or (x.shape[0] * jax.process_count()) % n:
                raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} of shape {x.shape}: the global leading "
                                 f"dim must be divisible by the {n} devices of mesh axis 'data'")
            return jax.make_array_from_process_local_data(self.batch_sharding, x)

        return jax.tree_util.tree_map_with_path(put, dict(batch))

    # ------------------------------------------------------------------------------------------------ loop

    def fit(self, batches: Iterator[Mapping[str, np.ndarray]], num_steps: int, *, desc: str = "train",
            frozen: Any = None) -> TrainState:
        """Trains until `state.step == num_steps`, resuming from the latest checkpoint in `workdir/ckpt`.

        `frozen` reaches the loss as `ctx.frozen` (not trained, not checkpointed: a rerun passes the same)."""
        num_steps = checks.integer(num_steps, "num_steps", lo=0)  # fit(2.5) or fit(-3) must not train 2 or 0 steps
        if not (hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict")):
            raise ValueError(f"batches (a {type(batches).__name__}) needs state_dict()/load_state_dict() so runs can "
                             "resume (eejax.data.pipeline.BatchIterator, eejax.data.lm.WindowIterator and "
                             "eejax.train.ArrayIterator have them)")
        # The newest checkpoint that passes its checksum and restores; bad newer ones are reported and set aside.
        restored = self.checkpointer.restore_latest_good(self._abstract_state())
        if restored is None:
            state = self.init_state()
        else:
            state = restored.state
            batches.load_state_dict(restored.data_state)
            if self._is_chief:
                print(f"resumed from step {restored.step}", flush=True)
        start = int(state.step)
        if start >= num_steps:
            self.state = state
            return state

        frozen = None if frozen is None else jax.device_put(frozen, self.replicated)
        crash_at = int(os.environ.get("EEJAX_CRASH_AT_STEP", "-1"))
        writer = MetricsWriter(self.workdir, enabled=self._is_chief)
        bar = tqdm(total=num_steps, initial=start, desc=desc, dynamic_ncols=True,
                   disable=not self._is_chief or os.environ.get("EEJAX_NO_PROGRESS") == "1")
        throughput = Throughput()
        pending: _Pending | None = None
        try:
            for step in range(start + 1, num_steps + 1):
                batch = self.shard_batch(next(batches))
                state, metrics = self._step(state, batch, frozen)
                # Fetch the previous step's metrics now: the device already has this step queued, so never idles.
                if pending is not None:
                    self._finish(pending, writer, bar, throughput, num_steps)
                pending = _Pending(step, metrics, batch_size=jax.tree.leaves(batch)[0].shape[0])
                if step % self.ckpt_every == 0 or step == num_steps:
                    # Only states whose losses were all finite are saved, so check this step before saving.
                    self._finish(pending, writer, bar, throughput, num_steps)
                    pending = None
                    self.checkpointer.save(step, state, batches.state_dict())
                bar.update(1)
                if step == crash_at:  # Test-only: a hard kill after step k; the regular save above completes.
                    self.checkpointer.wait()
                    os._exit(CRASH_EXIT_CODE)
        except BaseException:
            bar.close()
            writer.close(quiet=True)  # the error in flight is the one to report
            raise
        bar.close()
        writer.close()
        self.checkpointer.wait()
        self.state = state
        return state

    def _finish(self, pending: _Pending, writer: MetricsWriter, bar, throughput: Throughput, num_steps: int):
        """Host side of a step: the finiteness check, then metrics at log steps."""
        metrics = jax.device_get(pending.metrics)
        if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
            last = self.checkpointer.latest_good_step()  # (waits for pending saves; skips corrupt steps)
            where = "no checkpoint yet" if last is None else f"last good checkpoint at step {last}"
            raise NonFiniteLossError(f"step {pending.step}: loss={float(metrics['loss'])} grad_norm="
                                     f"{float(metrics['grad_norm'])}; {where} in {self.checkpointer.directory}")
        is_log_step = pending.step % self.log_every == 0 or pending.step == num_steps
        # The clock starts at the first step of this run, so compilation is not counted in steps/s.
        rates = throughput.rates(pending.step, pending.batch_size) if is_log_step or not throughput.started else {}
        if is_log_step:
            writer.write(pending.step, {**metrics, **rates})
            bar.set_postfix({"loss": f"{float(metrics['loss']):.4g}",
                             "steps/s": f"{rates.get('steps_per_sec', 0.0):.3g}"})

    # ------------------------------------------------------------------------------------------------ eval

    def evaluate(self, eval_fn: EvalFn, batches: Iterator[Mapping[str, np.ndarray]], *,
                 params: Any = None) -> dict[str, float]:
        """Sums `eval_fn(params, batch) -> {name: scalar sum}` over one pass of a finite iterator.

        Batches whose size does not divide the devices (typically the last) are zero-padded; every batch gets
        `batch[MASK_KEY]` (float32[B]: 1 real, 0 padding), and eval_fn must weight its sums by it. Padding keeps
        the batch sharded, so this is also right on multi-host. `params` defaults to the state from `fit()`.
        """
        if params is None:
            if self.state is None:
                raise ValueError("evaluate() needs params=... or a previous fit()")
            params = self.state.params
        if eval_fn not in self._eval_fns:
            self._eval_fns[eval_fn] = jax.jit(eval_fn, in_shardings=(self.replicated, self.batch_sharding),
                                              out_shardings=self.replicated)
        jitted, totals = self._eval_fns[eval_fn], None
        local_devices = self.mesh.shape["data"] // jax.process_count()
        for batch in batches:
            if MASK_KEY in batch:
                raise ValueError(f"eval batch already has the reserved key {MASK_KEY!r}")
            b = len(next(iter(batch.values())))
            pad = -b % local_devices
            batch = {k: np.pad(np.asarray(x), [(0, pad)] + [(0, 0)] * (np.ndim(x) - 1)) for k, x in batch.items()}
            batch[MASK_KEY] = (np.arange(b + pad) < b).astype(np.float32)
            sums = jitted(params, self.shard_batch(batch))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if totals is None:
            raise ValueError("evaluate() got an empty iterator")
        return {k: float(v) for k, v in jax.device_get(totals).items()}

    def close(self) -> None:
        self.checkpointer.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
