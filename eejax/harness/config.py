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
import os
import pathlib
import re
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
    try:
        check_sizes(cfg)  # first: a config's own checks may build what a huge size makes huge
        if check is not None:
            check(cfg)
        validate_common(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a model config's own __post_init__ check, say
        raise ConfigError(f"{spec}: {e}") from e


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Sanity ceilings for sizes, by field name, wherever they occur in a config: far above every config here, far below
# what exhausts memory before the first result (a depth of 10**9 builds a 10**9-entry exit list while the config is
# validated; a sequence of 100,000 tokens asked XLA for terabytes of attention).
SIZE_CEILINGS = {
    **dict.fromkeys(("depth", "random_depth", "num_heads", "num_kv_heads"), 1024),
    **dict.fromkeys(("d_model", "width", "latent_dim", "latent_tokens", "local_hidden", "lambda_hidden", "hidden",
                     "rank", "global_pool", "patch_size", "image_size"), 65536),
    "mlp_dim": 262144,
    **dict.fromkeys(("seq_len", "context", "max_len", "eval_max_len", "prompt_len", "prompt_tokens", "new_tokens",
                     "cont_len"), 32768),
    **dict.fromkeys(("batch_size", "eval_batch_size", "batch", "cache_batch", "greedy_batch", "throughput_batch",
                     "latency_batch", "eval_batch_tokens", "batch_tokens"), 1 << 20),
}
SEED_MAX = 2**31 - 1  # JAX keys and numpy generators take it; larger ones overflow inside JAX


def validate_common(cfg: ml_collections.ConfigDict) -> None:
    """Rules every config obeys, checked after its own ``validate``: ``name`` is one plain folder name (it becomes
    ``runs/<name>``), every ``seed`` fits JAX's keys, a cosine schedule lasts as long as the training it drives
    (``optim.total_steps`` below the sibling ``steps`` would train the last steps at learning rate 0). Sizes are
    checked before the config's own ``validate`` (``check_sizes``)."""
    v = Validator(cfg)
    if "name" in cfg:
        name = cfg.name
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
            v.fail("name", "must be one plain folder name (letters, digits, . _ + -; no '/' or '..'): it becomes "
                           "runs/<name>")
    for key, value in _leaves(cfg):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "seed" or leaf.endswith("_seed"):
            if _is_int(value) and not 0 <= value <= SEED_MAX:
                v.fail(key, f"must be an integer in [0, {SEED_MAX}] (2**31 - 1)")
        if leaf == "optim" and isinstance(value, ml_collections.ConfigDict):
            _check_schedule_length(cfg, key)



def check_sizes(cfg: ml_collections.ConfigDict) -> None:
    """Every size field under its ``SIZE_CEILINGS`` entry, wherever it occurs."""
    v = Validator(cfg)
    for key, value in _leaves(cfg):
        leaf = key.rsplit(".", 1)[-1]
        if leaf in SIZE_CEILINGS and _is_int(value) and value > SIZE_CEILINGS[leaf]:
            v.fail(key, f"must be <= {SIZE_CEILINGS[leaf]} (a sanity ceiling for {leaf}: a size this large exhausts "
                        "memory or time before any result)")


def _leaves(node: ml_collections.ConfigDict, prefix: str = ""):
    for k, v in node.items():
        yield f"{prefix}{k}", v
        if isinstance(v, ml_collections.ConfigDict):
            yield from _leaves(v, f"{prefix}{k}.")


def _check_schedule_length(cfg: ml_collections.ConfigDict, optim_key: str) -> None:
    optim = get(cfg, optim_key)
    parent_key = optim_key.rpartition(".")[0]
    parent = get(cfg, parent_key) if parent_key else cfg
    if optim.get("schedule", "constant") == "constant" or not _is_int(optim.get("total_steps")):
        return
    steps = [k for k, x in parent.items() if _is_int(x) and (k == "steps" or k.endswith("_steps"))
             and k not in ("warmup_steps", "total_steps")]
    if len(steps) != 1:  # no (or no single) step count beside it: nothing to compare with
        return
    key = f"{parent_key}.{steps[0]}" if parent_key else steps[0]
    if optim.total_steps < parent[steps[0]]:
        raise ConfigError(f"config.{optim_key}.total_steps={optim.total_steps} < config.{key}="
                          f"{parent[steps[0]]}: the {optim.schedule} schedule reaches learning rate 0 at step "
                          f"{optim.total_steps}, so the last {parent[steps[0]] - optim.total_steps} steps would not "
                          f"train; set total_steps to {parent[steps[0]]}")


def _load(spec: str):
    path, colon, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    if colon and not arg.strip():
        raise ConfigError(f"--config {spec}: empty config argument after ':'; name one (e.g. {path}:smoke) or drop "
                          "the ':' for the default")
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
    configs = [a for a in rest if a == "--config" or a.startswith("--config=")]
    if len(configs) > 1:
        given = [rest[i + 1] if a == "--config" and i + 1 < len(rest) else a.partition("=")[2]
                 for i, a in enumerate(rest) if a == "--config" or a.startswith("--config=")]
        raise ConfigError(f"--config given {len(configs)} times ({', '.join(given)}); one run runs one config "
                          "(launch.sh PAPER[:ARG] passes --config configs/PAPER.py[:ARG] itself: name the paper "
                          "there instead)")
    parser = _ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="config file and argument, e.g. configs/lgvit.py:smoke")
    parser.add_argument("--workdir", default=None, help="run directory (checkpoints, metrics); default runs/<name>")
    parser.add_argument("--data_dir", default=None, help="offline data directory (or env EEJAX_DATA_DIR)")
    parser.add_argument("--outdir", default=None, help="where result tables/plots go; default <workdir>/results")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--fresh", action="store_true",
                        help="if --workdir holds a run of another config, start over in a new subfolder of it")
    parser.add_argument("--break-lock", action="store_true",
                        help="remove the lock of --workdir / --outdir first (when the run that held it is gone but "
                             "cannot be detected as such: another host's lock, a garbage or directory lock)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors (or env EEJAX_DEBUG=1)")
    args = parser.parse_args(rest)
    for flag in ("workdir", "outdir", "data_dir"):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            raise ConfigError(f"--{flag} {value!r} is empty; name a folder or leave the flag out (see --help)")
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
    _writable_dir(outdir, "--outdir" if args.outdir else "the results folder (default --outdir)")
    for f in (f"{result_name}.md", f"{result_name}.json"):
        if (outdir / f).is_dir():
            raise ResultsExistError(f"{outdir / f} is a folder where the results file goes; move it away")
        if (outdir / f).exists() and not args.overwrite:
            raise ResultsExistError(f"{outdir / f} exists")
    return workdir, outdir


def _writable_dir(path: pathlib.Path, what: str) -> None:
    """A ConfigError now, not after training, when ``path`` (or the nearest existing parent, where it would be
    created) is not a writable folder."""
    p = path
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling link
            raise ConfigError(f"{what} {path}: {p} is a broken symbolic link")
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"{what} {path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {p} is not writable")




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

    def seq(self, key: str, item_ok: Callable[[Any], bool], rule: str, *, nonempty: bool = True,
            unique: Callable[[Any], Any] | None = None) -> tuple:
        """A list whose items pass ``item_ok``; with ``unique``, no two items with the same ``unique(item)`` (a
        repeated variant would train twice and repeat its table rows)."""
        x = get(self.cfg, key)
        if not isinstance(x, (list, tuple)) or (nonempty and not x):
            self.fail(key, f"must be a {'non-empty ' if nonempty else ''}list, each {rule}")
        for i, item in enumerate(x):
            if not item_ok(item):
                raise ConfigError(f"config.{key}[{i}]={item!r}: must be {rule}")
        if unique is not None:
            seen: dict[Any, int] = {}
            for i, item in enumerate(x):
                if (u := unique(item)) in seen:
                    j = seen[u]
                    same = "is repeated" if x[j] == item else f"and {x[j]!r} are the same at the tables' precision"
                    raise ConfigError(f"config.{key}[{i}]={item!r} {same} (config.{key}[{j}]): each value once")
                seen[u] = i
        return tuple(x)

    def ints(self, key: str, lo=None, hi=None, *, nonempty: bool = True, unique: bool = False) -> tuple:
        """Integers; ``unique`` for a sweep (seeds, budgets), not for per-layer or per-member lists."""
        return self.seq(key, lambda i: _is_int(i) and _in_range(i, lo, hi, False, False),
                        "an integer" + ("" if lo is None and hi is None else
                                        " " + _range_text(lo, hi, False, False)), nonempty=nonempty,
                        unique=(lambda i: i) if unique else None)

    def floats(self, key: str, lo=None, hi=None, *, lo_open=False, hi_open=False, nonempty: bool = True,
               unique: bool = True) -> tuple:
        """Finite numbers; ``unique``: no two equal at 6 significant digits (``f"{t:g}"``, which tables and
        result keys print), e.g. 0.5 and 0.5000001."""
        return self.seq(key, lambda f: _is_real(f) and math.isfinite(f) and _in_range(f, lo, hi, lo_open, hi_open),
                        "a finite number" + ("" if lo is None and hi is None else
                                             " " + _range_text(lo, hi, lo_open, hi_open)), nonempty=nonempty,
                        unique=(lambda f: f"{f:g}") if unique else None)

    def choices(self, key: str, choices: Iterable[str], *, nonempty: bool = True, unique: bool = True) -> tuple:
        choices = tuple(choices)
        return self.seq(key, lambda c: isinstance(c, str) and c in choices, f"one of {', '.join(choices)}",
                        nonempty=nonempty, unique=(lambda c: c) if unique else None)

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
