"""Token-window batches for language modelling, deterministic and resumable (the Trainer checkpoints the state).

``WindowIterator(ids_N, batch_size, seq_len)`` yields ``{"tokens": int32[b, T], "targets": int32[b, T]}`` with
``targets[:, t] = tokens[:, t + 1]`` in the underlying stream. shuffle=True: infinite; batch k draws its window starts
from ``np.random.default_rng([seed, k])``, so the stream depends only on (seed, k) and ``state_dict()`` is one
integer. shuffle=False: one pass over consecutive non-overlapping windows (evaluation), the last short batch kept.
With process_count > 1 each host gets rows [process_index::process_count] of every global batch, as BatchIterator.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class WindowIterator:
    def __init__(self, ids_N: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, *, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, max_batches: int = 0):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an integer >= 0")
        if not isinstance(ids_N, np.ndarray) or not np.issubdtype(ids_N.dtype, np.integer):
            # np.asarray(floats, int32) would truncate a float stream (probabilities: all zeros) without a word.
            raise ValueError(f"ids_N must be a numpy array of integer token ids, got "
                             f"{getattr(ids_N, 'dtype', type(ids_N).__name__)}")
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() > np.iinfo(np.int32).max):
            raise ValueError(f"ids_N hold ids in [{ids_N.min()}, {ids_N.max()}]; token ids are >= 0 (int32)")
        ids_N = np.asarray(ids_N, np.int32)
        if ids_N.ndim != 1 or len(ids_N) < seq_len + 1:
            raise ValueError(f"need a 1-D token stream longer than {seq_len=}, got shape {ids_N.shape}")
        if batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(f"{batch_size=} must divide by {process_count=} and 0 <= {process_index=} < it")
        self.ids_N, self.batch_size, self.seq_len, self.seed = ids_N, batch_size, seq_len, seed
        self.shuffle, self.process_index, self.process_count = shuffle, process_index, process_count
        num_windows = (len(ids_N) - 1) // seq_len
        self.num_eval_batches = -(-num_windows // batch_size)
        if max_batches:
            self.num_eval_batches = min(self.num_eval_batches, max_batches)
        self._num_windows = num_windows
        self.index = 0

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        index = int(state["index"])
        if index < 0 or (not self.shuffle and index > self.num_eval_batches):
            raise ValueError(f"bad iterator state {state}")
        self.index = index

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        t = self.seq_len
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.index])
            starts_B = rng.integers(0, len(self.ids_N) - t - 1, self.batch_size)
        else:
            if self.index >= self.num_eval_batches:
                raise StopIteration
            first = self.index * self.batch_size
            starts_B = np.arange(first, min(first + self.batch_size, self._num_windows)) * t
        self.index += 1
        starts_b = starts_B[self.process_index::self.process_count]
        windows = self.ids_N[starts_b[:, None] + np.arange(t + 1)[None, :]]
        return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}
