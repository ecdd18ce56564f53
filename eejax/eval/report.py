"""Result tables and plots for the experiment scripts (markdown tables, accuracy-vs-FLOPs curves, exit
histograms). Plots use matplotlib's object API (``Figure``, Agg canvas) so that importing this module never touches
pyplot's global backend. Writing result files (staged, with provenance) is ``eejax.harness.results``.
"""
from __future__ import annotations

import numbers
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return format(float(value), floatfmt)
    return str(value).replace("|", r"\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], floatfmt: str = ".2f") -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``; floats use ``floatfmt``, None is blank.

    Columns holding only numbers are right-aligned.
    """
    for i, row in enumerate(rows):
        if missing := [c for c in columns if c not in row]:
            raise ValueError(f"row {i} lacks columns {missing}; it has {sorted(row)}")
    numeric = [all(isinstance(r[c], numbers.Number) for r in rows if r[c] is not None) for c in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(r[c], floatfmt) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _save(fig: Figure, path: str | os.PathLike):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def plot_accuracy_vs_flops(curves: dict[str, Sequence[tuple[float, float]]], static_points: Sequence[tuple],
                           path: str | os.PathLike, title: str = "", ylabel: str = "accuracy"):
    """Dynamic curves as lines, static-depth points as markers; x in MFLOPs (``ylabel``: any other per-example
    metric plotted the same way, e.g. ECE or conformal set size).

    ``curves`` maps a policy name to (flops, accuracy) pairs; ``static_points`` holds (flops, accuracy) or
    (flops, accuracy, label) tuples, e.g. one per truncated model.
    """
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for name, points in curves.items():
        flops, acc = np.asarray(points, np.float64).reshape(-1, 2).T
        order = np.argsort(flops)
        ax.plot(flops[order] / 1e6, acc[order], marker=".", label=name)
    for i, point in enumerate(static_points):
        if len(point) not in (2, 3):
            raise ValueError(f"static point {i} is {point!r}; want (flops, accuracy) or (flops, accuracy, label)")
        ax.plot(point[0] / 1e6, point[1], "k^", label="static depth" if i == 0 else None)
        if len(point) == 3:
            ax.annotate(str(point[2]), (point[0] / 1e6, point[1]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
    ax.set(xlabel="MFLOPs per example", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if curves or static_points:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_exit_histogram(exits: dict[str, np.ndarray], num_exits: int, path: str | os.PathLike, title: str = ""):
    """Grouped bars: fraction of examples leaving at each exit, one bar group per exit, one colour per policy."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    width = 0.8 / max(len(exits), 1)
    for i, (name, exit_idx_N) in enumerate(exits.items()):
        exit_idx_N = np.asarray(exit_idx_N).reshape(-1)
        if exit_idx_N.size == 0 or exit_idx_N.min() < 0 or exit_idx_N.max() >= num_exits:
            raise ValueError(f"exits[{name!r}] must be non-empty indices in [0, {num_exits=})")
        fractions_E = np.bincount(exit_idx_N, minlength=num_exits) / exit_idx_N.size
        ax.bar(np.arange(num_exits) + (i - (len(exits) - 1) / 2) * width, fractions_E, width, label=name)
    ax.set_xticks(np.arange(num_exits))
    ax.set(xlabel="exit", ylabel="fraction of examples", title=title, ylim=(0, 1))
    if exits:
        ax.legend(fontsize=8)
    _save(fig, path)
