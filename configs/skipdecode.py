"""SkipDecode (Del Corro et al. 2023, arXiv:2307.02628) on a small char LM, against static truncation and per-token
confidence exit, at target speed-ups 2x / 3x / 5x and batch 32.

Runbook
-------
Command (args: shakespeare (default) | gutenberg | smoke):
    python -m experiments.skipdecode --config configs/skipdecode.py:shakespeare \
        --outdir experiments/results/skipdecode
    python -m experiments.skipdecode --config configs/skipdecode.py:smoke    # CI, about a minute
Data: as configs/per_token_exit.py (Tiny Shakespeare, character-level, 64 prompt + 64 generated characters per
    window; calibration and report windows from the validation split).
Model: the base model of configs/per_token_exit.py (in <workdir>/base-lm, or a shared --config.model_workdir).
    For each target speed-up s the schedule decays linearly over the 64 generated positions with mean about N/s
    layers (SkipDecode skips the lower layers, always ends at the last one); the base model is fine-tuned under that
    schedule for `skipdecode.finetune_steps` steps (final-exit loss, prompt positions at full depth).
Baselines: the full model; SkipDecode without fine-tuning; the static truncated model with round(N/s) layers
    (its exit head); per-token max-softmax exit with the threshold whose average depth on the calibration windows
    is closest to N/s.
Hardware / wall-clock: 2-core CPU (AMD EPYC): under a minute of fine-tuning per speed-up (100 steps), the whole
    script about 6 min once the base model exists (fine-tuned checkpoints are resumed on a rerun).
Observed (experiments/results/skipdecode, tiny 6-layer char model): 100 steps of fine-tuning under the schedule
    rescue SkipDecode from collapse (val NLL 5.1 -> 2.6) but it stays far behind static truncation and per-token
    exit at equal layers; wall-clock tokens/s scales with the layers run for SkipDecode and static truncation, not
    for per-token exit at batch 32 (its loop runs to the deepest row).
Paper: SkipDecode reports 2x to 5x inference speed-ups with negligible regression, on OPT 1.3B and 6.7B, while
    staying compatible with batching and KV caching (arXiv:2307.02628, abstract).
"""
import ml_collections

from _base_lm import base_config, validate_base
from eejax.train import default_optim_config


def get_config(arg=None):
    c = base_config(arg)
    c.runbook = __doc__
    c.name = f"skipdecode-{arg or 'shakespeare'}"
    c.skipdecode = ml_collections.ConfigDict(dict(speedups=(2.0, 3.0, 5.0), keep_bottom=0, finetune_steps=100,
                                                  optim=default_optim_config()))
    c.skipdecode.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=10, total_steps=100,
                              weight_decay=0.01, grad_clip=1.0)
    c.eval.exit_measure = "max_softmax"
    c.eval.exit_thresholds = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
    if arg == "smoke":
        c.skipdecode.speedups = (2.0,)
        c.skipdecode.finetune_steps = c.skipdecode.optim.total_steps = 4
        c.skipdecode.optim.warmup_steps = 1
        c.eval.exit_thresholds = (0.3, 0.9)
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    v = validate_base(c)
    v.floats("skipdecode.speedups", lo=1.0)
    v.int("skipdecode.keep_bottom", lo=0, hi=c.model.depth - 1)
    v.int("skipdecode.finetune_steps", lo=1)
    v.optim("skipdecode.optim")
    v.choice("eval.exit_measure", ("max_softmax", "margin"))
    v.floats("eval.exit_thresholds", 0.0, 1.0)
    if c.data.seq_len != c.eval.prompt_len + c.eval.new_tokens:
        v.fail("data.seq_len", f"must equal eval.prompt_len + eval.new_tokens = "
                               f"{c.eval.prompt_len + c.eval.new_tokens} (SkipDecode fine-tunes on decode windows)")
