"""Ground floor: Flax NNX layers shared by the models and the engine, and the one ``build`` helper.

Nothing here imports from the rest of eejax.
"""
from eejax.nn.layers import (MLPS, NORM_PLACEMENTS, Block, Mlp, SelfAttention, SwiGLU, build, make_mlp,
                             param_count, require_pre_ln, stacked, sublayer_input, sublayer_residual)
from eejax.nn.ssm import MambaMixer, SSMState

__all__ = ["MLPS", "NORM_PLACEMENTS", "Block", "Mlp", "SelfAttention", "SwiGLU", "build", "make_mlp", "param_count", "stacked",
           "require_pre_ln", "sublayer_input", "sublayer_residual", "MambaMixer", "SSMState"]
