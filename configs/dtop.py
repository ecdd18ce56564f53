"""DToP (Tang et al., ICCV 2023, arXiv:2308.01045): dynamic token pruning, i.e. token early exit, in a plain
segmentation ViT, on synthetic digit segmentation.

Runbook
-------
Command (args: mnist | fashion_mnist | smoke):
    EEJAX_PYTHON=/work/main/.venv/bin/python nice -n 10 ./launch.sh dtop:mnist \\
        --outdir experiments/results/dtop-mnist --workdir runs/dtop-mnist
    ./launch.sh dtop:smoke          # embedded MNIST, no download, tiny model: under a minute on 2 CPU cores
Data: 2-4 MNIST (or Fashion-MNIST) digits pasted in distinct quadrants of a 56 x 56 canvas (jittered by up to 4
    pixels); a pixel is labelled with its digit's class where the stroke is (>= 128), background elsewhere; a 7 x 7
    patch (a token) takes the most frequent digit class when at least a quarter of its pixels are stroke, else
    background (eejax.data.composed). 11 classes. Train canvases from the digits of 54,000 train images, validation
    canvases from the 6,000 carved from train, test canvases from the 10,000 test images.
Model: a plain ViT (eejax.models.segvit): 7 x 7 patches (64 tokens, no CLS), width 64, 6 pre-LN layers, 4 heads,
    MLP 128; a per-token head (LayerNorm + linear, 11 classes) after layers 2, 4 and 6, trained together with the
    mean per-token cross-entropy over the three heads (DToP's auxiliary-loss model; every token runs every layer).
Evaluation (test; every threshold choice made on validation): each head on all tokens ("fewer layers for every
    token": 3 static points, and per-image mixtures of two neighbouring depths at any mean FLOPs); DToP executed by
    eejax.exits.tokens (drop mode, DToP's rule, on the compacted executor; freeze mode, where an exited token stays
    a key, on the masked executor; batch 100) for a grid of thresholds up to 0.99999 shared by the two early heads,
    with top-k = 5 tokens per class kept (the paper's k) and k = 0 (the ablation); mIoU over the 11 classes
    at the token level with paired bootstrap intervals over test images; FLOPs per image counted from the tokens
    each layer actually updated (cost model: eejax.exits.costs, heads included) and the batched bucket slots;
    executed = teacher-forced simulation under the executed schedule (exits, FLOPs, and predictions whose top-2
    logits are more than pred_margin apart); savings against each image's
    background fraction; measured CPU time (load recorded) and the roofline H200 cost model.
Hardware / wall-clock: a shared 2-core CPU under a load of ~20 (many runs at once): mnist about 1.5-2 h (1,500
    training steps of batch 32, then 40 executed runs over 1,000 validation and 2,000 test canvases); about 25 min
    on a quiet machine; evaluation alone (a finished workdir) about 10 min; smoke a minute or two (mostly compilation).
Expected shape (PAPERS-WAVE4.md): background tokens exit at the first head; the threshold-traced mIoU-vs-FLOPs curve
    lies above "fewer layers for every token"; keeping the top-k per class matters (k = 0 loses mIoU at the same
    threshold); the savings grow with the background fraction. Paper: 20-35% less computation without accuracy
    loss (ADE20K SegViT ViT-B 109.9 -> 86.8 GFLOPs at 49.6 -> 49.8 mIoU).
"""
import ml_collections
from _base_vision import DIGITS, validate_vision

from eejax.train import default_optim_config

NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "mnist"
    if arg not in ("mnist", "fashion_mnist", "smoke"):
        raise ValueError(f"configs/dtop.py: unknown arg {arg!r}; use mnist, fashion_mnist or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"dtop-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name=arg, val_fraction=0.1, num_train=16000, num_val=1000,
                                            num_test=2000, digits=(2, 4), patch_min_fraction=0.25))
    c.model = ml_collections.ConfigDict(dict(image_size=56, patch_size=7, d_model=64, depth=6, num_heads=4,
                                             mlp_dim=128, exits=(1, 3, 5)))
    c.train = ml_collections.ConfigDict(dict(steps=1500, batch_size=32, optim=default_optim_config()))
    c.train.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=100, total_steps=1500, weight_decay=0.05)
    c.eval = ml_collections.ConfigDict(dict(
        thresholds=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 0.9999, 0.99999),  # shared by the early heads
        top_ks=(5, 0),             # the paper's k first, then the ablation
        modes=("drop", "freeze"),  # drop: DToP's rule (compacted executor); freeze: an exited token stays a key
        analysis_threshold=0.95,   # background / speed rows: drop mode, the paper's k, this threshold
        pred_margin=1e-4,          # exec = sim compares predictions whose top-2 logits are further apart than this
        max_drop=0.5,              # mIoU points below full depth allowed on validation for the operating point
        batch_size=100, buckets=(16, 24, 32, 40, 48, 56, 64), time_iters=5, resamples=2000))
    c.log_every = 100
    if arg == "smoke":
        c.data.name = "mnist_embedded"
        c.data.update(num_train=64, num_val=32, num_test=32)
        c.model.update(d_model=16, num_heads=2, mlp_dim=32)
        c.train.update(steps=6, batch_size=16)
        c.train.optim.update(total_steps=6, warmup_steps=1)
        c.eval.update(thresholds=(0.5, 0.9), analysis_threshold=0.9, batch_size=16, buckets=(32, 64), time_iters=1,
                      resamples=200)
        c.log_every = 3
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.models import segvit  # noqa: PLC0415

    v = validate_vision(c, sizes=(), names=DIGITS)
    for key in ("data.num_train", "data.num_val", "data.num_test"):
        v.int(key, lo=2)
    lo, hi = v.ints("data.digits", 1, 4)
    if lo > hi:
        v.fail("data.digits", "must be (lo, hi) with lo <= hi")
    v.float("data.patch_min_fraction", 0.0, 1.0, lo_open=True)
    v.build("model", lambda: segvit.SegViTConfig(num_classes=11, **c.model))
    v.int("train.steps", lo=1)
    v.int("train.batch_size", lo=1)
    v.optim("train.optim")
    v.floats("eval.thresholds", 0.0, 1.0)
    v.ints("eval.top_ks", 0)
    v.choices("eval.modes", ("drop", "freeze"))
    v.float("eval.pred_margin", 0.0)
    if v.float("eval.analysis_threshold", 0.0, 1.0) not in tuple(c.eval.thresholds):
        v.fail("eval.analysis_threshold", f"must be one of eval.thresholds {tuple(c.eval.thresholds)}")
    v.float("eval.max_drop", 0.0)
    v.int("eval.batch_size", lo=2)
    v.ints("eval.buckets", 1)
    v.int("eval.time_iters", lo=1)
    v.int("eval.resamples", lo=100)
    v.int("log_every", lo=1)
