"""Gated residual MLP step: Pallas kernel (``gated_mlp``) beside its pure-JAX reference (``gated_mlp_ref``).

Off the default path until a GPU run shows it beating XLA's dense MLP (``benchmarks/gated_kernel.py``); only the
opt-in ``GatedKernel`` executor uses it (see ``kernel``'s docstring).
"""
from eejax.kernels.gated_step.kernel import (default_block_d, default_block_k, gated_mlp, gated_mlp_auto,
                                             gated_mlp_ran_tiles, kernel_backend, resolve_interpret)
from eejax.kernels.gated_step.reference import gated_mlp_ref

__all__ = ["gated_mlp", "gated_mlp_auto", "kernel_backend", "gated_mlp_ref", "gated_mlp_ran_tiles", "default_block_k",
           "default_block_d", "resolve_interpret"]
