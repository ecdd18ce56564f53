"""eejax.runtime: the command-buffer flag is built right from EEJAX_COMMAND_BUFFERS, added to XLA_FLAGS only for a GPU
process that has not started its backend, never over an explicit flag, and never on CPU."""
import os
import subprocess
import sys

import pytest

from eejax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flag_string():
    assert runtime.command_buffer_flag(None) is None
    for off in ("", "0", "off", "OFF", " false "):
        assert runtime.command_buffer_flag(off) is None
    for on in ("1", "on", "ON", "true"):
        assert runtime.command_buffer_flag(on) == "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
    assert runtime.command_buffer_flag("fusion,cublas,cudnn,while,conditional") == \
        "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUDNN,WHILE,CONDITIONAL"
    assert runtime.command_buffer_flag("+WHILE,-CUDNN") == "--xla_gpu_enable_command_buffer=+WHILE,-CUDNN"
    for bad in ("WHILE;CONDITIONAL", "WHILE,,COND", "--xla_foo"):
        with pytest.raises(ValueError, match="EEJAX_COMMAND_BUFFERS="):
            runtime.command_buffer_flag(bad)


def test_configure_on_a_gpu_environment():
    env = {"EEJAX_COMMAND_BUFFERS": "1", "JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_autotune_level=2"}
    assert runtime.configure_xla(env) == "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
    assert env["XLA_FLAGS"] == "--xla_gpu_autotune_level=2 --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
    assert runtime.command_buffer_setting(env) == "+WHILE,+CONDITIONAL"
    assert runtime.configure_xla(env) is None                          # idempotent: the flag is there now
    assert env["XLA_FLAGS"].count("--xla_gpu_enable_command_buffer") == 1

    env = {"EEJAX_COMMAND_BUFFERS": "on", "JAX_PLATFORMS": "cuda,cpu"}
    assert runtime.configure_xla(env) and env["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"


def test_explicit_flag_off_and_cpu_change_nothing():
    explicit = {"EEJAX_COMMAND_BUFFERS": "1", "JAX_PLATFORMS": "cuda",
                "XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION"}
    assert runtime.configure_xla(explicit) is None
    assert explicit["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer=FUSION"
    off = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--a=1"}
    assert runtime.configure_xla(off) is None and off == {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--a=1"}
    assert runtime.command_buffer_setting(off) == "default"
    for platforms in ("cpu", "tpu", "cpu,tpu"):
        env = {"EEJAX_COMMAND_BUFFERS": "1", "JAX_PLATFORMS": platforms}
        assert runtime.configure_xla(env) is None and "XLA_FLAGS" not in env


def test_import_on_cpu_leaves_xla_flags_alone():
    """A fresh process on CPU with the switch on: importing eejax changes nothing, and JAX runs."""
    env = dict(os.environ, EEJAX_COMMAND_BUFFERS="1", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_cpu_enable_fast_math=false")
    code = ("import os, eejax, jax.numpy as jnp; print(os.environ['XLA_FLAGS']); print(int(jnp.arange(3).sum()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["--xla_cpu_enable_fast_math=false", "3"]


def test_too_late_is_a_warning(monkeypatch):
    monkeypatch.setattr(runtime, "_backend_running", lambda: True)
    monkeypatch.setenv("EEJAX_COMMAND_BUFFERS", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.warns(RuntimeWarning, match="backend already started"):
        assert runtime.configure_xla() is None
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
