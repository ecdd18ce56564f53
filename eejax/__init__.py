"""eejax: dynamic-depth networks (early exit, layer skipping, recursion, token exit) in JAX/Flax NNX.

Shape letters used across the package (in names such as ``h_BxTxD``):
  B batch, T tokens (patches + CLS), L sequence length, D model width, F MLP width, H heads,
  E exits, N layers, C classes, V vocabulary, P priors.
"""

__version__ = "0.1.0"


def _configure_runtime() -> None:
    """XLA flags eejax sets before JAX's backend starts (``eejax.runtime``; opt-in through env vars)."""
    import warnings  # noqa: PLC0415

    from eejax import runtime  # noqa: PLC0415

    try:
        runtime.configure_xla()
    except ValueError as err:   # a bad env var must not break every import: say so and leave XLA's default
        warnings.warn(f"{err}; XLA's default is kept", RuntimeWarning, stacklevel=2)


_configure_runtime()
