"""Ground floor: Flax NNX layers shared by the models and the engine, and the one ``build`` helper.

Nothing here imports from the rest of eejax.
"""
from eejax.nn.layers import MLPS, Block, Mlp, SelfAttention, SwiGLU, build, make_mlp, stacked
from eejax.nn.ssm import MambaMixer, SSMState

__all__ = ["MLPS", "Block", "Mlp", "SelfAttention", "SwiGLU", "build", "make_mlp", "stacked", "MambaMixer",
           "SSMState"]
