"""Relaxed Recursive Transformers (Bae et al. 2024, arXiv:2410.20672): a pretrained LM's N layers converted to K
unique layers looped L = N / K times (Average / Stepwise init), relaxed by per-loop LoRA initialised from the SVD of
the residual, against the full model and a truncated model of equal unique parameters, at equal uptraining steps.

Runbook
-------
Command (args: tiny_shakespeare (default) | smoke | smollm2):
    EEJAX_PYTHON=... nice -n 10 ./launch.sh rrt:tiny_shakespeare --data_dir /work/shared/data \
        --outdir experiments/results/rrt-tiny_shakespeare
    ./launch.sh rrt:smoke --data_dir /work/shared/data        # tiny models, a few steps: under a minute
    ./launch.sh rrt:smollm2 --data_dir /work/shared/data      # SmolLM2-135M 30 -> 15 x 2: a GPU run (below)
Data: tiny_shakespeare: Tiny Shakespeare, character-level (65 symbols), validation on `eval.batches` x `eval.batch`
    windows of `data.seq_len`. smollm2: uptraining on WikiText-2 validation (the train split is not offline),
    perplexity on WikiText-2 test, SmolLM2's BPE tokenizer.
"Pretrained" model (`source`): "scratch": an 8-layer Pre-LN char LM (width 64, 4 query / 2 KV heads, GELU MLP
    256, tied head) trained `train.pretrain_steps` steps from scratch; or a pretrained LM by name ("smollm2-135m":
    30 layers, width 576, loaded by `eejax.models.pretrained`).
Arms (`eejax.models.recursive.convert`, each uptrained `train.steps` steps on the same batches, the last loop's
    next-token CE, every parameter trained): `full` (the N-layer model); `truncated` (its first K layers + head,
    the same unique parameters as strict recursion); `recursive-<init>` for `inits` (K layers x `loops`, rank 0);
    `relaxed-r<r>` for `ranks` (`relaxed_init`, per-loop LoRA of rank r on every linear map; LoRA counted in the
    unique parameters). At width 64 rank 64 is full rank: that arm starts as the full model's linear maps
    exactly (norms and biases stay tied).
Evaluation: validation perplexity of each arm right after conversion and after uptraining, at the last loop and at
    the loop-1 exit (the one final norm + head); paired bootstrap over windows (`eejax.eval.bootstrap`) and per-seed
    differences for the expected ordering. Depth-wise batching: tokens of the `batching.arm` model exit after loop 1
    when its max-softmax there reaches each of `batching.thresholds`; layer-slot utilisation of a masked batch vs
    continuous depth-wise batching over `batching.slots` slots (`recursive.masked_counts` / `depthwise_counts`: a
    count, not CPU time), distinct adapters per call and the per-row LoRA multiply-adds (`lora_row_flops`).
Hardware / wall-clock: tiny_shakespeare: 2 CPU cores shared with other runs, 3 seeds x (600 + 7 x 300) steps,
    ~29 min measured with another job beside it. smollm2: untested at scale (on this CPU one step of the full
    model on 2 x 32 tokens took ~35 s); ESTIMATE for one H200, not run: 7 arms x 300 steps of 8 x 512 tokens
    through 30 layer-steps of a 135M model in float32, ~0.1-0.2 s a step, ~10-15 min with compilation and loading.
    `model.*` is unused when `source` names a pretrained model.
Expected shape (PAPERS-WAVE4.md [inf]): right after conversion strict recursive >> full; after equal uptraining
    full < relaxed(large r) < relaxed(small r) < recursive, monotone in r; recursive beats truncated. Paper: recursive
    Gemma 1B beats similar-size vanilla models; up to 13.5 points few-shot over a Gemma 1B from scratch; depth-wise
    batching 2-3x throughput in a theoretical analysis.
"""
import ml_collections
from _base_lm import CHAR_LM_POSITIVE, char_lm_config, char_lm_smoke, validate_text
from _base_smollm2 import RANDOM_TINY

from eejax.train import default_optim_config

INITS = ("average", "stepwise", "lower")


def get_config(arg=None):
    smollm2 = arg == "smollm2"
    c, arg = char_lm_config("rrt", None if smollm2 else arg, __doc__, seeds=(0, 1, 2))
    c.source = "scratch"
    c.unique = 4
    c.loops = 2
    c.inits = ("average", "stepwise")
    c.relaxed_init = "average"
    c.ranks = (4, 16, 64)
    c.train = ml_collections.ConfigDict(dict(pretrain_steps=600, steps=300, pretrain_optim=default_optim_config(),
                                             optim=default_optim_config()))
    c.train.pretrain_optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=30, total_steps=600,
                                  weight_decay=0.01, grad_clip=1.0)
    c.train.optim.update(lr=1e-3, schedule="warmup_cosine", warmup_steps=20, total_steps=300, weight_decay=0.01,
                         grad_clip=1.0)
    c.eval = ml_collections.ConfigDict(dict(batch=32, batches=8))
    c.batching = ml_collections.ConfigDict(dict(arm="relaxed-r16", thresholds=(0.5, 0.7, 0.9), slots=64))
    c.log_every = 100
    c.ckpt_every = 300
    if smollm2:
        c.name = "rrt-smollm2"
        c.source = "smollm2-135m"
        c.seeds = (0,)
        c.data.update(name="wikitext2", eval_split="test", seq_len=512, batch_size=8)
        c.unique, c.loops, c.ranks, c.batching.arm = 15, 2, (8, 32, 64), "relaxed-r32"
        c.train.update(pretrain_steps=0)
        c.train.optim.update(lr=1e-4)
        c.eval.update(batch=8, batches=8)
    elif arg == "smoke":
        c.seeds = (0,)
        char_lm_smoke(c)
        c.unique, c.ranks, c.batching.arm, c.batching.slots = 2, (2, 8), "relaxed-r2", 4
        c.train.update(pretrain_steps=3, steps=2)
        c.train.pretrain_optim.update(total_steps=3, warmup_steps=1)
        c.train.optim.update(total_steps=2, warmup_steps=1)
        c.eval.update(batch=8, batches=1)
    return c


def validate(c):
    """Every value checked when the config is loaded, before any work (called by eejax.harness.config)."""
    from eejax.models import lm, pretrained  # noqa: PLC0415

    v = validate_text(c, seeds=True, positive=CHAR_LM_POSITIVE + (
        "unique", "loops", "train.steps", "eval.batch", "eval.batches", "batching.slots"))
    v.choice("source", ("scratch", *sorted(pretrained.MODELS), RANDOM_TINY))
    v.int("train.pretrain_steps", lo=1 if c.source == "scratch" else 0)
    if c.source == "scratch" and c.unique * c.loops != c.model.depth:
        v.fail("unique", f"unique x loops = {c.unique} x {c.loops} must equal model.depth={c.model.depth}")
    if c.loops < 2:
        v.fail("loops", "must be >= 2: one loop is the truncated model")
    v.choices("inits", INITS)
    v.choice("relaxed_init", INITS)
    v.ints("ranks", lo=1, unique=True)
    v.choice("batching.arm", [f"recursive-{i}" for i in c.inits] + [f"relaxed-r{r}" for r in c.ranks])
    v.floats("batching.thresholds", lo=0.0, hi=1.0)
    v.build("model", lambda: lm.LMConfig(vocab_size=65, exits=(c.model.depth - 1,), exit_head="final",
                                         **c.model.to_dict()))
    v.optim("train.pretrain_optim")
    v.optim("train.optim")
