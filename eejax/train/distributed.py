"""Multi-process start-up: `maybe_initialize()` calls `jax.distributed.initialize()` when this is one of several.

    from eejax.train import maybe_initialize
    maybe_initialize()        # first thing in main(), before anything asks jax about devices

Call it before any jax call that starts a backend (`jax.devices()`, `jax.device_count()`, a computation); `Trainer`
calls it too, which is early enough only for a script whose first jax call is building the Trainer. After it,
`jax.devices()` lists every process's devices and `jax.local_devices()` this process's.

It initialises when the environment says so, in this order:

1. `EEJAX_DISTRIBUTED=0`: never (e.g. to run one host of a pod on its own). `EEJAX_DISTRIBUTED=1`: always, with
   JAX's auto-detection (`jax.distributed.initialize()` without arguments).
2. `EEJAX_COORDINATOR` (host:port of process 0), `EEJAX_NUM_PROCESSES`, `EEJAX_PROCESS_ID`: any cluster or one
   machine, passed explicitly; nothing happens when the number of processes is 1. On CPU the cross-process
   collectives are gloo's (TCP), e.g. two processes on one machine:

       EEJAX_COORDINATOR=127.0.0.1:12345 EEJAX_NUM_PROCESSES=2 EEJAX_PROCESS_ID=0 python -m experiments.lgvit ... &
       EEJAX_COORDINATOR=127.0.0.1:12345 EEJAX_NUM_PROCESSES=2 EEJAX_PROCESS_ID=1 python -m experiments.lgvit ...

3. Environments that JAX detects by itself, initialised without arguments:
   - a Cloud TPU VM (TPU chips present and libtpu installed): JAX reads the workers from the TPU metadata server,
     so `gcloud ... ssh --worker=all --command "python -m experiments.X"` is all a pod run needs (one host gives a
     one-process cluster, which is harmless);
   - GKE TPU: `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` with more than one host;
   - SLURM: inside `srun` with `SLURM_NTASKS` > 1;
   - Open MPI: `mpirun` with `OMPI_COMM_WORLD_SIZE` > 1.
"""
from __future__ import annotations

import os

import jax

_EXPLICIT = ("EEJAX_COORDINATOR", "EEJAX_NUM_PROCESSES", "EEJAX_PROCESS_ID")


def _int_env(name: str, default: int = 0) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _on_cloud_tpu_vm() -> bool:
    """TPU chips on this machine and libtpu installed: what JAX itself requires to detect a Cloud TPU VM."""
    try:  # Private helpers; a JAX that moved them is treated as "not a TPU VM" (EEJAX_DISTRIBUTED=1 still works).
        from jax._src import cloud_tpu_init, hardware_utils
        num_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
        return num_chips > 0 and cloud_tpu_init.get_tpu_library_path() is not None
    except Exception:  # noqa: BLE001
        return False


def detect() -> dict[str, str | int] | None:
    """The arguments `maybe_initialize` would pass to `jax.distributed.initialize` ({} = auto-detect), or None."""
    forced = os.environ.get("EEJAX_DISTRIBUTED", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return None
    if forced in ("1", "true", "yes", "on"):
        return {}
    if forced:
        raise ValueError(f"EEJAX_DISTRIBUTED={forced!r}: use 1 (initialise, auto-detect) or 0 (never)")
    given = [name for name in _EXPLICIT if os.environ.get(name)]
    if given:
        if len(given) < len(_EXPLICIT):
            missing = sorted(set(_EXPLICIT) - set(given))
            raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} missing: set all three or none")
        num_processes, process_id = _int_env("EEJAX_NUM_PROCESSES"), _int_env("EEJAX_PROCESS_ID")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"need 0 <= EEJAX_PROCESS_ID < EEJAX_NUM_PROCESSES, got {process_id=} {num_processes=}")
        if num_processes == 1:
            return None
        return {"coordinator_address": os.environ["EEJAX_COORDINATOR"], "num_processes": num_processes,
                "process_id": process_id}
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return {}
    if _int_env("SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in os.environ:
        return {}
    if _int_env("OMPI_COMM_WORLD_SIZE", 1) > 1:
        return {}
    if _on_cloud_tpu_vm():
        return {}
    return None


def maybe_initialize() -> bool:
    """Initialises JAX's distributed runtime if the environment asks for it (see module docstring).

    Returns True if this call initialised it; False if there was nothing to do or it already was (safe to call
    twice). Raises if it must initialise but a JAX backend was already started by an earlier jax call.
    """
    if jax.distributed.is_initialized():
        return False
    kwargs = detect()
    if kwargs is None:
        return False
    # CPU processes exchange gradients through these collectives; without them (older JAX defaults to none) a
    # cross-process all-reduce fails. The flag only concerns the CPU client, so it is harmless on TPU/GPU.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
