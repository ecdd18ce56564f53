"""EEEA-Net (Termritthikun et al., Eng. Appl. of AI 2021, arXiv:2108.06156; code chakkritte/EEEA-Net): evolutionary
architecture search whose initial population drops every candidate over a parameter budget (Early Exit Population
Initialisation, EE-PI), here over small ViTs with short proxy training.

Runbook
-------
Command (args: fashion_mnist | mnist | smoke):
    nice -n 10 ./launch.sh eeea_net:fashion_mnist --data_dir /work/shared/data \\
        --outdir experiments/results/eeea_net-fashion_mnist
    ./launch.sh eeea_net:smoke          # CI: embedded MNIST, two tiny candidates: the plumbing only
Data: Fashion-MNIST from --data_dir or $EEJAX_DATA_DIR; candidates are scored on a validation split carved from train
    (bounded to ``data.val_size`` examples), the final Pareto fronts once on the 10,000 test images.
Search space: ViT depth {1..6} x width {16, 32, 48, 64} x heads {1, 2, 4} x MLP ratio {1, 2, 4} x patch {4, 7, 14}
    (648 architectures), one linear head. Parameter count: an exact formula (``eeea_net.param_count``, tested against
    the built model).
Search (after the official search_space.py / genetic/optimizer.py): population 8, 2 generations, NSGA-II rank and
    crowding on (validation error, parameters); the best half survives, children by binary tournament, uniform
    crossover and a one-gene mutation, duplicates of anything seen rejected. Arms: ``normal`` (random initial
    population) and ``ee`` (EE-PI: an initial candidate over ``search.max_params`` is rejected and resampled; as in
    the official code, offspring are not filtered). Same seed, same number of candidates per arm.
Proxy training per candidate: 100 steps of batch 64, AdamW lr 2e-3 warmup-cosine (no retraining of the winners).
Hardware / wall-clock: a shared 2-core CPU, about 45 min under a load of ~35 (per-candidate compile and
    checkpoint overheads dominate); smoke a few minutes.
Expected shape (PAPERS.md, toy NAS): at the same number of evaluations the capped search reaches similar accuracy
    with smaller models and a lower search cost (the paper: 0.52 GPU-days on CIFAR-10).
"""
import ml_collections

from _base_vision import validate_vision
from eejax.train import default_optim_config

NOT_IN_CHECKPOINTS = ("eval", "search")   # a candidate's proxy training does not depend on how it was found
ARGS = ("fashion_mnist", "mnist", "smoke")
ARMS = ("normal", "ee")


def get_config(arg=None):
    arg = arg or "fashion_mnist"
    if arg not in ARGS:
        raise ValueError(f"configs/eeea_net.py: unknown arg {arg!r}; use one of {ARGS}")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"eeea_net-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        name=arg, val_fraction=0.1, val_size=2000, train_size=0, batch_size=64, eval_batch_size=500, test_size=0))
    c.space = ml_collections.ConfigDict(dict(
        depth=(1, 2, 3, 4, 5, 6), d_model=(16, 32, 48, 64), num_heads=(1, 2, 4), mlp_ratio=(1, 2, 4),
        patch_size=(4, 7, 14)))
    c.search = ml_collections.ConfigDict(dict(
        arms=ARMS, population=8, generations=2, retain=0.5, mutate_prob=0.3, max_params=30000))
    c.train = ml_collections.ConfigDict(dict(steps=100, optim=default_optim_config()))
    c.train.optim.update(lr=2e-3, schedule="warmup_cosine", warmup_steps=10, total_steps=100, weight_decay=0.05)
    c.log_every = 50
    c.eval = ml_collections.ConfigDict(dict(budgets=(10000, 20000, 30000, 50000, 100000, 300000)))
    if arg == "smoke":
        c.data.name = "mnist_embedded"
        c.data.val_fraction = 0.125
        c.data.batch_size = 32
        c.train.optim.total_steps = 10
        c.train.optim.warmup_steps = 2
        c.log_every = 5
        c.eval.budgets = (5000, 12000)
        # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.data.update(val_size=200, test_size=200, eval_batch_size=200)
        c.space.update(depth=(1,), d_model=(16,), mlp_ratio=(1,), num_heads=(1,), patch_size=(4, 7, 14))
        c.search.update(population=2, generations=1, max_params=5000)
        c.train.steps = 3
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.data import pipeline  # noqa: PLC0415

    v = validate_vision(c, sizes=("data.val_size", "data.train_size", "data.test_size"), positive=(
        "data.batch_size", "data.eval_batch_size", "train.steps", "log_every", "search.population",
        "search.generations", "search.max_params"))
    v.float("search.retain", 0.0, 1.0, lo_open=True, hi_open=True)
    if c.search.generations > 1 and int(c.search.retain * c.search.population) < 2:
        v.fail("search.retain", f"keeps {int(c.search.retain * c.search.population)} of the population; need >= 2 "
                                "parents for a next generation")
    v.prob("search.mutate_prob")
    v.choices("search.arms", ARMS)
    for key in ("space.depth", "space.d_model", "space.num_heads", "space.mlp_ratio", "space.patch_size"):
        v.ints(key, lo=1)
    image = pipeline.IMAGE_SHAPES[c.data.name][0]
    for p in c.space.patch_size:
        if image % p:
            v.fail("space.patch_size", f"{p} does not divide the {image}-pixel images of {c.data.name}")
    for d in c.space.d_model:
        for h in c.space.num_heads:
            if d % h:
                v.fail("space.num_heads", f"{h} heads do not divide width {d} of space.d_model")
    v.ints("eval.budgets", lo=1, unique=True)
    v.optim("train.optim")
    return v
