"""LGViT (Xu et al., ACM MM 2023, arXiv:2308.00255): heterogeneous exit heads + two-stage training, at small scale.

Runbook
-------
Command (default = Fashion-MNIST; args: demo | smoke | fashion_mnist | cifar10 | mnist_embedded):
    ./launch.sh lgvit:fashion_mnist --outdir experiments/results/lgvit-fashion_mnist
    ./launch.sh lgvit:cifar10       --outdir experiments/results/lgvit-cifar10
    ./launch.sh lgvit:demo          # the README demo: embedded MNIST, no download, a few minutes on 2 CPU cores
    ./launch.sh lgvit:smoke         # CI: the demo cut to 6 + 4 steps and two head variants, the plumbing only
Data: Fashion-MNIST / CIFAR-10 (JPEG q75 copy, not pixel-exact) from --data_dir or $EEJAX_DATA_DIR; demo and smoke
    use the MNIST test split shipped inside the package (7000 train / 1000 val / 2000 test).
Model: ViT, 6 layers, width 64 / patch 7 (fashion_mnist), width 96 / patch 8 (cifar10), exits after every layer from the 2nd (5 exits);
    LGViT heads (local perception on the shallower exits, global aggregation on the deeper) vs linear vs ViT-EE heads.
Hardware / wall-clock: 2-core CPU, about 25 min (fashion_mnist) and 30 min (cifar10) for all three head variants;
    demo about 2 min; smoke well under a minute of compute.
Expected shape (the paper's ordering, not its numbers): LGViT heads beat linear heads most at the shallow exits;
    stage 2 (self-distillation, frozen backbone) improves the early exits; the dynamic accuracy-vs-FLOPs curve lies
    above the static truncated-depth points at three or more budgets.
Paper: ~1.8x speed-up with competitive accuracy on ViT-B/16, DeiT-B, Swin-B over CIFAR-100, Food-101, ImageNet-1K
    (arXiv:2308.00255, abstract).
"""
import ml_collections

from _base_vision import check_image, validate_vision
from eejax.train import default_optim_config

HEAD_VARIANTS = ("lgvit", "linear", "vitee")
STAGE1_WEIGHTINGS = ("alternating", "uniform", "linear", "geometric")

# Not compared with the workdir's recorded config: thresholds and timing settings only, so a finished run can be
# re-evaluated with other values (eejax.harness.run.open_workdir).
NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"lgvit-{arg}"
    c.seed = 0
    c.variants = ("lgvit", "linear", "vitee")

    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist", val_fraction=0.1, train_size=0,  # 0 = the whole train split
        batch_size=128, eval_batch_size=500, test_size=0))
    c.model = ml_collections.ConfigDict(dict(
        image_size=28, channels=1, patch_size=7, d_model=64, depth=6, num_heads=4, mlp_dim=128, exits="from:1",
        pool="cls", local_hidden=64, global_pool=2))

    # Stage 1: end-to-end, LGViT's "alternating_weighted" (even steps final exit only, odd steps all exits weighted
    # by depth). Stage 2: backbone and final head frozen; early heads learn from labels + the final exit (KD) +
    # feature distillation.
    c.stage1 = ml_collections.ConfigDict(dict(steps=2500, weighting="alternating", optim=default_optim_config()))
    c.stage1.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=200, total_steps=2500, weight_decay=0.05)
    c.stage2 = ml_collections.ConfigDict(dict(steps=600, temperature=2.0, alpha=0.3, hetero_weight=0.01,
                                              homo_weight=0.01, optim=default_optim_config()))
    c.stage2.optim.update(lr=5e-4, schedule="warmup_cosine", warmup_steps=50, total_steps=600, weight_decay=0.0)

    c.eval = ml_collections.ConfigDict(dict(
        thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999), throughput_batch=256, latency_examples=200))
    c.log_every = 100
    c.ckpt_every = 1000

    if arg == "cifar10":
        c.data.name = "cifar10"
        # Patch 8 (a 4x4 grid + CLS = 17 tokens) keeps a 2-core CPU run to minutes; say so in the table.
        c.model.update(image_size=32, channels=3, patch_size=8, d_model=96, num_heads=4, mlp_dim=192,
                       local_hidden=96)
        c.stage1.steps = c.stage1.optim.total_steps = 2000
        c.stage2.steps = c.stage2.optim.total_steps = 500
    elif arg in ("smoke", "demo", "mnist_embedded"):
        c.data.name = "mnist_embedded"
        c.data.val_fraction = 0.125  # of the 8,000 images before the fixed 2,000-image test part: 1,000
        c.stage1.steps = c.stage1.optim.total_steps = 2000 if arg == "mnist_embedded" else 600
        c.stage1.optim.warmup_steps = 50
        c.stage2.steps = c.stage2.optim.total_steps = 600 if arg == "mnist_embedded" else 200
        c.data.batch_size = 64
        c.model.update(d_model=48, num_heads=4, mlp_dim=96, local_hidden=48)
        c.eval.latency_examples = 50
        c.ckpt_every = 200
        if arg == "smoke":   # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
            c.stage1.steps, c.stage2.steps = 6, 4
            c.variants = ("lgvit", "linear")
            c.eval.update(thresholds=(0.3, 0.9), latency_examples=2, throughput_batch=64)
            c.data.update(test_size=500, eval_batch_size=250)
    elif arg != "fashion_mnist":
        raise ValueError(f"configs/lgvit.py: unknown arg {arg!r}; use smoke, demo, fashion_mnist, cifar10, "
                         "mnist_embedded")
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.models import vit as vit_lib  # noqa: PLC0415

    v = validate_vision(c, positive=(
        "data.batch_size", "data.eval_batch_size", "model.image_size", "model.channels", "model.patch_size",
        "model.d_model", "model.depth", "model.num_heads", "model.mlp_dim", "model.local_hidden", "model.global_pool",
        "stage1.steps", "stage2.steps", "eval.throughput_batch", "eval.latency_examples", "log_every", "ckpt_every"))
    v.choices("variants", HEAD_VARIANTS)
    v.choice("model.pool", ("cls", "mean"))
    check_image(v, c)
    v.choice("stage1.weighting", STAGE1_WEIGHTINGS)
    v.float("stage2.temperature", lo=1e-2)  # KD on logits / T (x T^2): a tiny T overflows float32
    v.prob("stage2.alpha")
    v.float("stage2.hetero_weight", lo=0.0)
    v.float("stage2.homo_weight", lo=0.0)
    v.optim("stage1.optim")
    v.optim("stage2.optim")
    v.floats("eval.thresholds", 0.0, 1.0)  # max-softmax confidences: probabilities
    for variant in c.variants:             # every variant's model is checked before the first one trains
        v.build(f"model with heads {variant!r}",
                lambda: vit_lib.ViTConfig(**c.model.to_dict(), num_classes=10, head_types=variant).head_kinds)
