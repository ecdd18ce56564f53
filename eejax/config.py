"""Configs are Python: ``configs/<paper>.py`` defines ``get_config(arg)`` returning an ml_collections ConfigDict.

The command line names a config and its argument, then overrides fields by dotted path::

    python -m experiments.lgvit --config configs/lgvit.py:smoke --config.model.depth=6 --config.train.steps=200

An override must name an existing key and parse as that key's type; anything else is a one-line ``ConfigError``.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import pathlib
import sys
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
    pass


def load(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:arg]`` and call its ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"eejax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    # Configs may import the shared pieces beside them (configs/_lm_base.py) by bare name.
    sys.path.insert(0, str(file.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(file.resolve().parent))
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    cfg = module.get_config(arg or None)
    cfg.lock()  # no new keys from here on
    return cfg


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
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="config file and argument, e.g. configs/lgvit.py:smoke")
    parser.add_argument("--workdir", default=None, help="run directory (checkpoints, metrics); default runs/<name>")
    parser.add_argument("--data_dir", default=None, help="offline data directory (or env EEJAX_DATA_DIR)")
    parser.add_argument("--outdir", default=None, help="where result tables/plots go; default <workdir>/results")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = parser.parse_args(rest)
    cfg = load(args.config)
    for key, raw in overrides:
        override(cfg, key, raw)
    return cfg, args


def run_dirs(cfg: ml_collections.ConfigDict, args: argparse.Namespace, result_name: str
             ) -> tuple[pathlib.Path, pathlib.Path]:
    """``(workdir, outdir)`` of a run: ``--workdir`` (default ``runs/<cfg.name>``) and ``--outdir`` (default
    ``<workdir>/results``). Refuses, before any work, to overwrite existing ``<result_name>.md/.json`` results
    unless ``--overwrite`` was given."""
    workdir = pathlib.Path(args.workdir or f"runs/{cfg.name}")
    outdir = pathlib.Path(args.outdir or workdir / "results")
    for f in (f"{result_name}.md", f"{result_name}.json"):
        if (outdir / f).exists() and not args.overwrite:
            raise SystemExit(f"error: {outdir / f} exists; pass --overwrite to replace it or choose --outdir")
    return workdir, outdir
