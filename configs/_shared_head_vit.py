"""The shared-head multi-exit ViT that MuE's and DeeR's configs both train (experiments/_shared_head_vit.py): one
recipe, so one trained backbone (``model_workdir``) serves both papers."""
import ml_collections

from eejax.harness.config import Validator
from eejax.train import default_optim_config


def base_config(arg: str) -> ml_collections.ConfigDict:
    """Seed, data, model and training of the backbone for ``arg`` in (fashion_mnist, smoke)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_workdir = ""   # "" = <workdir>/backbone; a shared directory lets MuE's and DeeR's scripts share it
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist", val_fraction=0.1, train_size=0, batch_size=128, eval_batch_size=500, test_size=0))
    c.model = ml_collections.ConfigDict(dict(
        image_size=28, channels=1, patch_size=7, d_model=64, depth=6, num_heads=4, mlp_dim=128, pool="cls"))
    c.train = ml_collections.ConfigDict(dict(steps=1200, label_smoothing=0.1, optim=default_optim_config()))
    c.train.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=100, total_steps=1200, weight_decay=0.05)
    c.log_every = 100
    c.ckpt_every = 500
    if arg == "smoke":
        c.data.name = "mnist_embedded"
        c.data.val_fraction = 0.125
        c.data.batch_size = 64
        c.model.update(d_model=32, num_heads=2, mlp_dim=64, depth=4)
        c.train.steps = c.train.optim.total_steps = 200
        c.train.optim.warmup_steps = 20
        c.ckpt_every = 100
    elif arg != "fashion_mnist":
        raise ValueError(f"unknown arg {arg!r}; use fashion_mnist or smoke")
    return c


def validate_base(c) -> Validator:
    """Checks of the backbone's fields; returns the Validator for the experiment's own checks."""
    from eejax.data import pipeline  # noqa: PLC0415
    from eejax.models import vit as vit_lib  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.str("model_workdir", nonempty=False)
    v.int("seed", lo=0)
    v.choice("data.name", pipeline.DATASETS)
    v.float("data.val_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
    for key in ("data.train_size", "data.test_size"):
        v.int(key, lo=0)
    for key in ("data.batch_size", "data.eval_batch_size", "model.image_size", "model.channels", "model.patch_size",
                "model.d_model", "model.depth", "model.num_heads", "model.mlp_dim", "train.steps", "log_every",
                "ckpt_every"):
        v.int(key, lo=1)
    if c.model.depth < 2:
        v.fail("model.depth", "must be >= 2 (an early exit needs a layer after it)")
    v.choice("model.pool", ("cls", "mean"))
    if (c.model.image_size, c.model.image_size, c.model.channels) != pipeline.IMAGE_SHAPES[c.data.name]:
        v.fail("model.image_size", f"with model.channels={c.model.channels} does not match {c.data.name} images "
                                   f"{pipeline.IMAGE_SHAPES[c.data.name]}")
    v.float("train.label_smoothing", 0.0, 1.0, hi_open=True)
    v.optim("train.optim")
    v.build("model", lambda: vit_lib.ViTConfig(**c.model.to_dict(), num_classes=10, exits=[c.model.depth - 1],
                                               head_types="linear"))
    return v
