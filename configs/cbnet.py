"""CBNet (Mahmud et al., arXiv:2403.07036): a converting autoencoder + a small classifier, against BranchyNet exits.

Runbook
-------
Command (args: mnist | fashion_mnist | smoke):
    nice -n 10 ./launch.sh cbnet:mnist         --outdir experiments/results/cbnet-mnist
    nice -n 10 ./launch.sh cbnet:fashion_mnist --outdir experiments/results/cbnet-fashion_mnist
    ./launch.sh cbnet:smoke      # CI: embedded MNIST, no download, 3 steps: the plumbing only
Data: MNIST / Fashion-MNIST from --data_dir or $EEJAX_DATA_DIR (54,000 train / 6,000 val carved from train /
    10,000 test); smoke uses the MNIST test split shipped in the package. Conversion targets come from TRAIN only.
Models, all trained with the same batch and optimizer:
    BranchyNet-style early-exit CNN = eejax/models/perceiver.py with no latent branch: a stride-4 conv stem and 3
    residual 3x3-conv stages of width 16, a linear exit after every stage, trained with the mean CE over exits;
    the small classifier = that CNN truncated at its first exit (stem + stage 1 + exit 1);
    the small classifier trained directly (the same architecture, trained alone: PAPERS.md red flag);
    the converting autoencoder: dense 784-128-32-128-784, MSE to the easy image of the input's class;
    a control MLP classifier 784-128-32-10 (the encoder's widths) trained directly with the CNNs' budget.
Evaluation on test: accuracy, FLOPs per image (autoencoder counted) and measured batched CPU latency of
    CBNet (autoencoder + small classifier), the small classifiers alone, the full CNN, and BranchyNet exits
    (max-softmax thresholds fit on validation by MSDNet's budgeted protocol, executed by the engine's compacted
    executor, asserted equal to the simulation). Energy is not measured: FLOPs are the proxy.
Hardware / wall-clock: a shared 2-core CPU, about 15-25 min per dataset.
Expected shape (PAPERS.md): on MNIST-like data the autoencoder + tiny classifier roughly matches the full net at
    lower cost; the gain shrinks on harder data (Fashion-MNIST). Paper: up to 4.8x lower latency and 79% less energy
    than competing techniques at similar or higher accuracy (Raspberry Pi 4, cloud CPU, K80).
"""
import ml_collections

from _base_vision import check_image, validate_vision
from eejax.train import default_optim_config

NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "mnist"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"cbnet-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        name=arg, val_fraction=0.1, train_size=0, batch_size=64, eval_batch_size=1000, test_size=0))
    c.model = ml_collections.ConfigDict(dict(image_size=28, channels=1, width=16, depth=3))
    c.autoencoder = ml_collections.ConfigDict(dict(hidden=(128, 32)))
    c.train = ml_collections.ConfigDict(dict(steps=400, optim=default_optim_config()))
    c.train.optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=40, total_steps=400, weight_decay=0.05)
    c.train_ae = ml_collections.ConfigDict(dict(steps=800, batch_size=128, optim=default_optim_config()))
    c.train_ae.optim.update(lr=2e-3, schedule="warmup_cosine", warmup_steps=50, total_steps=800, weight_decay=0.0)
    c.eval = ml_collections.ConfigDict(dict(executed_priors=(0.2, 0.5, 0.8, 1.2, 1.8), latency_batch=256,
                                            latency_iters=20))
    c.log_every = 100
    c.ckpt_every = 400
    if arg == "smoke":
        c.data.name = "mnist_embedded"
        c.data.val_fraction = 0.125
        c.model.update(width=8)
        c.train.optim.total_steps = 60
        c.train.optim.warmup_steps = 6
        c.train_ae.optim.total_steps = 60
        c.train_ae.optim.warmup_steps = 6
        # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = c.train_ae.steps = 3
        c.data.update(test_size=200, eval_batch_size=200)
        c.eval.update(executed_priors=(1.0,), latency_batch=16, latency_iters=1)
    elif arg not in ("mnist", "fashion_mnist"):
        raise ValueError(f"configs/cbnet.py: unknown arg {arg!r}; use mnist, fashion_mnist or smoke")
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.models import cbnet, perceiver  # noqa: PLC0415

    v = validate_vision(c, positive=(
        "data.batch_size", "data.eval_batch_size", "model.image_size", "model.channels", "model.width",
        "train.steps", "train_ae.steps", "train_ae.batch_size", "eval.latency_batch", "eval.latency_iters",
        "log_every", "ckpt_every"))
    v.int("model.depth", lo=2)
    check_image(v, c)
    v.ints("autoencoder.hidden", lo=1)
    v.optim("train.optim")
    v.optim("train_ae.optim")
    v.seq("eval.executed_priors", lambda p: isinstance(p, (int, float)) and abs(20 * p - round(20 * p)) < 1e-9
          and 1 <= round(20 * p) <= 39, "one of MSDNet's priors k/20, k = 1..39")
    v.build("model", lambda: perceiver.PerceiverConfig(**c.model.to_dict(), latent_tokens=0))
    v.build("autoencoder", lambda: cbnet.AutoencoderConfig(
        (c.model.image_size, c.model.image_size, c.model.channels), tuple(c.autoencoder.hidden)))
