"""Peri-LN (Kim et al. 2025, arXiv:2502.02732) at small scale: tiny character LMs with the norms placed Pre-LN,
Post-LN or Peri-LN, trained at equal steps over a learning-rate sweep and several seeds. An analysis, not a
dynamic-depth method: how each placement shapes the residual stream, its stability, and its early exits.

Runbook
-------
Command (args: tiny_shakespeare (default) | smoke):
    EEJAX_PYTHON=... nice -n 10 ./launch.sh peri_ln:tiny_shakespeare --data_dir /work/shared/data \
        --outdir experiments/results/peri_ln-tiny_shakespeare
    ./launch.sh peri_ln:smoke --data_dir /work/shared/data      # tiny models, a few steps: under a minute
Data: Tiny Shakespeare (first 90% of characters train, last 10% validation), character-level (65 symbols);
    evaluation on the first `eval.batches` x `eval.batch` validation windows of `data.seq_len` characters.
Models (`eejax.models.lm`, `LMConfig.norm` = "pre" | "post" | "peri", `eejax.nn.sublayer_residual`): 8 blocks,
    width 64, 4 query / 2 KV heads, GELU MLP 256, RoPE, RMSNorm, tied embedding; an exit after every layer
    read through a per-exit RMSNorm (scale 1, never trained) and the shared tied head ("logit lens"). Every placement
    of one seed starts from the same projections (the norms are the only difference). Peri-LN adds 2 RMSNorms
    (2 x 64 scales) per layer: 1,024 parameters on ~0.4M, and ~2 x 5 x T x D FLOPs per layer (under 1%).
Training: final-exit next-token CE only (the early exits are read-outs, not trained), AdamW (weight decay 0.01,
    b2 0.999), warm-up 20 steps then cosine to 0, global-norm clip 1.0, `train.steps` steps of batch 16 x 64
    characters, for every placement x learning rate in `train.lrs` x seed in `seeds` (same data order per seed).
Measured per run: validation CE at the final exit (diverged: non-finite or above ln(65), the uniform guess); per
    layer l: variance of the residual stream over the width, averaged over tokens, and its largest |h| (massive
    activations); relative update ||h_l - h_{l-1}|| / ||h_{l-1}||; exit CE through the shared head; CE when layer
    l alone is skipped (`layer_mask_NxB`).
Comparisons: per learning rate, placement minus Pre-LN, per seed (same seed = same init and data) and the seed
    range; with 2-3 seeds this is a range, not a confidence interval: say so.
Hardware / wall-clock: 2 CPU cores shared with other runs (load average ~11): ~0.3 s per step, ~25 min for 3
    placements x 3 learning rates x 2 seeds at 300 steps (measured in the README; a first attempt at 600 steps x 4
    learning rates measured 190 s per run, ~75 min, and was stopped).
Expected shape (PAPERS-WAVE4.md [inf]): Pre-LN hidden-state variance grows fast with depth, Peri-LN about linearly
    and less, Post-LN stays flat; Peri-LN keeps the widest stable learning-rate range; early exits read better
    where each layer's relative update is more uniform.
Paper: arXiv:2502.02732, up to 3.2B parameters on 30B tokens: "more balanced variance growth, steadier gradient
    flow, and convergence stability"; up to +2.8 points on a 5-task average over Pre-LN.
"""
import ml_collections
from _base_lm import char_lm_config, validate_text

from eejax.train import default_optim_config

NORMS = ("pre", "post", "peri")


def get_config(arg=None):
    c, arg = char_lm_config("peri_ln", arg, __doc__, seeds=(0, 1))
    c.model_workdir = ""
    c.norms = NORMS
    c.train = ml_collections.ConfigDict(dict(steps=300, lrs=(2e-3, 1e-2, 5e-2),
                                             optim=default_optim_config()))
    c.train.optim.update(lr=1.0, schedule="warmup_cosine", warmup_steps=20, total_steps=300, weight_decay=0.01,
                         grad_clip=1.0)
    c.eval = ml_collections.ConfigDict(dict(batch=32, batches=4))
    c.log_every = 200
    if arg == "smoke":
        c.seeds = (0,)
        c.model.update(d_model=16, depth=3, num_heads=2, num_kv_heads=1, mlp_dim=32)
        c.data.update(seq_len=16, batch_size=4)
        c.train.update(steps=4, lrs=(1e-3, 1e-1))
        c.train.optim.update(total_steps=4, warmup_steps=1)
        c.eval.update(batch=4, batches=1)
        c.log_every = 2
    return c


def validate(c):
    """Every value checked when the config is loaded, before any work (called by eejax.harness.config)."""
    from eejax.models import lm  # noqa: PLC0415

    v = validate_text(c, seeds=True, positive=(
        "data.batch_size", "model.d_model", "model.depth", "model.num_heads", "model.num_kv_heads", "model.mlp_dim",
        "train.steps", "eval.batch", "eval.batches", "log_every"))
    norms = v.choices("norms", NORMS)
    if "pre" not in norms:
        v.fail("norms", "must hold 'pre': every placement is compared with Pre-LN")
    v.floats("train.lrs", lo=0.0, lo_open=True, unique=True)
    v.optim("train.optim")
    if c.train.optim.lr != 1.0:
        v.fail("train.optim.lr", "must be 1.0: the schedule's shape; each run's peak learning rate is train.lrs")
    for n in norms:
        v.build("model", lambda n=n: lm.LMConfig(vocab_size=65, norm=n, **c.model.to_dict()))
