"""Synthetic tasks composed from digit images (MNIST / Fashion-MNIST ``ArrayDataset``s), deterministic in a seed.

* ``digit_canvases``: semantic segmentation. 2-4 digits pasted on a ``56 x 56`` canvas (one per quadrant, jittered),
  every pixel labelled with its digit's class or background (class ``num_classes``); ``patch_labels`` turns that
  into one label per ``p x p`` patch (a token's label). The background fraction varies with the digit count, which
  is what DToP's savings should follow (arXiv:2308.01045: easy tokens exit early).
* ``digit_questions``: a toy visual question answering set for a multimodal decoder (DyVTE, arXiv:2411.19628): a
  ``28 x 56`` image of two digits and a short question about them, laid out as ``[BOS, filler words, image tokens,
  question words, ?]`` with a random number of filler words, so the image tokens sit at different positions in
  different rows (the released DyVTE code hard-codes them).

Shapes: N examples, H x W pixels, P patches (tokens), T sequence length.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from eejax.data.vision import ArrayDataset

INK = 128   # a pixel at or above this belongs to its digit's stroke


# ------------------------------------------------------------------------------------------------ segmentation


class Canvases(NamedTuple):
    images_NxHxWx1: np.ndarray   # uint8
    labels_NxHxW: np.ndarray     # uint8 pixel labels: digit class, or ``background`` where no stroke
    digits_N: np.ndarray         # int32: digits pasted on each canvas
    background: int              # the background label (= the source's number of classes)


def digit_canvases(ds: ArrayDataset, num: int, *, seed: int, digits: tuple[int, int] = (2, 4), canvas: int = 56,
                   jitter: int = 4) -> Canvases:
    """``num`` canvases of ``canvas x canvas`` pixels, each with ``digits[0]..digits[1]`` digits of ``ds`` (28 x 28)
    in distinct quadrants, shifted by up to ``jitter`` pixels. A pixel's value is the maximum over the digits; its
    label is the class of the (last pasted) digit whose stroke (>= ``INK``) covers it, else background."""
    if ds.images_NxHxWxC.shape[1:] != (28, 28, 1):
        raise ValueError(f"digit_canvases needs 28 x 28 x 1 digits, got {ds.images_NxHxWxC.shape[1:]}")
    lo, hi = digits
    if not 1 <= lo <= hi <= 4:
        raise ValueError(f"digits={digits} must satisfy 1 <= lo <= hi <= 4 (one digit per quadrant)")
    if canvas < 56 or num < 1 or jitter < 0:
        raise ValueError(f"need canvas >= 56, num >= 1 and jitter >= 0, got {canvas=}, {num=}, {jitter=}")
    rng = np.random.default_rng(seed)
    bg = ds.num_classes
    images = np.zeros((num, canvas, canvas), np.uint8)
    labels = np.full((num, canvas, canvas), bg, np.uint8)
    count_N = rng.integers(lo, hi + 1, num).astype(np.int32)
    half = canvas // 2
    for n in range(num):
        quadrants = rng.permutation(4)[:count_N[n]]
        for q in quadrants:
            i = int(rng.integers(len(ds)))
            digit = ds.images_NxHxWxC[i, :, :, 0]
            y = int(np.clip((q // 2) * half + (half - 28) // 2 + rng.integers(-jitter, jitter + 1), 0, canvas - 28))
            x = int(np.clip((q % 2) * half + (half - 28) // 2 + rng.integers(-jitter, jitter + 1), 0, canvas - 28))
            win = images[n, y:y + 28, x:x + 28]
            np.maximum(win, digit, out=win)
            labels[n, y:y + 28, x:x + 28][digit >= INK] = ds.labels_N[i]
    return Canvases(images[..., None], labels, count_N, bg)


def patch_labels(labels_NxHxW: np.ndarray, patch: int, background: int, min_fraction: float = 0.25) -> np.ndarray:
    """``int32[N, P]`` token labels in row-major patch order: the most frequent digit class among a patch's pixels
    when its stroke pixels are at least ``min_fraction`` of the patch, else background."""
    n, h, w = labels_NxHxW.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} not divisible by {patch=}")
    blocks = labels_NxHxW.reshape(n, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4)
    blocks = blocks.reshape(n, (h // patch) * (w // patch), patch * patch).astype(np.int64)
    counts = np.stack([(blocks == c).sum(-1) for c in range(background)], -1)    # N x P x C (digit classes)
    stroke = counts.sum(-1)
    return np.where(stroke >= min_fraction * patch * patch, counts.argmax(-1), background).astype(np.int32)


# ------------------------------------------------------------------------------------------------ toy VQA

PAD, BOS, IMG, QMARK = 0, 1, 2, 3
DIGIT0 = 4                      # answer tokens "0".."9" are DIGIT0 .. DIGIT0 + 9
YES, NO = 14, 15
LEFT, RIGHT, SAME, SUM, BIGGER = 16, 17, 18, 19, 20
FILLERS = (21, 22, 23, 24)      # "please", "look", "at", "this": a variable-length preamble
VOCAB = 25
QUESTIONS = ("left", "right", "same", "sum", "bigger")
_QUESTION_TOKENS = {"left": (LEFT,), "right": (RIGHT,), "same": (SAME,), "sum": (SUM,), "bigger": (BIGGER,)}


class Questions(NamedTuple):
    images_NxHxWx1: np.ndarray   # uint8, 28 x 56: two digits side by side
    tokens_NxT: np.ndarray       # int32, right-padded with PAD; IMG marks where the image tokens go
    answer_N: np.ndarray         # int32: the answer token, predicted at the last real position (QMARK)
    kind_N: np.ndarray           # int32: index into QUESTIONS
    length_N: np.ndarray         # int32: real tokens per row


def answer(kind: str, left: int, right: int) -> int:
    """The answer token of question ``kind`` about digits ``left`` and ``right``."""
    if kind == "left":
        return DIGIT0 + left
    if kind == "right":
        return DIGIT0 + right
    if kind == "same":
        return YES if left == right else NO
    if kind == "sum":
        return DIGIT0 + (left + right) % 10
    if kind == "bigger":
        return SAME if left == right else (LEFT if left > right else RIGHT)
    raise ValueError(f"unknown question {kind!r}; use one of {QUESTIONS}")


def digit_questions(ds: ArrayDataset, num: int, *, seed: int, patch: int = 7, max_fillers: int = 3,
                    kinds: tuple[str, ...] = QUESTIONS, same_fraction: float = 0.3) -> Questions:
    """``num`` (image, question, answer) triples. The right digit repeats the left one's class with probability
    ``same_fraction`` (so "same" and "bigger" are not almost always "no" / one side)."""
    if ds.images_NxHxWxC.shape[1:] != (28, 28, 1) or ds.num_classes != 10:
        raise ValueError("digit_questions needs a 10-class dataset of 28 x 28 x 1 digits")
    bad = [k for k in kinds if k not in QUESTIONS]
    if bad or not kinds:
        raise ValueError(f"kinds={kinds}: use a non-empty subset of {QUESTIONS}")
    if 28 % patch or not 0 <= max_fillers <= len(FILLERS) or not 0 <= same_fraction <= 1:
        raise ValueError(f"need 28 % patch == 0, 0 <= max_fillers <= {len(FILLERS)} and same_fraction in [0, 1]; "
                         f"got {patch=}, {max_fillers=}, {same_fraction=}")
    rng = np.random.default_rng(seed)
    num_img = (28 // patch) * (56 // patch)
    t = 1 + max_fillers + num_img + 1 + 1
    by_class = [np.flatnonzero(ds.labels_N == c) for c in range(10)]
    images = np.zeros((num, 28, 56, 1), np.uint8)
    tokens = np.full((num, t), PAD, np.int32)
    answers, kind_N, length_N = (np.zeros(num, np.int32) for _ in range(3))
    for n in range(num):
        i = int(rng.integers(len(ds)))
        left = int(ds.labels_N[i])
        j = int(rng.choice(by_class[left])) if rng.random() < same_fraction else int(rng.integers(len(ds)))
        right = int(ds.labels_N[j])
        images[n, :, :28], images[n, :, 28:] = ds.images_NxHxWxC[i], ds.images_NxHxWxC[j]
        k = int(rng.integers(len(kinds)))
        fillers = list(rng.choice(FILLERS, int(rng.integers(max_fillers + 1))))
        seq = [BOS, *fillers, *([IMG] * num_img), *_QUESTION_TOKENS[kinds[k]], QMARK]
        tokens[n, :len(seq)] = seq
        answers[n], kind_N[n], length_N[n] = answer(kinds[k], left, right), QUESTIONS.index(kinds[k]), len(seq)
    return Questions(images, tokens, answers, kind_N, length_N)


__all__ = ["INK", "Canvases", "digit_canvases", "patch_labels", "PAD", "BOS", "IMG", "QMARK", "DIGIT0", "YES", "NO",
           "LEFT", "RIGHT", "SAME", "SUM", "BIGGER", "FILLERS", "VOCAB", "QUESTIONS", "Questions", "answer",
           "digit_questions"]
