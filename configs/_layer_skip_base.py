"""Config checks shared by the layer-skipping experiments on the pretrained LM (configs/uls.py, configs/first.py)."""


def validate_common(v, c):
    """Checks shared by the layer-skip configs (``v``: eejax.harness.config.Validator)."""
    from eejax.models import pretrained  # noqa: PLC0415

    v.choice("model.name", sorted(pretrained.MODELS) + ["random"])
    v.choice("model.dtype", ("float32", "bfloat16"))
    v.int("model.depth", lo=0)
    if c.model.name == "random":  # the smoke LM's sizes, checked as experiments/_layer_skip_common.py builds it
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
