"""MuE (Tang et al., CVPR 2023, arXiv:2211.11152): exit when consecutive layers' states are similar, on a small ViT.

Runbook
-------
Command (args: fashion_mnist | smoke):
    nice -n 10 ./launch.sh mue:fashion_mnist --outdir experiments/results/mue-fashion_mnist \\
        --config.model_workdir=runs/shared-head-vit-fashion_mnist
    ./launch.sh mue:smoke          # CI: embedded MNIST, no download, 4 steps: the plumbing only
Data: Fashion-MNIST from --data_dir or $EEJAX_DATA_DIR (54,000 train / 6,000 val carved from train / 10,000 test);
    smoke uses the MNIST test split shipped inside the package.
Model: ViT, 6 layers, width 64, patch 7, ONE linear head shared by every layer (MuE follows OFA, whose decoder layers
    share the output projection), trained with label-smoothed CE (0.1) averaged over every layer's output
    (experiments/_common_vision.py; DeeR's script trains the same backbone with the same recipe and seed).
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

from _base_vision import base_config, validate_base

NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    if arg not in ("fashion_mnist", "smoke"):
        raise ValueError(f"configs/mue.py: unknown arg {arg!r}; use fashion_mnist or smoke")
    c = base_config(arg)
    c.runbook = __doc__
    c.name = f"mue-{arg}"
    c.eval = ml_collections.ConfigDict(dict(
        budgets=(1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5),   # mean layers per example, fit on validation
        quality=(0.99, 0.96),                                     # fractions of full-depth accuracy (the paper's)
        num_candidates=200, throughput_batch=256))
    if arg == "smoke":   # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = 4
        c.data.update(test_size=500, eval_batch_size=250)
        c.eval.update(budgets=(2.0,), quality=(0.9,), num_candidates=20, throughput_batch=32)
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    v = validate_base(c)
    for key in ("eval.num_candidates", "eval.throughput_batch"):
        v.int(key, lo=1)
    v.floats("eval.budgets", 1.0, float(c.model.depth))
    v.floats("eval.quality", 0.0, 1.0, lo_open=True)
