"""MuE (Tang et al., CVPR 2023, arXiv:2211.11152): exit when consecutive layers' states are similar, on a small ViT.

Runbook
-------
Command (args: fashion_mnist | smoke):
    nice -n 10 ./launch.sh mue:fashion_mnist --outdir experiments/results/mue-fashion_mnist \\
        --config.model_workdir=runs/shared-head-vit-fashion_mnist
    ./launch.sh mue:smoke          # embedded MNIST, no download, about a minute on 2 CPU cores
Data: Fashion-MNIST from --data_dir or $EEJAX_DATA_DIR (54,000 train / 6,000 val carved from train / 10,000 test);
    smoke uses the MNIST test split shipped inside the package.
Model: ViT, 6 layers, width 64, patch 7, ONE linear head shared by every layer (MuE follows OFA, whose decoder layers
    share the output projection), trained with label-smoothed CE (0.1) averaged over every layer's output
    (experiments/_shared_head_vit.py; DeeR's script trains the same backbone with the same recipe and seed).
Arms on that one model: MuE (cosine similarity of the whole token tensor after layer l with the one before it,
    the embedding for layer 1; no classifier takes part in the decision) vs max-softmax of the shared head, one
    global threshold each, fit on validation to a mean-layer budget and to 99% / 96% of full-depth accuracy.
Hardware / wall-clock: a shared 2-core CPU, about 25 min (1200 steps of batch 128, then evaluation); smoke a few
    minutes.
Expected shape (arXiv:2211.11152): layers saved rise smoothly as the similarity threshold falls, quality declines
    smoothly; the paper reports up to 50% (SNLI-VE) and 40% (MS COCO) less expected inference time at 99% / 96% of
    full performance, and claims an advantage over confidence-based exits where confidence is hard to estimate.
"""
import ml_collections

from eejax.config import Validator
from eejax.train import default_optim_config

NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"mue-{arg}"
    c.seed = 0
    c.model_workdir = ""   # "" = <workdir>/backbone; a shared directory lets DeeR's script reuse this backbone
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist", val_fraction=0.1, train_size=0, batch_size=128, eval_batch_size=500, test_size=0))
    c.model = ml_collections.ConfigDict(dict(
        image_size=28, channels=1, patch_size=7, d_model=64, depth=6, num_heads=4, mlp_dim=128, pool="cls"))
    c.train = ml_collections.ConfigDict(dict(steps=1200, label_smoothing=0.1, optim=default_optim_config()))
    c.train.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=100, total_steps=1200, weight_decay=0.05)
    c.eval = ml_collections.ConfigDict(dict(
        budgets=(1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5),   # mean layers per example, fit on validation
        quality=(0.99, 0.96),                                     # fractions of full-depth accuracy (the paper's)
        num_candidates=200, throughput_batch=256))
    c.log_every = 100
    c.ckpt_every = 500
    if arg == "smoke":
        c.data.name = "mnist_embedded"
        c.data.val_fraction = 0.125
        c.data.batch_size = 64
        c.model.update(d_model=32, num_heads=2, mlp_dim=64, depth=4)
        c.train.steps = c.train.optim.total_steps = 200
        c.train.optim.warmup_steps = 20
        c.eval.budgets = (1.5, 2.0, 3.0)
        c.eval.throughput_batch = 64
        c.ckpt_every = 100
    elif arg != "fashion_mnist":
        raise ValueError(f"configs/mue.py: unknown arg {arg!r}; use fashion_mnist or smoke")
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.config)."""
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
                "model.d_model", "model.depth", "model.num_heads", "model.mlp_dim", "train.steps",
                "eval.num_candidates", "eval.throughput_batch", "log_every", "ckpt_every"):
        v.int(key, lo=1)
    if c.model.depth < 2:
        v.fail("model.depth", "must be >= 2 (an early exit needs a layer after it)")
    v.choice("model.pool", ("cls", "mean"))
    if (c.model.image_size, c.model.image_size, c.model.channels) != pipeline.IMAGE_SHAPES[c.data.name]:
        v.fail("model.image_size", f"with model.channels={c.model.channels} does not match {c.data.name} images "
                                   f"{pipeline.IMAGE_SHAPES[c.data.name]}")
    v.float("train.label_smoothing", 0.0, 1.0, hi_open=True)
    v.optim("train.optim")
    v.floats("eval.budgets", 1.0, float(c.model.depth))
    v.floats("eval.quality", 0.0, 1.0, lo_open=True)
    v.build("model", lambda: vit_lib.ViTConfig(**c.model.to_dict(), num_classes=10, exits=[c.model.depth - 1],
                                               head_types="linear"))
