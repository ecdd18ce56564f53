"""eejax: dynamic-depth networks (early exit, layer skipping, recursion, token exit) in JAX/Flax NNX.

Shape letters. An array's name ends in its axes, leading axis first (``h_BxTxD``: batch x tokens x width). This is
the one glossary of the package: a module's legend may add letters for axes of its own, but never gives one of these
another meaning.

  B  batch: the rows of one call or step       T  tokens of a sequence, or fed at once (a ViT: patches + CLS)
  D  model width                                F  hidden width: of an MLP, or of a feature vector
  H  query heads                                J  key/value heads (grouped-query attention: H / J queries share one)
  K  head dim (D = H * K)                       M  key/value cache slots of a row (prompt + generated tokens)
  N  stored layers: a layer stack's leading axis
  S  steps of a loop: a layer program's (one stored layer each, maybe repeated), a sampler's
  E  exits (a cascade's stages)                 C  classes
  V  vocabulary                                 Q  examples: the rows of a dataset, a cache or a queue
  P  prompt tokens                              G  generated tokens
  W  text windows                               R  rank of a low-rank adapter
  HxWxC  an image (height, width, channels): one unit, read together, never split into the letters above
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
