"""Shared plumbing of the text-encoder experiments (encoder_exits.py: DeeBERT / PABEE / PALBERT on SST-2;
encoder_retrieval.py: multi-exit self-distillation for retrieval): the MiniLM tokenizer, read before anything is
written, and the fine-tuning stage (the one Trainer over shuffled epochs of tokenized arrays, word embeddings
optionally frozen). Not a paper: a shared piece.
"""
from __future__ import annotations

import time

from eejax.models import pretrained_encoder as pe
from eejax.train import ArrayIterator, Trainer, make_optimizer


def tokenizer() -> pe.WordPieceTokenizer:
    """all-MiniLM-L6-v2's WordPiece tokenizer (a one-line error when its weight package is not installed)."""
    return pe.WordPieceTokenizer(pe.minilm_dir() / "tokenizer.json")


def trainable(cfg):
    """The optimizer's mask: everything, or everything but the word embeddings."""
    if not cfg.train.freeze_word_embeddings:
        return None
    return lambda path: not path.startswith("tok/")


def fine_tune(loss_fn, params, arrays, cfg, workdir, desc: str):
    """``cfg.train.steps`` of AdamW (``cfg.train.optim``) over shuffled epochs of ``arrays`` (epoch e's order from
    ``(cfg.seed, e)``), resumable in ``workdir``; returns ``(params, wall-clock seconds)``."""
    t0 = time.perf_counter()
    with Trainer(loss_fn, params, make_optimizer(cfg.train.optim, trainable=trainable(cfg)), workdir=workdir,
                 seed=cfg.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(ArrayIterator(arrays, cfg.data.batch_size, seed=cfg.seed), cfg.train.steps, desc=desc).params
    return params, time.perf_counter() - t0
