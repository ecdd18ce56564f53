"""The experiment runner: what every paper script's ``main`` did by hand, written once.

A paper script holds its science; ``experiment`` supplies the rest, as flax's examples keep ``main.py`` short and
leave the work to libraries::

    @experiment("lgvit", data=vision.load_data)
    def main(run: Run, data) -> Report:
        ...                                    # train, evaluate: the paper's recipe
        return Report(markdown, {"results": results}, files={"lgvit_exits.png": lambda path: ...})

``experiment(name, ...)`` turns that function into the script's ``main(argv=None)``, which

1. parses the command line (``--config PATH[:ARG]``, ``--config.a.b=v`` overrides, ``--workdir`` ``--outdir``
   ``--data_dir`` ``--overwrite`` ``--fresh`` ``--debug``) and validates every config value before any work;
2. calls ``data(cfg, args)`` when given: data are read and checked before anything is written, so a bad
   ``--data_dir`` leaves no workdir behind;
3. initialises a multi-host run (``maybe_initialize``, before the first device query) and records the provenance
   (the command, the commit, the device, the date) at the start, so it names the code that ran;
4. locks the workdir and binds it to the config (``eejax.harness.run.prepare``), refusing existing results unless
   ``--overwrite``;
5. runs the science: ``science(run)`` or ``science(run, data)``, returning a ``Report`` (or None: nothing to write);
6. on process 0 only (every host computed the same), writes the plots, the table and the JSON into a staging folder
   and commits them together (``eejax.harness.results.StagedResults``: never a half-written result), with the
   provenance and the config added to the JSON, then prints the table and the files written.

Errors a user can fix (a bad value, missing data, a locked workdir) end as one line ``error: ...; hint`` with exit
status 2 (``eejax.harness.run.cli``).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple

import ml_collections

from eejax.harness import config as config_lib
from eejax.harness import results as result_files
from eejax.harness import run as run_lib


class Run(NamedTuple):
    """What a paper's science gets: the validated config, the flags, where to write, and where it came from."""
    name: str                          # the paper (experiments/<name>.py)
    cfg: ml_collections.ConfigDict
    args: argparse.Namespace           # --workdir, --data_dir, --outdir, --overwrite, --fresh, ...
    prov: result_files.Provenance      # command, device, commit, date (prov.markdown() heads every table)
    workdir: pathlib.Path              # locked, bound to cfg (checkpoints, caches)
    outdir: pathlib.Path               # results (tables, JSON, plots)
    started: float                     # time.perf_counter() when the run started

    def seconds(self) -> float:
        """Wall-clock seconds since the run started."""
        return time.perf_counter() - self.started

    def keyed_dir(self, name: str, fields: Any) -> pathlib.Path:
        """``<workdir>/<name>-<hash of fields>``: where a stage keeps what it trains on config fields the workdir's
        binding leaves out (a config's ``NOT_IN_CHECKPOINTS``), so another value of them starts afresh instead of
        resuming the wrong checkpoints."""
        plain = json.dumps(fields, sort_keys=True, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o))
        key = hashlib.sha256(plain.encode()).hexdigest()[:12]
        return self.workdir / f"{name}-{key}"

    def shared_workdir(self, path: str, record: Mapping[str, Any], default: pathlib.Path, *,
                       what: str = "model_workdir") -> pathlib.Path:
        """A directory several runs share (a base model, a backbone, trained exits): ``path`` locked and bound to
        ``record`` (the config fields its checkpoints depend on, so another recipe is refused, not silently
        reused), or, when ``path`` is empty, ``default`` inside this run's own workdir."""
        if not path:
            return default
        return run_lib.open_workdir(path, self.cfg, fresh=getattr(self.args, "fresh", False), what=what,
                                    record=run_lib.config_record(record))


class Report(NamedTuple):
    """What a paper's science returns: the table (``<name>.md``), the numbers behind it (``<name>.json``; the
    runner adds ``provenance`` and ``config``), and other files (plots, logs) by name, each written by
    ``write(path)`` into the staging folder (the name ``"."``: a writer of several files into the folder itself)."""
    markdown: str
    data: Mapping[str, Any]
    files: Mapping[str, Callable[[pathlib.Path], Any]] = {}


def experiment(name: str, *, data: Callable[[Any, argparse.Namespace], Any] | None = None,
               result_name: Callable[[Any], str] | None = None, bind_workdir: bool = True
               ) -> Callable[[Callable[..., Report | None]], Callable[..., Any]]:
    """Turns ``science(run[, data]) -> Report`` into the script's ``main(argv=None)``; see the module docstring.

    ``data(cfg, args)`` loads and checks the data before any file is written; its result is the second argument
    of ``science``. ``result_name(cfg)`` names the result files when they are not ``<name>.md/.json``.
    ``bind_workdir=False``: a script that trains and caches nothing takes no workdir lock and writes no record
    (only the results, under ``--outdir``).
    """

    def wrap(science: Callable[..., Report | None]) -> Callable[..., Any]:
        description = getattr(sys.modules.get(science.__module__), "__doc__", "") or ""

        @run_lib.cli
        @functools.wraps(science)
        def main(argv=None):
            import jax  # noqa: PLC0415 (the harness stays importable without initialising jax)

            from eejax.train import maybe_initialize  # noqa: PLC0415

            started = time.perf_counter()
            cfg, args = config_lib.parse_cli(argv, description=description)  # every value validated first
            loaded = data(cfg, args) if data is not None else None
            maybe_initialize()  # multi-host: before the first device query
            prov = result_files.provenance(f"experiments.{name}", argv)
            stem = result_name(cfg) if result_name is not None else name
            if bind_workdir:
                workdir, outdir = run_lib.prepare(cfg, args, stem)
            else:
                workdir, outdir = config_lib.run_dirs(cfg, args, stem)
            run = Run(name, cfg, args, prov, workdir, outdir, started)
            report = science(run) if data is None else science(run, loaded)
            if report is None or jax.process_index() != 0:
                return
            write(run, stem, report)

        return main

    return wrap


def write(run: Run, stem: str, report: Report) -> list[pathlib.Path]:
    """The files, ``<stem>.md`` and ``<stem>.json`` into a staging folder, committed together; prints what it wrote."""
    stage = result_files.StagedResults(run.outdir, overwrite=run.args.overwrite)
    for file_name, write_file in report.files.items():
        write_file(stage.dir / file_name)
    payload = dict(report.data)
    payload.setdefault("provenance", run.prov._asdict())
    payload.setdefault("config", run.cfg.to_dict())
    stage.write_results(stem, report.markdown, payload)
    files = stage.commit()
    print(report.markdown)
    for f in files:
        print(f"wrote {f}")
    return files


def logged_loss(workdir, step: int, key: str = "loss") -> float:
    """The value the Trainer logged at ``step`` in ``<workdir>/metrics.jsonl`` (a fit's last step is always logged;
    a rerun appends, so the last record of a step wins)."""
    from eejax.train import read_metrics  # noqa: PLC0415

    return float([r for r in read_metrics(workdir) if r["step"] == step][-1][key])
