"""RBQE (Xing et al., ECCV 2020, arXiv:2006.16581): blind early exit for compressed-image enhancement, small scale.

Runbook
-------
Command (args: mnist (default) | fashion_mnist | smoke):
    EEJAX_PYTHON=/work/main/.venv/bin/python nice -n 10 ./launch.sh rbqe:mnist --data_dir ../shared/data \\
        --workdir runs/rbqe-mnist --outdir experiments/results/rbqe-mnist
    ./launch.sh rbqe:smoke         # embedded MNIST, no download, tiny models: about a minute on 2 CPU cores
Data: MNIST (or Fashion-MNIST) from --data_dir or $EEJAX_DATA_DIR; train capped at ``data.train_size``, validation
    carved from train (``data.val_fraction``, then capped at ``eval.val_size``), test capped at ``data.test_size``;
    each image JPEG re-compressed (Pillow, ``eejax.data.jpeg``) at every quality factor of ``data.qualities``.
Models (``eejax.models.enhancer``: stem, ``stages`` residual stages of 3x3 convolutions, an image head after every
    stage adding its correction to the input), each trained on the mean over exits of the MSE to the clean image, on
    the one Trainer (AdamW, ``train.steps`` steps of ``train.batch_size``, shuffled epochs; resumable):
    * the blind model: every QF mixed, the QF never given (RBQE's setting);
    * with ``specialists``: one model per QF, trained on that QF alone with the same steps and batch (the paper's
      "QF-specific" comparison; each sees 1/len(qualities) of the blind model's images per QF but all its steps).
Exit rule: the first stage whose output's blind blockiness score (``image_quality.blockiness_quality``) reaches T;
    T swept over validation score quantiles; the operating point is the fewest mean stages at 95% of full-depth
    validation dPSNR. Oracle: the stage of best true dPSNR per image (it reads the clean image: a bound).
    The operating threshold is executed by the engine (``Enhancer.dynamic``, masked loop) and checked against the
    simulated exits.
Comparisons (paired bootstrap over test images x QFs, or over test images per QF): blind exit vs a fixed-depth mix
    of equal mean FLOPs at every swept threshold; oracle vs blind; per QF, the blind model (full depth, and at its
    exit) minus the specialist (full depth).
Hardware / wall-clock: a shared 2-core CPU (load ~10): about 1 s per training step of the default model (width 12,
    batch 16), so the blind model and 5 specialists (6 x 400 steps) take 30-40 min, evaluation a few minutes (a
    width-16, batch-32 model ran at ~3 s per step under that load); smoke about a minute.
Expected shape (arXiv:2006.16581): mean exit depth falls as QF rises; the one blind model is close to per-QF
    specialists in dPSNR; the blind-exit dPSNR vs FLOPs curve lies above fixed depth; an oracle exit bounds it from
    above.
"""
import ml_collections
from _base_vision import DIGITS, check_image, validate_vision

from eejax.train import default_optim_config

NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "mnist"
    if arg not in ("mnist", "fashion_mnist", "smoke"):
        raise ValueError(f"configs/rbqe.py: unknown arg {arg!r}; use mnist, fashion_mnist or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"rbqe-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name=arg, val_fraction=0.1, train_size=8000, test_size=2000,
                                            eval_batch_size=500, qualities=(10, 20, 30, 40, 50)))
    c.model = ml_collections.ConfigDict(dict(image_size=28, channels=1, width=12, stages=5, convs_per_stage=2,
                                             kernel=3))
    c.train = ml_collections.ConfigDict(dict(steps=400, batch_size=16, specialists=True,
                                             optim=default_optim_config()))
    c.train.optim.update(lr=2e-3, weight_decay=0.0)
    c.eval = ml_collections.ConfigDict(dict(num_thresholds=40, val_size=1000, depth_fraction=0.95,
                                            resamples=2000))
    c.log_every = 100
    if arg == "smoke":
        c.data.update(name="mnist_embedded", val_fraction=0.125, train_size=500, test_size=60, eval_batch_size=30,
                      qualities=(10, 50))
        c.model.update(width=8, stages=3)
        c.train.steps = 4
        c.train.batch_size = 16
        c.eval.update(num_thresholds=8, val_size=60, resamples=200)
        c.log_every = 2
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training."""
    from eejax.models import enhancer  # noqa: PLC0415

    v = validate_vision(c, sizes=(), names=DIGITS)
    for key in ("data.train_size", "data.test_size", "data.eval_batch_size", "train.steps", "train.batch_size",
                "eval.num_thresholds", "eval.val_size", "log_every"):
        v.int(key, lo=1)
    v.int("eval.resamples", lo=100)
    v.float("eval.depth_fraction", 0.0, 1.0, lo_open=True)
    v.bool("train.specialists")
    v.optim("train.optim")
    if not c.data.qualities or any(not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= 95
                                   for q in c.data.qualities) or len(set(c.data.qualities)) != len(c.data.qualities):
        v.fail("data.qualities", "must be distinct integer JPEG quality factors in [1, 95]")
    check_image(v, c)
    v.build("model", lambda: enhancer.EnhancerConfig(**c.model.to_dict()))
