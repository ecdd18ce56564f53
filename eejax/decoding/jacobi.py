"""Jacobi (parallel fixed-point) decoding of blocks of tokens, with CEED-VLA's early exit of the iterations
(Song et al. 2025, arXiv:2506.13725; Jacobi decoding after Santilli et al. 2023 and CLLM, Kou et al. 2024).

The prompt minus its last token is prefilled; ``x0`` (the last prompt token, later the last token of the previous
block) is not yet in the cache. A block of ``n`` new tokens starts from a guess ``y_1..y_n`` (``x0`` repeated).
Each **iteration** is one full-depth ``kv.extend`` of ``[x0, y_1..y_{n-1}]`` from the committed cache (all ``n``
positions in one forward), and every guess is replaced in parallel by the argmax at its position:
``y_j <- argmax p(. | prefix, x0, y_1..y_{j-1})``. The greedy continuation is the unique fixed point, and after
``t`` iterations at least the first ``t`` tokens equal it, so:

* **full Jacobi** (``tol=0``) stops a row when an iteration changes no token (a fixed point) or after ``n``
  iterations (then every token is exact): the output equals greedy decoding token for token, in at most ``n``
  iterations per block (tested, batched);
* **early exit** (CEED-VLA's relaxed convergence): stop when an iteration changed at most ``tol`` tokens, or after
  ``max_iters`` iterations. The block is then emitted as it stands: NOT lossless (tokens may differ from greedy).
  ``tol=-1`` never stops on convergence: exactly ``min(n, max_iters)`` iterations per block (the GPU benchmark's
  way to replay iteration counts measured on the real model with random weights).

The cache kept for the next block is the one written by the row's last iteration, i.e. from that iteration's
*input* guesses. For full Jacobi these are exact; under early exit up to ``tol`` positions (or the tail past
``max_iters``) carry keys/values of a token that was replaced (a stale cache, as a decoder that stops iterating
has). Rows of a batch stop independently (their inputs are frozen once stopped, so a row's result does not depend
on the other rows); the batch loop runs until every row has stopped. Iterations are counted per row and block.

Shapes: B batch, P prompt (padded), G new tokens, K blocks, N block size (``n``), V vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eejax import checks
from eejax.decoding import kv as kv_lib
from eejax.models.lm import DecoderLM


class JacobiOutputs(NamedTuple):
    tokens_BxG: jax.Array     # emitted tokens (G = K * N)
    iters_BxK: jax.Array      # Jacobi iterations (block forwards) row b needed for block k
    changed_BxK: jax.Array    # tokens the row's last iteration changed (0 = a fixed point was reached)

    @property
    def mean_iters_per_block(self) -> jax.Array:
        return jnp.mean(self.iters_BxK.astype(jnp.float32))


class _Iter(NamedTuple):
    t: jax.Array              # iterations run for this block (batch loop)
    inp_BxN: jax.Array        # the guesses fed to the next iteration (frozen once a row stops)
    out_BxN: jax.Array        # the row's current block (what is emitted)
    done_B: jax.Array
    iters_B: jax.Array
    changed_B: jax.Array
    state: kv_lib.DecodeState


class _Blocks(NamedTuple):
    """Carry of the loop over blocks (a known trip count)."""
    x0_B: jax.Array           # the last committed token (not yet in the cache)
    state: kv_lib.DecodeState
    out_BxG: jax.Array
    iters_BxK: jax.Array
    changed_BxK: jax.Array


def jacobi_block(model: DecoderLM, x0_B: jax.Array, state: kv_lib.DecodeState, n: int, *, tol: int = 0,
                 max_iters: int | None = None):
    """One block of ``n`` tokens by Jacobi iteration from the committed ``state`` (``x0`` not in the cache).
    Returns ``(block_BxN, iters_B, changed_B, new_state)``; ``new_state`` has ``pos_B + n``. ``tol`` and
    ``max_iters`` may be traced (one compiled program for a sweep)."""
    cap = n if max_iters is None else jnp.minimum(n, max_iters)
    b = x0_B.shape[0]
    guess_BxN = jnp.broadcast_to(x0_B[:, None], (b, n)).astype(jnp.int32)
    zero_B = jnp.zeros((b,), jnp.int32)

    def body(c: _Iter) -> _Iter:
        block_BxN = jnp.concatenate([x0_B[:, None], c.inp_BxN[:, :n - 1]], axis=1)
        logits_BxNxV, st = kv_lib.extend(model, block_BxN, state)
        new_BxN = jnp.argmax(logits_BxNxV, -1).astype(jnp.int32)
        t = c.t + 1
        changed_B = jnp.sum((new_BxN != c.inp_BxN).astype(jnp.int32), axis=1)
        live_B = ~c.done_B
        stop_B = live_B & ((changed_B <= tol) | (t >= cap))
        live_Bx1 = live_B[:, None]
        # A stopping row keeps the inputs that wrote its cache; a running row feeds its new guesses.
        inp = jnp.where(live_Bx1 & ~stop_B[:, None], new_BxN, c.inp_BxN)
        # Done rows rerun their frozen inputs: the same keys/values are rewritten, so taking `st` for every row is
        # the cache of each row's last own iteration.
        return _Iter(t, inp, jnp.where(live_Bx1, new_BxN, c.out_BxN), c.done_B | stop_B,
                     jnp.where(live_B, t, c.iters_B), jnp.where(live_B, changed_B, c.changed_B), st)

    init = _Iter(jnp.int32(0), guess_BxN, guess_BxN, zero_B > 0, zero_B, zero_B, state)
    final = jax.lax.while_loop(lambda c: ~jnp.all(c.done_B), body, init)
    return final.out_BxN, final.iters_B, final.changed_B, final.state


def jacobi_decode(model: DecoderLM, prompt_BxP: jax.Array, lengths_B: jax.Array, num_new: int, *, block: int,
                  tol: int = 0, max_iters: int | None = None) -> JacobiOutputs:
    """``num_new`` tokens per row (a multiple of ``block``) in blocks of ``block`` by Jacobi iteration. ``tol=0``
    and ``max_iters=None``: exact (greedy); otherwise CEED-VLA's early exit (lossy)."""
    for name, value in (("block", block), ("num_new", num_new)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if num_new % block:
        raise ValueError(f"num_new={num_new} must be a multiple of block={block} (equal blocks)")
    if checks.is_concrete(tol) and (np.ndim(tol) != 0 or int(tol) != tol or tol < -1):
        raise ValueError(f"tol={tol!r} must be an int >= -1 (tokens an iteration may change and still stop; -1: "
                         "never stop on convergence)")
    if max_iters is not None and checks.is_concrete(max_iters) and (
            np.ndim(max_iters) != 0 or int(max_iters) != max_iters or max_iters < 1):
        raise ValueError(f"max_iters={max_iters!r} must be an int >= 1 or None")
    kv_lib.check_prompts(prompt_BxP, lengths_B, model.cfg.vocab_size)
    b, p = prompt_BxP.shape
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    _, state = kv_lib.prefill(model, prompt_BxP, lengths_B, p + num_new + 1)
    state = kv_lib.rollback(state, lengths_B - 1)        # the last prompt token is the first block's x0
    x0_B = jnp.take_along_axis(prompt_BxP, (lengths_B - 1)[:, None], axis=1)[:, 0].astype(jnp.int32)
    num_blocks = num_new // block

    def one(k, c: _Blocks) -> _Blocks:
        blk_BxN, it_B, ch_B, st = jacobi_block(model, c.x0_B, c.state, block, tol=tol, max_iters=max_iters)
        return _Blocks(blk_BxN[:, -1], st, jax.lax.dynamic_update_slice(c.out_BxG, blk_BxN, (0, k * block)),
                       c.iters_BxK.at[:, k].set(it_B), c.changed_BxK.at[:, k].set(ch_B))

    zeros_BxK = jnp.zeros((b, num_blocks), jnp.int32)
    f = jax.lax.fori_loop(0, num_blocks, one, _Blocks(x0_B, state, jnp.zeros((b, num_new), jnp.int32), zeros_BxK,
                                                      zeros_BxK))
    return JacobiOutputs(f.out_BxG, f.iters_BxK, f.changed_BxK)


__all__ = ["JacobiOutputs", "jacobi_block", "jacobi_decode"]
