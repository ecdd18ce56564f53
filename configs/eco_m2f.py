"""ECO-M2F (Yao et al., arXiv:2404.15244): the encoder depth chosen per input BEFORE running, on a small ViT.

Runbook
-------
Command (args: fashion_mnist | smoke):
    nice -n 10 ./launch.sh eco_m2f:fashion_mnist --outdir experiments/results/eco_m2f-fashion_mnist
    ./launch.sh eco_m2f:smoke      # embedded MNIST, no download, about a minute on 2 CPU cores
Data: Fashion-MNIST from --data_dir or $EEJAX_DATA_DIR (54,000 train / 6,000 val carved from train / 10,000 test);
    smoke uses the MNIST test split shipped inside the package.
Model (step A, the multi-exit model): the shared-head ViT of MuE / DeeR (experiments/_common_vision.py: 6 layers,
    width 64, patch 7, one linear head applied after every layer, label-smoothed CE averaged over the layers);
    ``model_workdir`` may point at the backbone those scripts trained (same recipe, checked).
Step B (the derived dataset): on VALIDATION (held out from step A), quality q_e = the true class's softmax
    probability at exit e, label = argmax_e [q_e - beta * (e + 1)] (``gate_first.gate_labels``), one label set per
    beta in ``eval.betas``.
Step C (the gate): ``gate_first.DepthGate`` (the embedding tokens average-pooled, one linear layer), trained with
    cross-entropy on those labels (``eval.gate_steps`` full-batch Adam steps on cached pooled tokens); only B and C
    are redone per beta.
Arms on test: the gate; the oracle (test labels of step B applied directly: it reads the answer, an upper bound, not
    a method); every static depth. The gate's exits are executed by the grouped executor (``gate_first.Grouped``)
    and checked equal to the simulated exits; batched measured speed of grouped vs per-row masked exits vs static.
Hardware / wall-clock: a shared 2-core CPU, about 15 min (8 of them the backbone, none when it is reused).
Expected shape (arXiv:2404.15244, Fig. / Tab. on COCO panoptic): sweeping beta traces quality vs GFLOPs; the gated
    model keeps PQ within about 1 point of full depth at fewer encoder FLOPs, above fixed-depth truncation.
"""
import ml_collections

from _base_vision import base_config, validate_base

NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    if arg not in ("fashion_mnist", "smoke"):
        raise ValueError(f"configs/eco_m2f.py: unknown arg {arg!r}; use fashion_mnist or smoke")
    c = base_config(arg)
    c.runbook = __doc__
    c.name = f"eco_m2f-{arg}"
    c.eval = ml_collections.ConfigDict(dict(
        betas=(0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2),   # price of one layer (quality units)
        gate_steps=500, gate_lr=0.05, throughput_batch=256, timing_betas=(0.005, 0.02, 0.05), timing_iters=5))
    if arg == "smoke":   # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = 4
        c.data.update(test_size=200, eval_batch_size=100)
        c.eval.update(betas=(0.0, 0.05), gate_steps=5, throughput_batch=16, timing_betas=(0.05,), timing_iters=1)
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    v = validate_base(c)
    for key in ("eval.gate_steps", "eval.throughput_batch", "eval.timing_iters"):
        v.int(key, lo=1)
    v.float("eval.gate_lr", 0.0, 10.0, lo_open=True)
    v.floats("eval.betas", 0.0, 1.0)
    v.floats("eval.timing_betas", 0.0, 1.0)
