"""Shared config pieces of the experiments on the frozen SmolLM2-135M (ULS, FiRST, FFN-SkipLLM, LAC voids, Kangaroo,
SpecEE, the depth-efficiency / CoLa / CEED-VLA analyses): the model fields and their checks, and the evaluation
checks of the layer-skipping configs (experiments/_common_smollm2.py reads them)."""
import ml_collections

RANDOM_TINY = "random-tiny"   # smoke model: random weights, 4 layers, width 32, byte vocabulary


def model_config(name: str = "smollm2-135m") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name=name, dtype="float32"))


def skip_config(paper: str, arg, runbook: str) -> ml_collections.ConfigDict:
    """What FFN-SkipLLM's and LAC's configs share (args: wikitext2 (default) | smoke): the run name, the model
    (SmolLM2, or the smoke LM) and the WikiText-2 perplexity windows."""
    arg = arg or "wikitext2"
    if arg not in ("wikitext2", "smoke"):
        raise ValueError(f"configs/{paper}.py: unknown arg {arg!r}; use wikitext2 or smoke")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.runbook = runbook
    c.name = f"{paper}-{arg}"
    c.model = ml_collections.ConfigDict(dict(name=RANDOM_TINY if smoke else "smollm2-135m", depth=0))
    c.ppl = ml_collections.ConfigDict(dict(context=32, batch=2, max_tokens=128) if smoke else
                                      dict(context=512, batch=2, max_tokens=8192))
    return c


def validate_model(v, *, random_name: str = RANDOM_TINY, dtype: bool = True, depth: bool = False) -> None:
    """``model.name``: a known pretrained LM or the smoke model ``random_name``; ``model.dtype`` and
    ``model.depth`` (0 = all layers) when the config has them."""
    from eejax.models import pretrained  # noqa: PLC0415

    v.choice("model.name", sorted(pretrained.MODELS) + [random_name])
    if dtype:
        v.choice("model.dtype", ("float32", "bfloat16"))
    if depth:
        v.int("model.depth", lo=0)


def validate_run(c, **model):
    """A Validator over ``c`` with the checks every SmolLM2 config with a seed makes (its ``name``, ``seed`` and
    model: ``validate_model(**model)``)."""
    from eejax.harness.config import Validator  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.int("seed", lo=0)
    validate_model(v, **model)
    return v


def validate_layer_skip(v, c):
    """Checks shared by the layer-skip configs (configs/uls.py, configs/first.py; ``v``: a Validator)."""
    validate_model(v, random_name="random", depth=True)
    if c.model.name == "random":  # the smoke LM's sizes, checked as experiments/_common_smollm2.py builds it
        from eejax.models import lm as lm_lib  # noqa: PLC0415

        v.build("config.model.random",
                lambda: lm_lib.LMConfig(vocab_size=256, mlp="swiglu", **c.model.random.to_dict()))
    for key in ("eval.prompt_len", "eval.windows", "eval.prompts", "eval.batch", "eval.greedy_batch",
                "timing.rounds"):
        v.int(key, lo=1)
    v.int("eval.new_tokens", lo=2)
    v.ints("timing.batches", lo=1, unique=True)
    if c.eval.windows % c.eval.batch:
        v.fail("eval.windows", f"must be a multiple of eval.batch={c.eval.batch}")
    if c.eval.prompts % c.eval.greedy_batch:
        v.fail("eval.prompts", f"must be a multiple of eval.greedy_batch={c.eval.greedy_batch}")
    if max(c.timing.batches) > c.eval.prompts:
        v.fail("timing.batches", f"at most eval.prompts={c.eval.prompts}")
