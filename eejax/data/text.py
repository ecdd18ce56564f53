"""Text corpora from verified offline files, and character / byte tokenizers.

Splits:
  tiny_shakespeare  train = first 90% of characters, validation = last 10% (the nanoGPT / char-rnn split).
  wikitext2         validation, test (valid.txt / test.txt; the train split is not available offline).
  gutenberg         train = five books (Frankenstein, Dorian Gray, Pride and Prejudice, Sherlock Holmes,
                    Moby Dick), validation = Alice in Wonderland; lines starting with "*** " (Gutenberg
                    START/END markers) are dropped.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from eejax.data import files

_GUTENBERG_TRAIN = ("pg84.txt", "pg174.txt", "pg1342.txt", "pg1661.txt", "pg2701.txt")
_GUTENBERG_VALIDATION = ("pg11.txt",)
TEXT_SPLITS = {
    "tiny_shakespeare": ("train", "validation"),
    "wikitext2": ("validation", "test"),
    "gutenberg": ("train", "validation"),
}


def _read(data_dir, dataset_dir: str, filename: str) -> str:
    return files.verified_path(data_dir, dataset_dir, filename).read_text(encoding="utf-8")


def load_text(data_dir, dataset: str, split: str) -> str:
    """The raw text of one split of `dataset` (see the module docstring for the splits)."""
    if split not in TEXT_SPLITS.get(dataset, ()):
        raise ValueError(f"unknown text dataset/split {dataset}/{split}; known: {TEXT_SPLITS}")
    if dataset == "tiny_shakespeare":
        text = _read(data_dir, "tiny-shakespeare", "input.txt")
        n_train = int(0.9 * len(text))
        return text[:n_train] if split == "train" else text[n_train:]
    if dataset == "wikitext2":
        return _read(data_dir, "wikitext-2", "valid.txt" if split == "validation" else "test.txt")
    books = _GUTENBERG_TRAIN if split == "train" else _GUTENBERG_VALIDATION
    texts = (_read(data_dir, "gutenberg-books", name) for name in books)
    return "\n".join("".join(line for line in text.splitlines(keepends=True) if not line.startswith("*** "))
                     for text in texts)


# WikiText's tokenization undone, rule for rule as lm-evaluation-harness's `wikitext_detokenizer` (after
# Megatron-LM): (old, new) string replacements, and regexes, applied in this order.
_WIKITEXT_RULES = (
    ("s '", "s'"), (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"), (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"), (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "), (" 's", "'s"),
)


def detokenize_wikitext(text: str) -> str:
    """WikiText's word-level tokenization (` @-@ `, spaces before punctuation, `= = Heading = =`) turned back into
    running text, as lm-evaluation-harness does before scoring a subword LM (`<unk>` stays)."""
    for old, new in _WIKITEXT_RULES:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def load_tokens(data_dir, dataset: str, split: str, tokenizer, max_chars: int = 0,
                detokenize: bool = False) -> np.ndarray:
    """int32 ids of one split of `dataset` under any tokenizer with `encode` (char, byte, or a pretrained model's
    BPE, e.g. `eejax.models.pretrained.load(...).tokenizer`); `max_chars > 0` keeps only the first characters;
    `detokenize` applies `detokenize_wikitext` first (WikiText-2 only)."""
    text = load_text(data_dir, dataset, split)
    if detokenize:
        if dataset != "wikitext2":
            raise ValueError(f"detokenize=True is for wikitext2, not {dataset!r}")
        text = detokenize_wikitext(text)
    return np.asarray(tokenizer.encode(text[:max_chars] if max_chars > 0 else text), np.int32)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One id per character of `chars` (sorted, unique), e.g. 65 ids for tiny Shakespeare."""
    chars: str

    def __post_init__(self):
        if not self.chars or list(self.chars) != sorted(set(self.chars)):
            raise ValueError("CharTokenizer.chars must be non-empty, sorted and unique; use CharTokenizer.from_text")

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary = the sorted character set of `text` (build it from the training split)."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids, one per character; a character outside the vocabulary is an error."""
        vocab_V = _codepoints(self.chars)
        codes_L = _codepoints(text)
        ids_L = np.searchsorted(vocab_V, codes_L).clip(max=self.vocab_size - 1)
        unknown = np.flatnonzero(vocab_V[ids_L] != codes_L)
        if unknown.size:
            raise ValueError(f"character {text[unknown[0]]!r} at position {unknown[0]} is not in the "
                             f"{self.vocab_size}-character vocabulary")
        return ids_L.astype(np.int32)

    def decode(self, ids_L) -> str:
        return "".join(self.chars[i] for i in np.asarray(ids_L).tolist())

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"])


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids: a fixed vocabulary of 256 that needs no training text."""
    vocab_size: int = dataclasses.field(default=256, init=False)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids_L) -> str:
        # A model can emit an invalid UTF-8 sequence; show it as U+FFFD rather than failing mid-sample.
        return np.asarray(ids_L, np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte"}

    @classmethod
    def from_dict(cls, d: dict) -> ByteTokenizer:
        return cls()
