"""The shared pieces of the vision configs: the checks every one of them makes (run name and seed, the dataset and
its splits, the model's image shape against the dataset's), and the shared-head multi-exit ViT that MuE's, DeeR's,
JEI-DNN's and the window cascade's configs all train (experiments/_common_vision.py): one recipe, so one trained
backbone (``model_workdir``) serves MuE and DeeR."""
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


DIGITS = ("mnist", "fashion_mnist", "mnist_embedded")   # the 28 x 28 grey-scale digit datasets


def validate_vision(c, *, sizes=("data.train_size", "data.test_size"), positive=(), names=None) -> Validator:
    """The checks every vision config makes: ``name``, ``seed``, ``data.name`` (a known dataset, or one of
    ``names``), ``data.val_fraction`` (when the config has one), the split ``sizes`` (>= 0, 0 = all) and the
    ``positive`` integer fields (>= 1). Returns the Validator for the config's own checks."""
    from eejax.data import pipeline  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.int("seed", lo=0)
    v.choice("data.name", pipeline.DATASETS if names is None else names)
    if "val_fraction" in c.data:
        v.float("data.val_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
    for key in sizes:
        v.int(key, lo=0)
    for key in positive:
        v.int(key, lo=1)
    return v


def check_image(v: Validator, c) -> None:
    """``model.image_size`` x ``model.image_size`` x ``model.channels`` must be the dataset's image shape."""
    from eejax.data import pipeline  # noqa: PLC0415

    if (c.model.image_size, c.model.image_size, c.model.channels) != pipeline.IMAGE_SHAPES[c.data.name]:
        v.fail("model.image_size", f"with model.channels={c.model.channels} does not match {c.data.name} images "
                                   f"{pipeline.IMAGE_SHAPES[c.data.name]}")


def validate_base(c) -> Validator:
    """Checks of the backbone's fields; returns the Validator for the experiment's own checks."""
    from eejax.models import vit as vit_lib  # noqa: PLC0415

    v = validate_vision(c, positive=(
        "data.batch_size", "data.eval_batch_size", "model.image_size", "model.channels", "model.patch_size",
        "model.d_model", "model.depth", "model.num_heads", "model.mlp_dim", "train.steps", "log_every",
        "ckpt_every"))
    v.str("model_workdir", nonempty=False)
    if c.model.depth < 2:
        v.fail("model.depth", "must be >= 2 (an early exit needs a layer after it)")
    v.choice("model.pool", ("cls", "mean"))
    check_image(v, c)
    v.float("train.label_smoothing", 0.0, 1.0, hi_open=True)
    v.optim("train.optim")
    v.build("model", lambda: vit_lib.ViTConfig(**c.model.to_dict(), num_classes=10, exits=[c.model.depth - 1],
                                               head_types="linear"))
    return v
