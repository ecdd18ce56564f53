"""What predicts a path's GPU cost, read from its compiled program on any backend: host stops, dot dtypes, big copies.

On a GPU, XLA runs a ``while`` whose trip count depends on data by copying its predicate to the host and waiting,
once per iteration; every ``conditional`` (``lax.cond`` / ``lax.switch``) does the same with its branch index (the
default command-buffer set holds neither). A loop with a trip count XLA knows (``scan``, ``fori_loop`` with static
bounds) costs nothing of the kind. The CPU backend compiles the same loop and conditional structure, so these counts
are taken on CPU and held as budgets in the tests (``tests/test_host_stops.py``).

    prof = hlo.profile(jax.jit(f), *args)              # compile once, read the optimised HLO
    prof.host_stops(trips=num_exits)                   # host stops per call if every data-dependent loop runs
                                                       # ``trips`` iterations (an upper bound: the exits)
    prof.dot_dtypes                                    # {("bf16", "bf16", "f32"): 3, ...} of the *lowered* program

Counting rule (``host_stops``): a data-dependent ``while`` costs ``trips + 1`` stops per execution (its predicate is
evaluated before every iteration and once more to leave), plus what its body costs times ``trips``; a
``conditional`` costs 1 plus its costliest branch; a loop with a known trip count ``n`` costs ``n`` times its body.
Costs multiply through nesting. Dot dtypes are read from the program as lowered (before XLA's CPU backend, which
upcasts bf16 dots to f32, rewrites them), so they say what a GPU or TPU would run.

Shapes: none (the module reads programs, not arrays).
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np

_COMP_HEAD = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_SHAPE = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_MEMORY_OPS = ("copy", "gather", "scatter", "dynamic-slice", "dynamic-update-slice", "sort")


def _shape_bytes(text: str) -> int:
    """Bytes of the first array shape (or tuple of shapes) written in ``text``."""
    total = 0
    depth_text = text.split("{", 1)[0] if not text.startswith("(") else text
    for dtype, dims in _SHAPE.findall(depth_text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _BYTES[dtype]
        if not text.startswith("("):
            break
    return total


@dataclasses.dataclass
class _Instr:
    name: str
    op: str
    shape: str
    attrs: str
    calls: list[str]


@dataclasses.dataclass
class HloProfile:
    """The loop / conditional structure of one compiled program, and what it moves."""

    computations: dict[str, list[_Instr]]
    entry: str
    dot_dtypes: dict[tuple[str, str, str], int]   # (lhs, rhs, result) element types -> count in the lowered program
    text: str = ""

    # ------------------------------------------------------------------------------------------ host stops

    def _cost(self, comp: str, trips: tuple[float, ...], level: int, memo: dict) -> float:
        key = (comp, level)
        if key in memo:
            return memo[key]
        memo[key] = 0.0   # recursion guard
        total = 0.0
        for ins in self.computations.get(comp, ()):
            if ins.op == "while":
                cond, body = _attr(ins.attrs, "condition"), _attr(ins.attrs, "body")
                known = _TRIP.search(ins.attrs)
                if known:
                    n = int(known.group(1))
                    total += n * self._cost(body, trips, level, memo) + (n + 1) * self._cost(cond, trips, level, memo)
                else:
                    t = trips[min(level, len(trips) - 1)]
                    total += ((t + 1) * (1 + self._cost(cond, trips, level + 1, memo))
                              + t * self._cost(body, trips, level + 1, memo))
            elif ins.op == "conditional":
                total += 1 + max((self._cost(b, trips, level, memo) for b in ins.calls), default=0.0)
            else:
                total += sum(self._cost(c, trips, level, memo) for c in ins.calls)
        memo[key] = total
        return total

    def host_stops(self, trips: float | tuple[float, ...] = 1, per: float = 1) -> float:
        """Host stops per call, divided by ``per`` (e.g. the generated tokens, for a per-token figure).

        ``trips``: iterations of each data-dependent loop; a tuple gives them by nesting level (outermost first,
        the last value for deeper levels), e.g. ``(num_exits, layers_per_segment)``."""
        trips = tuple(float(t) for t in np.atleast_1d(trips))
        return self._cost(self.entry, trips, 0, {}) / per

    def top_unknown_whiles(self) -> int:
        """Data-dependent ``while`` loops that no other data-dependent loop encloses (static count)."""
        def count(comp, seen):
            if comp in seen:
                return 0
            seen.add(comp)
            n = 0
            for ins in self.computations.get(comp, ()):
                if ins.op == "while" and not _TRIP.search(ins.attrs):
                    n += 1
                elif ins.op == "while":
                    n += count(_attr(ins.attrs, "body"), seen) + count(_attr(ins.attrs, "condition"), seen)
                else:
                    n += sum(count(c, seen) for c in ins.calls)
            return n
        return count(self.entry, set())

    def stops_per_call(self, decisions: float, inner: float = 1) -> float:
        """Host stops of one call whose outermost data-dependent loops run ``decisions`` iterations *in all*: loops
        that share one counter, such as the engine's loops over exits (one per run of equal segments and per
        bucket, each picking up where the previous stopped). Each has its own entry stop; every iteration costs
        the mean per-iteration cost of those loops; deeper data-dependent loops run ``inner`` iterations."""
        loops = self.top_unknown_whiles()
        fixed = self.host_stops(trips=(0, inner))
        if not loops:
            return fixed
        return fixed + decisions * (self.host_stops(trips=(1, inner)) - fixed) / loops

    def _walk(self):
        """Every instruction reachable from the entry, with the product of known trip counts around it (unknown
        loops count once)."""
        seen: dict[str, float] = {}
        order = [(self.entry, 1.0)]
        out = []
        while order:
            comp, mult = order.pop()
            if seen.get(comp, 0) >= mult:
                continue
            seen[comp] = mult
            for ins in self.computations.get(comp, ()):
                out.append((ins, mult))
                if ins.op == "while":
                    known = _TRIP.search(ins.attrs)
                    n = int(known.group(1)) if known else 1
                    order.append((_attr(ins.attrs, "body"), mult * n))
                    order.append((_attr(ins.attrs, "condition"), mult * n))
                else:
                    order.extend((c, mult) for c in ins.calls)
        return out

    @property
    def unknown_whiles(self) -> int:
        """Data-dependent ``while`` loops in the program (static count)."""
        return sum(1 for ins, _ in self._walk() if ins.op == "while" and not _TRIP.search(ins.attrs))

    @property
    def known_whiles(self) -> int:
        return sum(1 for ins, _ in self._walk() if ins.op == "while" and _TRIP.search(ins.attrs))

    @property
    def conditionals(self) -> int:
        """``conditional`` instructions in the program (static count)."""
        return sum(1 for ins, _ in self._walk() if ins.op == "conditional")

    def memory_ops(self, min_bytes: int = 0) -> dict[str, int]:
        """Static count of copies, gathers, scatters, dynamic slices and sorts whose result has ``>= min_bytes``
        (outside fusions too: each is a pass over memory on a GPU)."""
        counts: collections.Counter = collections.Counter()
        for ins, _ in self._walk():
            if ins.op in _MEMORY_OPS and _shape_bytes(ins.shape) >= min_bytes:
                counts[ins.op] += 1
        return dict(counts)

    def summary(self, trips: float | tuple[float, ...] = 1, per: float = 1) -> dict[str, Any]:
        """A JSON-ready record for a benchmark row: host stops, loops, conditionals and dot dtypes."""
        return {"host_stops": round(self.host_stops(trips, per), 3), "unknown_whiles": self.unknown_whiles,
                "conditionals": self.conditionals,
                "dot_dtypes": {"x".join(k): v for k, v in sorted(self.dot_dtypes.items())}}

    def f32_dots(self) -> int:
        """Dots whose operands are float32 (in the lowered program)."""
        return sum(v for (a, b, _), v in self.dot_dtypes.items() if "f32" in (a, b))


def _attr(attrs: str, key: str) -> str:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else ""


def _calls(op: str, attrs: str) -> list[str]:
    if op == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
        if m:
            return [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
        return [x for x in (_attr(attrs, "true_computation"), _attr(attrs, "false_computation")) if x]
    names = []
    for key in ("calls", "to_apply", "async_execution_thread_computation"):
        m = re.search(rf"\b{key}=\{{?([^,}}\s]+(?:,\s*%[\w.\-]+)*)\}}?", attrs)
        if m:
            names += [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
    return names


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """Computations of an HLO module's text (``compiled.as_text()``) and the entry computation's name."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            head = _COMP_HEAD.match(line.strip())
            if head:
                current = head.group(1)
                comps[current] = []
                if line.lstrip().startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        comps[current].append(_Instr(name, op, shape, rest, _calls(op, rest)))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


_DOT_MLIR = re.compile(r"stablehlo\.(?:dot_general|dot)\b.*?:\s*\(tensor<([^>]*)>,\s*tensor<([^>]*)>\)"
                       r"\s*->\s*tensor<([^>]*)>")
_MLIR_TYPES = {"bf16": "bf16", "f16": "f16", "f32": "f32", "f64": "f64", "i32": "s32", "i8": "s8", "i64": "s64"}


def dot_dtypes_of(lowered_text: str) -> dict[tuple[str, str, str], int]:
    """``(lhs, rhs, result)`` element types of every dot in a lowered (StableHLO) module's text."""
    counts: collections.Counter = collections.Counter()
    for m in _DOT_MLIR.finditer(lowered_text):
        elems = (t.rsplit("x", 1)[-1] for t in m.groups())
        counts[tuple(_MLIR_TYPES.get(t, t) for t in elems)] += 1
    return dict(counts)


def profile(fn: Callable, *args, static: Mapping[str, Any] | None = None, **kwargs) -> HloProfile:
    """Lower and compile ``fn`` (a jitted function, or a plain one: it is jitted) for ``args`` and read it."""
    import jax   # noqa: PLC0415

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **(dict(static) if static else {}))
    lowered = jitted.lower(*args, **kwargs)
    text = lowered.compile().as_text()
    comps, entry = parse_hlo(text)
    return HloProfile(comps, entry, dot_dtypes_of(lowered.as_text()), text)


__all__ = ["HloProfile", "parse_hlo", "dot_dtypes_of", "profile"]
