"""Configs are Python: ``configs/<paper>.py`` defines ``get_config(arg)`` returning an ml_collections ConfigDict.

The command line names a config and its argument, then overrides fields by dotted path::

    python -m experiments.lgvit --config configs/lgvit.py:smoke --config.model.depth=6 --config.train.steps=200

An override must name an existing key and parse as that key's type; anything else is a one-line ``ConfigError``.
After the overrides, the config file's own ``validate(cfg)`` (if it defines one) checks every value (types, ranges,
finite numbers, known names) before any work starts; ``Validator`` below is the helper those functions use.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import math
import numbers
import pathlib
import sys
from typing import Any, Callable, Iterable, Sequence

import ml_collections

from eejax.errors import ConfigError, ResultsExistError




def load(spec: str, *, validate: bool = True) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:arg]``, call its ``get_config(arg)`` and (by default) its ``validate(cfg)``."""
    cfg, module = _load(spec)
    if validate:
        _validate(module, cfg, spec)
    return cfg


def _validate(module, cfg: ml_collections.ConfigDict, spec: str) -> None:
    check = getattr(module, "validate", None)
    if check is None:
        return
    try:
        check(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a model config's own __post_init__ check, say
        raise ConfigError(f"{spec}: {e}") from e


def _load(spec: str):
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"eejax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    # Configs may import the shared pieces beside them (configs/_base_*.py) by bare name.
    sys.path.insert(0, str(file.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(file.resolve().parent))
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    try:
        cfg = module.get_config(arg or None)
    except ValueError as e:  # e.g. an unknown config argument
        raise ConfigError(str(e)) from e
    cfg.lock()  # no new keys from here on
    return cfg, module


def _parse_value(key: str, raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={raw}: expected a bool (true/false)")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw
        raise ConfigError(f"--config.{key}={raw}: expected a {type(current).__name__}") from None
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    if isinstance(value, bool) or type(value) is not type(current):
        raise ConfigError(f"--config.{key}={raw}: expected a {type(current).__name__}, got {type(value).__name__}")
    return value


def override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Set ``cfg.<key>`` (dotted) from a command-line string, type-checked against the existing value."""
    *parents, leaf = key.split(".")
    node, path = cfg, []
    for name in parents + [leaf]:
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(name, known, n=1)
            where = ".".join(path) or "<top>"
            raise ConfigError(f"unknown config key {key!r}" + (f"; did you mean {'.'.join(path + hint)!r}?" if hint
                              else f"; keys under {where}: {', '.join(known)}"))
        if name != leaf:
            node, path = node[name], path + [name]
    with cfg.unlocked():
        node[leaf] = _parse_value(key, raw, node[leaf])


def parse_cli(argv: Sequence[str] | None = None, *, default_config: str | None = None,
              description: str = "") -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
    """Parse ``--config PATH[:ARG]``, ``--config.a.b=v`` overrides and the common run flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = [], []
    for a in argv:
        if a.startswith("--config."):
            key, eq, raw = a[len("--config."):].partition("=")
            if not eq:
                raise ConfigError(f"{a}: write overrides as --config.key=value")
            overrides.append((key, raw))
        else:
            rest.append(a)
    parser = _ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="config file and argument, e.g. configs/lgvit.py:smoke")
    parser.add_argument("--workdir", default=None, help="run directory (checkpoints, metrics); default runs/<name>")
    parser.add_argument("--data_dir", default=None, help="offline data directory (or env EEJAX_DATA_DIR)")
    parser.add_argument("--outdir", default=None, help="where result tables/plots go; default <workdir>/results")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--fresh", action="store_true",
                        help="if --workdir holds a run of another config, start over in a new subfolder of it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors (or env EEJAX_DEBUG=1)")
    args = parser.parse_args(rest)
    cfg, module = _load(args.config)
    for key, raw in overrides:
        override(cfg, key, raw)
    _validate(module, cfg, args.config)
    # Top-level fields the paper declares irrelevant to its checkpoints (evaluation settings): a finished run can be
    # re-evaluated with other values in the same workdir (eejax.harness.run.open_workdir compares the rest).
    args.not_in_checkpoints = tuple(getattr(module, "NOT_IN_CHECKPOINTS", ()))
    if args.workdir is not None and pathlib.Path(args.workdir).exists() and not pathlib.Path(args.workdir).is_dir():
        raise ConfigError(f"--workdir {args.workdir} is a file, not a directory")
    if args.outdir is not None and pathlib.Path(args.outdir).exists() and not pathlib.Path(args.outdir).is_dir():
        raise ConfigError(f"--outdir {args.outdir} is a file, not a directory")
    return cfg, args


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a ConfigError (one line, exit status 2 through eejax.harness.run.cli)."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


def run_dirs(cfg: ml_collections.ConfigDict, args: argparse.Namespace, result_name: str
             ) -> tuple[pathlib.Path, pathlib.Path]:
    """``(workdir, outdir)`` of a run: ``--workdir`` (default ``runs/<cfg.name>``) and ``--outdir`` (default
    ``<workdir>/results``). Refuses, before any work, to overwrite existing ``<result_name>.md/.json`` results
    unless ``--overwrite`` was given."""
    workdir = pathlib.Path(args.workdir or f"runs/{cfg.name}")
    outdir = pathlib.Path(args.outdir or workdir / "results")
    for f in (f"{result_name}.md", f"{result_name}.json"):
        if (outdir / f).exists() and not args.overwrite:
            raise ResultsExistError(f"{outdir / f} exists")
    return workdir, outdir




# ------------------------------------------------------------------------------------------------ validation


def get(cfg: ml_collections.ConfigDict, key: str) -> Any:
    """``cfg.<key>`` for a dotted key."""
    node = cfg
    for name in key.split("."):
        node = node[name]
    return node


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"


def _in_range(x, lo, hi, lo_open, hi_open) -> bool:
    return ((lo is None or (x > lo if lo_open else x >= lo)) and (hi is None or (x < hi if hi_open else x <= hi)))


class Validator:
    """Checks on a config's fields; each raises a one-line ``ConfigError`` naming the field, its value and the rule.

        v = Validator(cfg)
        v.int("data.batch_size", lo=1)
        v.floats("eval.thresholds", lo=0, hi=1)        # non-empty, each a finite number in [0, 1]
        v.choice("stage1.weighting", ("alternating", "uniform"))
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg

    def __call__(self, key: str) -> Any:
        return get(self.cfg, key)

    def fail(self, key: str, rule: str):
        raise ConfigError(f"config.{key}={get(self.cfg, key)!r}: {rule}")

    def int(self, key: str, lo=None, hi=None) -> int:
        x = get(self.cfg, key)
        if not _is_int(x) or not _in_range(x, lo, hi, False, False):
            self.fail(key, "must be an integer" + ("" if lo is None and hi is None else
                                                   " " + _range_text(lo, hi, False, False)))
        return x

    def float(self, key: str, lo=None, hi=None, *, lo_open=False, hi_open=False) -> float:
        x = get(self.cfg, key)
        if not _is_real(x) or not math.isfinite(x) or not _in_range(x, lo, hi, lo_open, hi_open):
            self.fail(key, "must be a finite number" + ("" if lo is None and hi is None else
                                                        " " + _range_text(lo, hi, lo_open, hi_open)))
        return float(x)

    def prob(self, key: str) -> float:
        return self.float(key, 0.0, 1.0)

    def bool(self, key: str) -> bool:
        x = get(self.cfg, key)
        if not isinstance(x, bool):
            self.fail(key, "must be true or false")
        return x

    def str(self, key: str, *, nonempty: bool = True) -> str:
        x = get(self.cfg, key)
        if not isinstance(x, str) or (nonempty and not x):
            self.fail(key, "must be a non-empty string" if nonempty else "must be a string")
        return x

    def choice(self, key: str, choices: Iterable[str]) -> str:
        x, choices = get(self.cfg, key), tuple(choices)
        if not isinstance(x, str) or x not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}")
        return x

    def seq(self, key: str, item_ok: Callable[[Any], bool], rule: str, *, nonempty: bool = True) -> tuple:
        x = get(self.cfg, key)
        if not isinstance(x, (list, tuple)) or (nonempty and not x):
            self.fail(key, f"must be a {'non-empty ' if nonempty else ''}list, each {rule}")
        for i, item in enumerate(x):
            if not item_ok(item):
                raise ConfigError(f"config.{key}[{i}]={item!r}: must be {rule}")
        return tuple(x)

    def ints(self, key: str, lo=None, hi=None, *, nonempty: bool = True) -> tuple:
        return self.seq(key, lambda i: _is_int(i) and _in_range(i, lo, hi, False, False),
                        "an integer" + ("" if lo is None and hi is None else
                                        " " + _range_text(lo, hi, False, False)), nonempty=nonempty)

    def floats(self, key: str, lo=None, hi=None, *, lo_open=False, hi_open=False, nonempty: bool = True) -> tuple:
        return self.seq(key, lambda f: _is_real(f) and math.isfinite(f) and _in_range(f, lo, hi, lo_open, hi_open),
                        "a finite number" + ("" if lo is None and hi is None else
                                             " " + _range_text(lo, hi, lo_open, hi_open)), nonempty=nonempty)

    def choices(self, key: str, choices: Iterable[str], *, nonempty: bool = True) -> tuple:
        choices = tuple(choices)
        return self.seq(key, lambda c: isinstance(c, str) and c in choices, f"one of {', '.join(choices)}",
                        nonempty=nonempty)

    def optim(self, key: str) -> None:
        """An optimizer sub-config (``eejax.train.default_optim_config``)."""
        from eejax.train.optim import validate_optim_config  # noqa: PLC0415

        try:
            validate_optim_config(get(self.cfg, key))
        except ValueError as e:
            raise ConfigError(f"config.{key}: {e}") from None

    def build(self, what: str, make: Callable[[], Any]) -> Any:
        """``make()`` (e.g. a model config dataclass whose ``__post_init__`` checks it), its ValueError a
        ConfigError."""
        try:
            return make()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{what}: {e}") from None
