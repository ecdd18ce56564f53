"""eejax: dynamic-depth networks (early exit, layer skipping, recursion, token exit) in JAX/Flax NNX.

Shape letters used across the package (in names such as ``h_BxTxD``):
  B batch, T tokens (patches + CLS), L sequence length, D model width, F MLP width, H heads,
  E exits, N layers, C classes, V vocabulary, P priors,
  G generated tokens (decoding), J key/value heads (grouped-query attention: each serves H / J query heads).
"""

__version__ = "0.1.0"
