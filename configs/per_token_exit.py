"""Per-token early exit in batched, KV-cached decoding (CALM-style table of the engine), on a small char LM.

Runbook
-------
Command (args: shakespeare (default) | gutenberg | smoke):
    python -m experiments.per_token_exit --config configs/per_token_exit.py:shakespeare \
        --outdir experiments/results/per_token_exit
    python -m experiments.per_token_exit --config configs/per_token_exit.py:smoke    # CI, about a minute
Data: Tiny Shakespeare (../shared/data/tiny-shakespeare; first 90% of characters train, last 10% validation),
    character-level (65 symbols). The validation split is cut into windows of 64 prompt + 64 continuation
    characters: the first `eval.calib_batches` batches calibrate, the next `eval.eval_batches` are reported.
    `gutenberg`: byte-level, five Gutenberg books train, WikiText-2 validation evaluation.
Model: decoder LM, 6 layers, width 128, 4 query / 2 KV heads (GQA), RoPE, RMSNorm pre-LN, tied embeddings, an exit
    after every layer sharing the output head through per-exit RMSNorms; multi-exit CE (uniform weights, EE-LLM
    warm-up over 100 steps), LayerSkip layer dropout (max 0.1), 800 steps of batch 32 x 128 characters. The base
    model trains in <workdir>/base-lm (set --config.model_workdir=DIR to share one with configs/skipdecode.py: DIR
    records the base model's fields and refuses another config); CALM's learned exit classifier is trained for
    150 steps on the frozen model, in <workdir>/classifier.
Hardware / wall-clock: 2-core CPU (AMD EPYC): base model 1188 s for 800 steps (0.5-0.85 steps/s; the CPU was
    shared with another run for most of it), classifier under a minute, the table about 5 min.
Expected shape (what experiments/results/per_token_exit shows): at equal average layers per token, per-token exit
    keeps more greedy agreement with the full model than the static truncated model (far more with oracle K/V);
    state-propagated K/V lose much of that consistency on this small model, and static truncation has the lower
    validation NLL at equal depth; at batch 32 the batched loop runs to its deepest row (loop_layers ~ 6), so
    measured tokens/s stays at the full model's while the ideal rises with the layer saving.
Paper: CALM (Schuster et al., NeurIPS 2022, arXiv:2207.07061): up to about 3x speed-up on T5 while provably
    keeping consistency with the full model.
"""
from _base_lm import base_config, validate_base

KV_MODES = ("propagate", "oracle")
# Measures whose score is a probability (thresholds in [0, 1]); cosine similarity lies in [-1, 1].
THRESHOLD_RANGE = {"max_softmax": (0.0, 1.0), "margin": (0.0, 1.0), "learned": (0.0, 1.0), "cosine": (-1.0, 1.0)}

# Not compared with the workdir's recorded config: decoding and calibration settings only, so a finished run can be
# re-evaluated with other values (eejax.harness.run.open_workdir).
NOT_IN_CHECKPOINTS = ("eval",)


def get_config(arg=None):
    c = base_config(arg)
    c.runbook = __doc__
    c.name = f"per_token_exit-{arg or 'shakespeare'}"
    c.eval.measures = ("max_softmax", "margin", "cosine", "learned")
    c.eval.kv_modes = ("propagate", "oracle")
    c.eval.thresholds = dict(max_softmax=(0.4, 0.6, 0.8, 0.9, 0.95, 0.99), margin=(0.2, 0.4, 0.6, 0.8, 0.9, 0.98),
                             cosine=(0.9, 0.95, 0.98, 0.99, 0.995, 0.999), learned=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99))
    c.eval.decay_tau = 4.0             # CALM's position-decayed threshold, shown for max_softmax (0 = off)
    c.eval.static_exits = (0, 1, 2, 3, 4)  # exit indices of the static truncated baselines
    # Learn-then-Test (risk of inconsistency with the full model <= epsilon w.p. >= 1 - delta) on calibration windows.
    c.eval.calib_batches = 4
    c.eval.ltt_measures = ("max_softmax", "learned")
    c.eval.ltt_thresholds = dict(max_softmax=(0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4),
                                 learned=(0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4))
    c.eval.ltt_epsilons = (0.1, 0.2, 0.3)
    c.eval.ltt_delta = 0.1
    if arg == "smoke":
        c.eval.measures = ("max_softmax", "learned")
        c.eval.thresholds = dict(max_softmax=(0.5,), margin=(0.5,), cosine=(0.9,), learned=(0.5,))
        c.eval.static_exits = (0,)
        c.eval.decay_tau = 0.0
        c.eval.calib_batches = 1
        c.eval.ltt_measures = ("max_softmax",)
        c.eval.ltt_thresholds = dict(max_softmax=(0.9, 0.5), learned=(0.9,))  # (0.5 is compiled already)
        c.eval.ltt_epsilons = (0.5,)
    return c


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.exits import engine  # noqa: PLC0415

    v = validate_base(c)
    measures = v.choices("eval.measures", THRESHOLD_RANGE)
    v.choices("eval.kv_modes", KV_MODES)
    for m in measures:
        if m not in c.eval.thresholds:
            v.fail("eval.thresholds", f"has no list for measure {m!r}")
        v.floats(f"eval.thresholds.{m}", *THRESHOLD_RANGE[m])
    v.float("eval.decay_tau", lo=0.0)
    num_exits = len(engine.exit_layers_from(c.model.exits, c.model.depth))
    v.ints("eval.static_exits", lo=0, hi=num_exits - 1, nonempty=False, unique=True)
    for m in v.choices("eval.ltt_measures", ("max_softmax", "learned", "margin"), nonempty=False):
        if m not in c.eval.ltt_thresholds:
            v.fail("eval.ltt_thresholds", f"has no list for measure {m!r}")
        v.floats(f"eval.ltt_thresholds.{m}", 0.0, 1.0)
    v.floats("eval.ltt_epsilons", 0.0, 1.0, lo_open=True, hi_open=True)
    v.float("eval.ltt_delta", 0.0, 1.0, lo_open=True, hi_open=True)
