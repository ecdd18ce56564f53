"""Ground floor: Flax NNX layers shared by the models and the engine, and the one ``build`` helper.

Nothing here imports from the rest of eejax.
"""
from eejax.nn.layers import Block, Mlp, SelfAttention, build, stacked

__all__ = ["Block", "Mlp", "SelfAttention", "build", "stacked"]
