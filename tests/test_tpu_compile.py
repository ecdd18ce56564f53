"""Ahead-of-time compilation for TPU topologies (tests/tpu_aot_programs.py), run in a child process.

libtpu brings its own compiler, LLVM and thread pools; loaded into the suite's process it stayed there for every CPU
program compiled after it, and in CI the first compilation of the next module died with SIGSEGV (exit 139, no
Python frame). The TPU programs therefore compile in a process of their own; this test passes when all of them
compile (or skip for a topology this libtpu does not describe) and shows the child's report on failure.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu not installed: pip install -e ".[tpu]" to compile for TPU topologies')
def test_tpu_programs_compile_in_a_child_process():
    env = {**os.environ, "EEJAX_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-rs",
                           "tests/tpu_aot_programs.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    print(proc.stdout[-8000:])  # Each program's memory_analysis(), shown with `pytest -s`.
    assert proc.returncode == 0, f"TPU AOT compilation failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    # libtpu's exit cuts pytest's closing summary, so each program reports itself: 2 programs x 3 topologies.
    reports = [line for line in proc.stdout.splitlines() if line.startswith(("compiled ", "skipped "))]
    assert len(reports) == 6 and any(r.startswith("compiled ") for r in reports), proc.stdout[-6000:]
