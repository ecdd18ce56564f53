"""BERT-style text encoder over stacked layers, with an exit head after any set of layers.

Post-LN blocks as in BERT (``x = LN(x + attn(x)); x = LN(x + mlp(x))``, exact-erf GELU), absolute learned positions
and token types, a padding mask. ``Encoder.all_exits`` runs the training path (``engine.scan_exits``, every exit)
and ``Encoder.dynamic`` the inference path (``engine.while_exits``, per-sample exit) over the same parameters, as
``eejax.models.vit`` does. The pretrained all-MiniLM-L6-v2 weights load into it with
``eejax.models.pretrained_encoder.load_minilm``.

The engine's hidden state is an :class:`EncState` pytree ``(h_BxTxD, mask_BxT, halt)``: the padding mask travels
with the hidden state, so layers need no side input (the engine's default ``layer_fn``) and masked row updates
freeze it with everything else.

``shared_layers=True`` stores ONE layer and runs it ``depth`` times (ALBERT-style, as PALBERT uses) as the engine's
repeat program (``engine.repeat([0], depth)``: ``Encoder.program()``), on both the scan and the inference path; the
gradient of the stored layer sums over the loops.

``ponder=True`` adds PALBERT's Lambda layer (arXiv:2204.03276, official code ``tinkoff-ai/palbert``): after each
layer ``lambda_l = sigmoid(MLP([pool(h_l), pool(h_{l-1})]))``; the carry accumulates ``log prod_{j<=l}(1 -
lambda_j)``, and every exit head reports ``gate_B = logit(CDF_l)`` with ``CDF_l = 1 - prod_{j<=l}(1 - lambda_j)``
(the halting distribution's CDF), so the engine's ``learned`` measure (``sigmoid(gate)``) with threshold ``q`` is
PALBERT's Q-exit rule and the PonderNet loss reads ``p_l = CDF_l - CDF_{l-1}`` from the scan path.

Shapes: B batch, T tokens, D width, H heads, K head dim, F MLP width, N layers, E exits, C classes, V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.exits import confidence as conf_lib
from eejax.exits import engine, policies
from eejax.nn.layers import build as nn_build, stacked

_NEG = -1e9  # additive attention bias for padding keys (finite: a fully padded row stays NaN-free)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    d_model: int = 384
    depth: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    ln_eps: float = 1e-12
    num_classes: int = 2
    exits: str | Sequence[int] = "all"   # see engine.exit_layers_from
    pool: str = "cls"                    # classifier pooling: 'cls' (BERT pooler: tanh(W h_CLS)) | 'mean'
    shared_layers: bool = False          # ALBERT-style: one stored layer run `depth` times
    ponder: bool = False                 # PALBERT's Lambda layer (halting distribution in HeadOut.gate_B)
    lambda_hidden: int = 128

    def __post_init__(self):
        checks.config_ints(self, vocab_size=1, max_len=1, type_vocab_size=1, d_model=1, depth=1, num_heads=1,
                           mlp_dim=1, num_classes=2, lambda_hidden=1)
        checks.positive_number(self.ln_eps, "ln_eps")
        if self.d_model % self.num_heads:
            raise ValueError(f"{self.d_model=} not divisible by {self.num_heads=}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool={self.pool!r}: use 'cls' or 'mean'")
        self.exit_layers  # validates the exit spec  # noqa: B018

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return engine.exit_layers_from(self.exits, self.depth)


class HaltState(NamedTuple):
    """PALBERT's running halting state (zeros and unused when ``ponder=False``)."""

    log_surv_B: jax.Array      # log prod_{j<=l} (1 - lambda_j): probability of not having halted yet
    prev_pool_BxD: jax.Array   # pooled hidden state of the previous layer (the Lambda layer's second input)


class EncState(NamedTuple):
    """The engine's hidden state for a text encoder."""

    h_BxTxD: jax.Array
    mask_BxT: jax.Array        # 1.0 for real tokens, 0.0 for padding
    halt: HaltState


def masked_mean(h_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean over real tokens (sentence-transformers' mean pooling)."""
    m = mask_BxT.astype(h_BxTxD.dtype)[:, :, None]
    return (h_BxTxD * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


class BertSelfAttention(nnx.Module):
    """BERT's attention: separate Q, K, V projections (so pretrained weights map one to one), padding mask."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.query = nnx.Linear(d_model, d_model, rngs=rngs)
        self.key = nnx.Linear(d_model, d_model, rngs=rngs)
        self.value = nnx.Linear(d_model, d_model, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
        b, t, d = x_BxTxD.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = split(self.query(x_BxTxD)), split(self.key(x_BxTxD)), split(
            self.value(x_BxTxD))
        logits_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxTxHxK) / jnp.sqrt(q_BxTxHxK.shape[-1])
        logits_BxHxTxT = logits_BxHxTxT + jnp.where(mask_BxT[:, None, None, :] > 0, 0.0, _NEG)
        probs = jax.nn.softmax(logits_BxHxTxT.astype(jnp.float32), axis=-1).astype(v_BxTxHxK.dtype)
        o_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs, v_BxTxHxK)
        return self.out(o_BxTxHxK.reshape(b, t, d))


class BertLayer(nnx.Module):
    """Post-LN BERT block on an :class:`EncState` (mask and halting state pass through)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.attn = BertSelfAttention(d, cfg.num_heads, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, epsilon=cfg.ln_eps, rngs=rngs)
        self.fc1 = nnx.Linear(d, cfg.mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp_dim, d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=cfg.ln_eps, rngs=rngs)

    def block(self, x_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
        x_BxTxD = self.ln1(x_BxTxD + self.attn(x_BxTxD, mask_BxT))
        return self.ln2(x_BxTxD + self.fc2(jax.nn.gelu(self.fc1(x_BxTxD), approximate=False)))

    def __call__(self, s: EncState) -> EncState:
        return s._replace(h_BxTxD=self.block(s.h_BxTxD, s.mask_BxT))


class LambdaLayer(nnx.Module):
    """PALBERT's Lambda layer: halting probability from the current and previous pooled states (3 linear layers,
    ``linear_cat`` in the official code)."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(2 * d_model, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, cur_BxD, prev_BxD) -> jax.Array:
        x = jnp.concatenate([cur_BxD, prev_BxD], axis=-1)
        return self.fc3(jax.nn.gelu(self.fc2(jax.nn.gelu(self.fc1(x)))))[:, 0]   # logit of lambda_l


class PonderLayer(nnx.Module):
    """A BERT layer followed by the Lambda layer, which advances the halting state."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.layer = BertLayer(cfg, rngs=rngs)
        self.lam = LambdaLayer(cfg.d_model, cfg.lambda_hidden, rngs=rngs)

    def __call__(self, s: EncState) -> EncState:
        h = self.layer.block(s.h_BxTxD, s.mask_BxT)
        pool_BxD = h[:, 0]
        log_one_minus_lam_B = jax.nn.log_sigmoid(-self.lam(pool_BxD, s.halt.prev_pool_BxD))
        return EncState(h, s.mask_BxT, HaltState(s.halt.log_surv_B + log_one_minus_lam_B, pool_BxD))


def cdf_logit(log_surv_B: jax.Array) -> jax.Array:
    """``logit(1 - S)`` from ``log S``, stable for S near 0 and 1."""
    log_surv_B = jnp.minimum(log_surv_B, -1e-7)
    return jnp.log(-jnp.expm1(log_surv_B)) - log_surv_B


class ClassifierHead(nnx.Module):
    """A pooled linear classifier (DeeBERT's off-ramp: BERT pooler ``tanh(W h_CLS)`` then a linear layer)."""

    def __init__(self, d_model: int, num_classes: int, *, pool: str, ponder: bool, rngs: nnx.Rngs):
        self.pool, self.ponder = pool, ponder
        self.pooler = nnx.Linear(d_model, d_model, rngs=rngs)
        self.fc = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, s: EncState) -> engine.HeadOut:
        mean_BxD = masked_mean(s.h_BxTxD, s.mask_BxT)
        pooled_BxD = s.h_BxTxD[:, 0] if self.pool == "cls" else mean_BxD
        feat_BxD = jnp.tanh(self.pooler(pooled_BxD))
        gate_B = cdf_logit(s.halt.log_surv_B) if self.ponder else jnp.zeros_like(s.halt.log_surv_B)
        return engine.HeadOut(logits_BxC=self.fc(feat_BxD), feat_BxD=feat_BxD, hidden_BxD=mean_BxD, gate_B=gate_B)


class Encoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        init = nnx.initializers.normal(0.02)
        self.tok = nnx.Embed(cfg.vocab_size, d, embedding_init=init, rngs=rngs)
        self.pos = nnx.Embed(cfg.max_len, d, embedding_init=init, rngs=rngs)
        self.typ = nnx.Embed(cfg.type_vocab_size, d, embedding_init=init, rngs=rngs)
        self.ln = nnx.LayerNorm(d, epsilon=cfg.ln_eps, rngs=rngs)
        make = (lambda r: PonderLayer(cfg, rngs=r)) if cfg.ponder else (lambda r: BertLayer(cfg, rngs=r))
        self.layers = stacked(make, 1 if cfg.shared_layers else cfg.depth, rngs)
        self.heads = nnx.List([ClassifierHead(d, cfg.num_classes, pool=cfg.pool, ponder=cfg.ponder, rngs=rngs)
                               for _ in cfg.exit_layers])

    # ------------------------------------------------------------------------------------------------ pieces

    def embed(self, ids_BxT: jax.Array, mask_BxT: jax.Array, type_ids_BxT: jax.Array | None = None) -> EncState:
        checks.batch_array(ids_BxT, "ids_BxT", ndim=2)
        checks.batch_array(mask_BxT, "mask_BxT")
        checks.token_ids(ids_BxT, self.cfg.vocab_size, name="ids_BxT")
        b, t = ids_BxT.shape
        if t > self.cfg.max_len:
            raise ValueError(f"sequence length {t} > max_len {self.cfg.max_len}")
        if mask_BxT.shape != ids_BxT.shape:
            raise ValueError(f"mask shape {mask_BxT.shape} != ids shape {ids_BxT.shape}")
        type_ids_BxT = jnp.zeros_like(ids_BxT) if type_ids_BxT is None else type_ids_BxT
        h = self.tok(ids_BxT) + self.pos(jnp.arange(t))[None] + self.typ(type_ids_BxT)
        h_BxTxD = self.ln(h)
        zero_B = h_BxTxD[:, 0, 0] * 0   # carries derived from the data (sharding-friendly, JAX-NOTES §5)
        return EncState(h_BxTxD, mask_BxT.astype(h_BxTxD.dtype), HaltState(zero_B, h_BxTxD[:, 0] * 0))

    def program(self) -> engine.Program:
        """The layer program: with ``shared_layers`` the one stored layer looped ``depth`` times
        (``engine.repeat``: ALBERT / PALBERT recursion, gradients summed over the loops), else the prefix."""
        cfg = self.cfg
        if cfg.shared_layers:
            return engine.repeat([0], cfg.depth, cfg.exit_layers)
        return engine.prefix(cfg.depth, cfg.exit_layers)

    # ------------------------------------------------------------------------------------------------ paths

    def hidden_states(self, ids_BxT, mask_BxT, type_ids_BxT=None) -> jax.Array:
        """Every layer's output ``h_NxBxTxD`` (for tests and embeddings)."""
        _, s_N = engine.run_layers(self.layers, self.embed(ids_BxT, mask_BxT, type_ids_BxT),
                                   program=self.program())
        return s_N.h_BxTxD

    def sentence_embedding(self, ids_BxT, mask_BxT, layer: int = -1) -> jax.Array:
        """sentence-transformers' embedding: masked mean of a layer's tokens, L2-normalised."""
        e_BxD = masked_mean(self.hidden_states(ids_BxT, mask_BxT)[layer], mask_BxT)
        return e_BxD / jnp.maximum(jnp.linalg.norm(e_BxD, axis=-1, keepdims=True), 1e-12)

    def all_exits(self, ids_BxT, mask_BxT, type_ids_BxT=None, *, remat: bool = False) -> engine.ExitOutputs:
        return engine.scan_exits(self.layers, list(self.heads), self.embed(ids_BxT, mask_BxT, type_ids_BxT),
                                 program=self.program(), remat=remat)

    def dynamic(self, ids_BxT, mask_BxT, threshold=None, measure: str | conf_lib.Measure = "neg_entropy",
                type_ids_BxT=None, *, policy=None, executor=engine.Masked()) -> engine.DynamicOutputs:
        """``engine.run`` over ``program()``; by default a threshold on ``measure`` (DeeBERT: ``neg_entropy``,
        PABEE: ``patience``, PALBERT's Q-exit: ``learned`` on the halting CDF)."""
        if policy is None:
            policy = policies.threshold(measure, threshold, len(self.cfg.exit_layers))
        return engine.run(self.layers, list(self.heads), self.embed(ids_BxT, mask_BxT, type_ids_BxT),
                          self.program(), policy, executor)

    def static(self, ids_BxT, mask_BxT, exit_index: int, type_ids_BxT=None) -> jax.Array:
        """A truncated model: layers up to exit ``exit_index`` and only that exit's head."""
        n = self.cfg.exit_layers[exit_index] + 1
        trunc = engine.sequence(np.asarray(self.program().layer_S)[:n])
        out = engine.run(self.layers, [self.heads[exit_index]], self.embed(ids_BxT, mask_BxT, type_ids_BxT), trunc)
        return out.logits_BxC


def build(cfg: EncoderConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``Encoder`` (``eejax.nn.build``)."""
    return nn_build(lambda rngs: Encoder(cfg, rngs=rngs), seed)


def halting_probs(gate_ExB: jax.Array) -> jax.Array:
    """PALBERT's halting distribution ``p_ExB`` from the heads' ``gate = logit(CDF)``: ``p_l = CDF_l - CDF_{l-1}``,
    the last exit taking all the remaining mass (so every row sums to 1)."""
    cdf_ExB = jax.nn.sigmoid(gate_ExB.astype(jnp.float32))
    cdf_ExB = cdf_ExB.at[-1].set(1.0)
    prev_ExB = jnp.concatenate([jnp.zeros_like(cdf_ExB[:1]), cdf_ExB[:-1]])
    return jnp.maximum(cdf_ExB - prev_ExB, 0.0)


__all__ = ["EncoderConfig", "EncState", "HaltState", "Encoder", "BertLayer", "PonderLayer", "ClassifierHead",
           "build", "masked_mean", "halting_probs", "cdf_logit"]
