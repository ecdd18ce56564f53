"""SST-2 (GLUE) from the verified offline files: ``(sentences, labels_N)``.

Splits: ``train`` (67,349 phrases), ``dev`` (872 sentences: what early-exit papers report), ``test`` (the 1,821 GLUE
test sentences with labels from the source repository, not an official GLUE artefact; see the dataset README).
"""
from __future__ import annotations

import numpy as np

from eejax.data import files

SPLITS = {"train": "train.tsv", "dev": "dev.tsv", "test": "test-labeled.tsv"}


def load_sst2(data_dir, split: str) -> tuple[list[str], np.ndarray]:
    """Sentences and int32 labels (1 = positive) of one split, after the file's sha256 check."""
    if split not in SPLITS:
        raise ValueError(f"unknown SST-2 split {split!r}; choose from {sorted(SPLITS)}")
    path = files.verified_path(data_dir, "sst2", SPLITS[split])
    lines = path.read_text(encoding="utf-8").splitlines()[1:]   # header line first
    rows = [line.split("\t") for line in lines if line]
    bad = [i for i, r in enumerate(rows) if len(r) != 2 or r[1] not in ("0", "1")]
    if bad:
        raise files.DataError(f"{path}: line {bad[0] + 2} is not 'sentence<TAB>0|1'")
    return [r[0] for r in rows], np.asarray([int(r[1]) for r in rows], np.int32)
