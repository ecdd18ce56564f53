"""FFN-SkipLLM (Jaiswal et al., EMNLP 2024, arXiv:2404.03865): per token, skip the FFN (MLP) half of the layers
that follow the point where the FFN's input/output cosine similarity saturates; attention and the KV cache always
run.

The rule (``Saturation``), per token and layer l, in layer order:

* the layers ``[0, cold_first)`` and ``[N - cold_last, N)`` are *cold*: their FFN always runs and never triggers a
  skip (the paper keeps the first and last layers, whose FFNs change the representation most);
* the first ``warmup`` tokens (token index ``< warmup``, counted from the start of the skipping phase) run every FFN
  (the paper's warm-up: the first tokens, attention sinks, are decoded at full depth);
* in the hot layers, an FFN that ran and whose input ``x`` and output ``x + FFN(x)`` (the residual stream around the
  MLP half) have ``cos >= threshold`` *saturates* the token: the FFNs of the following hot layers are skipped
  (greedily, without computing them: the decision reads only FFNs that ran). ``max_skip > 0`` runs one FFN again
  after ``max_skip`` consecutive skips to re-measure the cosine (0: skip to the end of the hot region).

``Table`` is a fixed per-(layer, row, token index) skip set (tests, static baselines). Both are *sublayer gates*: the
layer function ``skip_layer(gate)`` runs inside the engine's one loop (``engine.run``, static program: every layer;
``engine.mlp_skip`` / ``row_skip`` bits are honoured on top), with the gate's per-token state carried next to the KV
cache as the engine's auxiliary state.

How a skipped FFN is skipped (``branch=``):

* ``"where"`` (default): predication. The MLP half is computed and each token keeps it or not (``jnp.where``): no
  data-dependent control flow, so a gate that never fires costs nothing over greedy decoding but a skip saves no
  compute either.
* ``"cond"``: the MLP half runs under ``lax.cond`` when at least one token of the batch needs it, so a batch
  whose tokens all skip really saves the FFN's matmuls, at the price of one host round trip per layer on a GPU
  (~18 us on an H200, issue 20). It pays only where an FFN costs more than that: at batch-1 decoding, an MLP half
  of more than ~18 us of weight reads (about 70 MB at H200 bandwidth: a d_model >= ~4096 LLaMA-style model in
  bf16); SmolLM2-135M's (5 MB) does not.

Decisions are per token and causal: a token's decision reads only its own hidden states, which depend on earlier
tokens through attention over the cache they wrote. So one teacher-forced ``forward`` of T tokens equals T
single-token decode steps (tested), which is how perplexity is measured.

Shapes: B batch, T tokens in the forward, N layers, D width, V vocabulary, S token indices of a ``Table``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eejax.decoding import kv as kv_lib
from eejax.decoding.per_token import full_depth_stats
from eejax.exits import engine
from eejax.models.lm import DecoderLM


class SkipState(NamedTuple):
    """Per-token state of a gate during one forward, and its record."""

    saturated_BxT: jax.Array   # bool: the token's next hot FFN is skipped
    streak_BxT: jax.Array      # int32: consecutive FFNs skipped so far
    skip_NxBxT: jax.Array      # bool: FFN of layer l skipped for the token
    cos_NxBxT: jax.Array       # float32: cosine of the MLP half's input and output (NaN where skipped)


def cosine(a_BxTxD: jax.Array, b_BxTxD: jax.Array) -> jax.Array:
    """Cosine similarity over the last axis, in float32."""
    a, b = a_BxTxD.astype(jnp.float32), b_BxTxD.astype(jnp.float32)
    num = jnp.sum(a * b, -1)
    return num / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)


def init_state(num_layers: int, batch: int, tokens: int) -> SkipState:
    bt = (batch, tokens)
    return SkipState(jnp.zeros(bt, bool), jnp.zeros(bt, jnp.int32), jnp.zeros((num_layers,) + bt, bool),
                     jnp.full((num_layers,) + bt, jnp.nan, jnp.float32))


def _record(st: SkipState, l, skip_BxT, cos_BxT) -> SkipState:
    return st._replace(skip_NxBxT=st.skip_NxBxT.at[l].set(skip_BxT),
                       cos_NxBxT=st.cos_NxBxT.at[l].set(jnp.where(skip_BxT, jnp.nan, cos_BxT)))


class Saturation(NamedTuple):
    """FFN-SkipLLM's rule (module docstring). ``threshold`` may be traced (one compile for a sweep)."""

    threshold: jax.Array
    num_layers: int
    cold_first: int = 2
    cold_last: int = 2
    warmup: int = 0
    max_skip: int = 0

    def hot(self, l) -> jax.Array:
        return (l >= self.cold_first) & (l < self.num_layers - self.cold_last)

    def skip(self, st: SkipState, l, index_BxT) -> jax.Array:
        return st.saturated_BxT & self.hot(l) & (index_BxT >= self.warmup)

    def update(self, st: SkipState, l, gate_skip_BxT, skip_BxT, cos_BxT) -> SkipState:
        """``gate_skip``: skipped by this rule; ``skip``: skipped at all (a program bit too). An FFN removed by the
        program only leaves the rule's state as it was."""
        trigger = ~skip_BxT & self.hot(l) & (cos_BxT >= self.threshold)
        streak = jnp.where(gate_skip_BxT, st.streak_BxT + 1, jnp.where(skip_BxT, st.streak_BxT, 0))
        again = (self.max_skip > 0) & (streak >= self.max_skip)    # re-measure after max_skip skips
        saturated = jnp.where(gate_skip_BxT, ~again, jnp.where(skip_BxT, st.saturated_BxT, trigger))
        return _record(st._replace(saturated_BxT=saturated, streak_BxT=jnp.where(again, 0, streak)), l, skip_BxT,
                       cos_BxT)


class Table(NamedTuple):
    """A fixed skip set: the FFN of layer l is skipped for row b's token of index i iff ``skip_NxBxS[l, b, i]``
    (indices past S never skip)."""

    skip_NxBxS: jax.Array

    def skip(self, st: SkipState, l, index_BxT) -> jax.Array:
        table = jnp.asarray(self.skip_NxBxS, bool)[l]                       # B x S
        s = table.shape[1]
        got = jnp.take_along_axis(table, jnp.clip(index_BxT, 0, s - 1), axis=1)
        return got & (index_BxT < s)

    def update(self, st: SkipState, l, gate_skip_BxT, skip_BxT, cos_BxT) -> SkipState:
        return _record(st, l, skip_BxT, cos_BxT)


def saturation(threshold, num_layers: int, *, cold_first: int = 2, cold_last: int = 2, warmup: int = 0,
               max_skip: int = 0) -> Saturation:
    """The FFN-SkipLLM gate; checks the static settings (a threshold above 1 never fires: no skips)."""
    if not (0 <= cold_first and 0 <= cold_last and cold_first + cold_last <= num_layers):
        raise ValueError(f"{cold_first=} and {cold_last=} must be >= 0 and leave at most {num_layers=} layers")
    if warmup < 0 or max_skip < 0:
        raise ValueError(f"{warmup=} and {max_skip=} must be >= 0")
    if isinstance(threshold, (int, float)) and not np.isfinite(threshold) and threshold != np.inf:
        raise ValueError(f"{threshold=} must be a finite number or +inf (never skip)")
    return Saturation(jnp.asarray(threshold, jnp.float32), num_layers, cold_first, cold_last, warmup, max_skip)


class SkipAux(NamedTuple):
    """The engine's auxiliary state of an FFN-skip forward."""

    decode: kv_lib.DecodeAux
    skip: SkipState
    index_BxT: jax.Array   # token index the warm-up and tables count (decode: generation index; forward: position)


BRANCHES = ("where", "cond")


def skip_layer(gate, branch: str = "where"):
    """The engine's layer function: attention half with the KV cache (``kv.cache_attention``, always, unless a
    program bit removes the whole layer), then the MLP half where the gate (and the program's MLP bit) keeps it, by
    predication or under a ``lax.cond`` (``branch``, module docstring)."""
    if branch not in BRANCHES:
        raise ValueError(f"branch={branch!r}: use one of {BRANCHES}")

    def layer_fn(layer, h_BxTxD, ctx: engine.StepCtx):
        aux: SkipAux = ctx.aux
        b = h_BxTxD.shape[0]
        prog_B = jnp.full((b,), engine.FULL, jnp.int32) if ctx.sub_B is None else ctx.sub_B
        h1, dec = kv_lib.cache_attention(layer, h_BxTxD, ctx._replace(sub_B=None if ctx.sub_B is None else prog_B,
                                                                         aux=aux.decode))
        gate_skip_BxT = gate.skip(aux.skip, ctx.layer, aux.index_BxT)
        skip_BxT = gate_skip_BxT | ((prog_B & engine.MLP) == 0)[:, None]
        keep = ~skip_BxT[..., None]
        if branch == "where":
            h2 = jnp.where(keep, layer.mlp_half(h1), h1)
        else:
            h2 = jax.lax.cond(jnp.any(~skip_BxT), lambda x: jnp.where(keep, layer.mlp_half(x), x), lambda x: x, h1)
        st = gate.update(aux.skip, ctx.layer, gate_skip_BxT, skip_BxT, cosine(h1, h2))
        return h2, SkipAux(dec, st, aux.index_BxT)

    return layer_fn


class SkipForward(NamedTuple):
    logits: jax.Array         # B x V (last token) or B x T x V
    state: kv_lib.DecodeState
    skip: SkipState


def forward(model: DecoderLM, tokens_BxT: jax.Array, state: kv_lib.DecodeState, gate, *,
            index_BxT: jax.Array | None = None, program: engine.Program | None = None,
            last_token: bool = False, branch: str = "where") -> SkipForward:
    """T new tokens per row through every layer under the gate (``engine.run``, static path over ``program``,
    default ``kv.full_program``), the KV cache written at every layer; final-head logits at every position (or the
    last). ``index_BxT``: the token indices the warm-up and tables count (default: the positions). ``branch``:
    predication or ``lax.cond`` around the MLP half (module docstring)."""
    b, t = tokens_BxT.shape
    pos_BxT = state.pos_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    index_BxT = pos_BxT if index_BxT is None else jnp.broadcast_to(jnp.asarray(index_BxT, jnp.int32), (b, t))
    aux = SkipAux(kv_lib.DecodeAux(state.cache, pos_BxT), init_state(model.cfg.depth, b, t), index_BxT)
    program = kv_lib.full_program(model) if program is None else program
    out = engine.run(model.layers, kv_lib.final_head(model, last_token=last_token), model.embed_tokens(tokens_BxT),
                     program, None, layer_fn=skip_layer(gate, branch), aux=aux)
    return SkipForward(out.logits_BxC, kv_lib.DecodeState(out.aux.decode.cache, state.pos_B + t), out.aux.skip)


def skip_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, i, gate, *, branch: str = "where"):
    """``per_token.generate``'s step function: one token per row under the gate; ``i`` (the generation index) is
    the token index of the warm-up. ``StepStats.layers_B`` counts the FFN blocks the token ran (attention always
    runs in all N layers)."""
    res = forward(model, tok_B[:, None], state, gate, index_BxT=jnp.asarray(i, jnp.int32), last_token=True,
                  branch=branch)
    return res.logits, full_depth_stats(model.cfg, res.skip.skip_NxBxT[:, :, 0]), res.state


def first_crossing_skips(cos_NxM: np.ndarray, threshold: float, *, cold_first: int, cold_last: int) -> np.ndarray:
    """Offline estimate of the skip set from full-model cosines (``M`` tokens): the hot layers after each token's
    first hot layer with ``cos >= threshold``. Exact for the token itself with ``max_skip=0`` (every FFN up to the
    crossing ran); approximate across tokens (earlier tokens' skips change the cache). For calibration only."""
    n = cos_NxM.shape[0]
    hot = np.zeros(n, bool)
    hot[cold_first:n - cold_last] = True
    fire = (cos_NxM >= threshold) & hot[:, None]
    before = np.cumsum(fire, axis=0) - fire          # crossings strictly before layer l
    return (before > 0) & hot[:, None]


__all__ = ["BRANCHES", "SkipState", "Saturation", "Table", "SkipAux", "SkipForward", "cosine", "init_state",
           "saturation", "skip_layer", "forward", "skip_step", "first_crossing_skips"]
