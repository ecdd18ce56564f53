"""A small retrieval task from offline text: match a sentence to its continuation (the next sentence).

``continuation_pairs(text)`` splits running text into sentences (on ``.``, ``!`` or ``?`` followed by whitespace,
after joining wrapped lines), keeps consecutive pairs whose two sentences both have ``min_words..max_words`` words,
and returns ``(queries, continuations)``. With ``eejax.data.text``'s Gutenberg splits, training pairs come from five
books and evaluation pairs from a sixth (Alice in Wonderland), so no evaluation text is seen in training.
"""
from __future__ import annotations

import re

_SENT_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+")


def sentences(text: str) -> list[str]:
    """Sentences of running text; paragraphs (blank-line separated) never join across."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        out += [s.strip() for s in _SENT_END.split(para) if s.strip()]
    return out


def continuation_pairs(text: str, min_words: int = 5, max_words: int = 30) -> tuple[list[str], list[str]]:
    """Consecutive sentence pairs (each side ``min_words..max_words`` words); duplicate queries are dropped."""
    sents = sentences(text)
    ok = [min_words <= len(s.split()) <= max_words for s in sents]
    queries, conts, seen = [], [], set()
    for i in range(len(sents) - 1):
        if ok[i] and ok[i + 1] and sents[i] not in seen:
            seen.add(sents[i])
            queries.append(sents[i])
            conts.append(sents[i + 1])
    return queries, conts
