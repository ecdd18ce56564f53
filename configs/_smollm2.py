"""Shared config pieces of the SmolLM2 analysis experiments (depth_efficiency, cola, ceed_jacobi)."""
import ml_collections

RANDOM_TINY = "random-tiny"   # smoke model: random weights, 4 layers, width 32, byte vocabulary


def model_config(name: str = "smollm2-135m") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name=name, dtype="float32"))


def validate_model(v) -> None:
    from eejax.models import pretrained  # noqa: PLC0415

    v.choice("model.name", sorted(pretrained.MODELS) + [RANDOM_TINY])
    v.choice("model.dtype", ("float32", "bfloat16"))
