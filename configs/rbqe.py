"""RBQE (Xing et al., ECCV 2020, arXiv:2006.16581): blind early exit for compressed-image enhancement, small scale.

Runbook
-------
Command (args: mnist | smoke):
    nice -n 10 ./launch.sh rbqe:mnist --outdir experiments/results/rbqe-mnist
    ./launch.sh rbqe:smoke         # embedded MNIST, no download, about a minute on 2 CPU cores
Data: MNIST from --data_dir or $EEJAX_DATA_DIR (train 54,000 / val 6,000 / test 10,000; ``data.train_size`` and
    ``data.test_size`` cut them), each image JPEG re-compressed (Pillow, ``eejax.data.jpeg``) at every quality
    factor of ``data.qualities``; the model sees them mixed, without the QF (blind).
Model: ``eejax.models.enhancer`` (stem, ``stages`` residual stages of 3x3 convolutions, an image head after every
    stage adding its correction to the input), trained on the mean over exits of the MSE to the clean image.
Exit rule: the first stage whose output's blind blockiness score (``image_quality.blockiness_quality``) reaches T;
    T swept over validation quantiles. Oracle: the exit with the best true dPSNR (reads the clean image).
Hardware / wall-clock: a shared 2-core CPU, about 10 min; smoke about a minute.
Expected shape (arXiv:2006.16581): mean exit depth falls as QF rises; the blind-exit dPSNR vs FLOPs curve lies above
    fixed depth; an oracle exit bounds it from above.
"""
import ml_collections

from eejax.harness.config import Validator


def get_config(arg=None):
    arg = arg or "mnist"
    if arg not in ("mnist", "smoke"):
        raise ValueError(f"configs/rbqe.py: unknown arg {arg!r}; use mnist or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"rbqe-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name="mnist", val_fraction=0.1, train_size=8000, test_size=2000,
                                            batch_size=32, eval_batch_size=500, qualities=(10, 20, 30, 40, 50)))
    c.model = ml_collections.ConfigDict(dict(image_size=28, channels=1, width=16, stages=5, convs_per_stage=2,
                                             kernel=3))
    c.train = ml_collections.ConfigDict(dict(steps=800, lr=2e-3))
    c.eval = ml_collections.ConfigDict(dict(num_thresholds=40, val_size=1000))
    if arg == "smoke":
        c.data.update(name="mnist_embedded", val_fraction=0.125, train_size=500, test_size=200, eval_batch_size=100,
                      qualities=(10, 50))
        c.model.update(width=8, stages=3)
        c.train.steps = 20
        c.eval.update(num_thresholds=8, val_size=200)
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training."""
    from eejax.data import pipeline  # noqa: PLC0415
    from eejax.models import enhancer  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.int("seed", lo=0)
    v.choice("data.name", ("mnist", "fashion_mnist", "mnist_embedded"))
    v.float("data.val_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
    for key in ("data.train_size", "data.test_size", "data.batch_size", "data.eval_batch_size", "train.steps",
                "eval.num_thresholds", "eval.val_size"):
        v.int(key, lo=1)
    v.float("train.lr", 0.0, 1.0, lo_open=True)
    if not c.data.qualities or any(not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= 95
                                   for q in c.data.qualities) or len(set(c.data.qualities)) != len(c.data.qualities):
        v.fail("data.qualities", "must be distinct integer JPEG quality factors in [1, 95]")
    if (c.model.image_size, c.model.image_size, c.model.channels) != pipeline.IMAGE_SHAPES[c.data.name]:
        v.fail("model.image_size", f"with model.channels does not match {c.data.name} images")
    v.build("model", lambda: enhancer.EnhancerConfig(**c.model.to_dict()))
