"""Sorted LLaMA / SoFT (Kavehzadeh et al. 2023, arXiv:2309.08968) at small scale: many-in-one fine-tuning of nested
sub-models (the first n layers, then the ONE final norm + LM head) against plain fine-tuning read at depth n and
against intermediate classifier tuning on a frozen backbone.

Runbook
-------
Command (args: tiny_shakespeare (default) | smoke):
    EEJAX_PYTHON=... nice -n 10 ./launch.sh soft:tiny_shakespeare --data_dir /work/shared/data \
        --outdir experiments/results/soft-tiny_shakespeare
    ./launch.sh soft:smoke --data_dir /work/shared/data       # tiny models, a few steps: under a minute
Data: Tiny Shakespeare, character-level (65 symbols); validation on `eval.batches` x `eval.batch` windows of
    `data.seq_len` characters.
Model (`eejax.models.lm`, `exit_head="final"`): 8 Pre-LN blocks, width 64, 4 query / 2 KV heads, GELU MLP 256,
    tied head. Sub-models at depths `depths` = {2, 4, 6, 8} (the paper: 8 sub-models of 12..40 layers of LLaMA 2
    13B, PAPERS-WAVE4.md's tier 1 shape), every one read through the final norm + shared head: no new parameter.
Stages, per seed: `pretrained`: `train.pretrain_steps` steps of final-exit loss from scratch (the "pretrained
    model"). Then from it, each arm `train.steps` steps on the same batches: `sft`: final-exit loss (read out at
    depth n through the same head, the paper's SFT baseline); `soft`: the mean over the nested depths of each
    sub-model's next-token CE (`lm.multi_exit_lm_loss`, uniform weights; the paper's sum up to a constant factor);
    `ict`: SFT's model frozen, an own RMSNorm + output matrix per early exit (started as the shared ones) tuned for
    `train.steps` steps (SFT+ICT: it has had SFT's steps plus its own, more than the others).
Evaluation: per-depth validation perplexity per arm; SoFT minus each arm with a paired bootstrap over windows
    (`eejax.eval.bootstrap`) and per-seed differences. Second shape: each arm's half-depth sub-model drafts `spec.k`
    tokens a round for its own full model in greedy self-speculative decoding (`speculative.self_speculative`):
    acceptance rate, SoFT minus each arm with a paired bootstrap over prompts. Costs: multiply-adds per token of
    each sub-model relative to the full one (blocks + shared head).
Hardware / wall-clock: 2 CPU cores shared with other runs: ~0.1-0.3 s per step; 3 seeds x (500 + 3 x 300) steps
    ~ 8-20 min (measured in the results README when run).
Expected shape (PAPERS-WAVE4.md [inf]): SoFT's sub-models far better than SFT's read-outs at every intermediate
    depth, the gap largest at the shallowest; SoFT <= SFT+ICT at most depths; at full depth SoFT about SFT (equal or
    slightly worse). Paper (abstract): sub-models "twice as fast as the original model while maintaining or
    exceeding performance", better than SFT and SFT+ICT on Alpaca / TriviaQA (PandaLM judge).
"""
import ml_collections
from _base_lm import char_lm_config, validate_text

from eejax.train import default_optim_config

ARMS = ("pretrained", "sft", "ict", "soft")


def get_config(arg=None):
    c, arg = char_lm_config("soft", arg, __doc__, seeds=(0, 1, 2))
    c.depths = (2, 4, 6, 8)
    c.arms = ARMS
    c.train = ml_collections.ConfigDict(dict(pretrain_steps=500, steps=300, pretrain_optim=default_optim_config(),
                                             optim=default_optim_config()))
    c.train.pretrain_optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=30, total_steps=500,
                                  weight_decay=0.01, grad_clip=1.0)
    c.train.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=20, total_steps=300, weight_decay=0.01,
                         grad_clip=1.0)
    c.eval = ml_collections.ConfigDict(dict(batch=32, batches=8))
    c.spec = ml_collections.ConfigDict(dict(draft_exit=1, k=4, prompt_len=32, new_tokens=32, batches=2))
    c.log_every = 100
    c.ckpt_every = 300
    if arg == "smoke":
        c.seeds = (0,)
        c.model.update(d_model=16, depth=4, num_heads=2, num_kv_heads=1, mlp_dim=32)
        c.depths = (2, 4)
        c.data.update(seq_len=16, batch_size=8)      # the test suite's 8 CPU devices split the batch
        c.train.update(pretrain_steps=3, steps=2)
        c.train.pretrain_optim.update(total_steps=3, warmup_steps=1)
        c.train.optim.update(total_steps=2, warmup_steps=1)
        c.eval.update(batch=8, batches=1)
        c.spec.update(draft_exit=0, k=2, prompt_len=8, new_tokens=4, batches=1)
        c.log_every = 1
        c.ckpt_every = 100
    return c


def validate(c):
    """Every value checked when the config is loaded, before any work (called by eejax.harness.config)."""
    from eejax.models import lm  # noqa: PLC0415

    v = validate_text(c, seeds=True, positive=(
        "data.batch_size", "model.d_model", "model.depth", "model.num_heads", "model.num_kv_heads", "model.mlp_dim",
        "train.pretrain_steps", "train.steps", "eval.batch", "eval.batches", "spec.k", "spec.prompt_len",
        "spec.new_tokens", "spec.batches", "log_every", "ckpt_every"))
    depths = v.ints("depths", lo=1, unique=True)
    if list(depths) != sorted(depths) or depths[-1] != c.model.depth or len(depths) < 2:
        v.fail("depths", f"must rise to model.depth={c.model.depth} with at least one shallower sub-model")
    arms = v.choices("arms", ARMS)
    if "soft" not in arms:
        v.fail("arms", "must hold 'soft': every arm is compared with it")
    if "ict" in arms and "sft" not in arms:
        v.fail("arms", "'ict' tunes heads on SFT's model: it needs 'sft'")
    v.int("spec.draft_exit", lo=0, hi=len(depths) - 2)
    if c.spec.k > c.spec.new_tokens:
        v.fail("spec.k", f"must be at most spec.new_tokens={c.spec.new_tokens}")
    v.build("model", lambda: lm.LMConfig(vocab_size=65, exits=tuple(d - 1 for d in depths), exit_head="final",
                                         **c.model.to_dict()))
    v.optim("train.pretrain_optim")
    v.optim("train.optim")
