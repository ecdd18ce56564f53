"""Per-token FFN routes (Duo-LLM, Alizadeh et al. 2024, arXiv:2410.10846): route patterns, uniform random routes
for training, the oracle search under a budget of big layers, and a learned router that predicts a pattern.

Every layer of a Duo model holds a big FFN and a small one; per token and layer a route picks ``FFN_SKIP`` /
``FFN_SMALL`` / ``FFN_BIG`` (``engine.ffn_route``, ``lm.Block.mlp_routed``); attention always runs. Training draws
the route uniformly per token and layer, so every pattern is usable at inference. The search space here is
``{small, big}`` per layer (a *pattern*: ``2^L`` of them, 64 at L = 6), and a budget ``k`` is the number of big
layers. The **oracle** picks per token the pattern of budget ``k`` with the lowest loss of that token: it reads the
true next token, so it is an upper bound to compare routers with, never a method. The **router** sees only the
input: a linear map from a hidden state to one logit per pattern, trained with cross-entropy against the oracle's
pattern at every budget (``router_loss``) and read by the highest logit among the budget's patterns.

Shapes: L layers, P patterns (2^L), N tokens (flattened B x T), D width, K budgets.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eejax.exits.engine import FFN_BIG, FFN_SKIP, FFN_SMALL, FFN_VARIANTS


def patterns(num_layers: int) -> np.ndarray:
    """``int32[2^L, L]``: every {small, big} pattern; pattern p runs the big FFN at layer l iff bit l of p is set
    (pattern 0 is all-small, the last all-big)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or not 1 <= num_layers <= 16:
        raise ValueError(f"num_layers={num_layers!r} must be an integer in [1, 16] (2^L patterns are enumerated)")
    bits_PxL = (np.arange(2 ** num_layers)[:, None] >> np.arange(num_layers)[None, :]) & 1
    return np.where(bits_PxL == 1, FFN_BIG, FFN_SMALL).astype(np.int32)


def num_big(patterns_PxL) -> np.ndarray:
    """``int[P]``: big layers per pattern (its budget)."""
    return (np.asarray(patterns_PxL) == FFN_BIG).sum(-1)


def _budget(patterns_PxL, k: int) -> np.ndarray:
    num_layers = np.shape(patterns_PxL)[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= num_layers:
        raise ValueError(f"budget k={k!r} must be an integer in [0, {num_layers}]")
    return num_big(patterns_PxL) == k


def is_prefix(pattern_L) -> bool:
    """Whether a pattern's big layers are the first ones (the shape early exit would give: big, ..., big, small,
    ...); all-small and all-big count as prefixes."""
    big = np.asarray(pattern_L) == FFN_BIG
    return bool(np.all(big[:big.sum()]))


class OracleRoutes(NamedTuple):
    pattern_N: np.ndarray   # int[N]: index (into the patterns) of each token's best pattern of budget k
    loss_N: np.ndarray      # float[N]: that pattern's loss of the token


def oracle(loss_PxN, patterns_PxL, k: int) -> OracleRoutes:
    """Per token, the pattern of ``k`` big layers with the lowest loss ``loss_PxN[p, n]`` (token n's loss under
    pattern p). It reads the token's label through its loss: an oracle, not a method."""
    loss_PxN = np.asarray(loss_PxN)
    if loss_PxN.ndim != 2 or loss_PxN.shape[0] != np.shape(patterns_PxL)[0]:
        raise ValueError(f"loss_PxN must be P x N with P={np.shape(patterns_PxL)[0]} patterns, got {loss_PxN.shape}")
    idx = np.flatnonzero(_budget(patterns_PxL, k))
    best = idx[np.argmin(loss_PxN[idx], axis=0)]
    return OracleRoutes(best, loss_PxN[best, np.arange(loss_PxN.shape[1])])


def uniform_routes(rng: jax.Array, num_layers: int, shape: Sequence[int],
                   choices: Sequence[int] = (FFN_SKIP, FFN_SMALL, FFN_BIG)) -> jax.Array:
    """``int32[L, *shape]``: a choice drawn uniformly from ``choices`` per layer and token (Duo-LLM's training
    routes; ``shape`` is ``(B, T)`` for per-token routing)."""
    choices = tuple(int(c) for c in choices)
    if not choices or any(c not in range(len(FFN_VARIANTS)) for c in choices):
        raise ValueError(f"choices={choices!r} must be a non-empty subset of 0..{len(FFN_VARIANTS) - 1} "
                         f"({FFN_VARIANTS})")
    pick = jax.random.randint(rng, (num_layers, *shape), 0, len(choices))
    return jnp.asarray(choices, jnp.int32)[pick]


def budget_routes(rng: jax.Array, num_layers: int, k: int, shape: Sequence[int]) -> jax.Array:
    """``int32[L, *shape]``: per token, ``k`` big layers drawn uniformly without replacement, the rest small
    (a random route at budget ``k``, the control the oracle and the router are compared with)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= num_layers:
        raise ValueError(f"budget k={k!r} must be an integer in [0, {num_layers}]")
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (num_layers, *shape)), axis=0), axis=0)
    return jnp.where(rank < k, FFN_BIG, FFN_SMALL).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------- router


def init_router(d_model: int, num_patterns: int) -> dict:
    """A linear router: one logit per pattern from a ``D``-wide feature (zeros: every pattern equally likely)."""
    return {"w_DxP": jnp.zeros((d_model, num_patterns), jnp.float32), "b_P": jnp.zeros((num_patterns,), jnp.float32)}


def router_logits(router: dict, feat_NxD: jax.Array) -> jax.Array:
    return feat_NxD.astype(jnp.float32) @ router["w_DxP"] + router["b_P"][None, :]


def _masked(logits_NxP, budget_P):
    return jnp.where(jnp.asarray(budget_P)[None, :], logits_NxP, -1e9)   # finite: no NaN in the gradient


def router_pick(router: dict, feat_NxD: jax.Array, patterns_PxL, k: int) -> jax.Array:
    """``int[N]``: the router's pattern of budget ``k`` per token (its highest logit among those patterns)."""
    return jnp.argmax(_masked(router_logits(router, feat_NxD), _budget(patterns_PxL, k)), axis=-1)


def router_loss(patterns_PxL, budgets: Sequence[int]):
    """``loss_fn(router, batch, ctx)`` for the Trainer: ``batch = {"feat": N x D, "oracle": N x K}`` (the oracle's
    pattern index per token at each budget of ``budgets``; tokens lead, so the Trainer splits them over devices); the mean over budgets of the cross-entropy of the
    router's softmax over that budget's patterns against the oracle's."""
    masks_KxP = np.stack([_budget(patterns_PxL, k) for k in budgets])

    def loss_fn(router, batch, ctx):
        del ctx
        logits_NxP = router_logits(router, batch["feat"])
        ces, accs = [], []
        for i in range(len(budgets)):
            logp_NxP = jax.nn.log_softmax(_masked(logits_NxP, masks_KxP[i]), axis=-1)
            target_N = batch["oracle"][:, i]
            ces.append(-jnp.mean(jnp.take_along_axis(logp_NxP, target_N[:, None], axis=-1)))
            accs.append(jnp.mean(jnp.argmax(logp_NxP, -1) == target_N))
        return jnp.mean(jnp.stack(ces)), {"oracle_agree": jnp.mean(jnp.stack(accs))}

    return loss_fn
