"""Training metrics: one JSON object per log step in `metrics.jsonl`, the same scalars in TensorBoard.

Only process 0 writes. The JSONL file is opened in append mode, so a resumed run adds to it and never truncates;
steps between the last checkpoint and a crash are logged again after the resume, so readers should keep the
last record of each step (`read_metrics` does).
"""
import json
import os
import time
from typing import Any, Mapping

import numpy as np
import tensorboardX


class Throughput:
    """Steps/s and examples/s since the previous `rates` call; the first call only starts the clock."""

    def __init__(self):
        self._mark: tuple[int, float] | None = None

    @property
    def started(self) -> bool:
        return self._mark is not None

    def rates(self, step: int, batch_size: int) -> dict[str, float]:
        now, mark = time.perf_counter(), self._mark
        self._mark = (step, now)
        if mark is None or step == mark[0]:
            return {}
        steps_per_sec = (step - mark[0]) / (now - mark[1])
        return {"steps_per_sec": steps_per_sec, "examples_per_sec": steps_per_sec * batch_size}


class MetricsWriter:
    """Appends `{"step": ..., **scalars}` to `workdir/metrics.jsonl` and writes TensorBoard events to `workdir/tb`."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps every written line.
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, global_step=int(step))

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self, *, quiet: bool = False) -> None:
        """Closes both files; ``quiet``: ignore their write errors (when another error already stops the run, e.g.
        a full disk, which would fail these flushes too and hide the first error)."""
        if self.enabled:
            self.enabled = False
            try:
                self._jsonl.close()
            finally:
                try:
                    self._tb.close()
                except OSError:
                    if not quiet:
                        raise


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """Records of `workdir/metrics.jsonl` sorted by step, keeping the last record of each step."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        by_step = {r["step"]: r for r in map(json.loads, filter(str.strip, f))}
    return [by_step[s] for s in sorted(by_step)]
