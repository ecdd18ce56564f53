"""What a decode program's matrix products cost, read from its compiled HLO: FLOPs and the bytes their operands
read (weights, cache slices, activations), each multiplied by the trip counts around it.

``compiled.cost_analysis()`` counts a ``while`` body once whatever its trip count, so a 4-layer and a 12-layer
program read the same there; this walker multiplies each dot by the known trip counts of the loops around it (a
data-dependent loop by ``trips``, as ``eejax.exits.hlo`` counts host stops) and takes a conditional's costliest
branch. At batch 1 decoding is memory-bound and the dots' operand bytes are dominated by the weights read, so their
ratio is the cost of a draft token relative to a greedy step on a GPU, before kernel launches and host stops.

    cost = dot_cost(hlo.profile(jax.jit(f), *args), trips=4)    # {"flops": ..., "bytes": ...}
    exe, prof = compile_profiled(f, *args)    # one compile: the executable to time and its program to read
    seconds, out = median_time(exe, args, repeats=3)

The benchmark modules of the speculative family (self_speculative, kangaroo, specee, ceed_jacobi) time their rows
with these and write each executed row's ``host_stops`` (``eejax.exits.hlo``) beside its time.

Shapes: none (reads programs).
"""
from __future__ import annotations

import re
import statistics

import jax
import numpy as np

from eejax.exits import costs, hlo

_OPERANDS = re.compile(r"^([^)]*)\)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def _dims(shape: str) -> list[int]:
    m = hlo._SHAPE.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def dot_cost(prof: hlo.HloProfile, trips: float | tuple[float, ...] = 1.0) -> dict[str, float]:
    """FLOPs and operand bytes of every dot of the program, per call (see the module docstring). ``trips``: the
    iterations of each data-dependent loop, or a tuple by nesting level (outermost first, the last value for
    deeper levels), as ``HloProfile.host_stops`` takes them."""
    trips = tuple(float(t) for t in np.atleast_1d(trips))
    shapes = {comp: {ins.name: ins.shape for ins in instrs} for comp, instrs in prof.computations.items()}
    memo: dict[tuple[str, int], np.ndarray] = {}

    def cost(comp: str, level: int = 0) -> np.ndarray:
        key = (comp, level)
        if key in memo:
            return memo[key]
        memo[key] = np.zeros(2)    # recursion guard
        total = np.zeros(2)
        for ins in prof.computations.get(comp, ()):
            if ins.op == "dot":
                names = [n.strip().lstrip("%") for n in _OPERANDS.match(ins.attrs).group(1).split(",")]
                lhs = _dims(shapes[comp].get(names[0], ""))
                contract = [int(d) for d in (_CONTRACT.search(ins.attrs).group(1) or "").split(",") if d]
                k = int(np.prod([lhs[d] for d in contract])) if lhs else 1
                flops = 2.0 * int(np.prod(_dims(ins.shape) or [1])) * k
                read = sum(hlo._shape_bytes(shapes[comp].get(n, "")) for n in names)
                total += (flops, read)
            elif ins.op == "while":
                known = hlo._TRIP.search(ins.attrs)
                n, inner = (int(known.group(1)), level) if known else (trips[min(level, len(trips) - 1)], level + 1)
                total += n * (cost(hlo._attr(ins.attrs, "body"), inner)
                              + cost(hlo._attr(ins.attrs, "condition"), inner))
            elif ins.op == "conditional":
                branches = [cost(b, level) for b in ins.calls]
                total += max(branches, key=lambda c: c[1]) if branches else 0.0
            else:
                for c in ins.calls:
                    total += cost(c, level)
        memo[key] = total
        return total

    flops, read = cost(prof.entry)
    return {"flops": float(flops), "bytes": float(read)}


def compile_profiled(fn, *args):
    """``jax.jit(fn)`` compiled AOT for ``args`` and the ``HloProfile`` of that same compiled program."""
    lowered = jax.jit(fn).lower(*args)
    exe = lowered.compile()
    text = exe.as_text()
    return exe, hlo.HloProfile(*hlo.parse_hlo(text), hlo.dot_dtypes_of(lowered.as_text()), text)


def median_time(exe, args, repeats: int = 3):
    """Median wall-clock seconds of ``repeats`` calls after one warm call (``costs.measure``: ``block_until_ready``
    each time), and the output."""
    t = costs.measure(exe, *args, warmup=1, iters=repeats)
    return float(statistics.median(t.times_s)), t.output


def time_profiled(fn, *args, profile: dict | None = None):
    """``(output, seconds)`` of one timed call of ``fn`` compiled AOT, after a warm-up (compile excluded); with
    ``profile``, the compiled program's HloProfile is stored there under "prof"."""
    exe, prof = compile_profiled(fn, *args)
    if profile is not None:
        profile["prof"] = prof
    t = costs.measure(exe, *args, warmup=1, iters=1)
    return t.output, t.mean_s


__all__ = ["dot_cost", "compile_profiled", "median_time", "time_profiled"]
