"""Runs that cannot lie: a workdir bound to its config, one run per workdir, and one-line errors on the CLI.

    @run.cli                                   # every experiments/*.py main
    def main(argv=None):
        cfg, args = config.parse_cli(argv)
        workdir, outdir = config.run_dirs(cfg, args, "lgvit")
        workdir = run.open_workdir(workdir, cfg, fresh=args.fresh)   # lock + <workdir>/run_config.json
        ...

``open_workdir`` takes the workdir's lock (``<workdir>/.lock``, created with O_EXCL and holding the pid, the
process's start time, host and command) and records the config in ``<workdir>/run_config.json`` on the first run.
A lock whose process is dead on this host, or whose pid now belongs to another process (its start time differs),
is stale and taken over; a lock of another host, a garbage lock file or a ``.lock`` directory is refused with a
message naming ``--break-lock``, which removes it. A later run whose config differs is refused with one line naming
the differing fields, since its checkpoints would be resumed silently (fields a config file lists in
``NOT_IN_CHECKPOINTS``, evaluation settings, are not compared: a finished run may be re-evaluated); ``--fresh``
runs it in the subfolder ``<workdir>/fresh-<k>`` that holds the same config (so rerunning a ``--fresh`` command
resumes it), or in a new one. The record holds ``RESUME_FORMAT`` (bumped when checkpoints of older code can no
longer be resumed) and, for information only, the commit and library versions. A run refused before it wrote
anything else does not stay bound: ``cli`` removes the records it created in folders that hold nothing else.
``prepare`` also locks the result files of ``--outdir`` (``<outdir>/.<name>.lock``), so two runs writing the same
results cannot both report success.

``cli`` prints the expected errors (``ConfigError``, data, checkpoint, lock, results and bad-value errors) as one
line ``error: <cause>; <hint>`` on stderr with exit status 2; ``--debug`` or ``EEJAX_DEBUG=1`` shows the traceback.
Ctrl-C (SIGINT) and SIGTERM print one line too (exit status 130 / 143) after releasing the locks and dropping
staged results; a rerun of the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import atexit
import errno
import functools
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Mapping

from eejax.errors import ConfigMismatchError, DiskFullError, EejaxError, WorkdirLockedError

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


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, field 22 of /proc/<pid>/stat), with the boot id: a
    pid reused by another process after the lock holder died has another start; None where /proc is missing."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        start = stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None
    try:
        boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}:{start}"


def _same_command(pid: int, command: Any) -> bool:
    """Whether process ``pid`` runs ``command`` (the holder's ``" ".join(sys.argv)``: its arguments after argv[0]
    end the process's command line); True when either is unknown."""
    try:
        argv = [a.decode(errors="replace") for a in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return True
    if not isinstance(command, str) or not command.strip():
        return True
    args = command.split(" ")[1:]
    return not args or " ".join(a for a in argv if a).endswith(" ".join(args))


_HELD: list["WorkdirLock"] = []


def release_locks() -> None:
    """Releases every workdir lock this process holds (``cli`` does it when main returns or fails)."""
    for lock in list(_HELD):
        lock.release()


class WorkdirLock:
    """``<directory>/.lock`` created with O_EXCL; ``release()`` (also at interpreter exit) removes it.

    ``break_lock``: remove an existing lock first, whoever holds it (``--break-lock``: for a lock whose run is gone
    but cannot be detected as such: another host's, a garbage file, a directory).
    """

    def __init__(self, directory: str | os.PathLike, name: str = LOCK, *, what: str = "workdir"):
        self.path = pathlib.Path(directory) / name
        self.held = False
        self.what = what

    def acquire(self, *, break_lock: bool = False) -> "WorkdirLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "process_start": _process_start(os.getpid())}
        if break_lock:
            self._break()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None and self.path.is_file():  # being written right now, or garbage; look again
                    time.sleep(0.05)
                    holder = self._holder()
                if self._stale(holder):
                    self._remove_stale(holder)
                    continue
                raise WorkdirLockedError(self._refusal(holder)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            _HELD.append(self)
            atexit.register(self.release)
            return self
        raise WorkdirLockedError(f"could not take the lock {self.path}")

    def _refusal(self, holder: dict | None) -> str:
        where = f"{self.what} {self.path.parent}"
        if holder is not None:
            other_host = holder.get("host") != socket.gethostname()
            return (f"{where} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                    f"(`{holder.get('command', '?')}`, started {holder.get('started', '?')}); lock file {self.path}"
                    + ("; that host's processes cannot be checked from here" if other_host else ""))
        kind = "a directory" if self.path.is_dir() else "not a lock file this code wrote (garbage or empty)"
        return f"{where} has a lock {self.path} that is {kind}, so whether a run holds it is unknown"

    def _break(self) -> None:
        if not (self.path.exists() or self.path.is_symlink()):
            return
        holder = self._holder()
        if self.path.is_dir() and not self.path.is_symlink():
            try:
                self.path.rmdir()
            except OSError:
                raise WorkdirLockedError(f"--break-lock: {self.path} is a directory with files in it; remove it by "
                                         "hand if no run uses it") from None
        else:
            self.path.unlink(missing_ok=True)
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock"
        print(f"note: --break-lock: removed the lock of {who} in {self.path.parent}", file=sys.stderr, flush=True)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # vanished, or an empty file left by a process killed between create and write
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return True
            return self.path.is_file() and st.st_size == 0 and time.time() - st.st_mtime > 5
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool):
            return False
        if not _pid_alive(pid):
            return True
        # Alive: the holder itself, or another process that got its pid after it died (a reboot, a recycled pid).
        recorded, now = holder.get("process_start"), _process_start(pid)
        if recorded and now:
            return recorded != now
        return not _same_command(pid, holder.get("command"))  # a lock of older code: compare the command

    def _remove_stale(self, holder: dict | None) -> None:
        if holder:
            why = ("no such process" if not _pid_alive(holder["pid"]) else
                   "that pid now belongs to another process")
            print(f"note: removing the stale lock of pid {holder.get('pid')} ({why}) in {self.path.parent}",
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
                 record: Mapping[str, Any] | None = None, what: str = "workdir",
                 break_lock: bool | None = None) -> pathlib.Path:
    """Lock ``workdir`` for this process and bind it to ``cfg``; returns the directory the run must use.

    ``record`` replaces ``config_record(cfg)`` (e.g. only the fields a shared base model depends on). A recorded
    config that differs raises ``ConfigMismatchError`` naming the fields, or with ``fresh`` moves the run to the
    ``<workdir>/fresh-<k>`` that holds the same config (a rerun resumes it) or else to the first free one (which
    gets its own record and lock). ``break_lock``: remove an existing lock first (default: ``--break-lock`` of
    the run, as ``prepare`` saw it).
    """
    if break_lock is None:
        break_lock = _OPTIONS["break_lock"]
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigMismatchError(f"{what} {workdir} is a file, not a directory")
    created = _mkdir(workdir)
    if lock and _is_chief():
        WorkdirLock(workdir, LOCK if _process_count() == 1 else f"{LOCK}.{_process_index()}",
                    what=what).acquire(break_lock=break_lock)
    want = dict(record) if record is not None else config_record(cfg)
    path = workdir / RUN_CONFIG
    if not path.exists():
        if any(p.name not in (LOCK, "results") and not p.name.startswith(LOCK) for p in workdir.iterdir()):
            # A workdir from before run_config.json existed: its checkpoints cannot be tied to a config.
            if not fresh:
                raise ConfigMismatchError(f"{what} {workdir} holds files but no {RUN_CONFIG}, so its checkpoints "
                                          "cannot be matched to this config")
            return _fresh_subdir(workdir, cfg, want, lock, what)
        if _is_chief():
            _CREATED.append((path, created, _files(workdir)))
            _write_json(path, want)
        return workdir
    diffs = _record_diffs(path, want, what)
    if not diffs:
        return workdir
    if fresh:
        return _fresh_subdir(workdir, cfg, want, lock, what)
    shown = ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise ConfigMismatchError(f"{what} {workdir} was run with a different config: {shown}")


def _record_diffs(path: pathlib.Path, want: Mapping[str, Any], what: str) -> list[str]:
    """``field (old -> new)`` for every field where the record at ``path`` differs from ``want``."""
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigMismatchError(f"{path} is unreadable ({e})") from None
    if not isinstance(have, dict) or not isinstance(have.get("config", {}), dict):
        raise ConfigMismatchError(f"{path} holds {_short(have)}, not a run record (an object with a 'config'); "
                                  f"it was not written by this code, so {what} {path.parent} cannot be matched to "
                                  "this config")
    diffs = []
    if have.get("resume_format") != want["resume_format"]:
        diffs.append(f"resume_format ({have.get('resume_format')} -> {want['resume_format']}: checkpoints of an "
                     "older code version)")
    return diffs + config_diff(have.get("config", {}), want["config"])


def _fresh_subdir(workdir: pathlib.Path, cfg, want, lock: bool, what: str) -> pathlib.Path:
    # Release the parent's lock: the run lives in the subfolder from here on.
    for held in list(_HELD):
        if held.path.parent == workdir:
            held.release()
    subs = sorted((p for p in workdir.glob("fresh-*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))
    for sub in subs:  # the same --fresh command again: resume the subfolder that holds this config
        if (sub / RUN_CONFIG).is_file():
            try:
                same = not _record_diffs(sub / RUN_CONFIG, want, what)
            except ConfigMismatchError:
                same = False
            if same:
                print(f"note: {workdir} holds a run of another config; --fresh: this config's run is {sub} "
                      "(resumed)", file=sys.stderr, flush=True)
                return open_workdir(sub, cfg, fresh=False, lock=lock, record=want, what=what)
    k = 1
    while (workdir / f"fresh-{k}").exists():
        k += 1
    sub = workdir / f"fresh-{k}"
    print(f"note: {workdir} holds a run of another config; --fresh: this run uses {sub}", file=sys.stderr,
          flush=True)
    return open_workdir(sub, cfg, fresh=False, lock=lock, record=want, what=what)


# Options of the current run that every open_workdir of it honours (set by prepare from the command line).
_OPTIONS = {"break_lock": False}

# Records this process wrote, with the topmost folder it created for them and the files the folder held before: a
# run that fails before writing anything else leaves no binding behind (``unbind_unused``).
_CREATED: list[tuple[pathlib.Path | None, pathlib.Path | None, frozenset]] = []


def _mkdir(path: pathlib.Path) -> pathlib.Path | None:
    """``mkdir -p``; returns the topmost folder it created (None if ``path`` existed)."""
    top, p = None, path.absolute()
    while not p.exists():
        top, p = p, p.parent
    path.mkdir(parents=True, exist_ok=True)
    return top


def _files(directory: pathlib.Path) -> frozenset:
    """Every file (not folder) under ``directory``."""
    return frozenset(p for p in directory.rglob("*") if not p.is_dir() or p.is_symlink())


def _only_bookkeeping(directory: pathlib.Path, before: frozenset = frozenset()) -> bool:
    """Whether ``directory`` holds nothing but ``before``, a run record, lock files and empty folders."""
    for p in _files(directory) - before:
        if not (p.name == RUN_CONFIG or p.name.startswith(LOCK) or (p.name.startswith(".") and p.name.endswith(
                ".lock"))):
            return False
    return True


def unbind_unused() -> None:
    """Removes the run records this process created in folders that still hold nothing else, and the folders it
    created for them when empty: a refused run must not bind a workdir to its (refused) config. Called by ``cli``
    when main fails."""
    release_locks()
    while _CREATED:
        path, created, before = _CREATED.pop()
        try:
            if path is not None and path.is_file() and _only_bookkeeping(path.parent, before):
                path.unlink()
            if created is not None and created.is_dir() and _only_bookkeeping(created):
                if not any(p.is_file() for p in created.rglob("*")):
                    shutil.rmtree(created, ignore_errors=True)
        except OSError:
            pass


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
    ``<workdir>/results``) with its ``<result_name>`` results locked, and a refusal to replace existing
    ``<result_name>.md/.json`` without ``--overwrite``. ``--break-lock`` applies to every lock this run takes."""
    from eejax.harness import config as config_lib  # noqa: PLC0415

    _OPTIONS["break_lock"] = bool(getattr(args, "break_lock", False))
    workdir = pathlib.Path(args.workdir or f"runs/{cfg.name}")
    workdir = open_workdir(workdir, cfg, fresh=getattr(args, "fresh", False),
                           record=config_record(cfg, getattr(args, "not_in_checkpoints", ())))
    args = type(args)(**{**vars(args), "workdir": str(workdir)})
    workdir, outdir = config_lib.run_dirs(cfg, args, result_name)
    if _is_chief():
        created = _mkdir(outdir)
        if created is not None:
            _CREATED.append((None, created, frozenset()))
        WorkdirLock(outdir, f".{result_name}.lock", what=f"--outdir (its {result_name} results)").acquire(
            break_lock=_OPTIONS["break_lock"])
    return workdir, outdir


# ------------------------------------------------------------------------------------------------------ CLI


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (like KeyboardInterrupt for SIGINT) so that locks are released."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: every ``eejax.errors`` class, the API's argument checks (ValueError), a
    non-finite loss and file-system errors. Anything else is a bug and keeps its traceback."""
    return (EejaxError, ValueError, FloatingPointError, OSError)


def _hint(e: BaseException) -> str:
    hint = getattr(e, "hint", "")
    if hint:
        return hint
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return DiskFullError.hint
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


INTERRUPTED = {KeyboardInterrupt: ("interrupted (Ctrl-C)", 130), Terminated: ("stopped by SIGTERM", 143)}


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an experiment's ``main(argv=None)``: expected errors become one line on stderr and exit status 2;
    Ctrl-C and SIGTERM one line too (130 / 143). Locks are released and staged results dropped either way.

    Called from the command line (``argv=None``), a failed run then ends at once (``os._exit``): the line stays
    the last thing printed, and no background thread of a failed checkpoint write can hold the exit for minutes.
    """

    @functools.wraps(main)
    def wrapped(argv=None, *a, **kw):
        command_line = argv is None
        debug = debug_requested(argv)
        set_debug = debug and os.environ.get("EEJAX_DEBUG", "") in ("", "0")
        if set_debug:
            os.environ["EEJAX_DEBUG"] = "1"  # also keeps orbax's own error logs (eejax.train.checkpoint)
        old_term = None
        if command_line and threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        ok, code = False, 0
        _CREATED.clear()
        try:
            out = main(argv, *a, **kw)
            ok = True
            return out
        except _expected_errors() as e:
            if debug:
                raise
            print(error_line(e), file=sys.stderr, flush=True)
            code = 2
            raise SystemExit(2) from None
        except (KeyboardInterrupt, Terminated) as e:
            what, code = INTERRUPTED[type(e)]
            print(f"error: {what}; locks released, results left as they were; rerun the same command to resume "
                  "from the last checkpoint", file=sys.stderr, flush=True)
            raise SystemExit(code) from None
        finally:
            if set_debug:
                del os.environ["EEJAX_DEBUG"]
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            if not ok:
                unbind_unused()
            _CREATED.clear()
            release_locks()
            _OPTIONS["break_lock"] = False
            if "eejax.harness.results" in sys.modules:  # drop staged results of a run that did not finish
                sys.modules["eejax.harness.results"].abort_open_stages()
            if command_line and code:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    return wrapped
