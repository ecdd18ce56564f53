"""Process-wide XLA settings, applied before JAX starts its backend: GPU command buffers over loops and conditionals.

On a GPU, XLA runs a ``while`` loop whose trip count depends on data by copying the predicate to the host and
waiting, every iteration; every ``lax.cond`` / ``lax.switch`` does the same with its branch index. XLA's default
set of command-buffer (CUDA graph) commands has neither ``WHILE`` nor ``CONDITIONAL``. On the H200 run of issue 20
each such stop cost ~18 us (against ~58 us for a whole GPT-2-small decode layer at batch 1), and the early-exit
paths make 17-61 of them per forward or token. With ``WHILE`` and ``CONDITIONAL`` in the set, a loop or a
conditional is recorded as a device-side graph node and the predicate need not travel to the host.

The switch, read when ``eejax`` is imported (``configure_xla``; XLA reads ``XLA_FLAGS`` once, when JAX creates its
backend, so it must happen before the first computation):

* ``EEJAX_COMMAND_BUFFERS`` unset, empty, ``0`` or ``off`` (the default until a GPU run shows it faster and
  correct): nothing is changed;
* ``1`` or ``on``: ``--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL`` (XLA's default set plus the two);
* any other value, e.g. ``FUSION,CUBLAS,CUDNN,WHILE,CONDITIONAL`` or ``+WHILE``: passed as the flag's value as it
  is (XLA's syntax: a list of command types, or ``+TYPE`` / ``-TYPE`` edits of the default set).

Nothing is changed when ``XLA_FLAGS`` already sets ``--xla_gpu_enable_command_buffer`` (an explicit flag wins), when
the process will not run on a GPU (``JAX_PLATFORMS`` names no GPU platform, or it is unset and the machine has no
NVIDIA device), or when JAX's backend is already running (a warning says the setting came too late). Scripts that
set up their own environment call ``configure_xla(environ)`` on it.
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import MutableMapping

ENV = "EEJAX_COMMAND_BUFFERS"
FLAG = "--xla_gpu_enable_command_buffer"
LOOPS_AND_CONDITIONALS = "+WHILE,+CONDITIONAL"
_OFF = ("", "0", "off", "false", "no")
_ON = ("1", "on", "true", "yes")
_TYPES = re.compile(r"^[+-]?[A-Z_]+(,[+-]?[A-Z_]+)*$")
_GPU_PLATFORMS = ("cuda", "gpu", "rocm")


def command_buffer_flag(setting: str | None) -> str | None:
    """The ``XLA_FLAGS`` entry for a value of ``EEJAX_COMMAND_BUFFERS`` (``None``: leave XLA's default)."""
    value = (setting or "").strip()
    if value.lower() in _OFF:
        return None
    if value.lower() in _ON:
        return f"{FLAG}={LOOPS_AND_CONDITIONALS}"
    value = value.upper()
    if not _TYPES.match(value):
        raise ValueError(f"{ENV}={setting!r}: use 0/off, 1/on, or XLA command types such as "
                         "'FUSION,CUBLAS,WHILE,CONDITIONAL' or '+WHILE,+CONDITIONAL'")
    return f"{FLAG}={value}"


def gpu_expected(environ: MutableMapping[str, str]) -> bool:
    """Whether this process's JAX will run on a GPU: ``JAX_PLATFORMS`` names one, or is unset on a machine with an
    NVIDIA device."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return any(p.strip() in _GPU_PLATFORMS for p in platforms.split(","))
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def _backend_running() -> bool:
    try:
        from jax._src import xla_bridge   # noqa: PLC0415  (private, but the only way to ask; absent: assume not)
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001
        return False


def configure_xla(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Extend ``XLA_FLAGS`` in ``environ`` (default ``os.environ``) by the command-buffer flag that
    ``EEJAX_COMMAND_BUFFERS`` asks for (see the module docstring); returns the flag added, or ``None``."""
    environ = os.environ if environ is None else environ
    flag = command_buffer_flag(environ.get(ENV))
    flags = environ.get("XLA_FLAGS", "")
    if flag is None or FLAG in flags or not gpu_expected(environ):
        return None
    if environ is os.environ and _backend_running():
        warnings.warn(f"{ENV}={environ.get(ENV)!r} ignored: JAX's backend already started, so XLA_FLAGS is no longer "
                      "read; import eejax (or call eejax.runtime.configure_xla) before the first computation",
                      RuntimeWarning, stacklevel=2)
        return None
    environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    return flag


def command_buffer_setting(environ: MutableMapping[str, str] | None = None) -> str:
    """What ``XLA_FLAGS`` says about command buffers (for benchmark records): the flag's value or ``"default"``."""
    environ = os.environ if environ is None else environ
    for part in environ.get("XLA_FLAGS", "").split():
        if part.startswith(FLAG + "="):
            return part.split("=", 1)[1]
    return "default"
