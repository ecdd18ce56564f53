"""Window-Based Early-Exit Cascades (Xia & Bouganis, ICCV 2023, arXiv:2303.08010) on small ViTs.

Runbook
-------
Command (args: fashion_mnist | smoke):
    nice -n 10 ./launch.sh window_cascade:fashion_mnist --data_dir /work/shared/data \\
        --outdir experiments/results/window_cascade-fashion_mnist
    ./launch.sh window_cascade:smoke   # CI: embedded MNIST, uniform-noise OOD, 4 steps: the plumbing only
Data: in-distribution Fashion-MNIST (54,000 train / 6,000 val carved from train / 10,000 test); OOD: the MNIST
    test split (10,000 digits). Smoke: embedded MNIST in distribution, uniform-noise images as OOD.
Members: three ViTs of growing size trained independently (own seed), label-smoothed CE, 1000 steps of batch 128:
    S (2 layers, width 32), M (4 layers, width 64), L (6 layers, width 64). Stage k of the cascade outputs the
    ensemble (mean softmax) of members 1..k; its uncertainty score is that ensemble's max softmax probability.
Rule: for a target operating point (Cov@5: coverage at 5% selective risk; Risk@80: risk at 80% coverage; FPR@95:
    OOD false-positive rate at 95% ID true-positive rate) the threshold tau_k of stage k is fit on VALIDATION; a
    sample goes on to stage k+1 only if its stage-k score lies within +-w/2 percentile points of tau_k's
    validation percentile (others are accepted or rejected at stage k). Baseline at the same compute: the plain
    threshold cascade that passes the lowest-confidence fraction w on. Executed by the engine
    (``eejax.exits.cascade``, ``policies.window``, bucket-cascade executor: stage 2 runs on the forwarded rows only).
Hardware / wall-clock: a shared 2-core CPU; about 20-30 min of member training, then a few minutes.
Expected shape (arXiv:2303.08010): at matched MACs, window cascade >= single-threshold cascade >= single model at
    the targeted operating point; gains larger for uncertainty than for accuracy; paper: a cascaded
    EfficientNet-B2 ensemble ~ EfficientNet-B4 in Cov@5 with <30% of its MACs.
"""
import ml_collections

from _base_vision import base_config, validate_base

NOT_IN_CHECKPOINTS = ("eval",)
METRICS = ("cov@5", "risk@80", "fpr@95")


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    if arg not in ("fashion_mnist", "smoke"):
        raise ValueError(f"configs/window_cascade.py: unknown arg {arg!r}; use fashion_mnist or smoke")
    c = base_config(arg)
    c.runbook = __doc__
    c.name = f"window_cascade-{arg}"
    # Members of growing size (one entry per member; the shared model fields give patch / image / pooling).
    c.members = ml_collections.ConfigDict(dict(depth=(2, 4, 6), d_model=(32, 64, 64), num_heads=(2, 4, 4),
                                               mlp_dim=(64, 128, 128)))
    c.train.steps = c.train.optim.total_steps = 1000
    c.ood = "mnist"
    c.eval = ml_collections.ConfigDict(dict(
        metrics=METRICS, widths=(0.05, 0.1, 0.2, 0.3, 0.4), risk=0.05, coverage=0.8, tpr=0.95,
        throughput_batch=1024))
    if arg == "smoke":
        c.members.update(depth=(1, 2), d_model=(16, 32), num_heads=(2, 2), mlp_dim=(32, 64))
        c.train.optim.total_steps = 150
        c.ood = "noise"
        # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = 4
        c.data.update(test_size=500, eval_batch_size=250)
        c.log_every, c.ckpt_every = 2, 4
        c.eval.widths = (0.2,)
        c.eval.throughput_batch = 32
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.models import vit as vit_lib  # noqa: PLC0415

    v = validate_base(c)
    if c.model_workdir:
        v.fail("model_workdir", "must be empty: the cascade trains its own members under --workdir")
    n = len(c.members.depth)
    for key in ("members.depth", "members.d_model", "members.num_heads", "members.mlp_dim"):
        v.ints(key, 1)
        if len(c.members[key.split(".")[1]]) != n:
            v.fail(key, f"needs one entry per member ({n}, as members.depth)")
    if n < 2:
        v.fail("members.depth", "a cascade needs at least two members")
    for k in range(min(n, *(len(c.members[f]) for f in ("d_model", "num_heads", "mlp_dim")))):
        v.build("members", lambda k=k: vit_lib.ViTConfig(
            **{**c.model.to_dict(), "depth": c.members.depth[k], "d_model": c.members.d_model[k],
               "num_heads": c.members.num_heads[k], "mlp_dim": c.members.mlp_dim[k]},
            num_classes=10, exits=[c.members.depth[k] - 1], head_types="linear"))
    v.choice("ood", ("mnist", "noise"))
    v.choices("eval.metrics", METRICS)
    v.floats("eval.widths", 0.0, 1.0, lo_open=True)
    v.float("eval.risk", 0.0, 1.0, lo_open=True, hi_open=True)
    v.float("eval.coverage", 0.0, 1.0, lo_open=True)
    v.float("eval.tpr", 0.0, 1.0, lo_open=True, hi_open=True)
    v.int("eval.throughput_batch", lo=1)
