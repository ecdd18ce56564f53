"""Cost accounting for early-exit models: analytic FLOPs, expected cost under a policy, wall-clock timing.

FLOPs convention: one multiply-add counts as 2 FLOPs (the convention of MSDNet, LGViT and fvcore-style counters
multiplied by 2), so a dense layer mapping D -> F on T tokens costs ``2*T*D*F``. Only matmuls and convolutions are
counted; biases, norms, activations, softmax, residual adds and pooling are ignored (they are O(T*D) against the
O(T*D^2) matmuls and every paper we compare with drops them too).

Letters: T tokens, D model width, F MLP width, H heads, C classes, E exits. ``N`` is the layer axis in
``layer_flops_N`` and the example axis in ``exit_idx_N`` / ``exit_layer_N`` (the names callers use).

Typical use (a ViT with exits after layers 3, 7, 11)::

    layer = transformer_layer_flops(tokens=197, d_model=768, mlp_dim=3072, num_heads=12)
    costs = exit_costs(patch_embed_flops(196, 768, 768), [layer] * 12, [3, 7, 11], [linear_head_flops(768, 1000)] * 3)
    expected_flops(exit_idx_N, costs.cum_flops_E)
"""
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np


def _check_heads(d_model: int, num_heads: int):
    if d_model % num_heads:
        raise ValueError(f"{d_model=} not divisible by {num_heads=}")


def _attention_flops(tokens: int, d_model: int) -> int:
    """Multi-head self-attention on ``tokens`` tokens: QKV, scores, scores @ V, output projection.

    The head count does not change the total: H heads of width D/H do H * T*T*(D/H) = T*T*D multiply-adds.
    """
    qkv = 2 * tokens * d_model * 3 * d_model
    scores = 2 * tokens * tokens * d_model  # q @ k^T over all heads
    mix = 2 * tokens * tokens * d_model  # softmax(scores) @ v over all heads
    out = 2 * tokens * d_model * d_model
    return qkv + scores + mix + out


def transformer_layer_flops(tokens: int, d_model: int, mlp_dim: int, num_heads: int) -> int:
    """One pre-/post-norm transformer block: attention (8TD^2 + 4T^2D) plus a two-matmul MLP (4TDF)."""
    _check_heads(d_model, num_heads)
    return _attention_flops(tokens, d_model) + 2 * 2 * tokens * d_model * mlp_dim


def patch_embed_flops(tokens: int, patch_dim: int, d_model: int) -> int:
    """Patch embedding as a linear map of each flattened patch (``patch_dim`` = p*p*channels); ``tokens`` patches.

    The CLS token and position embeddings are additions, not counted.
    """
    return 2 * tokens * patch_dim * d_model


def linear_head_flops(d_model: int, num_classes: int) -> int:
    """A linear classifier on one pooled (or CLS) vector."""
    return 2 * d_model * num_classes


def local_perception_head_flops(grid_h: int, grid_w: int, d_model: int, hidden: int, num_classes: int) -> int:
    """LGViT's local perception head (Xu et al., ACM MM 2023, Sec. 3.2) on the ``grid_h x grid_w`` patch grid.

    1x1 conv D->hidden, depthwise 3x3 on the hidden channels (all 9 taps counted at every position, as
    fvcore/ptflops do for 'same' padding), 1x1 conv hidden->D, residual, mean-pool, linear classifier.
    """
    patches = grid_h * grid_w
    expand = 2 * patches * d_model * hidden
    depthwise = 2 * patches * hidden * 3 * 3
    project = 2 * patches * hidden * d_model
    return expand + depthwise + project + linear_head_flops(d_model, num_classes)


def global_aggregation_head_flops(grid_h: int, grid_w: int, d_model: int, pool: int, num_heads: int,
                                  num_classes: int) -> int:
    """LGViT's global aggregation head (Xu et al., ACM MM 2023, Sec. 3.2) on the ``grid_h x grid_w`` patch grid.

    The grid is average-pooled by ``pool x pool`` windows with stride ``pool`` ('VALID', so floor(grid/pool) per
    side), one multi-head self-attention runs over the pooled tokens, then mean-pool and a linear classifier.
    """
    if not 1 <= pool <= min(grid_h, grid_w):
        raise ValueError(f"{pool=} must be in [1, min({grid_h=}, {grid_w=})]")
    _check_heads(d_model, num_heads)
    pooled = (grid_h // pool) * (grid_w // pool)
    return _attention_flops(pooled, d_model) + linear_head_flops(d_model, num_classes)


def vit_ee_head_flops(tokens: int, d_model: int, mlp_dim: int, num_heads: int, num_classes: int) -> int:
    """ViT-EE's exit head (Bakhtiarnia et al., 2021): one transformer block on all tokens + a linear head on CLS."""
    return transformer_layer_flops(tokens, d_model, mlp_dim, num_heads) + linear_head_flops(d_model, num_classes)


class ExitCosts(NamedTuple):
    """Per-exit FLOPs (float64, shape [E]).

    cum_flops_E: cost of a sample that stops at exit e in a dynamic model: the embedding, layers 0..exit_layers[e]
        and the heads of exits 0..e, since it evaluated (and declined) every earlier head on its way.
    static_flops_E: cost of a truncated model that runs to exit e's layer and evaluates only head e.
    """
    cum_flops_E: np.ndarray
    static_flops_E: np.ndarray


def exit_costs(embed_flops: float, layer_flops_N: Sequence[float], exit_layers_E: Sequence[int],
               head_flops_E: Sequence[float]) -> ExitCosts:
    """Cumulative and static per-exit costs; ``exit_layers_E`` are the 0-based layers each exit sits after."""
    layer_flops_N = np.asarray(layer_flops_N, np.float64)
    exit_layers_E = np.asarray(exit_layers_E, np.int64)
    head_flops_E = np.asarray(head_flops_E, np.float64)
    num_layers, num_exits = len(layer_flops_N), len(exit_layers_E)
    if exit_layers_E.ndim != 1 or num_exits == 0 or head_flops_E.shape != (num_exits,):
        raise ValueError(f"need one head per exit, got {exit_layers_E.shape=} {head_flops_E.shape=}")
    if np.any(np.diff(exit_layers_E) <= 0) or exit_layers_E[0] < 0 or exit_layers_E[-1] >= num_layers:
        raise ValueError(f"{exit_layers_E=} must be strictly increasing layer indices in [0, {num_layers=})")
    trunk_E = embed_flops + np.cumsum(layer_flops_N)[exit_layers_E]
    return ExitCosts(cum_flops_E=trunk_E + np.cumsum(head_flops_E), static_flops_E=trunk_E + head_flops_E)


def expected_flops(exit_idx_N: np.ndarray, cum_flops_E: np.ndarray) -> float:
    """Mean FLOPs per example when example n stops at exit ``exit_idx_N[n]``."""
    return float(np.mean(np.asarray(cum_flops_E, np.float64)[np.asarray(exit_idx_N)]))


def layer_speedup(exit_layer_N: np.ndarray, num_layers: int) -> float:
    """LGViT's speed-up ratio: ``num_layers`` / mean layers executed; stopping after 0-based layer l runs l+1."""
    exit_layer_N = np.asarray(exit_layer_N)
    if np.any(exit_layer_N < 0) or np.any(exit_layer_N >= num_layers):
        raise ValueError(f"exit layers must lie in [0, {num_layers=}), got {exit_layer_N.min()}..{exit_layer_N.max()}")
    return float(num_layers / np.mean(exit_layer_N + 1))


class Timing(NamedTuple):
    """Wall-clock seconds per call over ``iters`` timed calls (after warm-up, which absorbs compilation)."""
    mean_s: float
    std_s: float
    iters: int
    times_s: tuple[float, ...] = ()  # every timed call, for medians and minima
    output: Any = None               # what the last timed call returned (ready on the device)

    @property
    def min_s(self) -> float:
        """The fastest call: the least disturbed by other work on a shared machine."""
        return float(min(self.times_s))


def measure(fn: Callable[..., Any], *args, warmup: int = 2, iters: int = 10) -> Timing:
    """Times ``fn(*args)`` with ``jax.block_until_ready``, so asynchronous dispatch is not mistaken for speed: the
    one timer of eejax (experiments and benchmarks time through it, or through ``measure_interleaved``)."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need {iters=} >= 1 and {warmup=} >= 0")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times, out = [], None
    for _ in range(iters):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return Timing(mean_s=float(np.mean(times)), std_s=float(np.std(times)), iters=iters, times_s=tuple(times),
                  output=out)


def measure_interleaved(calls: Mapping[str, tuple[Callable[..., Any], Sequence[Any]]], *, warmup: int = 1,
                        iters: int = 3) -> dict[str, Timing]:
    """``measure`` of several ``name -> (fn, args)`` calls run round-robin (``warmup`` untimed rounds, then one timed
    call of each per round for ``iters`` rounds), so a slow spell of a shared machine hits every candidate alike."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need {iters=} >= 1 and {warmup=} >= 0")
    for _ in range(warmup):
        for fn, args in calls.values():
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in calls}
    outs: dict[str, Any] = {}
    for _ in range(iters):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            outs[name] = jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: Timing(float(np.mean(t)), float(np.std(t)), iters, tuple(t), outs[name]) for name, t in times.items()}


def throughput(fn: Callable[..., Any], batch_size: int, *args, warmup: int = 2, iters: int = 10) -> float:
    """Examples per second of ``fn(*args)`` processing a batch of ``batch_size`` examples."""
    return batch_size / measure(fn, *args, warmup=warmup, iters=iters).mean_s
