"""Shared pieces of the benchmark scripts: provenance, compile-then-time, JSON output.

Benchmarks write JSON and are never timed tests; ``tests/test_benchmarks.py`` only checks that they run and that
the paths they compare agree.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import jax

from eejax.exits import costs


def provenance(argv: list[str]) -> dict[str, Any]:
    """Who, where, what: device, versions, the exact command and the XLA flags it ran under."""
    import flax
    import jaxlib
    dev = jax.devices()[0]
    return {
        "command": " ".join(shlex.quote(a) for a in [pathlib.Path(sys.executable).name] + argv),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
        "device_kind": dev.device_kind, "device_count": jax.device_count(), "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),   # a run under other flags (command buffers) says so
    }


def compile_fn(fn: Callable, *args) -> tuple[Callable, float]:
    """``jax.jit(fn)`` lowered and compiled for ``args``; returns the executable and the seconds it took."""
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return exe, time.perf_counter() - t0


def time_fn(exe: Callable, *args, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Wall-clock seconds per call (``block_until_ready``, via ``costs.measure``), after ``warmup`` untimed calls."""
    times = list(costs.measure(exe, *args, warmup=warmup, iters=repeats).times_s)
    return {"time_s": statistics.median(times), "min_s": min(times), "times_s": times}


def write_json(path: str | pathlib.Path, obj: Any) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def time_interleaved(calls: dict[str, tuple[Callable, tuple]], *, repeats: int, warmup: int = 1
                     ) -> dict[str, dict[str, Any]]:
    """Wall-clock of several ``name -> (exe, args)`` calls, run round-robin (one call of each per round, for
    ``repeats`` rounds after ``warmup`` untimed rounds), so a slow spell of a shared machine hits every candidate
    alike. Returns per name the median, the minimum and every time (``block_until_ready``)."""
    timings = costs.measure_interleaved(calls, warmup=warmup, iters=repeats)
    return {name: {"time_s": statistics.median(t.times_s), "min_s": t.min_s, "times_s": list(t.times_s)}
            for name, t in timings.items()}


def cast_floats(tree: Any, dtype) -> Any:
    """Every floating leaf of a pytree cast to ``dtype`` (integer leaves untouched)."""
    import jax.numpy as jnp
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


class Budget:
    """A wall-clock budget for a benchmark: ``left()`` seconds remain; ``over()`` once it is spent (the script
    then records what it skipped instead of starting it)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds
