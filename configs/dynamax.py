"""DYNAMAX (Nogales, Gambella, Roveri, IJCNN 2025, arXiv:2504.20922) at small scale: early exits on a Mamba
(selective SSM) LM against a transformer LM of equal parameters, and three exit-classifier kinds at matched parameters
(linear / MLP / a Mamba block), in KV-free (Mamba) and KV-cached (transformer) per-token early-exit decoding.

Runbook
-------
Command (args: shakespeare (default) | cpu | smoke):
    EEJAX_PYTHON=... nice -n 10 ./launch.sh dynamax:shakespeare --outdir experiments/results/dynamax-shakespeare
    EEJAX_PYTHON=... nice -n 15 ./launch.sh dynamax:cpu --workdir runs/dynamax-cpu \
        --outdir experiments/results/dynamax-shakespeare     # the committed run: see "cpu" below
    ./launch.sh dynamax:smoke          # tiny models, a few steps: about 1.5 minutes (mostly compiling the decoders)
Data: Tiny Shakespeare (first 90% of characters train, last 10% validation), character-level (65 symbols). The
    validation split is cut into windows of 64 prompt + 64 continuation characters: the first `eval.calib_batches`
    batches of 32 windows fit the thresholds, the next `eval.test_batches` are reported.
Models (trained from scratch, one seed): a Mamba LM (8 blocks, width 128, expand 2, state 8 per channel, conv 4;
    `eejax.models.mamba_lm`) and a transformer LM (`eejax.models.lm`: 8 pre-RMSNorm blocks, width 128, 4 query /
    2 KV heads, GELU MLP whose width `transformer.mlp_dim = 0` sets so that the two models have equal parameters,
    within 0.5%). Both have exits after layers 4..8 (the second half, as DYNAMAX places them), each a per-exit RMSNorm
    + the shared tied head, trained jointly with the backbone: CE at the final exit + KD (temperature 1) of every
    early exit from the final exit, early-exit weights decaying linearly with position (DYNAMAX [2nd]).
    1000 steps of batch 16 x 128 characters, AdamW 2e-3, warmup-cosine. The Mamba LM trains with the fused
    sequential scan (`scan="fused"`, 3-4x faster than the associative scan on this CPU; same function, tested).
Exit classifiers (DYNAMAX's EE classifiers, `eejax.models.exit_classifier`), trained on each frozen LM for 300 steps:
    linear (CALM's, D + 1 parameters), MLP and a Mamba block (state 4 per channel, conv 4, output projection to one
    logit) with their widths set so both hold `classifier.budget` parameters (the linear one cannot grow: reported
    with its own count); label: the exit's argmax is among the final exit's top-`classifier.top_k` (DYNAMAX's
    relaxation of CALM's label), BCE weighted linearly decaying with the exit's position. The three kinds train side
    by side on one frozen forward per batch (no gradient clipping, so they stay independent).
Decoding (`eejax.decoding.recurrent`): the prompt is prefilled at full depth; the 64 continuation characters are fed
    teacher-forced through the real per-token exit step (prefix program x threshold policy x masked executor), and
    the 63 tokens predicted by decode steps are scored: NLL, and agreement of the step's argmax with the full
    model's argmax at that position (consistency, DYNAMAX's "consistency"). Exit decisions: max softmax (no
    classifier; the vocabulary head runs at every exit passed) or a classifier's gate (the head runs once, at the
    exit taken). State of the layers an exited token skips: `propagate` (the state advanced from the frozen exit
    hidden state, CALM's propagation: Mamba pays ~40% of a block per skipped layer, the transformer its K/V
    projections), `freeze` (Mamba only: left unchanged, free) and `oracle` (every layer runs: the quality bound at
    full cost; max softmax only).
Compute: per token, from the counts the method evaluates (layers, vocabulary heads, classifier calls, skipped-layer
    state updates) through `eejax.exits.costs.decode_work` (FLOPs, batch 1, 128 cache slots), relative to the full
    model; the head's share is stated. Speed-ups: `costs.predicted_speedup` (roofline, H200) from the mean counts
    plus the decode step's host stops read from its compiled program (`eejax.exits.hlo`); no CPU wall-clock claim.
Comparisons: thresholds fit on the calibration windows to each target relative compute (`eval.compute_targets`)
    and to each target agreement (`eval.agreement_targets`), then measured on the test windows; every difference
    with a paired bootstrap interval over test windows (95%, `eval.resamples`).
Hardware / wall-clock: 2 CPU cores (AMD EPYC) shared with up to eight other runs (load average 12-17): Mamba LM
    ~3.4 s per step (~60 min), transformer ~1.1 s per step (~20 min), classifiers ~10 min, decoding sweep ~45 min;
    2-2.5 hours in all (resumable from the workdir).
`cpu`: the same models, data and protocol cut to fit under an hour of the shared 2-core CPU (load average 3-6):
    300 training steps per LM (warmup 30), 100 classifier steps, 32 continuation characters per window (31
    scored), 2 calibration + 3 test batches of 32 windows (96 test windows, 2,976 scored characters), 9
    thresholds (dense near 1), no oracle arm (the state modes propagate and freeze only). Wall-clock: 28 minutes measured at load average 3-13
    (expect up to ~50 under heavier load; resumable from the workdir up to the decoding sweep, which reruns whole).
    Undertrained LMs: the shape, not the paper's scale (results: experiments/results/dynamax-shakespeare).
Expected shape (PAPERS-WAVE4.md [inf]): both backbones' per-token exit curves above static truncation; a Mamba-block
    classifier at least as good as the MLP one at equal parameters; state propagation costs the SSM more than the
    transformer (its skipped-layer update is a larger share of a block), so at equal quality the SSM may save less.
Paper: the abstract (arXiv:2504.20922) gives no number; it reports Mistral 7B against Codestral 7B Mamba on
    TruthfulQA, CoQA and TriviaQA and calls Mamba "a powerful EE classifier".
"""
import ml_collections
from _base_lm import validate_text

from eejax.train import default_optim_config

ARCHS = ("mamba", "transformer")
GATES = ("max_softmax", "linear", "mlp", "mamba")     # max softmax, or one of the exit-classifier kinds
MODES = {"mamba": ("propagate", "freeze", "oracle"), "transformer": ("propagate", "oracle")}

# Decoding, calibration and cost settings may change between runs without invalidating the trained models.
NOT_IN_CHECKPOINTS = ("eval", "costs")


def get_config(arg=None):
    arg = arg or "shakespeare"
    if arg not in ("shakespeare", "cpu", "smoke"):
        raise ValueError(f"configs/dynamax.py: unknown arg {arg!r}; use shakespeare, cpu or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"dynamax-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name="tiny_shakespeare", tokenizer="char", eval_name="",
                                            eval_split="validation", seq_len=128, batch_size=16))
    c.exits = "from:3"              # after 0-based layers 3..7: the second half of 8 layers
    c.mamba = ml_collections.ConfigDict(dict(d_model=128, depth=8, expand=2, d_state=8, conv_width=4, dt_rank=0,
                                             scan="fused"))
    c.transformer = ml_collections.ConfigDict(dict(d_model=128, depth=8, num_heads=4, num_kv_heads=2, mlp_dim=0,
                                                   mlp="gelu"))
    c.train = ml_collections.ConfigDict(dict(steps=1000, kd_weight=1.0, temperature=1.0, weighting="decaying",
                                             optim=default_optim_config()))
    c.train.optim.update(lr=2e-3, schedule="warmup_cosine", warmup_steps=100, total_steps=1000, weight_decay=0.01,
                         grad_clip=1.0)
    c.classifier = ml_collections.ConfigDict(dict(kinds=("linear", "mlp", "mamba"), budget=4200, d_state=4,
                                                  conv_width=4, top_k=2, steps=300, optim=default_optim_config()))
    c.classifier.optim.update(lr=3e-3, weight_decay=0.0, grad_clip=0.0)
    c.eval = ml_collections.ConfigDict(dict(
        prompt_len=64, new_tokens=64, batch=32, calib_batches=3, test_batches=5,
        gates=GATES, modes=dict(MODES), oracle_gates=("max_softmax",),
        thresholds=(0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.94, 0.97, 0.99),
        compute_targets=(0.65, 0.75, 0.85, 0.95), agreement_targets=(0.8, 0.9, 0.95), resamples=2000))
    c.costs = ml_collections.ConfigDict(dict(device="h200", batch=1, cache_len=128, dtype="bfloat16"))
    c.log_every = 100
    c.ckpt_every = 250
    if arg == "cpu":
        # The same models and protocol, cut to fit about 50 minutes of a shared 2-core CPU (see the runbook).
        c.train.steps = c.train.optim.total_steps = 300
        c.train.optim.warmup_steps = 30
        c.classifier.steps = 100
        c.eval.update(new_tokens=32, calib_batches=2, test_batches=3, oracle_gates=(),
                      modes=dict(mamba=("propagate", "freeze"), transformer=("propagate",)),
                      # dense near 1: the 300-step classifiers' scores saturate (up to 0.94 nearly every token
                      # leaves at the first exit), so the compute targets fall between 0.94 and 0.9995
                      thresholds=(0.5, 0.85, 0.94, 0.97, 0.99, 0.995, 0.998, 0.999, 0.9995), resamples=2000)
        c.log_every = 50
        c.ckpt_every = 100
    if arg == "smoke":
        c.exits = "from:1"
        c.mamba.update(d_model=16, depth=4, d_state=2)
        c.transformer.update(d_model=16, depth=4, num_heads=2, num_kv_heads=1)
        c.data.update(seq_len=32, batch_size=8)   # a multiple of the test suite's 8 CPU devices
        c.train.steps = c.train.optim.total_steps = 4
        c.train.optim.warmup_steps = 1
        c.classifier.update(kinds=("linear", "mamba"), budget=120, steps=2)
        # Every arm compiles its own decoder: the smoke keeps two exit decisions and two state modes.
        c.eval.update(prompt_len=8, new_tokens=6, batch=4, calib_batches=1, test_batches=1, gates=("max_softmax",
                      "mamba"), modes=dict(mamba=("propagate", "freeze"), transformer=("propagate",)),
                      oracle_gates=(), thresholds=(0.5, 0.9), compute_targets=(0.9,), agreement_targets=(0.9,),
                      resamples=200)
        c.log_every = 2
        c.ckpt_every = 100
    return c


def validate(c):
    """Every value checked when the config is loaded, before any work (called by eejax.harness.config)."""
    from eejax.exits import costs, engine, losses  # noqa: PLC0415
    from eejax.models import exit_classifier, lm, mamba_lm  # noqa: PLC0415
    from eejax.nn.ssm import SCANS  # noqa: PLC0415

    v = validate_text(c, positive=(
        "data.batch_size", "mamba.d_model", "mamba.depth", "mamba.expand", "mamba.d_state", "mamba.conv_width",
        "transformer.d_model", "transformer.depth", "transformer.num_heads", "transformer.num_kv_heads",
        "train.steps", "classifier.budget", "classifier.d_state", "classifier.conv_width", "classifier.top_k",
        "classifier.steps", "eval.prompt_len", "eval.new_tokens", "eval.batch", "eval.calib_batches",
        "eval.test_batches", "log_every", "ckpt_every", "costs.batch", "costs.cache_len"))
    v.int("mamba.dt_rank", lo=0)
    v.int("transformer.mlp_dim", lo=0)
    v.choice("mamba.scan", SCANS)
    v.choice("transformer.mlp", ("gelu", "swiglu"))
    if c.mamba.depth != c.transformer.depth:
        v.fail("transformer.depth", f"must equal mamba.depth={c.mamba.depth}: the exits sit at the same layers")
    v.build("exits", lambda: engine.exit_layers_from(c.exits, c.mamba.depth))
    if len(engine.exit_layers_from(c.exits, c.mamba.depth)) < 2:
        v.fail("exits", "needs at least one early exit")
    v.build("mamba", lambda: mamba_lm.MambaConfig(vocab_size=65, exits=c.exits, **c.mamba.to_dict()))
    v.build("transformer", lambda: lm.LMConfig(vocab_size=65, exits=c.exits, **{
        **c.transformer.to_dict(), "mlp_dim": c.transformer.mlp_dim or 1}))
    v.float("train.kd_weight", lo=0.0)
    v.float("train.temperature", lo=0.0, lo_open=True)
    v.build("train.weighting", lambda: losses.exit_weights([0, 1], c.train.weighting))
    v.optim("train.optim")
    kinds = v.choices("classifier.kinds", exit_classifier.KINDS)
    v.optim("classifier.optim")
    if c.classifier.optim.grad_clip:
        v.fail("classifier.optim.grad_clip", "must be 0: the classifier kinds train side by side and a global-norm "
               "clip would couple them")
    gates = v.choices("eval.gates", ("max_softmax",) + tuple(exit_classifier.KINDS))
    for g in gates:
        if g != "max_softmax" and g not in kinds:
            v.fail("eval.gates", f"names {g!r}, which classifier.kinds does not train")
    v.choices("eval.oracle_gates", gates, nonempty=False)
    for arch in ("mamba", "transformer"):
        if arch not in c.eval.modes:
            v.fail("eval.modes", f"has no entry for {arch!r}")
        v.choices(f"eval.modes.{arch}", MODES[arch])
    v.floats("eval.thresholds", 0.0, 1.0, lo_open=True, hi_open=True)
    v.floats("eval.compute_targets", 0.0, 1.0, lo_open=True)
    v.floats("eval.agreement_targets", 0.0, 1.0, lo_open=True)
    v.int("eval.resamples", lo=100)
    v.build("costs.device", lambda: costs.get_device(c.costs.device))
    v.build("costs.dtype", lambda: costs._itemsize(c.costs.dtype))
