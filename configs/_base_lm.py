"""The config both LM decoding experiments share (configs/per_token_exit.py, configs/skipdecode.py).

A shared piece, not a paper: ``launch.sh`` skips files starting with "_".
"""
import ml_collections

from eejax.harness.config import Validator
from eejax.train import default_optim_config

TOKENIZERS = ("char", "byte")
WEIGHTINGS = ("uniform", "linear", "geometric")

def base_config(arg: str | None):
    """The config both LM decoding experiments share: ``shakespeare`` (default), ``gutenberg`` (byte-level,
    Gutenberg train / WikiText-2 validation) or ``smoke`` (a tiny model, a few steps: CI)."""
    arg = arg or "shakespeare"
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The base model trains (or resumes) in model_workdir; "" = <workdir>/base-lm, inside the run's own workdir.
    # Set it to share one base model between experiments: that directory records (and locks) the fields the
    # base model depends on, so a different model/data/train config is refused there too.
    c.model_workdir = ""
    c.model_name = f"lm-{arg}"
    c.data = ml_collections.ConfigDict(dict(name="tiny_shakespeare", tokenizer="char", eval_name="",
                                            eval_split="validation", seq_len=128, batch_size=32))
    c.model = ml_collections.ConfigDict(dict(d_model=128, depth=6, num_heads=4, num_kv_heads=2, mlp_dim=512,
                                             rope_base=10000.0, norm="pre", tie_embeddings=True, exits="all",
                                             exit_head="shared"))
    c.train = ml_collections.ConfigDict(dict(steps=800, weighting="uniform", gamma=2.0, warmup_steps=100,
                                             layer_drop=0.1, optim=default_optim_config()))
    c.train.optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=50, total_steps=800, weight_decay=0.01,
                         grad_clip=1.0)
    c.classifier = ml_collections.ConfigDict(dict(steps=150, optim=default_optim_config()))
    c.classifier.optim.update(lr=1e-2, weight_decay=0.0)
    c.eval = ml_collections.ConfigDict(dict(batch=32, prompt_len=64, new_tokens=64, calib_batches=2,
                                            eval_batches=4, timing_iters=3))
    c.log_every = 100
    c.ckpt_every = 400
    if arg == "gutenberg":
        c.data.update(name="gutenberg", tokenizer="byte", eval_name="wikitext2", eval_split="validation")
    elif arg == "smoke":
        c.model.update(d_model=32, depth=3, num_heads=4, num_kv_heads=2, mlp_dim=64)
        c.data.update(seq_len=32, batch_size=8)
        c.train.steps = c.train.optim.total_steps = 6
        c.train.optim.warmup_steps = 2
        c.train.warmup_steps = 3
        c.classifier.steps = 4
        c.eval.update(batch=4, prompt_len=16, new_tokens=16, calib_batches=1, eval_batches=1, timing_iters=1)
        c.log_every = 2
        c.ckpt_every = 100
    elif arg != "shakespeare":
        raise ValueError(f"unknown arg {arg!r}; use shakespeare, gutenberg or smoke")
    return c



def char_lm_config(paper: str, arg: str | None, doc: str, *, seeds=(0, 1)):
    """``(config, arg)``: the run name, seeds, data and model of the from-scratch 8-layer character LM on Tiny
    Shakespeare that Peri-LN, SkipPipe and SoFT train (``doc``, the paper config's docstring, is its runbook);
    ``arg`` in (tiny_shakespeare, smoke), the paper's config adds its own fields and its smoke sizes."""
    arg = arg or "tiny_shakespeare"
    if arg not in ("tiny_shakespeare", "smoke"):
        raise ValueError(f"configs/{paper}.py: unknown arg {arg!r}; use tiny_shakespeare or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = doc
    c.name = f"{paper}-{arg}"
    c.seed = 0
    c.seeds = tuple(seeds)
    c.data = ml_collections.ConfigDict(dict(name="tiny_shakespeare", tokenizer="char", eval_name="",
                                            eval_split="validation", seq_len=64, batch_size=16))
    c.model = ml_collections.ConfigDict(dict(d_model=64, depth=8, num_heads=4, num_kv_heads=2, mlp_dim=256,
                                             mlp="gelu"))
    return c, arg


# The integer fields of char_lm_config's model, data and logging (each >= 1): checked by every such paper.
CHAR_LM_POSITIVE = ("data.batch_size", "model.d_model", "model.depth", "model.num_heads", "model.num_kv_heads",
                    "model.mlp_dim", "log_every", "ckpt_every")


def char_lm_smoke(c, *, depth: int = 4) -> None:
    """The smoke sizes of char_lm_config's model (width 16, ``depth`` layers) and data (batch 8 x 16: the test
    suite's 8 CPU devices split the batch), logging every step."""
    c.model.update(d_model=16, depth=depth, num_heads=2, num_kv_heads=1, mlp_dim=32)
    c.data.update(seq_len=16, batch_size=8)
    c.log_every = 1
    c.ckpt_every = 100


def validate_text(c, *, positive=(), seeds: bool = False) -> Validator:
    """The checks every text-LM config makes: ``name``, ``seed`` (and ``seeds`` when it has them), the dataset, its
    tokenizer and evaluation split, ``data.seq_len``, and the ``positive`` integer fields (>= 1). Returns the
    Validator for the config's own checks."""
    from eejax.data.text import TEXT_SPLITS  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.int("seed", lo=0)
    if seeds:
        v.ints("seeds", lo=0, unique=True)
    v.choice("data.name", TEXT_SPLITS)
    v.choice("data.tokenizer", TOKENIZERS)
    v.choice("data.eval_split", TEXT_SPLITS[c.data.eval_name or c.data.name])
    v.int("data.seq_len", lo=2)
    for key in positive:
        v.int(key, lo=1)
    return v


def validate_base(c) -> Validator:
    """Checks of the fields both LM experiments share; returns the Validator for the experiment's own checks."""
    from eejax.data.text import TEXT_SPLITS  # noqa: PLC0415
    from eejax.models import lm as lm_lib  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.str("model_name")
    v.str("model_workdir", nonempty=False)
    v.int("seed", lo=0)
    v.choice("data.name", TEXT_SPLITS)
    v.choice("data.tokenizer", TOKENIZERS)
    if c.data.eval_name:
        v.choice("data.eval_name", TEXT_SPLITS)
    v.choice("data.eval_split", TEXT_SPLITS[c.data.eval_name or c.data.name])
    v.int("data.seq_len", lo=2)
    for key in ("data.batch_size", "model.d_model", "model.depth", "model.num_heads", "model.num_kv_heads",
                "model.mlp_dim", "train.steps", "classifier.steps", "eval.batch", "eval.prompt_len",
                "eval.new_tokens", "eval.calib_batches", "eval.eval_batches", "eval.timing_iters", "log_every",
                "ckpt_every"):
        v.int(key, lo=1)
    v.float("model.rope_base", lo=0.0, lo_open=True)
    v.bool("model.tie_embeddings")
    v.choice("train.weighting", WEIGHTINGS)
    v.float("train.gamma", lo=0.0, lo_open=True)
    v.int("train.warmup_steps", lo=0)
    v.float("train.layer_drop", 0.0, 1.0, hi_open=True)
    v.optim("train.optim")
    v.optim("classifier.optim")
    v.build("config.model", lambda: lm_lib.LMConfig(vocab_size=256, **c.model.to_dict()).exit_layers)
    return v
