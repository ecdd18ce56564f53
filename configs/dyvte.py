"""DyVTE (arXiv:2411.19628): dynamic visual-token exit in a multimodal decoder, on a toy two-digit VQA task.

Runbook
-------
Command (args: mnist | fashion_mnist | smoke):
    EEJAX_PYTHON=/work/main/.venv/bin/python nice -n 10 ./launch.sh dyvte:mnist \\
        --outdir experiments/results/dyvte-mnist --workdir runs/dyvte-mnist
    ./launch.sh dyvte:smoke         # embedded MNIST, no download, tiny model: about a minute on 2 CPU cores
Data: a 28 x 56 image of two MNIST (or Fashion-MNIST) digits and a question, laid out as [BOS, 0-3 filler words,
    32 image tokens (7 x 7 patches), question word, ?] (eejax.data.composed.digit_questions): "left" / "right" (the
    digit's class), "same" (yes / no), "sum" ((left + right) mod 10), "bigger" (left / right / same). The image sits
    at a different position in different rows. Train questions from the digits of 54,000 train images, validation
    from the 6,000 carved from train, test from the 10,000 test images.
Model: eejax.models.vlm.ToyVLM: a causal decoder, width 64, 6 pre-LN layers, 4 heads, MLP 128, learned positions,
    image patches by a linear embedding, the answer read at the last token; trained with cross-entropy on the answer.
    Then DyVTE's routers (one linear map per layer of concat[mean text state, last text state], 2 logits), trained
    on the frozen model's detached states with cross-entropy on the released code's label rule: label(l) = 1 iff
    with the image tokens dropped after layer l the answer's argmax equals the full model's AND its loss is below
    1.03 x the full model's loss (0.99 agreement on a one-token answer is equality).
Evaluation (test; thresholds fit on validation): accuracy against the static exit layer of the image tokens (every
    question and per question kind, bootstrap intervals); the per-sample oracle (the label rule applied to test
    with its answers: the first layer it allows), the learned routers at the paper's decision (exit logit > keep
    logit) and at validation-fit thresholds, executed per row by eejax.exits.tokens (compacted, batch 100) and
    checked against the simulation from the teacher-forced all-token pass (exact for a group exit: nothing changes
    before the exit); the best static exit at equal compute (per-sample mixtures of two static layers) and a random
    control of 50 draws with the routers' exit-layer histogram (median, range, the routers' rank); FLOPs per row
    from the tokens each layer runs (cost model: eejax.exits.costs, routers and head included); measured CPU time
    with load and the H200 roofline cost model.
Hardware / wall-clock: a shared 2-core CPU; mnist about 30-50 min (6,000 steps of batch 64, routers, evaluation);
    smoke about a minute.
Expected shape (PAPERS-WAVE4.md): accuracy against the static exit layer has a knee; harder questions need later
    exits; the learned routers sit near the per-sample oracle and above the best static exit at equal compute.
    Paper (abstract v2): up to 45.7% less computation on LLaVA-1.5 with no performance drop.
"""
import ml_collections
from _base_vision import DIGITS, validate_vision

from eejax.train import default_optim_config

NOT_IN_CHECKPOINTS = ("eval", "router")


def get_config(arg=None):
    arg = arg or "mnist"
    if arg not in ("mnist", "fashion_mnist", "smoke"):
        raise ValueError(f"configs/dyvte.py: unknown arg {arg!r}; use mnist, fashion_mnist or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"dyvte-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name=arg, val_fraction=0.1, num_train=48000, num_router=8000,
                                            num_val=2000, num_test=4000, same_fraction=0.3))
    c.model = ml_collections.ConfigDict(dict(patch_size=7, d_model=64, depth=6, num_heads=4, mlp_dim=128))
    c.train = ml_collections.ConfigDict(dict(steps=6000, batch_size=64, optim=default_optim_config()))
    c.train.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=200, total_steps=6000, weight_decay=0.05)
    c.router = ml_collections.ConfigDict(dict(agree=0.99, loss_ratio=1.03, steps=1500, batch_size=256,
                                              optim=default_optim_config()))
    c.router.optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=50, total_steps=1500, weight_decay=0.0)
    c.eval = ml_collections.ConfigDict(dict(batch_size=100, random_draws=50, num_thresholds=12, max_drop=0.5,
                                            time_iters=5, resamples=2000))
    c.log_every = 200
    if arg == "smoke":
        c.data.name = "mnist_embedded"
        c.data.update(num_train=64, num_router=64, num_val=32, num_test=64)
        c.model.update(d_model=16, num_heads=2, mlp_dim=32, depth=3)
        c.train.update(steps=6, batch_size=16)
        c.train.optim.update(total_steps=6, warmup_steps=1)
        c.router.update(steps=6, batch_size=16)
        c.router.optim.update(total_steps=6, warmup_steps=1)
        c.eval.update(batch_size=32, random_draws=20, num_thresholds=3, time_iters=1, resamples=200)
        c.log_every = 3
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.models import vlm  # noqa: PLC0415

    v = validate_vision(c, sizes=(), names=DIGITS)
    for key in ("data.num_train", "data.num_router", "data.num_val", "data.num_test"):
        v.int(key, lo=2)
    v.prob("data.same_fraction")
    v.build("model", lambda: vlm.VLMConfig(max_len=38, **c.model))
    for part in ("train", "router"):
        v.int(f"{part}.steps", lo=1)
        v.int(f"{part}.batch_size", lo=1)
        v.optim(f"{part}.optim")
    v.prob("router.agree")
    v.float("router.loss_ratio", 1.0)
    v.int("eval.batch_size", lo=2)
    v.int("eval.random_draws", lo=20)
    v.int("eval.num_thresholds", lo=2)
    v.float("eval.max_drop", 0.0)
    v.int("eval.time_iters", lo=1)
    v.int("eval.resamples", lo=100)
    v.int("log_every", lo=1)
