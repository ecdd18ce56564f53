"""Cascades of independently trained models on the engine (window-based early-exit cascades, Xia & Bouganis,
ICCV 2023, arXiv:2303.08010; the plain threshold cascade of Wang et al., "Wisdom of Committees", ICLR 2022).

Stage k runs member k on the rows still going on; the exit after stage k sees the *ensemble* of members 0..k (the
mean of their softmaxes), as in the paper. The members are plain callables ``x_BxHxWxC -> logits_BxC`` of any
size (they are not stacked), picked by ``lax.switch`` in the engine's ``layer_fn``; the stages are a layer program
over a stage index (``engine.sequence(range(K), exit_steps=range(K))``) and the loop's hidden state is
:class:`CascadeState` (the input and the running sum of member softmaxes). Any policy decides who goes on
(``policies.window`` for window cascades, ``policies.threshold`` for the plain one); with ``engine.BucketCascade()``
stage k runs only on a bucket holding the rows still going on, so its cost follows the forwarded fraction.

Shapes: B batch, C classes, E stages (the cascade's exits).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eejax.exits import engine


class CascadeState(NamedTuple):
    x: jax.Array          # the input, B x ...
    psum_BxC: jax.Array   # sum of the softmaxes of the members run so far


class _StageIndex(nnx.Module):
    """The engine's "stacked layers" for a cascade: only a stage index (members are not stacked)."""

    def __init__(self, num_stages: int):
        self.index = nnx.Variable(jnp.arange(num_stages, dtype=jnp.int32))


def _ensemble(stage, h: CascadeState) -> engine.HeadOut:
    p_BxC = h.psum_BxC / (jnp.asarray(stage, jnp.float32) + 1)
    zeros_Bx1 = jnp.zeros((p_BxC.shape[0], 1), p_BxC.dtype)
    return engine.HeadOut(logits_BxC=jnp.log(jnp.maximum(p_BxC, 1e-30)), feat_BxD=zeros_Bx1,
                          hidden_BxD=zeros_Bx1, gate_B=zeros_Bx1[:, 0])


def ensemble_head(stage: int) -> Callable[[CascadeState], engine.HeadOut]:
    """Exit after ``stage``: the mean softmax of members 0..stage, as log-probabilities (so ``max_softmax`` of the
    head's logits is the ensemble's max probability)."""
    return functools.partial(_ensemble, stage)


def ensemble_heads(num_stages: int) -> engine.IndexedHeads:
    """Every stage's ``ensemble_head`` as one head indexed by the stage (no switch between stages)."""
    return engine.IndexedHeads(_ensemble, num_stages)


def run(members: Sequence[Callable[[jax.Array], jax.Array]], x, policy, num_classes: int,
        executor=engine.BucketCascade()) -> engine.DynamicOutputs:
    """The cascade of ``members`` on ``x`` as one engine loop; ``out.logits_BxC`` is each row's ensemble at the
    stage it stopped (log mean softmax), ``exit_B`` that stage."""
    if not members:
        raise ValueError("a cascade needs at least one member")
    k = len(members)
    branches = [lambda x, m=m: jax.nn.softmax(m(x).astype(jnp.float32), axis=-1) for m in members]

    def layer_fn(layer, h: CascadeState, ctx):
        del layer
        return CascadeState(h.x, h.psum_BxC + jax.lax.switch(ctx.layer, branches, h.x))

    zero_B = engine.zeros_from(x).astype(jnp.float32)
    h0 = CascadeState(x, jnp.zeros((1, num_classes), jnp.float32) + zero_B[:, None])
    program = engine.sequence(list(range(k)), exit_steps=list(range(k)))
    return engine.run(_StageIndex(k), ensemble_heads(k), h0, program, policy, executor, layer_fn=layer_fn)


__all__ = ["CascadeState", "ensemble_head", "ensemble_heads", "run"]
