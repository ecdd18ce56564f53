"""SkipPipe (Blagoev, Chen, Ersoy 2025, arXiv:2502.19913) at small scale: a tiny LM trained with per-micro-batch
stage skips (and swaps) against one trained in full order and one with LayerDrop, all evaluated in full order and
with half of the stages omitted at inference.

Runbook
-------
Command (args: tiny_shakespeare (default) | smoke):
    EEJAX_PYTHON=... nice -n 10 ./launch.sh skippipe:tiny_shakespeare --data_dir /work/shared/data \
        --outdir experiments/results/skippipe-tiny_shakespeare
    ./launch.sh skippipe:smoke --data_dir /work/shared/data       # tiny models, a few steps: under a minute
Data: Tiny Shakespeare, character-level (65 symbols); evaluation on `eval.batches` x `eval.batch` validation
    windows of `data.seq_len` characters.
Model (`eejax.models.lm`): 8 Pre-LN blocks, width 64, 4 query / 2 KV heads, GELU MLP 256, one exit (final norm +
    tied head), grouped into 4 pipeline stages of 2 layers (PAPERS-WAVE4.md suggests 12 layers in 6 stages; cut to
    fit the shared CPU).
Arms, each trained from the same init for `train.steps` steps of batch 16 x 64 characters in 4 micro-batches:
    `full`: every stage in order; `skip`: each micro-batch runs stage 0 then 2 of the other 3 stages in order (25%
    of the stages skipped, as SkipPipe's released config: paths of 6 over 8 partitions), `engine.stage_path`;
    `skip_swap`: the same with one adjacent pair swapped with probability 0.5; `layerdrop`: each row drops every
    layer but the first with probability `train.layerdrop` (uniform LayerDrop, Fan et al. 2019, the natural
    baseline), `lm.layer_drop_mask`.
Evaluation: validation CE in full order; and with half of the stages omitted (stage 0 + 1 of the other 3, in
    order; the mean over all 3 such paths): relative perplexity change exp(CE_half - CE_full) - 1, per arm and
    seed. Stage visits saved per training step are counted (no throughput claim: SkipPipe's gain is pipeline idle
    time on heterogeneous links, not reproducible on one CPU).
Hardware / wall-clock: 2 CPU cores shared with other runs: ~0.25 s per step under load, 4 arms x 2 seeds x 300
    steps ~ 15 min (measured in the results README when run).
Expected shape (PAPERS-WAVE4.md [inf]): full-order CE close for every arm (skip-trained slightly worse); with half
    of the stages omitted the skip-trained models degrade far less than the full-order model; swapping costs more
    than skipping. Paper: arXiv:2502.19913 v1: running half of the model changes perplexity by only 7% (LLaMA
    500M-8B); the withdrawn ICLR 2026 version: 2% when running 75% of the model (500M-1.5B). Quote one version.
"""
import ml_collections
from _base_lm import char_lm_config, validate_text

from eejax.train import default_optim_config

ARMS = ("full", "skip", "skip_swap", "layerdrop")


def get_config(arg=None):
    c, arg = char_lm_config("skippipe", arg, __doc__, seeds=(0, 1))
    c.model_workdir = ""
    c.arms = ARMS
    c.train = ml_collections.ConfigDict(dict(steps=300, stage_size=2, keep_stages=3, swap_prob=0.5,
                                             micro_batches=4, layerdrop=0.25, optim=default_optim_config()))
    c.train.optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=20, total_steps=300, weight_decay=0.01,
                         grad_clip=1.0)
    c.eval = ml_collections.ConfigDict(dict(batch=32, batches=4, keep_stages=2))
    c.log_every = 100
    c.ckpt_every = 200
    if arg == "smoke":
        c.seeds = (0,)
        c.arms = ("full", "skip_swap", "layerdrop")     # "skip" is skip_swap's code path with swap_prob 0
        c.model.update(d_model=16, depth=4, num_heads=2, num_kv_heads=1, mlp_dim=32)
        c.data.update(seq_len=16, batch_size=8)      # the test suite's 8 CPU devices split the batch
        c.train.update(steps=3, stage_size=1, keep_stages=3, micro_batches=2)
        c.train.optim.update(total_steps=3, warmup_steps=1)
        c.eval.update(batch=4, batches=1, keep_stages=2)
        c.log_every = 1
        c.ckpt_every = 100
    return c


def validate(c):
    """Every value checked when the config is loaded, before any work (called by eejax.harness.config)."""
    from eejax.exits import engine  # noqa: PLC0415
    from eejax.models import lm  # noqa: PLC0415

    v = validate_text(c, seeds=True, positive=(
        "data.batch_size", "model.d_model", "model.depth", "model.num_heads", "model.num_kv_heads", "model.mlp_dim",
        "train.steps", "train.micro_batches", "eval.batch", "eval.batches", "log_every", "ckpt_every"))
    arms = v.choices("arms", ARMS)
    if "full" not in arms:
        v.fail("arms", "must hold 'full': every arm is compared with full-order training")
    v.build("model", lambda: lm.LMConfig(vocab_size=65, **c.model.to_dict()))
    v.build("train.keep_stages", lambda: engine.check_stage_path(c.model.depth, c.train.stage_size,
                                                                  c.train.keep_stages, c.train.swap_prob))
    v.build("eval.keep_stages", lambda: engine.check_stage_path(c.model.depth, c.train.stage_size,
                                                                 c.eval.keep_stages, 0.0))
    if c.data.batch_size % c.train.micro_batches:
        v.fail("train.micro_batches", f"must divide data.batch_size={c.data.batch_size}")
    v.prob("train.layerdrop")
    v.optim("train.optim")
