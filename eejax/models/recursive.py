"""Recursive and Relaxed Recursive Transformers (Bae et al. 2024, arXiv:2410.20672) over ``eejax.models.lm``.

A pretrained ``DecoderLM`` of N stacked layers becomes a *recursive* model: K unique layers (one block) looped
L = N / K times, run on the engine with ``engine.repeat(range(K), L)`` (loop l, step i runs tied layer i in place
of original layer ``l * K + i``). The tied layer i is initialised from the layers it replaces (:data:`INITS`):

* ``"average"``: the mean of layers i, i + K, i + 2K, ... (the paper's Average; ahmedtaha100/RRT ``average_init``);
* ``"stepwise"``: layer i * L, every L-th layer (the paper's Stepwise, as read from its figure; unverified);
* ``"lower"``: layer i, the first K layers (the paper's Lower; with L = 1 it is the truncated model).

*Relaxation*: every linear map (every ``kernel``, ``I x O``) of the tied block gets a LoRA per loop,
``W' + A_l B_l`` with ``A_l`` ``I x R`` and ``B_l`` ``R x O``, initialised by the truncated SVD of the residual
``W_orig(l) - W'`` at rank ``R`` (both third-party codes; at full rank ``R = min(I, O)`` the relaxed model equals
the original, rank 0 is strict recursion). The layer function reads loop l's adapter through ``StepCtx.repeat``
(:func:`loop_adapters`). The norm scales and biases are tied with the block; ``relax_vectors=True`` gives each
loop a full (not low-rank) delta of them too, which makes full rank recover a trained original exactly.

On the training path every row of a step is at the same loop, so the adapter is merged into the tied weight for
that step (one ``I x R x O`` product per matrix per step). Decoding with per-loop exits and *Continuous Depth-wise
Batching* puts rows at different loops in one block call: they share W' but each needs its own loop's adapter, so
the adapters cannot be merged and run per row (batched LoRA, one adapter per row): :func:`lora_row_flops` and
:func:`depthwise_counts` count that, against a masked batch (:func:`masked_counts`) where all rows sit at one loop.

Per-loop exits: an exit after each loop through the model's final norm + shared head (:func:`loop_exit_logits`).

Shapes: B batch, T tokens, D width, V vocabulary, N original layers, K unique layers, L loops, S = K L program
steps, I / O a linear map's input / output width, R LoRA rank, Q queued rows.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.exits import engine
from eejax.models import lm
from eejax.nn import param_count

INITS = ("average", "stepwise", "lower")


def _name(path) -> str:
    """``"mlp.fc1.kernel"`` for a key path into a layer's state (dict keys only; ``.value`` dropped)."""
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def check_split(num_layers: int, num_unique: int, loops: int) -> None:
    """K unique layers looped L times must fit the N original layers (``K L = N``; ``K L < N`` leaves the top
    layers out, e.g. the truncated model ``L = 1``)."""
    for name, v in (("num_unique", num_unique), ("loops", loops)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if num_unique * loops > num_layers:
        raise ValueError(f"{num_unique=} x {loops=} exceeds the model's {num_layers} layers")


def tied_sources(num_layers: int, num_unique: int, init: str) -> list[list[int]]:
    """For each tied layer i, the original layers its initialisation reads (see the module docstring)."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: use one of {INITS}")
    check_split(num_layers, num_unique, 1)
    loops = num_layers // num_unique
    if init == "average":
        return [list(range(i, loops * num_unique, num_unique)) for i in range(num_unique)]
    if init == "stepwise":
        return [[i * loops] for i in range(num_unique)]
    return [[i] for i in range(num_unique)]


def tie_layers(layers_state, num_unique: int, init: str):
    """Stacked layer parameters (leading N) -> the tied block (leading K), each tied layer the mean of its
    ``tied_sources``."""
    n = jax.tree.leaves(layers_state)[0].shape[0]
    src = tied_sources(n, num_unique, init)
    return jax.tree.map(lambda x: jnp.stack([x[np.asarray(s)].mean(0).astype(x.dtype) for s in src]), layers_state)


def svd_lora(residual_xIxO: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD of residuals ``... x I x O`` at ``rank`` (capped at ``min(I, O)``): ``A`` ``... x I x R``,
    ``B`` ``... x R x O`` with ``A @ B`` the best rank-R approximation (singular values split evenly: ``U sqrt(S)``,
    ``sqrt(S) V^T``). Computed in float64."""
    u, s, vt = np.linalg.svd(np.asarray(residual_xIxO, np.float64), full_matrices=False)
    r = min(rank, s.shape[-1])
    sq = np.sqrt(s[..., :r])
    return u[..., :r] * sq[..., None, :], sq[..., :, None] * vt[..., :r, :]


class Converted(NamedTuple):
    graphdef: object     # the K-layer DecoderLM (one exit: its final norm + shared head)
    params: dict         # {"lm": State of the K-layer model, "lora": {name: {"A", "B"}}, "vec": {name: delta}}
    loops: int


def convert(cfg: lm.LMConfig, params, *, num_unique: int, loops: int, init: str = "average", rank: int = 0,
            relax_vectors: bool = False) -> Converted:
    """The recursive (``rank = 0``) or relaxed model of a trained ``DecoderLM`` (``cfg``, ``params``): the
    embedding, final norm and head kept, the N layers tied into K by ``init``, and per-loop LoRA adapters
    ``lora[name]["A"]`` ``K x L x I x R`` / ``["B"]`` ``K x L x R x O`` from the SVD of each loop's residual
    ``W_orig(l K + i) - W'_i``; ``relax_vectors`` adds per-loop full deltas ``K x L x O`` of norms and biases."""
    check_split(cfg.depth, num_unique, loops)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"rank={rank!r} must be an integer >= 0")
    new_cfg = dataclasses.replace(cfg, depth=num_unique, exits=(num_unique - 1,))
    graphdef, fresh = lm.build(new_cfg, 0)
    pure = nnx.to_pure_dict(params)
    orig = pure["layers"]
    tied = tie_layers(orig, num_unique, init)
    new = nnx.to_pure_dict(fresh)
    for key in new:
        new[key] = tied if key == "layers" else pure[key]
    nnx.replace_by_pure_dict(fresh, new)
    lora, vec = {}, {}
    k, steps = num_unique, num_unique * loops

    def residual(path, w_orig, w_tied):
        # loop l, tied layer i replaces original layer l K + i: KxL stacked residuals
        res = np.asarray(w_orig[:steps], np.float64).reshape((loops, k) + w_orig.shape[1:]).swapaxes(0, 1)
        res = res - np.asarray(w_tied, np.float64)[:, None]
        if w_orig.ndim == 3 and rank > 0:
            a, b = svd_lora(res, rank)
            lora[_name(path)] = {"A": jnp.asarray(a, w_orig.dtype), "B": jnp.asarray(b, w_orig.dtype)}
        elif w_orig.ndim != 3 and relax_vectors:
            vec[_name(path)] = jnp.asarray(res, w_orig.dtype)

    jax.tree_util.tree_map_with_path(residual, orig, tied)
    return Converted(graphdef, {"lm": fresh, "lora": lora, "vec": vec}, loops)


def loop_adapters(lora: dict, vec: dict):
    """``wrap(layer_fn) -> layer_fn`` for ``DecoderLM.hidden_states(wrap_layer_fn=...)``: the stored layer
    ``ctx.layer`` at loop ``ctx.repeat`` runs with ``W' + A B`` of that loop (and ``v' + delta``) merged in."""
    def wrap(layer_fn):
        if not lora and not vec:
            return layer_fn

        def fn(layer, h, ctx: engine.StepCtx):
            gdef, state = nnx.split(layer)

            def add(path, x):
                name = _name(path)
                if name in lora:
                    a_IxR, b_RxO = (lora[name][m][ctx.layer, ctx.repeat] for m in ("A", "B"))
                    return x + (a_IxR @ b_RxO).astype(x.dtype)
                if name in vec:
                    return x + vec[name][ctx.layer, ctx.repeat].astype(x.dtype)
                return x

            return layer_fn(nnx.merge(gdef, jax.tree_util.tree_map_with_path(add, state)), h, ctx)
        return fn
    return wrap


def loop_hidden(graphdef, params: dict, tokens_BxT: jax.Array, loops: int) -> jax.Array:
    """Every program step's hidden state ``S x B x T x D`` (S = K L) of the looped block with its adapters."""
    model = nnx.merge(graphdef, params["lm"])
    k = engine.num_layers_of(model.layers)
    return model.hidden_states(tokens_BxT, program=engine.repeat(range(k), loops),
                               wrap_layer_fn=loop_adapters(params["lora"], params["vec"]))


def loop_exit_logits(graphdef, params: dict, tokens_BxT: jax.Array, loops: int,
                     exit_loops: tuple[int, ...] | None = None) -> jax.Array:
    """Logits ``X x B x T x V`` of the exits after the loops ``exit_loops`` (default: every loop), all read
    through the one final norm + shared head."""
    model = nnx.merge(graphdef, params["lm"])
    k = engine.num_layers_of(model.layers)
    exit_loops = tuple(range(loops)) if exit_loops is None else exit_loops
    h_SxBxTxD = loop_hidden(graphdef, params, tokens_BxT, loops)
    last = model.cfg.num_exits - 1
    return jnp.stack([model.exit_logits(h_SxBxTxD[(l + 1) * k - 1], last) for l in exit_loops])


def recursive_lm_loss(graphdef, loops: int, loop_weights=None):
    """``loss_fn(params, batch, ctx)`` for the Trainer: the weighted next-token CE of the per-loop exits (default:
    the last loop only, the paper's uptraining). Every parameter (tied block, adapters, embedding) is trained."""
    w_L = np.eye(loops)[-1] if loop_weights is None else np.asarray(loop_weights, np.float64)
    if w_L.shape != (loops,) or np.any(w_L < 0) or not np.any(w_L > 0):
        raise ValueError(f"loop_weights={loop_weights!r}: {loops} non-negative weights, one at least positive")
    used = tuple(int(l) for l in np.flatnonzero(w_L))

    def loss_fn(params, batch, ctx):
        del ctx
        logits = loop_exit_logits(graphdef, params, batch["tokens"], loops, used)
        ce = jnp.stack([lm.lm_ce(lg, batch["targets"]) for lg in logits])
        return jnp.sum(jnp.asarray(w_L[list(used)], jnp.float32) * ce), {"ce_last": ce[-1], "ce_first": ce[0]}

    return loss_fn


def unique_params(params) -> int:
    """Stored parameters: the tied block once, embedding / norms / head, and every adapter (LoRA counted)."""
    return param_count(params)


# -------------------------------------------------------------------------------- depth-wise batching (a count)


def lora_row_flops(cfg: lm.LMConfig, rank: int) -> tuple[int, int]:
    """Multiply-adds per token of one tied layer's linear maps, ``(dense, lora)``: ``sum I O`` for ``x W'`` and
    ``sum R (I + O)`` for one row's own adapter ``(x A_l) B_l``, paid per row whenever rows at different loops
    share a block call (the adapter cannot be merged into W')."""
    d, k, h, j, f = cfg.d_model, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim
    maps = [(d, (h + 2 * j) * k), (h * k, d)] + ([(d, f), (d, f), (f, d)] if cfg.mlp == "swiglu"
                                                  else [(d, f), (f, d)])
    return sum(i * o for i, o in maps), sum(min(rank, i, o) * (i + o) for i, o in maps)


class SlotCounts(NamedTuple):
    """Block calls of a batching scheme over a queue of rows, each needing ``exit_loop + 1`` loops."""
    block_calls: int          # block applications (each runs the K-layer block on every slot of the batch)
    slot_loops: int           # loops the rows need (sum of exit_loop + 1): the useful work
    utilisation: float        # slot_loops / (block_calls x slots): the fraction of layer slots doing useful work
    adapters_per_call: float  # mean distinct loop adapters among the rows of a call (1 = mergeable)


def _check_exits(exit_loop_Q, slots: int, loops: int) -> np.ndarray:
    e = np.asarray(exit_loop_Q)
    if e.ndim != 1 or e.size == 0 or np.any(e < 0) or np.any(e >= loops):
        raise ValueError(f"exit_loop_Q must be a non-empty vector of loop indices in [0, {loops})")
    if slots < 1:
        raise ValueError(f"{slots=} must be >= 1")
    return e.astype(np.int64) + 1


def masked_counts(exit_loop_Q, slots: int, loops: int) -> SlotCounts:
    """A masked batch with per-loop exits: the queue in batches of ``slots`` rows, each batch running until its
    deepest row is done (exited rows are masked, still occupying their slots); every row of a call is at the
    same loop, so one adapter serves the call."""
    need = _check_exits(exit_loop_Q, slots, loops)
    calls = sum(int(need[i:i + slots].max()) for i in range(0, need.size, slots))
    return SlotCounts(calls, int(need.sum()), float(need.sum() / (calls * slots)), 1.0)


def depthwise_counts(exit_loop_Q, slots: int, loops: int) -> SlotCounts:
    """Continuous depth-wise batching (arXiv:2410.20672): a pool of ``slots`` rows; every call runs the
    one tied block on every occupied slot whatever loop it is at; a row leaves after its exit loop and the next
    queued row takes its slot at loop 0. Rows at different loops need different adapters in the same call:
    ``adapters_per_call`` counts them (batched per-row LoRA, :func:`lora_row_flops`)."""
    need = _check_exits(exit_loop_Q, slots, loops)
    queue, at, left = list(need[::-1]), [], []
    calls, adapters = 0, 0
    while queue or at:
        while queue and len(at) < slots:
            at.append(0)
            left.append(int(queue.pop()))
        calls += 1
        adapters += len(set(at))
        at = [a + 1 for a in at]
        keep = [i for i in range(len(at)) if at[i] < left[i]]
        at, left = [at[i] for i in keep], [left[i] for i in keep]
    return SlotCounts(calls, int(need.sum()), float(need.sum() / (calls * slots)), adapters / calls)
