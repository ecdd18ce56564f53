"""Byte-level BPE tokenizers of pretrained LMs, built from a vocabulary and a merge list (e.g. GGUF metadata).

The `tokenizers` library (the `pretrained` extra) does the work; this module only assembles it and gives it the
interface of eejax's other tokenizers (`encode` -> int32 ids, `decode`, `vocab_size`).

Pre-tokenizers (the split of the text into words before BPE), by the name GGUF stores in `tokenizer.ggml.pre`:
  "gpt2"    GPT-2's regex ('s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+).
  "smollm"  every digit its own word first, then GPT-2's regex: SmolLM / SmolLM2's tokenizer.json
            (`Digits(individual_digits=True)` then `ByteLevel(add_prefix_space=False)`), the same split as
            llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM.
Control tokens (e.g. `<|im_start|>`) are matched as whole special tokens anywhere in the text.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

PRE_TOKENIZERS = ("gpt2", "smollm")


@dataclasses.dataclass(frozen=True, eq=False)
class BPETokenizer:
    """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) with eejax's tokenizer interface."""
    tokenizer: Any                # tokenizers.Tokenizer
    bos_id: int | None = None
    eos_id: int | None = None
    name: str = ""

    @classmethod
    def from_vocab(cls, tokens: Sequence[str], merges: Sequence[str], *, special_ids: Sequence[int] = (),
                   pre: str = "gpt2", bos_id: int | None = None, eos_id: int | None = None,
                   name: str = "") -> BPETokenizer:
        """`tokens[i]` is id i (byte-level strings, "Ġ" = space); `merges` are "left right" pairs in rank order;
        `special_ids` are the control tokens."""
        try:
            import tokenizers  # noqa: PLC0415 (optional dependency: the `pretrained` extra)
        except ImportError:
            raise RuntimeError("BPE tokenizers need the `tokenizers` package: pip install -e '.[pretrained]'") \
                from None
        from tokenizers import decoders, models, pre_tokenizers  # noqa: PLC0415

        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"pre-tokenizer {pre!r} is not supported; known: {PRE_TOKENIZERS}")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"vocabulary has {len(tokens) - len(vocab)} duplicate token strings")
        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep or left not in vocab or right not in vocab or left + right not in vocab:
                raise ValueError(f"bad BPE merge {m!r}: both parts and their concatenation must be in the vocabulary")
            pairs.append((left, right))
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (byte_level if pre == "gpt2" else
                             pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]))
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                                for i in special_ids])
        return cls(tok, bos_id, eos_id, name)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = False) -> np.ndarray:
        """int32 ids of `text` (no BOS unless asked: SmolLM2 adds none)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token")
            ids = [self.bos_id, *ids]
        return np.asarray(ids, np.int32)

    def decode(self, ids_L) -> str:
        """Text of the ids, special tokens included; an incomplete UTF-8 sequence shows as U+FFFD."""
        return self.tokenizer.decode(np.asarray(ids_L).astype(int).tolist(), skip_special_tokens=False)

    def token(self, i: int) -> str:
        """The vocabulary string of id `i` (byte-level: "Ġ" is a space)."""
        return self.tokenizer.id_to_token(int(i))

    def to_dict(self) -> dict:
        return {"type": "bpe", "name": self.name}
