"""Shared plumbing of the SmolLM2 analysis experiments (depth_efficiency.py, cola.py, ceed_jacobi.py): the model
(the pretrained SmolLM2-135M-Instruct, or a tiny random-weight LM with a byte tokenizer for smoke runs), WikiText-2
test ids, the common config fields and their checks, and the teacher-forced forward of a layer program.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.text import ByteTokenizer, load_text
from eejax.exits import engine
from eejax.models import lm as lm_lib

RANDOM_TINY = "random-tiny"   # smoke model: random weights, 4 layers, width 32, byte vocabulary


class LM(NamedTuple):
    graphdef: Any
    params: Any
    tokenizer: Any
    cfg: lm_lib.LMConfig
    description: str
    load_seconds: float

    @property
    def model(self) -> lm_lib.DecoderLM:
        return nnx.merge(self.graphdef, self.params)


def load_model(mc) -> LM:
    """The model named by ``mc.name`` (final exit only)."""
    start = time.perf_counter()
    if mc.name == RANDOM_TINY:
        cfg = lm_lib.LMConfig(vocab_size=256, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64,
                              mlp="swiglu", exits=[3], dtype=None if mc.dtype == "float32" else mc.dtype)
        graphdef, params = lm_lib.build(cfg, 0)
        return LM(graphdef, params, ByteTokenizer(), cfg, "random-weight tiny LM (4 layers, width 32, byte "
                  "vocabulary; smoke runs only)", time.perf_counter() - start)
    from eejax.models import pretrained  # noqa: PLC0415

    pre = pretrained.load(mc.name, dtype=mc.dtype)
    c = pre.cfg
    desc = (f"{mc.name} (SmolLM2-135M-Instruct from `{pretrained.weights_path(mc.name).name}`, GGUF Q4_1 dequantized "
            f"to {mc.dtype}): {c.depth} layers, width {c.d_model}, {c.num_heads}/{c.num_kv_heads} heads, SwiGLU "
            f"{c.mlp_dim}, vocabulary {c.vocab_size:,}, pre-RMSNorm, tied embeddings")
    return LM(pre.graphdef, pre.params, pre.tokenizer, c, desc, time.perf_counter() - start)


def wikitext_ids(data_dir, tokenizer, max_tokens: int, split: str = "test") -> np.ndarray:
    """The first ``max_tokens`` ids of WikiText-2 (as stored) under the model's tokenizer (only the characters
    needed are tokenized: about 6 characters per token is plenty)."""
    text = load_text(data_dir, "wikitext2", split)
    ids = np.asarray(tokenizer.encode(text[:max_tokens * 8]), np.int32)
    if len(ids) < max_tokens:
        raise ValueError(f"wikitext2/{split} gave {len(ids)} tokens, fewer than the {max_tokens} asked for")
    return ids[:max_tokens]


def causal_inputs(tokens_BxT):
    """Positions and causal mask of full (unpadded) rows."""
    b, t = tokens_BxT.shape
    pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    return pos_BxT, lm_lib.causal_mask(jnp.ones((b, t), bool))


def half_layer_program(layers) -> engine.Program:
    """Each stored layer of ``layers`` (in the given order) as two steps, its attention half then its MLP half, so
    the scan path returns the residual stream after every sublayer."""
    layers = [int(l) for l in layers]
    prog = engine.sequence(np.repeat(np.asarray(layers, np.int32), 2))
    return prog._replace(sub_S=np.tile(np.asarray([engine.ATTN, engine.MLP], np.int32), len(layers)))


def padded_program(prog: engine.Program, max_steps: int) -> engine.Program:
    """A static chain as a fixed-size traced table (padding steps after the last exit never run), so chains of any
    length up to ``max_steps`` share one compiled program."""
    s = prog.num_steps
    if s > max_steps:
        raise ValueError(f"a chain of {s} steps is longer than max_steps={max_steps}")
    pad = lambda a: np.concatenate([np.asarray(a, np.int32), np.zeros(max_steps - s, np.int32)])   # noqa: E731
    return engine.Program(jnp.asarray(pad(prog.layer_S)), jnp.asarray(pad(prog.repeat_S)),
                          jnp.asarray(prog.exit_step_E, jnp.int32))


def nll_of(logits_BxTxV, targets_BxT):
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None], -1)[..., 0]
