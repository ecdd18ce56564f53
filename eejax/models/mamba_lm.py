"""A tiny Mamba language model over stacked layers, with exits, and the self-distillation loss of its exits.

Architecture (Mamba, Gu & Dao 2023, arXiv:2312.00752): token embedding -> N residual blocks ``h + mixer(RMSNorm(h))``
(``eejax.nn.ssm.MambaMixer``: selective SSM, causal depthwise conv, gated output; no attention, no MLP) -> an exit
after any set of layers. Every exit maps its hidden state to logits through its own RMSNorm and the output head
shared by all exits (tied to the embedding or untied), as ``eejax.models.lm``'s ``exit_head="shared"``; the last
exit is the final norm + shared head. The public head interface is the decoder LM's (``embed_tokens``,
``exit_features``, ``exit_logits``, ``shared_head``, ``all_exits``), so decoding code reads either model.

Paths (same parameters):

* ``all_exits(tokens)``: the training / teacher-forced path, ``engine.run_layers`` (a ``lax.scan`` over layers),
  each layer's mixer run over the whole sequence by ``cfg.scan`` (the parallel associative scan by default; the fused
  sequential scan is faster on a CPU); logits at every exit.
* the per-layer recurrent state (``empty_state``: conv window and SSM state with a leading layer axis) that
  ``eejax.decoding.recurrent`` carries through the engine as its auxiliary state: prefill runs the parallel scan
  from that state, decode steps the one-token recurrence (``MambaBlock.step``).

``distilled_lm_loss`` trains any LM with ``all_exits`` (this model or ``eejax.models.lm.DecoderLM``) with the exits of
DYNAMAX (arXiv:2504.20922): the final exit on the labels, every early exit distilled from the final exit's
(stopped-gradient) distribution, the early exits' weights decaying linearly with their position.

Shapes: B batch, T tokens, D width, I inner width, N stored layers (and, in ``SSMState``, the state size per
channel), W conv window, V vocabulary, E exits.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.exits import engine, losses
from eejax.models.lm import LMOutputs, exit_outputs, lm_ce
from eejax.nn.layers import build as nn_build, param_count, stacked
from eejax.nn.ssm import SCANS, MambaMixer, SSMState, default_dt_rank, mixer_param_count


@dataclasses.dataclass(frozen=True)
class MambaConfig(engine.ExitSpec):
    vocab_size: int = 65
    d_model: int = 128
    depth: int = 8
    expand: int = 2                          # inner width I = expand * D
    d_state: int = 16                        # SSM state size per channel
    conv_width: int = 4
    dt_rank: int = 0                         # 0: ceil(D / 16), Mamba's default
    tie_embeddings: bool = True
    exits: str | Sequence[int] = "all"       # see engine.exit_layers_from
    norm_eps: float = 1e-5
    scan: str = "parallel"                   # how sequences run (training, prefill): see eejax.nn.ssm.SCANS
    dtype: str | None = None                 # compute dtype; None = the parameters' dtype

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "depth", "expand", "d_state", "conv_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"MambaConfig: {name}={getattr(self, name)} must be >= 1")
        if self.scan not in SCANS:
            raise ValueError(f"MambaConfig: scan={self.scan!r}: use one of {SCANS}")
        if self.dt_rank < 0:
            raise ValueError(f"MambaConfig: dt_rank={self.dt_rank} must be >= 0 (0 = ceil(d_model / 16))")
        checks.dtype_name(self.dtype)
        self.exit_layers  # validates the exit spec  # noqa: B018

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or default_dt_rank(self.d_model)

    @property
    def compute_dtype(self):
        return None if self.dtype is None else jnp.dtype(self.dtype)

    def layer_params(self) -> int:
        """Parameters of one block (mixer + its norm scale)."""
        return mixer_param_count(self.d_model, self.d_inner, d_state=self.d_state, conv_width=self.conv_width,
                                 dt_rank=self.rank) + self.d_model


def _norm(cfg: MambaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, rngs=rngs)


class MambaBlock(nnx.Module):
    """Mamba's residual block: ``h + mixer(RMSNorm(h))``; sequences run with ``cfg.scan``."""

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        self.scan = cfg.scan
        self.norm = _norm(cfg, rngs)
        self.mixer = MambaMixer(cfg.d_model, cfg.d_inner, d_state=cfg.d_state, conv_width=cfg.conv_width,
                                dt_rank=cfg.rank, rngs=rngs, dtype=cfg.compute_dtype)

    def __call__(self, h_BxTxD, state: SSMState | None = None, valid_BxT=None) -> tuple[jax.Array, SSMState]:
        y, state = self.mixer(self.norm(h_BxTxD), state, valid_BxT, scan=self.scan)
        return h_BxTxD + y.astype(h_BxTxD.dtype), state

    def step(self, h_BxD, state: SSMState) -> tuple[jax.Array, SSMState]:
        y, state = self.mixer.step(self.norm(h_BxD), state)
        return h_BxD + y.astype(h_BxD.dtype), state


class MambaLM(nnx.Module):
    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype,
                               embedding_init=nnx.initializers.normal(stddev=0.02))
        self.layers = stacked(lambda r: MambaBlock(cfg, rngs=r), cfg.depth, rngs)
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.unembed = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                      rngs=rngs)
        self.exit_norms = stacked(lambda r: _norm(cfg, r), cfg.num_exits - 1, rngs) if cfg.num_exits > 1 else None

    # ---------------------------------------------------------------------------------------------- heads

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        checks.token_ids(tokens_BxT, self.cfg.vocab_size)
        return self.embed(tokens_BxT)

    def shared_head(self, x_BxTxD: jax.Array) -> jax.Array:
        if self.cfg.tie_embeddings:
            emb_VxD = self.embed.embedding[...]
            if self.cfg.dtype is not None:
                x_BxTxD, emb_VxD = x_BxTxD.astype(self.cfg.dtype), emb_VxD.astype(self.cfg.dtype)
            return x_BxTxD @ emb_VxD.T
        return self.unembed(x_BxTxD)

    def _early_norm(self, h, e):
        norm_def, norm_state = nnx.split(self.exit_norms)
        return nnx.merge(norm_def, jax.tree.map(lambda p: p[e], norm_state))(h)

    def exit_features(self, h_BxTxD: jax.Array, e) -> jax.Array:
        """What exit ``e`` (Python or traced int) feeds the shared head: its own RMSNorm (the last: the final)."""
        last = self.cfg.num_exits - 1
        if isinstance(e, (int, np.integer)):
            return self.final_norm(h_BxTxD) if e == last else self._early_norm(h_BxTxD, e)
        if last == 0:
            return self.final_norm(h_BxTxD)
        return jax.lax.cond(e == last, self.final_norm, lambda h: self._early_norm(h, jnp.minimum(e, last - 1)),
                            h_BxTxD)

    def exit_logits(self, h_BxTxD: jax.Array, e) -> jax.Array:
        """Logits of exit ``e`` (a Python int or a traced int32) for hidden states ``h``."""
        return self.shared_head(self.exit_features(h_BxTxD, e))

    def taken_logits(self, h_BxD: jax.Array, exit_B: jax.Array) -> jax.Array:
        """Logits ``B x V`` of each row's own exit ``exit_B[b]`` (traced), the vocabulary projected ONCE: every
        exit's norm runs on the batch (cheap), each row keeps its exit's features, then one shared-head projection
        (an exit decided by a gate needs no vocabulary head before it)."""
        last = self.cfg.num_exits - 1
        final_BxD = self.final_norm(h_BxD)
        if last == 0:
            return self.shared_head(final_BxD)
        norm_def, norm_state = nnx.split(self.exit_norms)
        early_ExBxD = jax.vmap(lambda st: nnx.merge(norm_def, st)(h_BxD))(norm_state)
        pick_B = jnp.clip(jnp.asarray(exit_B, jnp.int32), 0, last - 1)
        early_BxD = jnp.take_along_axis(early_ExBxD, pick_B[None, :, None], axis=0)[0]
        return self.shared_head(jnp.where((exit_B == last)[:, None], final_BxD.astype(early_BxD.dtype), early_BxD))

    # ---------------------------------------------------------------------------------------------- state

    def empty_state(self, batch: int) -> SSMState:
        """Every layer's recurrent state before the first token (leading layer axis N)."""
        c = self.cfg
        return SSMState(jnp.zeros((c.depth, batch, c.conv_width - 1, c.d_inner), jnp.float32),
                        jnp.zeros((c.depth, batch, c.d_inner, c.d_state), jnp.float32))

    # ---------------------------------------------------------------------------------------------- paths

    def all_exits(self, tokens_BxT: jax.Array, *, valid_BxT: jax.Array | None = None,
                  exits: Sequence[int] | None = None, remat: bool = False) -> LMOutputs:
        """Every layer under ``lax.scan`` (parallel scan inside each mixer); logits at every exit (or at ``exits``).
        ``valid_BxT``: real tokens as a prefix of each row (right padding)."""

        def layer_fn(layer, h, ctx):
            del ctx
            return layer(h, None, valid_BxT)[0]

        _, h_NxBxTxD = engine.run_layers(self.layers, self.embed_tokens(tokens_BxT), layer_fn=layer_fn,
                                         remat=remat)
        return exit_outputs(self, h_NxBxTxD, exits)

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """Final-exit logits ``B x T x V`` of a full-depth forward."""
        return self.all_exits(tokens_BxT, exits=[self.cfg.num_exits - 1]).logits_ExBxTxV[0]


def build(cfg: MambaConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``MambaLM`` (``eejax.nn.build``)."""
    return nn_build(lambda rngs: MambaLM(cfg, rngs=rngs), seed)


# ------------------------------------------------------------------------------------------------- training


def distilled_lm_loss(graphdef, exit_layers: Sequence[int], *, weighting: str = "decaying", kd_weight: float = 1.0,
                      temperature: float = 1.0, remat: bool = False):
    """``loss_fn(params, batch, ctx)`` for the Trainer, for any LM whose ``all_exits(tokens)`` gives
    ``logits_ExBxTxV`` (this model, ``eejax.models.lm.DecoderLM``); ``batch = {"tokens", "targets"}``.

    Loss = CE(final exit, targets) + ``kd_weight`` * sum_e w_e KD(final -> exit e) over the early exits, the final
    exit's distribution a stopped-gradient teacher (``losses.kd_loss`` at ``temperature``). ``weighting`` gives
    the early exits' weights (``losses.exit_weights``; DYNAMAX: ``"decaying"``, linear in the exit's position).
    """
    exit_layers = tuple(exit_layers)
    w_E = jnp.asarray(losses.exit_weights(exit_layers[:-1], weighting) if len(exit_layers) > 1 else np.zeros(0),
                      jnp.float32)

    def loss_fn(params, batch, ctx):
        del ctx
        model = nnx.merge(graphdef, params)
        logits = model.all_exits(batch["tokens"], remat=remat).logits_ExBxTxV
        ce_final = lm_ce(logits[-1], batch["targets"])
        if logits.shape[0] == 1:
            return ce_final, {"ce_last": ce_final}
        kd_E = jnp.stack([losses.kd_loss(logits[e], logits[-1], temperature) for e in range(logits.shape[0] - 1)])
        total = ce_final + kd_weight * jnp.sum(w_E * kd_E)
        return total, {"ce_last": ce_final, "kd_first": kd_E[0], "kd_last_early": kd_E[-1]}

    return loss_fn


__all__ = ["MambaConfig", "MambaBlock", "MambaLM", "build", "param_count", "distilled_lm_loss"]
