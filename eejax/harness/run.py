"""Runs that cannot lie: a workdir bound to its config, one run per workdir, and one-line errors on the CLI.

    @run.cli                                   # every experiments/*.py main
    def main(argv=None):
        cfg, args = config.parse_cli(argv)
        workdir, outdir = config.run_dirs(cfg, args, "lgvit")
        workdir = run.open_workdir(workdir, cfg, fresh=args.fresh)   # lock + <workdir>/run_config.json
        ...

``open_workdir`` takes the workdir's lock (``<workdir>/.lock``, created with O_EXCL and holding the pid, host and
command; a lock whose process is dead on this host is stale and taken over) and records the config in
``<workdir>/run_config.json`` on the first run. A later run whose config differs is refused with one line naming
the differing fields, since its checkpoints would be resumed silently (fields a config file lists in
``NOT_IN_CHECKPOINTS``, evaluation settings, are not compared: a finished run may be re-evaluated); ``--fresh`` starts it over in a new
subfolder ``<workdir>/fresh-<k>`` instead. The record holds ``RESUME_FORMAT`` (bumped when checkpoints of older code
can no longer be resumed) and, for information only, the commit and library versions.

``cli`` prints the expected errors (``ConfigError``, data, checkpoint, lock, results and bad-value errors) as one
line ``error: <cause>; <hint>`` on stderr with exit status 2; ``--debug`` or ``EEJAX_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import pathlib
import socket
import sys
import time
from typing import Any, Callable, Mapping

from eejax.errors import ConfigMismatchError, EejaxError, RunError, WorkdirLockedError

RESUME_FORMAT = 1
RUN_CONFIG = "run_config.json"
LOCK = ".lock"
# Config fields that say nothing about what a checkpoint holds (documentation, logging cadence).
NOT_COMPARED = ("runbook", "log_every")




# ----------------------------------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_HELD: list["WorkdirLock"] = []


def release_locks() -> None:
    """Releases every workdir lock this process holds (``cli`` does it when main returns or fails)."""
    for lock in list(_HELD):
        lock.release()


class WorkdirLock:
    """``<directory>/.lock`` created with O_EXCL; ``release()`` (also at interpreter exit) removes it."""

    def __init__(self, directory: str | os.PathLike, name: str = LOCK):
        self.path = pathlib.Path(directory) / name
        self.held = False

    def acquire(self) -> "WorkdirLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # unreadable: being written right now, or garbage; look again
                    time.sleep(0.05)
                    holder = self._holder()
                if self._stale(holder):
                    self._remove_stale(holder)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')} (`{holder.get('command', '?')}`, started "
                       f"{holder.get('started', '?')})") if holder else "an unreadable lock file"
                raise WorkdirLockedError(f"{self.path.parent} is in use by {who}; lock file {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            _HELD.append(self)
            atexit.register(self.release)
            return self
        raise WorkdirLockedError(f"could not take the lock {self.path}")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # vanished, or an empty file left by a process killed between create and write
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return True
            return st.st_size == 0 and time.time() - st.st_mtime > 5
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)

    def _remove_stale(self, holder: dict | None) -> None:
        if holder:
            print(f"note: removing the stale lock of pid {holder.get('pid')} (no such process) in {self.path.parent}",
                  file=sys.stderr, flush=True)
        # Only if it is still that holder's lock (another run may have replaced the stale lock meanwhile).
        if self._holder() == holder:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self in _HELD:
            _HELD.remove(self)
        if self.held:
            self.held = False
            try:
                if (self._holder() or {}).get("pid") == os.getpid():
                    self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------- run config


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        return {prefix[:-1]: [_flatten(v)[""] if not isinstance(v, (Mapping, list, tuple)) else v for v in tree]}
    return {prefix[:-1]: tree}


def _plain(tree: Any) -> Any:
    """JSON-comparable form: tuples as lists, ConfigDicts as dicts."""
    return json.loads(json.dumps(tree.to_dict() if hasattr(tree, "to_dict") else tree, default=str))


def config_record(cfg: Any, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """What ``run_config.json`` holds: the config (minus NOT_COMPARED and ``ignore``) and the code version."""
    plain = _plain(cfg)
    config = {k: v for k, v in plain.items() if k not in NOT_COMPARED + tuple(ignore)}
    return {"resume_format": RESUME_FORMAT, "config": config, "code": _code_version()}


def _code_version() -> dict[str, str]:
    import importlib.metadata as md  # noqa: PLC0415

    out = {}
    for pkg in ("jax", "flax", "optax", "orbax-checkpoint"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import subprocess  # noqa: PLC0415

        root = pathlib.Path(__file__).resolve().parents[2]
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, ValueError, Exception):  # noqa: BLE001 (informational only, never fails a run)
        out["commit"] = "unknown"
    return out


def config_diff(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``field (old -> new)`` for every dotted field that differs."""
    a, b = _flatten(recorded), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key} ({_short(a.get(key, '<absent>'))} -> {_short(b.get(key, '<absent>'))})")
    return out


def _short(x: Any) -> str:
    text = json.dumps(x) if not isinstance(x, str) else x
    return text if len(text) <= 40 else text[:37] + "..."


def open_workdir(workdir: str | os.PathLike, cfg: Any, *, fresh: bool = False, lock: bool = True,
                 record: Mapping[str, Any] | None = None, what: str = "workdir") -> pathlib.Path:
    """Lock ``workdir`` for this process and bind it to ``cfg``; returns the directory the run must use.

    ``record`` replaces ``config_record(cfg)`` (e.g. only the fields a shared base model depends on). A recorded
    config that differs raises ``ConfigMismatchError`` naming the fields, or with ``fresh`` moves the run to the
    first free ``<workdir>/fresh-<k>`` (which gets its own record and lock).
    """
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigMismatchError(f"{what} {workdir} is a file, not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    if lock and _is_chief():
        WorkdirLock(workdir, LOCK if _process_count() == 1 else f"{LOCK}.{_process_index()}").acquire()
    want = dict(record) if record is not None else config_record(cfg)
    path = workdir / RUN_CONFIG
    if not path.exists():
        if any(p.name not in (LOCK, "results") and not p.name.startswith(LOCK) for p in workdir.iterdir()):
            # A workdir from before run_config.json existed: its checkpoints cannot be tied to a config.
            if not fresh:
                raise ConfigMismatchError(f"{what} {workdir} holds files but no {RUN_CONFIG}, so its checkpoints "
                                          "cannot be matched to this config")
            return _fresh_subdir(workdir, cfg, want, lock, what)
        _write_json(path, want)
        return workdir
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigMismatchError(f"{path} is unreadable ({e})") from None
    diffs = []
    if have.get("resume_format") != want["resume_format"]:
        diffs.append(f"resume_format ({have.get('resume_format')} -> {want['resume_format']}: checkpoints of an "
                     "older code version)")
    diffs += config_diff(have.get("config", {}), want["config"])
    if not diffs:
        return workdir
    if fresh:
        return _fresh_subdir(workdir, cfg, want, lock, what)
    shown = ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise ConfigMismatchError(f"{what} {workdir} was run with a different config: {shown}")


def _fresh_subdir(workdir: pathlib.Path, cfg, want, lock: bool, what: str) -> pathlib.Path:
    # Release the parent's lock: the run lives in the subfolder from here on.
    for held in list(_HELD):
        if held.path.parent == workdir:
            held.release()
    k = 1
    while (workdir / f"fresh-{k}").exists():
        k += 1
    sub = workdir / f"fresh-{k}"
    print(f"note: {workdir} holds a run of another config; --fresh: this run uses {sub}", file=sys.stderr,
          flush=True)
    return open_workdir(sub, cfg, fresh=False, lock=lock, record=want, what=what)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _is_chief() -> bool:
    return _process_index() == 0 or _process_count() == 1


def _process_index() -> int:
    if "jax" not in sys.modules:
        return 0
    import jax  # noqa: PLC0415

    return jax.process_index()


def _process_count() -> int:
    if "jax" not in sys.modules:
        return 1
    import jax  # noqa: PLC0415

    return jax.process_count()


def prepare(cfg: Any, args: Any, result_name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """``(workdir, outdir)`` of an experiment run, before any work: ``--workdir`` (default ``runs/<cfg.name>``)
    locked and bound to ``cfg`` (``open_workdir``; ``--fresh`` may move it to a subfolder), ``--outdir`` (default
    ``<workdir>/results``), and a refusal to replace existing ``<result_name>.md/.json`` without ``--overwrite``."""
    from eejax.harness import config as config_lib  # noqa: PLC0415

    workdir = pathlib.Path(args.workdir or f"runs/{cfg.name}")
    workdir = open_workdir(workdir, cfg, fresh=getattr(args, "fresh", False),
                           record=config_record(cfg, getattr(args, "not_in_checkpoints", ())))
    args = type(args)(**{**vars(args), "workdir": str(workdir)})
    return config_lib.run_dirs(cfg, args, result_name)


# ------------------------------------------------------------------------------------------------------ CLI


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: every ``eejax.errors`` class, the API's argument checks (ValueError), a
    non-finite loss and file-system errors. Anything else is a bug and keeps its traceback."""
    return (EejaxError, ValueError, FloatingPointError, OSError)


def _hint(e: BaseException) -> str:
    hint = getattr(e, "hint", "")
    if hint:
        return hint
    if isinstance(e, ValueError):
        return "fix the value (see the config's runbook and --help)"
    return "rerun with --debug for the traceback"


def error_line(e: BaseException) -> str:
    """``error: <cause>; <hint>`` on one line."""
    cause = " ".join(str(e).split()) or type(e).__name__
    hint = _hint(e)
    return f"error: {cause}" + (f"; {hint}" if hint and hint not in cause else "")


def debug_requested(argv) -> bool:
    return os.environ.get("EEJAX_DEBUG", "") not in ("", "0") or "--debug" in (argv or sys.argv[1:])


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an experiment's ``main(argv=None)``: expected errors become one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(argv=None, *a, **kw):
        try:
            return main(argv, *a, **kw)
        except _expected_errors() as e:
            if debug_requested(argv):
                raise
            print(error_line(e), file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        finally:
            release_locks()
            if "eejax.harness.results" in sys.modules:  # drop staged results of a run that did not finish
                sys.modules["eejax.harness.results"].abort_open_stages()

    return wrapped
