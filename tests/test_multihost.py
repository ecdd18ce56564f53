"""Multi-host training on one machine: two CPU processes x 2 devices in lockstep equal one process x 4 devices.

Each process runs tests/multihost_script.py (the real Trainer, LGViT stage-1 loss, a BatchIterator fed its slice of
every global batch, a checkpoint at step 3 and a resume from it to step 5) after `maybe_initialize()` joined them
through a coordinator on 127.0.0.1; gradients are all-reduced across processes by gloo's TCP collectives.
"""
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from eejax.train import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, RESUME_AT = 5, 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_available() -> bool:
    from jax._src.lib import _jax
    return hasattr(_jax, "make_gloo_tcp_collectives")


def _launch(workdir: pathlib.Path, out: pathlib.Path, devices: int, dist_env: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EEJAX_", "SLURM_", "OMPI_", "TPU_"))}
    env.update(dist_env, JAX_PLATFORMS="cpu", EEJAX_NO_PROGRESS="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    cmd = [sys.executable, str(REPO / "tests" / "multihost_script.py"), str(workdir), str(out), str(STEPS),
           str(RESUME_AT)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: dict[str, subprocess.Popen], timeout: float = 300) -> dict[str, str]:
    logs = {}
    try:
        for name, p in procs.items():
            logs[name], _ = p.communicate(timeout=timeout)
    finally:
        for p in procs.values():  # A process whose peer died would wait for it until the coordinator times out.
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{logs.get(name, '')[-3000:]}"
    return logs


def test_two_processes_train_like_one_process_with_all_devices(tmp_path):
    if not _gloo_available():
        pytest.skip("this jaxlib has no gloo CPU collectives: multi-process CPU runs cannot all-reduce")
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = {f"process {i}": _launch(tmp_path / "multi", tmp_path / f"p{i}.npz", 2,
                                     {"EEJAX_COORDINATOR": coordinator, "EEJAX_NUM_PROCESSES": "2",
                                      "EEJAX_PROCESS_ID": str(i)})
             for i in range(2)}
    procs["single"] = _launch(tmp_path / "single", tmp_path / "single.npz", 4, {})
    logs = _finish(procs)
    assert "process 0/2: 2 local of 4 devices" in logs["process 0"]
    assert "process 1/2: 2 local of 4 devices" in logs["process 1"]
    assert "process 0/1: 4 local of 4 devices" in logs["single"]
    # Both legs ran: the second Trainer restored the step-3 checkpoint written by both processes together.
    assert "resumed from step 3" in logs["process 0"] and "resumed from step 3" not in logs["process 1"]

    p0, p1, single = (dict(np.load(tmp_path / f"{n}.npz")) for n in ("p0", "p1", "single"))
    assert sorted(p0) == sorted(p1) == sorted(single) and len(p0) > 10
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)  # Replicated state: the processes agree exactly.
        # Only the all-reduce order differs from one process (global rows are also ordered host by host).
        np.testing.assert_allclose(p0[k], single[k], rtol=1e-6, atol=1e-6, err_msg=k)

    # Only process 0 wrote metrics: each step once, one TensorBoard file per Trainer leg, as in the single run.
    multi_log, single_log = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert [r["step"] for r in multi_log] == list(range(1, STEPS + 1))
    assert len((tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()) == STEPS
    np.testing.assert_allclose([r["loss"] for r in multi_log], [r["loss"] for r in single_log], rtol=1e-5)
    assert len(list((tmp_path / "multi" / "tb").iterdir())) == len(list((tmp_path / "single" / "tb").iterdir()))
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "ckpt").iterdir() if p.name.isdigit()) == [3, 5]


# ------------------------------------------------------------------------------------------- environment detection

_ENV = ("EEJAX_DISTRIBUTED", "EEJAX_COORDINATOR", "EEJAX_NUM_PROCESSES", "EEJAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    from eejax.train import distributed
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    return monkeypatch


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"EEJAX_COORDINATOR": "10.0.0.1:1234", "EEJAX_NUM_PROCESSES": "4", "EEJAX_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
    ({"EEJAX_COORDINATOR": "10.0.0.1:1234", "EEJAX_NUM_PROCESSES": "1", "EEJAX_PROCESS_ID": "0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, {}),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ({"EEJAX_DISTRIBUTED": "1"}, {}),
    ({"EEJAX_DISTRIBUTED": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, None),
])
def test_detect(clean_env, env, expected):
    from eejax.train import distributed
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert distributed.detect() == expected


@pytest.mark.parametrize("env, match", [
    ({"EEJAX_COORDINATOR": "h:1", "EEJAX_NUM_PROCESSES": "2"}, "EEJAX_PROCESS_ID missing"),
    ({"EEJAX_COORDINATOR": "h:1", "EEJAX_NUM_PROCESSES": "2", "EEJAX_PROCESS_ID": "2"}, "process_id=2"),
    ({"EEJAX_COORDINATOR": "h:1", "EEJAX_NUM_PROCESSES": "two", "EEJAX_PROCESS_ID": "0"}, "not an integer"),
    ({"EEJAX_DISTRIBUTED": "maybe"}, "EEJAX_DISTRIBUTED"),
])
def test_detect_errors(clean_env, env, match):
    from eejax.train import distributed
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        distributed.detect()


def test_maybe_initialize_is_a_no_op_on_one_process_and_when_initialised(clean_env):
    import jax

    from eejax.train import maybe_initialize
    calls = []
    clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert maybe_initialize() is False  # Nothing in the environment: one process.
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setattr(jax.distributed, "is_initialized", lambda: True)
    assert maybe_initialize() is False and calls == []  # Already initialised: a second call does nothing.
    clean_env.setattr(jax.distributed, "is_initialized", lambda: False)
    assert maybe_initialize() is True and calls == [{}]
