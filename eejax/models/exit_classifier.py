"""Learned exit classifiers of three kinds (linear / MLP / Mamba block), one per early exit, and their training loss.

DYNAMAX (Nogales, Gambella, Roveri, IJCNN 2025, arXiv:2504.20922; no public code) decides per token whether to
leave at an exit with a small classifier on the exit's hidden state, of one of three kinds [2nd: the paper's method
section as summarised by themoonlight.io; the abstract only names "Mamba as an efficient EE classifier"]:

* ``"linear"``: CALM's classifier (Schuster et al. 2022, arXiv:2207.07061), one linear map to a gate logit;
* ``"mlp"``: a transformer-block-style feed-forward network, ``D -> H -> 1`` (GELU);
* ``"mamba"``: a Mamba block whose output projection is replaced by one to a single logit
  (``eejax.nn.ssm.MambaMixer`` with ``d_out=1``, inner width H). Unlike the other two it reads the *history* of the
  exit's hidden states through its own recurrent state, which decoding carries per row like the backbone's.

Every kind reads the RMS-normalised hidden state (no learned scale). ``hidden_for_budget`` picks H so that the MLP
and the Mamba classifier hold the same number of parameters (the linear one has D + 1 and cannot grow).

Training (``classifier_loss``) runs on the frozen LM: the label of exit e at a token is whether exit e's argmax is
among the final exit's top-k tokens (DYNAMAX's top-k relaxation of CALM's "same argmax" label; k = 1 is CALM's),
the loss is the BCE of each early exit's gate, weighted by ``losses.exit_weights(..., "decaying")`` (falling
linearly with the exit's position, as DYNAMAX does).

Shapes: B batch, T tokens, D width, H classifier width, E exits (E - 1 classifiers: the last exit always exits),
V vocabulary.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from eejax.exits import losses
from eejax.nn.layers import build as nn_build, stacked
from eejax.nn.ssm import MambaMixer, SSMState, default_dt_rank, mixer_param_count

KINDS = ("linear", "mlp", "mamba")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    kind: str = "linear"
    d_model: int = 128
    num_exits: int = 2          # the LM's exits; one classifier for each but the last
    hidden: int = 32            # MLP width / Mamba inner width (unused by "linear")
    d_state: int = 4            # Mamba classifier: state size per channel
    conv_width: int = 4         # Mamba classifier: conv kernel width
    dt_rank: int = 0            # Mamba classifier: 0 = ceil(D / 16)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {KINDS}")
        if self.num_exits < 2:
            raise ValueError(f"num_exits={self.num_exits}: exit classifiers need at least one early exit")
        for name in ("d_model", "hidden", "d_state", "conv_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierConfig: {name}={getattr(self, name)} must be >= 1")

    @property
    def rank(self) -> int:
        return self.dt_rank or default_dt_rank(self.d_model)

    @property
    def stateful(self) -> bool:
        return self.kind == "mamba"

    def params_each(self) -> int:
        """Parameters of one classifier."""
        d, h = self.d_model, self.hidden
        if self.kind == "linear":
            return d + 1
        if self.kind == "mlp":
            return d * h + h + h + 1
        return mixer_param_count(d, h, d_state=self.d_state, conv_width=self.conv_width, dt_rank=self.rank,
                                 d_out=1) + 1   # + the gate's bias


def hidden_for_budget(kind: str, d_model: int, budget: int, **mamba) -> int:
    """The width H whose classifier's parameter count is closest to ``budget`` (``mamba``: d_state, conv_width,
    dt_rank of the Mamba kind)."""
    if kind == "linear":
        return 1
    if budget < 1:
        raise ValueError(f"{budget=} must be >= 1")
    count = lambda h: ClassifierConfig(kind, d_model, 2, h, **mamba).params_each()   # noqa: E731
    hi = 1
    while count(hi) < budget:
        hi *= 2
    return min(range(1, hi + 1), key=lambda h: abs(count(h) - budget))


def _rms_normalise(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class ExitClassifier(nnx.Module):
    """One exit's classifier: ``gate logit = f(rms_normalise(h))``; the Mamba kind carries a recurrent state."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.kind
        d, h = cfg.d_model, cfg.hidden
        if cfg.kind == "linear":
            self.out = nnx.Linear(d, 1, rngs=rngs, kernel_init=nnx.initializers.zeros_init())
        elif cfg.kind == "mlp":
            self.fc1 = nnx.Linear(d, h, rngs=rngs)
            self.out = nnx.Linear(h, 1, rngs=rngs)
        else:
            self.mixer = MambaMixer(d, h, d_state=cfg.d_state, conv_width=cfg.conv_width, dt_rank=cfg.rank,
                                    d_out=1, rngs=rngs)
            self.bias = nnx.Param(jnp.zeros((1,), jnp.float32))

    def __call__(self, h_BxTxD, state: SSMState | None = None, valid_BxT=None) -> tuple[jax.Array, Any]:
        """Gate logits ``B x T`` of a sequence (the Mamba kind from ``state``); returns ``(gate_BxT, state)``."""
        x = _rms_normalise(h_BxTxD)
        if self.kind == "linear":
            return self.out(x)[..., 0], state
        if self.kind == "mlp":
            return self.out(jax.nn.gelu(self.fc1(x)))[..., 0], state
        y, state = self.mixer(x, state, valid_BxT)
        return y[..., 0] + self.bias[...][0], state

    def step(self, h_BxD, state: SSMState | None) -> tuple[jax.Array, Any]:
        """The gate logit ``B`` of one token (the Mamba kind advances its state)."""
        if self.kind != "mamba":
            return self(h_BxD[:, None], state)[0][:, 0], state
        y, state = self.mixer.step(_rms_normalise(h_BxD), state)
        return y[:, 0] + self.bias[...][0], state


class ExitClassifiers(nnx.Module):
    """The E - 1 classifiers of an LM's early exits, stacked (leading axis: early exit)."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.stack = stacked(lambda r: ExitClassifier(cfg, rngs=r), cfg.num_exits - 1, rngs)

    def at(self, e) -> ExitClassifier:
        """Early exit ``e``'s classifier (``e`` a Python or traced int)."""
        cdef, cstate = nnx.split(self.stack)
        return nnx.merge(cdef, jax.tree.map(lambda p: p[e], cstate))

    def empty_state(self, batch: int):
        """Every classifier's recurrent state (leading axis E - 1), or None for the stateless kinds."""
        c = self.cfg
        if not c.stateful:
            return None
        e = c.num_exits - 1
        return SSMState(jnp.zeros((e, batch, c.conv_width - 1, c.hidden), jnp.float32),
                        jnp.zeros((e, batch, c.hidden, c.d_state), jnp.float32))

    def gates(self, hidden_ExBxTxD, valid_BxT=None, state=None) -> tuple[jax.Array, Any]:
        """Teacher-forced gate logits of the early exits from their hidden states (``E - 1`` leading, or all E
        exits' hidden states: the last is ignored); returns ``(gate_ExBxT, final state or None)``."""
        n = self.cfg.num_exits - 1
        outs = [self.at(e)(hidden_ExBxTxD[e], None if state is None else jax.tree.map(lambda s: s[e], state),
                           valid_BxT) for e in range(n)]
        gate = jnp.stack([g for g, _ in outs])
        if not self.cfg.stateful:
            return gate, None
        return gate, jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in outs])


def build(cfg: ClassifierConfig, seed: int):
    """``(graphdef, params)`` of freshly initialised ``ExitClassifiers``."""
    return nn_build(lambda rngs: ExitClassifiers(cfg, rngs=rngs), seed)


# ------------------------------------------------------------------------------------------------- training


def relaxed_labels(logits_ExBxTxV: jax.Array, top_k: int) -> jax.Array:
    """``float[E-1, B, T]``: 1 where early exit e's argmax is among the final exit's ``top_k`` tokens."""
    if top_k < 1:
        raise ValueError(f"{top_k=} must be >= 1")
    pred_ExBxT = jnp.argmax(logits_ExBxTxV[:-1], axis=-1)
    top_BxTxK = jax.lax.top_k(logits_ExBxTxV[-1], top_k)[1]
    return jnp.any(pred_ExBxT[..., None] == top_BxTxK[None], axis=-1).astype(jnp.float32)


class ClassifierMetrics(NamedTuple):
    bce: jax.Array
    acc: jax.Array          # gate > 0 agrees with the label, all exits
    positive: jax.Array     # fraction of positive labels (how unbalanced the targets are)


def classifier_loss(lm_graphdef, lm_params, clf_graphdef, *, top_k: int = 1, weighting: str = "decaying"):
    """Loss on the frozen LM: ``loss_fn(clf_params, batch, ctx)`` for the Trainer (``batch["tokens"]``);
    only the classifiers train. The LM may be ``eejax.models.lm.DecoderLM`` or ``mamba_lm.MambaLM``.

    ``clf_graphdef`` may be a dict ``{name: graphdef}`` (then ``clf_params`` is ``{name: params}``): classifiers of
    several kinds trained side by side on ONE frozen forward per batch; the loss is the sum of theirs, each
    classifier's gradient is its own loss's (the losses share no parameter), metrics are prefixed by the name.
    Use an optimizer without global-norm clipping, which would couple them."""
    if top_k < 1:
        raise ValueError(f"{top_k=} must be >= 1")
    many = isinstance(clf_graphdef, dict)
    graphdefs = clf_graphdef if many else {"": clf_graphdef}

    def one(gd, params, outs, label):
        clf = nnx.merge(gd, params)
        n = clf.cfg.num_exits - 1
        w_E = jnp.asarray(losses.exit_weights(list(range(n)), weighting), jnp.float32)
        gate, _ = clf.gates(outs.hidden_ExBxTxD)
        bce_ExBxT = jnp.maximum(gate, 0) - gate * label + jnp.log1p(jnp.exp(-jnp.abs(gate)))
        total = jnp.sum(w_E * jnp.mean(bce_ExBxT, axis=(1, 2)))
        return total, ClassifierMetrics(total, jnp.mean((gate > 0) == (label > 0)), jnp.mean(label))

    def loss_fn(clf_params, batch, ctx):
        del ctx
        outs = jax.lax.stop_gradient(nnx.merge(lm_graphdef, lm_params).all_exits(batch["tokens"]))
        label = relaxed_labels(outs.logits_ExBxTxV, top_k)
        params = clf_params if many else {"": clf_params}
        total, metrics = 0.0, {}
        for name, gd in graphdefs.items():
            loss, m = one(gd, params[name], outs, label)
            total = total + loss
            metrics |= {(f"{name}_{k}" if name else k): v for k, v in m._asdict().items()}
        return total, metrics

    return loss_fn


__all__ = ["KINDS", "ClassifierConfig", "ExitClassifier", "ExitClassifiers", "build", "hidden_for_budget",
           "relaxed_labels", "classifier_loss", "ClassifierMetrics"]
