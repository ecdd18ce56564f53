"""DeeR-VLA's exit mechanism (Yue et al., NeurIPS 2024, arXiv:2411.02359) on a small multi-exit ViT classifier.

Runbook
-------
Command (args: fashion_mnist | smoke); the backbone is MuE's (same recipe, same seed): train it once and share it:
    nice -n 10 ./launch.sh deer:fashion_mnist --outdir experiments/results/deer-fashion_mnist \\
        --config.model_workdir=runs/shared-head-vit-fashion_mnist
    ./launch.sh deer:smoke         # CI: embedded MNIST, no download, 4 steps: the plumbing only
Data: Fashion-MNIST from --data_dir or $EEJAX_DATA_DIR (54,000 train / 6,000 val carved from train / 10,000 test);
    smoke uses the MNIST test split shipped inside the package.
Model: ViT, 6 layers, width 64, patch 7, one linear head shared by every layer (DeeR: a shared action head after
    every exit), trained with label-smoothed CE averaged over every layer (experiments/_common_vision.py).
Exit rule: exit e fires when ||softmax_e - softmax_{e-1}||_2 < T_e (the classification stand-in for DeeR's
    ||a_k - a_{k-1}||), at exit max_exit at the latest (DeeR's max_layer: the peak compute cap); exit 1 has nothing
    to compare with. T is fit on VALIDATION to an average-compute budget (mean layers) under the cap with DeeR's
    exit-ratio prior (fractions q_k proportional to p^k over the allowed exits, the MSDNet priors of
    eejax.eval.budgeted), then applied to TEST, executed by the engine (policies.agreement, bucket-cascade executor).
Hardware / wall-clock: a shared 2-core CPU; with the backbone already trained by MuE's run, a few minutes.
Expected shape (arXiv:2411.02359): the accuracy-vs-average-compute curve lies above the static depths, saturates
    well before full depth; a lower cap trades accuracy for peak compute. Paper: 5.2-6.5x less LLM compute and 2-6x
    less LLM GPU memory on CALVIN with no loss of task success.
"""
import ml_collections

from _base_vision import base_config, validate_base

NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    if arg not in ("fashion_mnist", "smoke"):
        raise ValueError(f"configs/deer.py: unknown arg {arg!r}; use fashion_mnist or smoke")
    c = base_config(arg)     # the same backbone recipe as MuE's, so one trained backbone serves both
    c.runbook = __doc__
    c.name = f"deer-{arg}"
    c.eval = ml_collections.ConfigDict(dict(
        budgets=(2.25, 2.5, 3.0, 3.5, 4.0, 5.0),   # average layers per example (>= 2: exit 1 cannot fire)
        max_layers=(3, 4, 6),                          # peak caps (DeeR's max_layer), in layers
        throughput_batch=256))
    if arg == "smoke":   # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = 4    # the same backbone as MuE's smoke
        c.data.update(test_size=500, eval_batch_size=250)
        c.eval.budgets = (3.0,)
        c.eval.max_layers = (3, 4)
        c.eval.throughput_batch = 32
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    v = validate_base(c)
    v.floats("eval.budgets", 1.0, float(c.model.depth))
    v.ints("eval.max_layers", 2, c.model.depth, unique=True)
    v.int("eval.throughput_batch", lo=1)
