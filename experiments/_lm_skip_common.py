"""Shared plumbing of the SmolLM2 skip experiments (ffn_skipllm.py, void_lm.py): the model (SmolLM2-135M-Instruct, or
a tiny random-weight LM with a byte tokenizer for smoke runs), WikiText-2 token ids, fixed prompts, greedy decoding,
agreement and plots. Not a paper: a shared piece.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from eejax.data.text import ByteTokenizer, load_text
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.models import lm as lm_lib
from eejax.models import pretrained

RANDOM = "random-tiny"   # model.name of the smoke runs: random weights, byte tokenizer


class Setup(NamedTuple):
    graphdef: Any
    params: Any
    tokenizer: Any
    cfg: lm_lib.LMConfig
    load_s: float

    @property
    def model(self) -> lm_lib.DecoderLM:
        return nnx.merge(self.graphdef, self.params)


def load_model(name: str, depth: int = 0) -> Setup:
    start = time.perf_counter()
    if name == RANDOM:
        cfg = lm_lib.LMConfig(vocab_size=256, d_model=32, depth=depth or 4, num_heads=4, num_kv_heads=2, mlp_dim=64,
                              mlp="swiglu", exits=[(depth or 4) - 1])
        graphdef, params = nnx.split(lm_lib.DecoderLM(cfg, rngs=nnx.Rngs(0)))
        return Setup(graphdef, params, ByteTokenizer(), cfg, time.perf_counter() - start)
    pre = pretrained.load(name, depth=depth or None)
    return Setup(pre.graphdef, pre.params, pre.tokenizer, pre.cfg, time.perf_counter() - start)


def wikitext_ids(data_dir, tokenizer, split: str, num_tokens: int) -> np.ndarray:
    """The first ``num_tokens + 1`` token ids of WikiText-2 ``split`` (as stored)."""
    text = load_text(data_dir, "wikitext2", split)
    ids = np.asarray(tokenizer.encode(text[:num_tokens * 12 + 1000]), np.int32)   # ~4 chars/token; ample margin
    if ids.size < num_tokens + 1:
        ids = np.asarray(tokenizer.encode(text), np.int32)
    if ids.size < num_tokens + 1:
        raise ValueError(f"wikitext2/{split} has {ids.size} tokens, fewer than the {num_tokens + 1} asked for")
    return ids[:num_tokens + 1]


def windows(ids: np.ndarray, context: int, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows of ``context`` tokens (inputs, targets), ``batch`` per item; only full batches."""
    n = (ids.size - 1) // (context * batch) * batch
    if not n:
        raise ValueError(f"{ids.size} tokens do not fill one batch of {batch} windows of {context}")
    x = ids[:n * context].reshape(n, context)
    y = ids[1:n * context + 1].reshape(n, context)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def prompts(ids: np.ndarray, num: int, length: int) -> np.ndarray:
    """``int32[num, length]``: fixed prompts, slices of ``ids`` at evenly spaced offsets (all the same length)."""
    starts = np.linspace(0, ids.size - length - 1, num).astype(int)
    return np.stack([ids[s:s + length] for s in starts]).astype(np.int32)


def nll_sum(logits_BxTxV, targets_BxT) -> jax.Array:
    """Summed NLL per window (B)."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None], -1)[..., 0].sum(-1)


def generator(graphdef, step_fn, num_new: int):
    """``jit(f(params, prompt_BxP, *step_args) -> Generation)`` with every prompt of full length."""
    f = per_token.decode_fn(graphdef, step_fn, num_new)
    return jax.jit(lambda params, prompt, *a: f(params, prompt, jnp.full((prompt.shape[0],), prompt.shape[1],
                                                                         jnp.int32), *a))


def full_step(m, t, s, i):
    return per_token.full_depth_step(m, t, s, i)


def agreement(ref_BxG: np.ndarray, gen_BxG: np.ndarray) -> dict:
    """Position-wise token match with the full model's greedy continuation, and the identical prefix length."""
    eq = np.asarray(ref_BxG) == np.asarray(gen_BxG)
    prefix = np.where(eq.all(1), eq.shape[1], np.argmin(eq, axis=1))
    return {"match": float(eq.mean()), "identical_prefix": float(prefix.mean()),
            "identical_rows": float(eq.all(1).mean())}


def time_generate(fn, params, prompt_BxP, *args, repeats: int = 1) -> float:
    """Seconds of one jitted generate call (a warm-up call first: compile excluded; block_until_ready)."""
    jax.block_until_ready(fn(params, prompt_BxP, *args))
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, prompt_BxP, *args))
        best = min(best, time.perf_counter() - start)
    return float(best)


def layer_flops(cfg: lm_lib.LMConfig) -> dict:
    """Matmul multiply-adds per token (attention scores and norms excluded): per layer's attention projections,
    per FFN, and the output head."""
    d, kv = cfg.d_model, cfg.num_kv_heads * cfg.head_dim
    attn = 2 * d * d + 2 * d * kv
    ffn = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.mlp_dim
    return {"attn": attn, "ffn": ffn, "head": d * cfg.vocab_size}


def plot_xy(curves: dict, path, *, xlabel: str, ylabel: str, title: str = "", hline: float | None = None,
            logy: bool = False):
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for name, (x, y) in curves.items():
        order = np.argsort(x)
        ax.plot(np.asarray(x)[order], np.asarray(y)[order], marker="o", label=name)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8, label="full model")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_map(map_RxN: np.ndarray, row_labels, path, *, title: str, cbar: str, xlabel: str = "layer"):
    fig = Figure(figsize=(7, min(0.35 * len(row_labels) + 1.6, 7.0)))
    ax = fig.subplots()
    im = ax.imshow(map_RxN, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(np.nanmax(map_RxN))))
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=7)
    ax.set(xlabel=xlabel, title=title)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
