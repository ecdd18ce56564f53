"""JEI-DNN (Regol, Chataoui, Coates, ICLR 2024, arXiv:2310.09163): exit gates trained jointly with the exit
classifiers, on a frozen small ViT; against max-softmax thresholds on the same classifiers at equal FLOPs.

Runbook
-------
Command (args: fashion_mnist | smoke):
    nice -n 10 ./launch.sh jei_dnn:fashion_mnist --data_dir /work/shared/data \\
        --outdir experiments/results/jei_dnn-fashion_mnist
    ./launch.sh jei_dnn:smoke      # CI: embedded MNIST, no download, a few steps: the plumbing only
Data: Fashion-MNIST (54,000 train / 6,000 val carved from train / 10,000 test); smoke uses the MNIST test split
    shipped inside the package.
Model: ViT, 6 layers, width 64, patch 7, trained with label-smoothed CE on its final head only (1200 steps of batch
    128), then FROZEN (the paper freezes a pretrained T2T-ViT). Its CLS token after every layer is cached once.
Exits: one intermediate inference module (IM: LayerNorm + linear on CLS) after layers 1..5, the frozen final head
    after layer 6; one gate per IM: a linear map of 4 uncertainty features of that IM's softmax (max prob, entropy,
    top-2 margin, entropy of the squared-and-renormalised softmax: dynn's LearnableUncGate).
Training (per lambda, on the cached train features): warm-up of the IMs with plain CE, then rounds alternating
    (a) gates: class-balanced BCE towards "exit at or after the cheapest exit l* = argmin_l CE_l + lambda *
    cost_l / cost_L" and (b) IMs: CE weighted by the gates' exit probabilities (dynn's weighted mode).
Inference: exit at the first gate whose sigmoid is >= 0.5 (``policies.uncertainty_gate``, bucket-cascade executor).
Baseline on the SAME IMs: one global max-softmax threshold, fit on VALIDATION to the gate's validation FLOPs.
Metrics on TEST: accuracy, expected FLOPs (every head evaluated counted), 15-bin ECE, split-conformal (LAC) sets
    calibrated on validation: coverage and mean size at alpha = 0.1 and 0.05.
Hardware / wall-clock: a shared 2-core CPU; about 10 min of backbone training, then a few minutes.
Expected shape (arXiv:2310.09163): per lambda, the gate's accuracy-cost point at or above max-softmax at matched
    cost; lower ECE and smaller conformal sets at matched cost; sweeping lambda traces the curve.
"""
import ml_collections

from _base_vision import base_config, validate_base

NOT_IN_CHECKPOINTS = ("eval", "jei")


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    if arg not in ("fashion_mnist", "smoke"):
        raise ValueError(f"configs/jei_dnn.py: unknown arg {arg!r}; use fashion_mnist or smoke")
    c = base_config(arg)     # data / ViT / optimiser of the shared-head recipe; the loss here is final-head only
    c.runbook = __doc__
    c.name = f"jei_dnn-{arg}"
    c.jei = ml_collections.ConfigDict(dict(
        lambdas=(0.02, 0.05, 0.1, 0.2, 0.4, 0.8),   # cost weight of the gate target (several operating points)
        warmup_steps=1500, rounds=4, gate_steps=300, im_steps=300, batch_size=256, lr=3e-3, seed=0))
    c.eval = ml_collections.ConfigDict(dict(alphas=(0.1, 0.05), ece_bins=15, num_candidates=400,
                                            throughput_batch=256))
    if arg == "smoke":   # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = 4
        c.data.update(test_size=500, eval_batch_size=250)
        c.log_every, c.ckpt_every = 2, 4
        c.jei.update(lambdas=(0.1,), warmup_steps=10, rounds=1, gate_steps=5, im_steps=5, batch_size=128)
        c.eval.num_candidates = 20
        c.eval.throughput_batch = 32
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    v = validate_base(c)
    v.floats("jei.lambdas", 0.0)
    for key in ("jei.warmup_steps", "jei.rounds", "jei.gate_steps", "jei.im_steps", "jei.batch_size",
                "eval.ece_bins", "eval.num_candidates", "eval.throughput_batch"):
        v.int(key, lo=1)
    v.int("jei.seed", lo=0)
    v.float("jei.lr", 0.0, lo_open=True)
    v.floats("eval.alphas", 0.0, 1.0, lo_open=True, hi_open=True)
