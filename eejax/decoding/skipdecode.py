"""SkipDecode (Del Corro et al. 2023, arXiv:2307.02628): one layer budget per sequence position, shared by the batch.

The number of layers a token runs decreases monotonically with its position; the layers dropped are the lower /
middle ones (after ``keep_bottom`` always-run bottom layers), and every token ends at the last layer and its head.
So the token at position t runs layers ``[0, keep_bottom) + [keep_bottom + skip_t, N)`` with ``skip_t``
non-decreasing. Any layer the token at t runs was also run by every earlier token, so the KV cache it reads is
complete: batching and caching work by construction, with no K/V to recompute or propagate.

The same program as a per-(layer, position) mask (``position_layer_mask``) gives the teacher-forced training and
evaluation path (``DecoderLM.all_exits(pos_mask_NxT=...)``), which equals the KV-cached decode exactly.

Two ways to decode a schedule, equal in tokens and logits (tested):

* ``phases(layers_G, N)`` (use this): the schedule grouped into runs of one budget, each group its own
  ``lax.scan`` over a static program (``per_token.decode`` phases), so every loop has a known trip count and a
  step costs no host round trip on a GPU; one compiled program per distinct budget.
* ``skip_step`` with the schedule as a traced array: one compiled step for any schedule (sweeps on CPU), but its
  layer loop has a traced trip count (a host round trip per layer run, plus one, on a GPU; issue 20 cause 1).

Shapes: G generated positions, T sequence positions, N layers, B batch.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.decoding.per_token import StepStats
from eejax.exits import engine
from eejax.models.lm import DecoderLM


def linear_schedule(num_positions: int, num_layers: int, max_layers: int, min_layers: int) -> np.ndarray:
    """``int32[G]`` layers per generated position, decaying linearly from ``max_layers`` to ``min_layers``."""
    if not 1 <= min_layers <= max_layers <= num_layers:
        raise ValueError(f"need 1 <= {min_layers=} <= {max_layers=} <= {num_layers=}")
    frac = np.linspace(0.0, 1.0, num_positions) if num_positions > 1 else np.zeros(1)
    return np.round(max_layers + (min_layers - max_layers) * frac).astype(np.int32)


def schedule_for_speedup(num_positions: int, num_layers: int, speedup: float) -> np.ndarray:
    """A linear schedule whose mean is about ``num_layers / speedup`` (max = 1.5x the mean, min mirrors it).

    The realised mean is rounded to whole layers per position; report ``num_layers / mean`` as the real speed-up.
    """
    if speedup < 1:
        raise ValueError(f"{speedup=} must be >= 1")
    mean = num_layers / speedup
    hi = int(min(num_layers, max(1, math.ceil(1.5 * mean))))
    lo = int(max(1, min(hi, round(2 * mean - hi))))
    return linear_schedule(num_positions, num_layers, hi, lo)


def check_schedule(layers_G, num_layers: int, keep_bottom: int = 0) -> np.ndarray:
    layers_G = np.asarray(layers_G, np.int32)
    if np.any(np.diff(layers_G) > 0):
        raise ValueError(f"SkipDecode schedule must be non-increasing (KV cache correctness), got {layers_G}")
    if layers_G.min() < max(1, keep_bottom) or layers_G.max() > num_layers:
        raise ValueError(f"layers per position must lie in [{max(1, keep_bottom)}, {num_layers}], got {layers_G}")
    return layers_G


def position_layer_mask(layers_T, num_layers: int, keep_bottom: int = 0) -> np.ndarray:
    """``bool[N, T]``: layer l runs at position t iff ``l < keep_bottom`` or ``l >= keep_bottom + skip_t``."""
    layers_T = check_schedule(layers_T, num_layers, keep_bottom)
    skip_T = num_layers - layers_T
    l_N1 = np.arange(num_layers)[:, None]
    return (l_N1 < keep_bottom) | (l_N1 >= keep_bottom + skip_T[None, :])


def sequence_mask(prompt_len: int, layers_G, num_layers: int, keep_bottom: int = 0) -> np.ndarray:
    """``bool[N, P + G]`` for teacher forcing: prompt positions run every layer (prefill), then the schedule."""
    full = np.full(prompt_len, num_layers, np.int32)
    return position_layer_mask(np.concatenate([full, np.asarray(layers_G, np.int32)]), num_layers, keep_bottom)


def skip_program(num_layers: int, run, keep_bottom: int = 0) -> engine.Program:
    """The layer program of one position: ``run`` layers, the first ``keep_bottom`` of them at the bottom, the rest
    the top ones; one exit (the final head) after the last step. ``run`` static (an ``int``): a static program of
    ``run`` steps; traced: a table of N steps of which the first ``run`` run (a traced loop bound)."""
    if isinstance(run, (int, np.integer)):
        if not max(1, keep_bottom) <= run <= num_layers:
            raise ValueError(f"{run=} layers must lie in [{max(1, keep_bottom)}, {num_layers}]")
        layers = [j if j < keep_bottom else j + num_layers - run for j in range(run)]
        return engine.sequence(layers, num_layers=num_layers)
    j_S = jnp.arange(num_layers, dtype=jnp.int32)
    skip = num_layers - run
    layer_S = jnp.minimum(jnp.where(j_S < keep_bottom, j_S, j_S + skip), num_layers - 1)
    return engine.Program(layer_S, jnp.zeros_like(layer_S), jnp.reshape(run - 1, (1,)).astype(jnp.int32))


def _step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, run, keep_bottom: int):
    out, state = kv_lib.forward(model, tok_B[:, None], state, skip_program(model.cfg.depth, run, keep_bottom),
                                kv_lib.final_head(model))
    b = tok_B.shape[0]
    stats = StepStats(jnp.full((b,), model.cfg.depth - 1, jnp.int32), jnp.full((b,), run, jnp.int32),
                      jnp.zeros((b,), jnp.float32), jnp.asarray(run, jnp.int32), out.out.hidden_BxD)
    return out.logits_BxC, stats, state


def skip_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, i, layers_G: jax.Array, *,
              keep_bottom: int = 0):
    """Decode one token per row through the layers of position ``i``'s budget ``layers_G[i]`` (shared by the
    batch), the schedule traced: the engine's static path over ``skip_program`` (a loop of ``layers_G[i]`` steps,
    so skipped layers cost nothing, but the loop's trip count is traced), then the final head."""
    return _step(model, tok_B, state, jnp.asarray(layers_G, jnp.int32)[i], keep_bottom)


def phases(layers_G, num_layers: int, keep_bottom: int = 0) -> list[tuple[int, per_token.StepFn]]:
    """The schedule as ``per_token.decode`` phases: one ``(steps, step_fn)`` per run of equal budgets, each step
    function a static program of that many layers (known trip counts only). ``layers_G[i]`` is the budget of
    decode step i (the step that consumes token i); a schedule of one budget is one phase."""
    layers_G = check_schedule(layers_G, num_layers, keep_bottom)
    out, start = [], 0
    for g in range(1, layers_G.size + 1):
        if g == layers_G.size or layers_G[g] != layers_G[start]:
            run = int(layers_G[start])
            out.append((g - start, lambda m, t, s, i, run=run: _step(m, t, s, run, keep_bottom)))
            start = g
    return out
