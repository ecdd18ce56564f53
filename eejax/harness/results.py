"""Result files of an experiment run: provenance, and the staged writer that never leaves a half-written result.

Results are written as ``name.md`` (a markdown table) beside ``name.json`` (the numbers behind it), never over an
existing result unless asked, so a rerun cannot silently replace a reported number. Only a run that finished replaces
results: every file of a run's results (md, json, plots) is written into a hidden staging folder of the output
directory (``StagedResults``) and moved into place together by ``commit()``. The commit writes a journal
(``.results-commit.json``) before its renames and removes it after, so a process killed halfway is completed by
``recover_results`` (called when the next StagedResults opens that directory): readers never keep a half pair.
Results files get mode 0644.

Provenance (``provenance``) is taken when a run starts: command, device, commit with a dirty flag, package versions.
A file one run reads from ANOTHER run (a drafter, a base model, cached features) is recorded in it with its sha256
and its producer's commit and step (``record_input``), read from the record the producer left beside the file
(``write_artefact_record``), so every result names exactly what it was built on.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from eejax.errors import ArtefactError, ResultsExistError


class Provenance(NamedTuple):
    """Where a result came from: written into every result JSON (``_asdict()``) and printed beside every table.

    ``commit`` is the short hash, ``+dirty`` appended when tracked files had uncommitted changes (``dirty`` says the
    same as a flag); ``versions`` the packages that computed the numbers; ``inputs`` one ``InputArtefact`` per file
    this run read from ANOTHER run (a drafter, a base model, cached features), appended by ``record_input`` while
    the run goes, so the JSON names exactly what it was built on."""
    command: str
    device: str
    jax_version: str
    commit: str
    date: str
    dirty: bool = False
    versions: dict | None = None
    inputs: list | None = None

    def markdown(self) -> str:
        lines = [f"Command: `{self.command}`", f"Hardware: {self.device}, jax {self.jax_version}",
                 f"Code: commit {self.commit}, run started {self.date}"]
        for a in self.inputs or ():
            lines.append(f"Input from another run: {a.markdown()}")
        return "  \n".join(lines)


class InputArtefact(NamedTuple):
    """A file (or directory) one run read from another: its sha256 and who produced it.

    ``producer_*`` come from the ``<file>.provenance.json`` record the producing run wrote beside it
    (``write_artefact_record``); a file without one gets ``"not recorded"`` there, which the result then says."""
    path: str
    role: str
    sha256: str
    producer_commit: str
    producer_step: int | None
    producer_command: str
    producer_date: str

    def markdown(self) -> str:
        step = "" if self.producer_step is None else f", step {self.producer_step}"
        return (f"{self.role} `{self.path}` (sha256 {self.sha256[:16]}, produced at commit {self.producer_commit}"
                f"{step})")


RECORD_SUFFIX = ".provenance.json"
NOT_RECORDED = "not recorded"
_VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections")


def _git(*args) -> str:
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages that compute the numbers (absent ones are left out)."""
    from importlib import metadata  # noqa: PLC0415

    out = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(module: str, argv: Sequence[str] | None = None) -> Provenance:
    """The command that reproduces this run (``python -m module argv``), the device, the git commit (``+dirty``
    and ``dirty=True`` when tracked files had uncommitted changes), the package versions and the UTC date. Call it
    when the run starts: the commit must be the code that ran, even if the tree changes while it runs."""
    import jax  # noqa: PLC0415 (keep this module importable without initialising jax)

    argv = sys.argv[1:] if argv is None else argv
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return Provenance(command=" ".join(["python -m", module, *map(shlex.quote, argv)]),
                      device=device_description(),
                      jax_version=jax.__version__, commit=commit + ("+dirty" if dirty else ""),
                      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      dirty=dirty, versions=package_versions(), inputs=[])


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file; of a directory, the sha256 of its sorted ``relative path + NUL + file sha256`` lines (so a
    checkpoint directory has one hash that changes when any file in it does)."""
    import hashlib  # noqa: PLC0415

    path = pathlib.Path(path)

    def file_hash(p: pathlib.Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory to hash")
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.endswith(RECORD_SUFFIX)):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_hash(p)}\n".encode())
    return h.hexdigest()


def write_artefact_record(path: str | os.PathLike, prov: Provenance, *, step: int | None = None) -> pathlib.Path:
    """Writes ``<path>.provenance.json`` beside an artefact other runs may read (a drafter's weights, cached
    features): its sha256, the producing run's commit, command and date, and the training step it holds. Call it
    right after the artefact is written; ``record_input`` in the reading run checks the hash against it."""
    path = pathlib.Path(path)
    record = path.with_name(path.name + RECORD_SUFFIX)
    _write_atomic(record, json.dumps({"sha256": sha256_of(path), "commit": prov.commit, "step": step,
                                      "command": prov.command, "date": prov.date}, indent=2) + "\n")
    return record


def record_input(prov: Provenance, path: str | os.PathLike, role: str, *,
                 producer: dict | None = None) -> InputArtefact:
    """Records that this run read ``path`` (produced by another run) in ``prov.inputs``: its sha256 now, and the
    producer's commit / step / command from the record beside it. A record whose hash differs from the file's is
    refused (the file was replaced after the producing run wrote it); a file without a record is recorded with
    ``"not recorded"`` as its producer. ``producer`` (``commit``, ``command``, ``date``, optional ``step``) names
    the producer when the file says it itself: a result JSON's own provenance."""
    path = pathlib.Path(path)
    digest = sha256_of(path)
    record = path.with_name(path.name + RECORD_SUFFIX)
    producer = ({"commit": NOT_RECORDED, "step": None, "command": NOT_RECORDED, "date": NOT_RECORDED}
                if producer is None else {"step": None, **producer})
    if record.exists():
        producer = json.loads(record.read_text())
        if producer.get("sha256") != digest:
            raise ArtefactError(f"{path}: its sha256 {digest[:16]} differs from the one its producing run recorded "
                                f"in {record.name} ({str(producer.get('sha256'))[:16]}): the file was replaced")
    art = InputArtefact(str(path), role, digest, str(producer["commit"]), producer["step"],
                        str(producer["command"]), str(producer["date"]))
    if prov.inputs is None:
        raise ValueError("prov has no inputs list: make it with results.provenance()")
    prov.inputs.append(art)
    return art


def device_description() -> str:
    """The accelerator and, on CPU, the processor model and visible cores (for the provenance line of a table)."""
    import jax  # noqa: PLC0415

    dev = jax.devices()[0]
    desc = f"{jax.device_count()} x {dev.device_kind}"
    if dev.platform == "cpu":
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        desc += f" ({model}, {len(os.sched_getaffinity(0))} cores visible)"
    return desc


def _to_json(obj: Any):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _jsonable(obj: Any):
    """NamedTuples become dicts (json would write them as lists and lose the field names)."""
    if hasattr(obj, "_asdict"):
        return {k: _jsonable(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _write_atomic(path: pathlib.Path, text: str):
    """Temp file in the same directory + ``os.replace``: readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ResultFiles(NamedTuple):
    md_path: pathlib.Path
    json_path: pathlib.Path


JOURNAL = ".results-commit.json"
CRASH_ENV = "EEJAX_CRASH_IN_RESULTS"  # tests only: "staged" (all files written, nothing moved) or "renaming"
_OPEN_STAGES: list["StagedResults"] = []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_results(outdir: str | os.PathLike) -> None:
    """Completes a commit that was killed halfway (its journal is there) and removes abandoned staging folders."""
    outdir = pathlib.Path(outdir)
    journal = outdir / JOURNAL
    if journal.exists():
        try:
            entry = json.loads(journal.read_text())
            stage = outdir / entry["stage"]
            for name in entry["files"]:
                if (stage / name).exists():
                    os.replace(stage / name, outdir / name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResultsExistError(f"{journal}: an interrupted results commit cannot be completed ({e})") from e
        print(f"note: completed an interrupted results commit in {outdir}", file=sys.stderr, flush=True)
        journal.unlink()
    for stage in outdir.glob(".staging-*"):
        pid = stage.name.split("-")[1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def read_result_input(prov: Provenance, path: str | os.PathLike, role: str, *,
                      root: str | os.PathLike | None = None) -> dict:
    """Reads a result JSON another run wrote and records it in ``prov.inputs`` (``record_input``): its sha256 and,
    as its producer, the commit / command / date of its own provenance. The recorded path is relative to ``root``
    (the repository) when the file lies inside it."""
    path = pathlib.Path(path)
    data = json.loads(path.read_text())
    src = data.get("provenance", {})
    art = record_input(prov, path, role, producer={k: src.get(k, NOT_RECORDED) for k in ("commit", "command", "date")})
    if root is not None:
        try:
            prov.inputs[-1] = art._replace(path=path.resolve().relative_to(pathlib.Path(root).resolve()).as_posix())
        except ValueError:   # outside the repository: its own path
            pass
    return data


def write_pair(directory: str | os.PathLike, name: str, table_md: str, data_json: Any) -> ResultFiles:
    """Writes ``directory/name.md`` and ``name.json`` (each atomically), replacing whatever is there."""
    directory = pathlib.Path(directory)
    files = ResultFiles(directory / f"{name}.md", directory / f"{name}.json")
    directory.mkdir(parents=True, exist_ok=True)
    # Serialise before writing anything, so a bad payload leaves no half-written result behind.
    json_text = json.dumps(_jsonable(data_json), indent=2, default=_to_json) + "\n"
    _write_atomic(files.md_path, table_md)
    _write_atomic(files.json_path, json_text)
    return files


class StagedResults:
    """A results transaction over ``outdir``: write every file under ``stage.dir``, then ``commit()``.

        with StagedResults(outdir, overwrite=args.overwrite) as stage:
            report.plot_exit_histogram(..., stage.dir / "exits.png")
            files = stage.write_results("lgvit", md, data)     # paths where they will be after the commit
        # committed on a clean exit from the block; on an exception the staged files are dropped

    ``commit`` refuses (``ResultsExistError``, nothing moved) to replace an existing file unless ``overwrite``.
    """

    def __init__(self, outdir: str | os.PathLike, *, overwrite: bool = False):
        self.outdir, self.overwrite = pathlib.Path(outdir), overwrite
        self.outdir.mkdir(parents=True, exist_ok=True)
        recover_results(self.outdir)
        self.dir = pathlib.Path(tempfile.mkdtemp(dir=self.outdir, prefix=f".staging-{os.getpid()}-"))
        os.chmod(self.dir, 0o755)
        self.committed = False
        _OPEN_STAGES.append(self)

    def write_results(self, name: str, table_md: str, data_json: Any) -> ResultFiles:
        write_pair(self.dir, name, table_md, data_json)
        return ResultFiles(self.outdir / f"{name}.md", self.outdir / f"{name}.json")

    def commit(self) -> list[pathlib.Path]:
        """Moves the staged files into ``outdir`` (results files last, the .md after its .json)."""
        names = sorted((p.name for p in self.dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda n: (n.endswith(".md"), n.endswith(".json"), n))
        if not self.overwrite:
            for name in names:
                if (self.outdir / name).exists() and name.endswith((".md", ".json")):
                    raise ResultsExistError(f"{self.outdir / name} exists")
        for name in names:
            if (self.dir / name).stat().st_mode & 0o777 == 0o600:
                os.chmod(self.dir / name, 0o644)
        if os.environ.get(CRASH_ENV) == "staged":
            os._exit(17)
        _write_atomic(self.outdir / JOURNAL, json.dumps({"stage": self.dir.name, "files": names}))
        for i, name in enumerate(names):
            os.replace(self.dir / name, self.outdir / name)
            if i == 0 and os.environ.get(CRASH_ENV) == "renaming":
                os._exit(17)
        (self.outdir / JOURNAL).unlink()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.committed = True
        self._close()
        return [self.outdir / n for n in names]

    def abort(self) -> None:
        """Drops the staged files; the previous results stay as they were."""
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._close()

    def _close(self) -> None:
        if self in _OPEN_STAGES:
            _OPEN_STAGES.remove(self)

    def __enter__(self) -> "StagedResults":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and not self.committed:
            self.commit()
        else:
            self.abort()


def abort_open_stages() -> None:
    """Drops the staged files of every transaction not committed (the CLI wrapper calls it when main ends)."""
    for stage in list(_OPEN_STAGES):
        stage.abort()


def write_results(outdir: str | os.PathLike, name: str, table_md: str, data_json: Any,
                  overwrite: bool = False) -> ResultFiles:
    """Writes ``outdir/name.md`` and ``outdir/name.json`` as one staged commit; refuses to replace existing results
    unless asked.

    ``data_json`` may hold numpy arrays/scalars and NamedTuples (written as objects). Non-finite floats (e.g.
    the -inf threshold of the last exit) are written as JSON ``Infinity``/``NaN``, which Python reads back.
    """
    outdir = pathlib.Path(outdir)
    files = ResultFiles(outdir / f"{name}.md", outdir / f"{name}.json")
    if not overwrite:
        for path in files:
            if path.exists():
                raise ResultsExistError(f"{path} exists; pass overwrite=True to replace it")
    with StagedResults(outdir, overwrite=overwrite) as stage:
        stage.write_results(name, table_md, data_json)
    return files
