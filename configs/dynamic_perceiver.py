"""Dynamic Perceiver (Han et al., ICCV 2023, arXiv:2306.11248) at small scale, against feature-branch exits.

Runbook
-------
Command (args: fashion_mnist | cifar10 | smoke):
    nice -n 10 ./launch.sh dynamic_perceiver:fashion_mnist --outdir experiments/results/dynamic_perceiver-fashion_mnist
    ./launch.sh dynamic_perceiver:smoke     # CI: embedded MNIST, no download, 3 steps: the plumbing only
Data: Fashion-MNIST (or CIFAR-10, the JPEG q75 copy: not pixel-exact) from --data_dir or $EEJAX_DATA_DIR;
    validation carved from train (10%), test = the test split; smoke uses the MNIST test split shipped in the package.
Model (eejax/models/perceiver.py): feature branch = a stride-4 conv stem + 4 residual 3x3-conv stages of width 24
    (32 for CIFAR-10) on the 7x7 grid (8x8 for CIFAR-10), stacked; latent branch = 6 latent tokens of width 32
    (48), per stage x2z cross-attention, one transformer block, z2x cross-attention (about 6 MFLOPs per image). Exits on the latent branch after every stage, the
    last one merging both branches. Baseline arm: the same feature branch, a linear exit on the pooled features
    after every stage (no latent branch).
Training (both arms alike): mean CE over the exits + kd_weight x KD (temperature T) from the last exit to the
    earlier ones (self-distillation), same steps, batch, optimizer and seed.
Evaluation: MSDNet's budgeted protocol (eejax.eval.budgeted: 39 priors, per-exit max-softmax thresholds fit on
    validation, applied to test); the points of ``eval.executed_priors`` are executed by the engine (bucket-cascade
    executor), their exits asserted equal to the simulated ones, and timed (batched throughput vs the static full model).
Scale: 400 steps of batch 64 per arm; test bounded to the first 5,000 test images (the 2-core CPU is shared by
    seven jobs: a 48-wide model ran at ~20 s per step there).
Hardware / wall-clock: a shared 2-core CPU; fashion_mnist about 45-60 min for both arms under that load.
Expected shape (PAPERS.md): latent-branch exits beat linear exits on intermediate CNN features at equal FLOPs; the
    dynamic curve dominates the static truncated models; measured speed-ups are smaller than FLOP speed-ups.
Paper (arXiv:2306.11248, README figures): 1.8-4.8x fewer FLOPs than static RegNets at equal ImageNet accuracy;
    measured latency gains 1.2-2.3x.
"""
import ml_collections

from _base_vision import check_image, validate_vision
from eejax.train import default_optim_config

ARMS = ("perceiver", "feature_exits")
NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"dynamic_perceiver-{arg}"
    c.seed = 0
    c.arms = ARMS
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist", val_fraction=0.1, train_size=0, batch_size=64, eval_batch_size=500, test_size=5000))
    c.model = ml_collections.ConfigDict(dict(
        image_size=28, channels=1, width=24, depth=4, latent_tokens=6, latent_dim=32, num_heads=2, mlp_dim=64))
    c.train = ml_collections.ConfigDict(dict(steps=400, kd_weight=1.0, temperature=2.0, optim=default_optim_config()))
    c.train.optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=40, total_steps=400, weight_decay=0.05)
    c.eval = ml_collections.ConfigDict(dict(executed_priors=(0.2, 0.7, 1.2, 1.8), throughput_batch=256))
    c.log_every = 100
    c.ckpt_every = 400
    if arg == "cifar10":
        c.data.name = "cifar10"
        c.model.update(image_size=32, channels=3)
        c.model.update(width=32, latent_dim=48)
    elif arg == "smoke":
        c.data.name = "mnist_embedded"
        c.data.val_fraction = 0.125
        c.data.batch_size = 64
        c.model.update(width=16, depth=3, latent_tokens=4, latent_dim=32, num_heads=2, mlp_dim=32)
        c.train.optim.total_steps = 150
        c.train.optim.warmup_steps = 15
        c.ckpt_every = 100
        # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = 3
        c.data.update(test_size=200, eval_batch_size=200)
        c.eval.executed_priors = (1.0,)
        c.eval.throughput_batch = 16
    elif arg != "fashion_mnist":
        raise ValueError(f"configs/dynamic_perceiver.py: unknown arg {arg!r}; use fashion_mnist, cifar10 or smoke")
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.models import perceiver  # noqa: PLC0415

    v = validate_vision(c, positive=(
        "data.batch_size", "data.eval_batch_size", "model.image_size", "model.channels", "model.width",
        "model.latent_tokens", "model.latent_dim", "model.num_heads", "model.mlp_dim", "train.steps",
        "eval.throughput_batch", "log_every", "ckpt_every"))
    v.choices("arms", ARMS)
    v.int("model.depth", lo=2)
    check_image(v, c)
    v.float("train.kd_weight", lo=0.0)
    v.float("train.temperature", lo=1e-2)  # KD on logits / T (x T^2): a tiny T overflows float32
    v.optim("train.optim")
    v.seq("eval.executed_priors", lambda p: isinstance(p, (int, float)) and abs(20 * p - round(20 * p)) < 1e-9
          and 1 <= round(20 * p) <= 39, "one of MSDNet's priors k/20, k = 1..39")
    v.build("model", lambda: perceiver.PerceiverConfig(**c.model.to_dict()))
