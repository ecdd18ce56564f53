"""Text windows and prompts for experiments/self_speculative.py: training windows carved from Gutenberg (train
books), evaluation windows from WikiText-2 test, decoding prompts from Gutenberg validation + WikiText-2
validation (fitting) and WikiText-2 test (held out)."""
from __future__ import annotations

import numpy as np

from eejax.data.text import load_text


def spread_windows(text: str, tokenizer, num: int, length: int, chars: int = 4000) -> np.ndarray:
    """``num`` windows of ``length`` token ids, each the start of a chunk of ``chars`` characters taken at evenly
    spaced offsets over ``text`` (so every book contributes), cut at a line start."""
    if num < 1:
        return np.zeros((0, length), np.int32)
    offsets = np.linspace(0, max(len(text) - chars, 0), num).astype(int)
    out = []
    for o in offsets:
        start = text.find("\n", o)
        start = o if start < 0 or start - o > chars // 2 else start + 1
        ids = tokenizer.encode(text[start:start + chars])
        if len(ids) < length:
            raise ValueError(f"a chunk of {chars} characters gave {len(ids)} < {length} tokens; raise chars")
        out.append(ids[:length])
    return np.asarray(out, np.int32)


def contiguous_windows(text: str, tokenizer, num: int, length: int) -> np.ndarray:
    """The first ``num`` non-overlapping windows of ``length`` ids of ``text`` (tokenized up to what is needed)."""
    chars = num * length * 8
    ids = tokenizer.encode(text[:chars])
    if len(ids) < num * length:
        raise ValueError(f"{len(ids)} tokens < {num} x {length}")
    return np.asarray(ids[:num * length], np.int32).reshape(num, length)


def prompts(text: str, tokenizer, num: int, length: int, chars: int = 2000) -> list[list[int]]:
    """``num`` prompts of ``length`` ids from evenly spaced paragraphs of ``text`` (WikiText headings skipped)."""
    offsets = np.linspace(0, max(len(text) - chars, 0), num + 2)[1:-1].astype(int)
    out = []
    for o in offsets:
        start = o
        while True:   # the next line that is prose, not a heading or blank
            nl = text.find("\n", start)
            if nl < 0:
                break
            line = text[nl + 1:text.find("\n", nl + 1)]
            start = nl + 1
            if len(line.strip()) > 200 and not line.strip().startswith("="):
                break
        ids = tokenizer.encode(text[start:start + chars])
        if len(ids) < length:                     # too close to the end of the text: take the offset itself
            ids = tokenizer.encode(text[o:o + chars])
        if len(ids) < length:
            raise ValueError(f"{chars} characters at offset {o} give {len(ids)} < {length} tokens")
        out.append([int(i) for i in ids[:length]])
    return out


def load(data_dir, dataset: str, split: str) -> str:
    return load_text(data_dir, dataset, split)
