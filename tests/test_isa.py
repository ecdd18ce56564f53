"""The numerically sensitive tests again, under a second instruction set (issue 23: tests that pass on any CPU).

XLA's CPU backend generates different code for different CPUs (fused multiply-adds or not, vector width, hence
reduction order and the rounding of tanh / exp), so a threshold placed on an observed score, or a 1e-5 tolerance on
a float32 chain of layers, can pass on the machine that recorded it and fail on another. ``--xla_cpu_max_isa``
makes XLA generate code as for an older CPU without a second machine. XLA reads its flags once per process, so this
test reruns the sensitive subset in a subprocess under the first ISA below the host's (SSE4_2: no FMA, 128-bit
vectors, the largest change; on a host without AVX it is skipped), from the same ``./launch.sh test`` CI runs. The
whole suite under another ISA (the check before a release or after changing a tolerance)::

    XLA_FLAGS=--xla_cpu_max_isa=AVX2 ./launch.sh test
    XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 ./launch.sh test
"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Tests that compare executed exits with thresholds or paths with each other in float32: the ones a CPU's code
# generation can move (golden exits, masked / compacted / sharded / continuous executors, kernels, the trainer's
# sharded step).
SENSITIVE = [
    "tests/test_golden.py",
    "tests/test_paths.py",
    "tests/test_continuous.py",
    "tests/test_gated_step.py",
    "tests/test_trainer.py::test_sharded_step_equals_single_device",
]
ISA = "SSE4_2"


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.skipif("xla_cpu_max_isa" in os.environ.get("XLA_FLAGS", ""),
                    reason="the suite already runs under a chosen instruction set")
def test_sensitive_tests_pass_under_a_second_instruction_set():
    if not {"avx", "fma"} & _host_flags():
        pytest.skip(f"this CPU has no instruction set above {ISA} to compare with")
    # Its own compilation cache: executables compiled for the host's instruction set must not be read back here.
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/eejax-jax-tests"))
    env = {**os.environ, "XLA_FLAGS": f"--xla_cpu_max_isa={ISA}", "EEJAX_NO_PROGRESS": "1",
           "JAX_COMPILATION_CACHE_DIR": f"{cache}-{ISA.lower()}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SENSITIVE],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"under --xla_cpu_max_isa={ISA}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
