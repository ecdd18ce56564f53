"""Make Deep Networks Shallow Again (Bermeitinger et al., KDIR 2023, arXiv:2309.08414): a residual stack vs the same
layers run in parallel (shallow and wide), same parameters, same FLOPs, same training.

Runbook
-------
Command (args: mnist | fashion_mnist | cifar10 | smoke):
    nice -n 10 ./launch.sh shallow_again:fashion_mnist --data_dir /work/shared/data \\
        --outdir experiments/results/shallow_again-fashion_mnist
    nice -n 10 ./launch.sh shallow_again:mnist --data_dir /work/shared/data \\
        --outdir experiments/results/shallow_again-mnist
    ./launch.sh shallow_again:smoke       # CI: embedded MNIST, no download, 4 steps: the plumbing only
Data: MNIST / Fashion-MNIST from --data_dir or $EEJAX_DATA_DIR (54,000 train / 6,000 val carved from train / 10,000
    test); cifar10 is the JPEG q75 copy in /work/shared/data (not the original PNGs); smoke uses the MNIST test split
    shipped inside the package.
Model: ViT (patch 7, width 32, 2 heads, MLP 64) with 4 pre-LN transformer blocks and one linear head (a first try
    at width 64 / 6 blocks ran at 0.3-1 step/s on the shared CPU: too slow for a grid). Variants ``parallel`` = k,
    the number of blocks per parallel group (eejax/exits/parallel.py): k = 1 is the residual stack (the engine's
    prefix program over 4 layers), k = 4 is the fully parallel net y = x + sum_i F_i(x) (depth 1), k = 2 between.
    Every variant has exactly the same parameters, FLOPs (up to k-1 additions per group) and initial weights (one
    init seed), and trains on the same batches. Control (PAPERS.md red flag): ONE block of the
    same width (1/4 of the block parameters).
Training: AdamW lr 1e-3, warmup-cosine, 300 steps of batch 128, cross-entropy, three seeds per variant.
Hardware / wall-clock: a shared 2-core CPU, about 30-40 min per dataset under a load of ~35; smoke about a minute.
Expected shape (arXiv:2309.08414): over the grid, (parallel - sequential) training and validation loss centre near 0;
    the parallel net has depth 1, so its latency can be lower on parallel hardware.
"""
import ml_collections

from _base_vision import check_image, validate_vision
from eejax.train import default_optim_config

NOT_IN_CHECKPOINTS = ("eval", "seeds", "parallel", "single_block_control")   # which runs, not how each is trained
ARGS = ("mnist", "fashion_mnist", "cifar10", "smoke")


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    if arg not in ARGS:
        raise ValueError(f"configs/shallow_again.py: unknown arg {arg!r}; use one of {ARGS}")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"shallow_again-{arg}"
    c.seed = 0                # the train/val split
    c.seeds = (0, 1, 2)       # one model per (variant, seed); the seed sets the init AND the batch order
    c.parallel = (1, 2, 4)    # blocks per parallel group; 1 = the sequential residual stack
    c.single_block_control = True
    c.data = ml_collections.ConfigDict(dict(
        name=arg, val_fraction=0.1, train_size=0, batch_size=128, eval_batch_size=500, test_size=0))
    c.model = ml_collections.ConfigDict(dict(
        image_size=28, channels=1, patch_size=7, d_model=32, depth=4, num_heads=2, mlp_dim=64, pool="cls"))
    c.train = ml_collections.ConfigDict(dict(steps=300, optim=default_optim_config()))
    c.train.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=30, total_steps=300, weight_decay=0.05)
    c.log_every = 50
    c.eval = ml_collections.ConfigDict(dict(
        train_subset=5000,          # training loss is measured after training on this many training examples
        timing_batches=(1, 256),    # inference wall-clock per variant at these batch sizes
        timing_iters=10))
    if arg == "cifar10":
        c.model.update(image_size=32, channels=3, patch_size=4)
    elif arg == "smoke":
        c.data.name = "mnist_embedded"
        c.data.val_fraction = 0.125
        c.data.batch_size = 64
        c.seeds = (0,)
        c.model.update(d_model=32, num_heads=2, mlp_dim=64, depth=4)
        c.train.optim.total_steps = 60
        c.train.optim.warmup_steps = 10
        c.log_every = 20
        # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = 4
        c.parallel = (1, 4)
        c.single_block_control = False
        c.data.update(test_size=250, eval_batch_size=250)
        c.eval.update(train_subset=250, timing_batches=(1, 8), timing_iters=1)
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.models import vit as vit_lib  # noqa: PLC0415

    v = validate_vision(c, sizes=("data.train_size", "data.test_size", "eval.train_subset"), positive=(
        "data.batch_size", "data.eval_batch_size", "model.image_size", "model.channels", "model.patch_size",
        "model.d_model", "model.depth", "model.num_heads", "model.mlp_dim", "train.steps", "log_every",
        "eval.timing_iters"))
    v.ints("seeds", lo=0, unique=True)
    v.ints("parallel", lo=1)
    v.bool("single_block_control")
    v.ints("eval.timing_batches", lo=1, unique=True)
    v.choice("model.pool", ("cls", "mean"))
    check_image(v, c)
    for k in c.parallel:
        if c.model.depth % k:
            v.fail("parallel", f"{k} blocks per parallel group does not divide model.depth={c.model.depth}")
    if 1 not in c.parallel:
        v.fail("parallel", "must include 1 (the sequential stack every variant is compared with)")
    v.optim("train.optim")
    v.build("model", lambda: vit_lib.ViTConfig(**c.model.to_dict(), num_classes=10, exits=[c.model.depth - 1],
                                               head_types="linear"))
    return v
