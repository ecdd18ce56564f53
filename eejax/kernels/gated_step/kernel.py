"""Pallas kernel: one gated residual MLP step over row tiles, reading one layer of stacked weights in place.

``gated_mlp(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, residual_NxD=r)`` computes, for the rows
whose ``active`` is set, ``r + gelu(h @ w1[layer] + b1[layer]) @ w2[layer] + b2[layer]`` (``r`` defaults to ``h``; a
pre-LN block passes ``h = ln(r)``), and returns ``r`` for the other rows (the MLP half of a transformer layer
inside an early-exit loop). Reference: ``reference.gated_mlp_ref``. ``gated_mlp_auto`` dispatches: the kernel on
GPU, the reference elsewhere (the TPU/Mosaic variant, with the layer index scalar-prefetched, is not written yet).

How it saves work and memory:

* **Skipped tiles.** The grid runs over row tiles of ``block_rows``; a tile with no active row only copies ``h``
  (``pl.when`` on the tile's active flags). Callers that sort active rows to the front (``exits.paths``) make
  whole tiles inactive.
* **Weights read in place.** The stacked ``L x ...`` arrays are passed whole (their BlockSpec is the full array,
  i.e. a base pointer on GPU) and the kernel indexes ``w1_ref[layer, :, k-tile]`` with ``layer`` read from a one-
  element int32 input: no ``w1[layer]`` slice is materialised in HBM and the layer index stays dynamic (it can be
  a ``while_loop`` counter).
* **F tiled.** An inner loop over ``block_k``-wide slices of the hidden width accumulates ``gelu(h @ w1_k + b1_k) @
  w2_k`` in float32, so only ``D x block_k`` and ``block_k x D`` weight tiles are live at once (a whole ``D x F``
  block overflows GPU shared memory at D=256, F=1024; JAX-NOTES §4); the default ``block_k`` keeps them within
  ``SMEM_TILE_BUDGET`` (``default_block_k``). Not yet compiled on a GPU: shared memory is only checked there.
* **D chunked.** Every array the kernel loads or stores has a power-of-2 size, as the Triton lowering requires:
  the width is split into ``D / block_d`` column chunks (``block_d``: the largest power of 2 <= 128 dividing D,
  e.g. 128 at D=384 and 768, 64 at D=576), the first GEMM sums the chunks' products and the second keeps one
  ``R x block_d`` float32 accumulator per chunk. (The whole-D tiles ``(32, 384)`` of the first version failed to
  compile on an H200: "Pallas Triton lowering requires power-of-2 array sizes", issue 20.)

Backends: ``interpret=None`` picks interpret mode on CPU (``EEJAX_PALLAS_INTERPRET=1`` forces it, ``=0`` forbids
it). On GPU the kernel is lowered by Triton (``compiler_params`` are Triton's, whatever jax's default GPU Pallas
backend is); ``block_rows``, ``block_d`` and ``block_k`` must be powers of two >= 16 there (D and F multiples of
16). On TPU the full-array weight BlockSpecs would copy all L layers into VMEM; a TPU variant should
scalar-prefetch ``layer`` into the weights' ``index_map`` instead (not written; untested here).

Speed: whether the kernel beats XLA's dense MLP on a GPU is measured by ``benchmarks/gated_kernel.py`` (kernel at
100% and 40% active rows against the XLA MLP on all rows). Until a GPU run shows it winning, no default path uses
it: only the opt-in ``GatedKernel`` executor (``eejax.exits.paths``) calls ``gated_mlp_auto``.

``jax.grad`` works through ``jax.custom_vjp`` with the reference's VJP (``pallas_call`` has no autodiff).

Shapes: N rows, D width, F hidden width, L stacked layers, R = ``block_rows``, K = ``block_k``, T row tiles,
C = ``block_d`` (a column chunk of D).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from eejax.kernels.gated_step.reference import gated_mlp_ref


TRITON_NUM_WARPS = 4


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` means auto: interpret on CPU; the env var ``EEJAX_PALLAS_INTERPRET`` (``1``/``0``) overrides auto."""
    if interpret is not None:
        return bool(interpret)
    env = os.environ.get("EEJAX_PALLAS_INTERPRET", "")
    if env in ("0", "1"):
        return env == "1"
    return jax.default_backend() == "cpu"


SMEM_TILE_BUDGET = 48 * 1024   # bytes of weight tiles one k-step loads (Triton keeps ~3 such stages in flight)


def default_block_k(f: int, cap: int = 128, *, d: int | None = None, itemsize: int | None = None) -> int:
    """The largest power of two <= ``cap`` dividing ``f`` (``f`` itself when that is below 16). Given the width
    ``d`` and the weights' ``itemsize``, also at most what keeps one k-step's tiles (``D x K`` of ``w1`` and ``K x
    D`` of ``w2``) within ``SMEM_TILE_BUDGET``, down to 16: 32 at D=384, 16 at D=576 and 768 (bf16). Triton's
    software pipeline buffers every load of the loop per stage, and a whole-D step at K=128 would need 192 KB per
    stage at D=384 (an H100/H200 has ~227 KB of shared memory per block; JAX-NOTES §4)."""
    if d is not None and itemsize is not None:
        while cap > 16 and 2 * d * cap * itemsize > SMEM_TILE_BUDGET:
            cap //= 2
    k = cap
    while k >= 16 and f % k:
        k //= 2
    return k if k >= 16 else f


def _block_k(w1_LxDxF) -> int:
    return default_block_k(w1_LxDxF.shape[-1], d=w1_LxDxF.shape[1], itemsize=jnp.dtype(w1_LxDxF.dtype).itemsize)


def default_block_d(d: int, cap: int = 128) -> int:
    """The column chunk of D: the largest power of two <= ``cap`` dividing ``d`` (``d`` itself below 16)."""
    return default_block_k(d, cap)


def _kernel(layer_ref, a_ref, h_ref, r_ref, w1_ref, b1_ref, w2_ref, b2_ref, o_ref, *maybe_ran_ref, block_d: int,
            num_d: int, block_k: int, num_k: int):
    ran_ref = maybe_ran_ref[0] if maybe_ran_ref else None   # debug output: 1 where the tile's MLP ran
    cols = [pl.ds(c * block_d, block_d) for c in range(num_d)]   # static column chunks of D
    a_Rx1 = a_ref[...]
    r_RxC = [r_ref[:, col] for col in cols]
    for col, r in zip(cols, r_RxC):
        o_ref[:, col] = r                                # inactive rows and skipped tiles: the residual
    if ran_ref is not None:
        ran_ref[...] = jnp.zeros(ran_ref.shape, jnp.int32)
    active_tile = jnp.max(a_Rx1) > 0

    @pl.when(active_tile)
    def _():
        layer = layer_ref[0]
        f32 = jnp.float32
        h_RxC = [h_ref[:, col] for col in cols]

        def k_step(k, acc_RxC):
            ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
            x_RxK = b1_ref[layer, ks].astype(f32)[None, :]
            for h, col in zip(h_RxC, cols):              # h @ w1[:, k-tile], summed over the column chunks
                x_RxK = x_RxK + jnp.dot(h, w1_ref[layer, col, ks], preferred_element_type=f32)
            x_RxK = jax.nn.gelu(x_RxK).astype(w2_ref.dtype)
            return tuple(acc + jnp.dot(x_RxK, w2_ref[layer, ks, col], preferred_element_type=f32)
                         for acc, col in zip(acc_RxC, cols))

        zeros = tuple(jnp.zeros((a_Rx1.shape[0], block_d), f32) for _ in cols)
        acc_RxC = jax.lax.fori_loop(0, num_k, k_step, zeros)
        for acc, r, col in zip(acc_RxC, r_RxC, cols):
            y_RxC = r.astype(f32) + acc + b2_ref[layer, col].astype(f32)[None, :]
            o_ref[:, col] = jnp.where(a_Rx1 > 0, y_RxC.astype(o_ref.dtype), r)
        if ran_ref is not None:
            ran_ref[...] = jnp.ones(ran_ref.shape, jnp.int32)


def _check(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, block_rows, block_k, block_d):
    n, d = h_NxD.shape
    num_layers, d1, f = w1_LxDxF.shape
    if (active_N.shape != (n,) or d1 != d or b1_LxF.shape != (num_layers, f) or w2_LxFxD.shape != (num_layers, f, d)
            or b2_LxD.shape != (num_layers, d)):
        raise ValueError(f"shapes do not fit: h {h_NxD.shape}, active {active_N.shape}, w1 {w1_LxDxF.shape}, "
                         f"b1 {b1_LxF.shape}, w2 {w2_LxFxD.shape}, b2 {b2_LxD.shape}")
    if block_rows < 1 or block_k < 1 or f % block_k:
        raise ValueError(f"{block_rows=} must be >= 1 and {block_k=} must divide F={f}")
    if block_d < 1 or d % block_d:
        raise ValueError(f"{block_d=} must divide D={d}")


def _pallas_forward(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, r_NxD, *, block_rows: int,
                    block_k: int, block_d: int, interpret: bool, with_ran: bool = False):
    _check(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, block_rows, block_k, block_d)
    if r_NxD.shape != h_NxD.shape:
        raise ValueError(f"residual of shape {r_NxD.shape} for rows of shape {h_NxD.shape}")
    n, d = h_NxD.shape
    num_layers, _, f = w1_LxDxF.shape
    pad = -n % block_rows                              # padded rows are inactive, so their tiles may be skipped
    h_pad = jnp.pad(h_NxD, ((0, pad), (0, 0))) if pad else h_NxD
    r_pad = jnp.pad(r_NxD, ((0, pad), (0, 0))) if pad else r_NxD
    a_pad = jnp.pad(active_N, (0, pad)) if pad else active_N
    num_tiles = (n + pad) // block_rows
    layer_1 = jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1).reshape(1)   # jnp indexing also clamps

    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))   # noqa: E731  (base pointer)
    rows = pl.BlockSpec((block_rows, d), lambda i: (i, 0))
    out_shape = [jax.ShapeDtypeStruct(r_pad.shape, r_pad.dtype)]
    out_specs = [rows]
    if with_ran:
        out_shape.append(jax.ShapeDtypeStruct((num_tiles,), jnp.int32))
        out_specs.append(pl.BlockSpec((1,), lambda i: (i,)))
    outs = pl.pallas_call(
        functools.partial(_kernel, block_d=block_d, num_d=d // block_d, block_k=block_k, num_k=f // block_k),
        grid=(num_tiles,),
        in_specs=[whole((1,)), pl.BlockSpec((block_rows, 1), lambda i: (i, 0)), rows, rows,
                  whole(w1_LxDxF.shape), whole(b1_LxF.shape), whole(w2_LxFxD.shape), whole(b2_LxD.shape)],
        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=TRITON_NUM_WARPS),
    )(layer_1, a_pad.astype(jnp.int32)[:, None], h_pad, r_pad, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD)
    out_NxD = outs[0][:n] if pad else outs[0]
    return (out_NxD, outs[1]) if with_ran else out_NxD


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _gated(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, r_NxD, block_rows, block_k, block_d,
           interpret):
    return _pallas_forward(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, r_NxD,
                           block_rows=block_rows, block_k=block_k, block_d=block_d, interpret=interpret)


def _gated_fwd(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, r_NxD, block_rows, block_k, block_d,
               interpret):
    out = _gated(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, r_NxD, block_rows, block_k, block_d,
                 interpret)
    return out, (h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, r_NxD)


def _gated_bwd(block_rows, block_k, block_d, interpret, res, g_NxD):
    del block_rows, block_k, block_d, interpret
    h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, r_NxD = res
    _, vjp = jax.vjp(lambda h, w1, b1, w2, b2, r: gated_mlp_ref(h, active_N, w1, b1, w2, b2, layer,
                                                                 residual_NxD=r),
                     h_NxD, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, r_NxD)
    g_h, g_w1, g_b1, g_w2, g_b2, g_r = vjp(g_NxD)
    return g_h, None, g_w1, g_b1, g_w2, g_b2, None, g_r   # no cotangent for the mask and the layer index


_gated.defvjp(_gated_fwd, _gated_bwd)


def gated_mlp(h_NxD: jax.Array, active_N: jax.Array, w1_LxDxF: jax.Array, b1_LxF: jax.Array, w2_LxFxD: jax.Array,
              b2_LxD: jax.Array, layer, *, residual_NxD: jax.Array | None = None, block_rows: int = 32,
              block_k: int | None = None, block_d: int | None = None, interpret: bool | None = None) -> jax.Array:
    """The gated MLP step (see the module docstring); differentiable in ``h``, the residual and the weights."""
    block_k = _block_k(w1_LxDxF) if block_k is None else block_k
    block_d = default_block_d(h_NxD.shape[-1]) if block_d is None else block_d
    r_NxD = h_NxD if residual_NxD is None else residual_NxD
    return _gated(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, jnp.asarray(layer, jnp.int32), r_NxD,
                  block_rows, block_k, block_d, resolve_interpret(interpret))


def kernel_backend() -> bool:
    """Whether ``gated_mlp_auto`` uses the Pallas kernel here: on GPU (Triton), not on CPU (interpret mode is only
    for correctness) nor on TPU (the Mosaic variant is not written)."""
    return jax.default_backend() == "gpu"


def gated_mlp_auto(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, *, residual_NxD=None,
                   block_rows: int = 32, block_k: int | None = None, block_d: int | None = None) -> jax.Array:
    """The executor's dispatch: the Pallas kernel where it compiles (``kernel_backend()``), the reference else."""
    fn = gated_mlp if kernel_backend() else gated_mlp_ref
    return fn(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, residual_NxD=residual_NxD,
              block_rows=block_rows, block_k=block_k, block_d=block_d)


def gated_mlp_ran_tiles(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, *, block_rows: int = 32,
                        block_k: int | None = None, block_d: int | None = None, interpret: bool | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """Debug view: the output and ``ran_T``, 1 for the row tiles whose MLP branch ran (0 where it was skipped)."""
    block_k = _block_k(w1_LxDxF) if block_k is None else block_k
    block_d = default_block_d(h_NxD.shape[-1]) if block_d is None else block_d
    return _pallas_forward(h_NxD, active_N, w1_LxDxF, b1_LxF, w2_LxFxD, b2_LxD, layer, h_NxD, block_rows=block_rows,
                           block_k=block_k, block_d=block_d, interpret=resolve_interpret(interpret), with_ran=True)
