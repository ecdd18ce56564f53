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
