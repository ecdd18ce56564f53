"""GPU-cost budgets of every LM decoding path, read from the compiled program on CPU (``eejax.exits.hlo``; issue 20).

Host stops per generated token (a data-dependent loop predicate or a conditional: a device-to-host round trip on a
GPU): full decode 0; an exit step at most one per decision point (the exits but the last), a forced static exit 0;
every paper mechanism with nothing skipped 0 over greedy (SkipDecode grouped, ULS / FiRST with static counts,
FFN-SkipLLM by predication, LAC). Dots: a bfloat16 decode runs no float32 matmul (the statistics kept in float32,
softmax and norms, are not dots). Memory: the KV cache is never copied whole inside the exit decisions' branches.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.decoding import ffn_skip, kv as kv_lib, layer_skip as ls, per_token, skipdecode, void
from eejax.exits import confidence, engine, hlo
from eejax.models import lm

N, G = 4, 3
CFG = lm.LMConfig(vocab_size=23, d_model=16, depth=N, num_heads=2, num_kv_heads=1, mlp_dim=32, mlp="swiglu")
E = CFG.num_exits
PROMPT, LENGTHS = jnp.ones((2, 5), jnp.int32), jnp.asarray([5, 3], jnp.int32)


def _model(dtype=None):
    return lm.build(lm.LMConfig(**{**CFG.__dict__, "dtype": dtype}), 0)


def _generate_fn(name: str, dtype=None, cache_dtype=None, cast=False):
    gd, params = _model(dtype)
    if cast:   # parameters cast after building, the model's dtype left None: it computes in theirs
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                              params)
    step, args = PATHS[name]

    def fn(params, *args):
        model = nnx.merge(gd, params)
        steps = step(model) if name == "skipdecode_grouped" else (lambda m, t, s, i: step(m, t, s, i, *args))
        return per_token.generate(model, PROMPT, LENGTHS, G, steps, cache_dtype=cache_dtype)

    return fn, (params, *args)


@functools.lru_cache(maxsize=None)
def _profile(name: str):
    fn, args = _generate_fn(name)
    return hlo.profile(fn, *args)


def _dot_dtypes(name: str, dtype=None, cache_dtype=None, cast=False):
    """The dots of the *lowered* program (what a GPU would run; no compile needed)."""
    fn, args = _generate_fn(name, dtype, cache_dtype, cast)
    return hlo.dot_dtypes_of(jax.jit(fn).lower(*args).as_text())


def _f32_dots(dots) -> int:
    return sum(n for (a, b, _), n in dots.items() if "f32" in (a, b))


_never = ffn_skip.saturation(np.inf, N, cold_first=0, cold_last=0)


def _row_skip_step(m, t, s, keep_NxB):
    """Whole layers skipped per row by a traced keep pattern (the voids benchmark's ``pp_pattern_skip``)."""
    out, s = kv_lib.forward(m, t[:, None], s, engine.row_skip(keep_NxB, [N - 1]), kv_lib.final_head(m))
    stats = per_token.StepStats(out.exit_layer_B, jnp.sum(keep_NxB, 0).astype(jnp.int32), out.score_B,
                                out.layers_run, out.out.hidden_BxD)
    return out.logits_BxC, stats, s
# name -> (step function, traced extra arguments); counts and schedules that must be static are static.
PATHS = {
    "full": (per_token.full_depth_step, ()),
    "forced_static": (lambda m, t, s, i: per_token.forced_step(m, t, s, i, 1), ()),
    "forced_threshold": (lambda m, t, s, i: per_token.exit_step(m, t, s, i, per_token.static_thresholds(E, 1)), ()),
    "threshold_every_head": (lambda m, t, s, i, thr: per_token.exit_step(m, t, s, i, thr), (jnp.float32(0.5),)),
    "threshold_cheap_gate": (lambda m, t, s, i, thr: per_token.exit_step(m, t, s, i, thr, measure=confidence.cosine),
                             (jnp.float32(0.9),)),
    "threshold_oracle": (lambda m, t, s, i, thr: per_token.exit_step(m, t, s, i, thr, kv="oracle"),
                         (jnp.float32(0.5),)),
    "skipdecode_grouped": (lambda m: skipdecode.phases([N] * G, N), ()),
    "uls_static": (lambda m, t, s, i, tab: ls.table_step(m, t, s, i, tab, N), (jnp.arange(N),)),
    "first_static": (lambda m, t, s, i, keep: ls.row_step(m, t, s, i, keep, count=N), (jnp.ones((N, 2), bool),)),
    "ffn_where": (lambda m, t, s, i: ffn_skip.skip_step(m, t, s, i, _never), ()),
    "lac": (lambda m, t, s, i: void.lac_step(m, t, s, i, 0.8), ()),
    "void_pattern_skip": (lambda m, t, s, i, keep: _row_skip_step(m, t, s, keep), (jnp.ones((N, 2), bool),)),
}


@pytest.mark.parametrize("name", ["full", "forced_static", "threshold_oracle", "skipdecode_grouped", "uls_static",
                                  "first_static", "ffn_where", "lac", "void_pattern_skip"])
def test_no_host_stop(name):
    """Full decode and every mechanism with nothing data-dependent to decide: 0 host stops (greedy's count)."""
    prof = _profile(name)
    assert prof.host_stops(trips=N, per=G) == 0, (name, prof.summary(trips=N, per=G))


@pytest.mark.parametrize("name", ["forced_threshold", "threshold_every_head", "threshold_cheap_gate"])
def test_exit_step_at_most_one_stop_per_decision(name):
    """One ``lax.cond`` per exit decision and no data-dependent loop: at most E - 1 stops per token."""
    prof = _profile(name)
    assert prof.unknown_whiles == 0
    assert 0 < prof.host_stops(trips=N, per=G) <= E - 1, prof.summary(trips=N, per=G)


def test_the_variants_kept_for_comparison_do_stop():
    """The traced variants (the masked executor's while loop, traced layer counts, the FFN cond) still cost stops:
    the budgets above would catch a path that silently fell back to them."""
    gd, params = _model()

    def stops(step, *args):
        fn = lambda p, *a: per_token.generate(nnx.merge(gd, p), PROMPT, LENGTHS, G,   # noqa: E731
                                              lambda m, t, s, i: step(m, t, s, i, *a))
        return hlo.profile(fn, params, *args).host_stops(trips=N, per=G)

    assert stops(lambda m, t, s, i: per_token.exit_step(m, t, s, i, 0.5, executor="masked")) > E
    assert stops(ls.table_step, jnp.arange(N), jnp.int32(N)) >= N
    assert stops(lambda m, t, s, i: ffn_skip.skip_step(m, t, s, i, _never, branch="cond")) == N


def test_bf16_decode_has_no_f32_dot():
    for name in sorted(PATHS):
        dots = _dot_dtypes(name, "bfloat16")
        assert dots and _f32_dots(dots) == 0, (name, dots)
    # The variants kept for comparison (the masked executor's while loop, traced layer counts, the FFN cond) too.
    for name, step, args in (
            ("masked", lambda m, t, s, i: per_token.exit_step(m, t, s, i, 0.5, executor="masked"), ()),
            ("uls_traced", ls.table_step, (jnp.arange(N), jnp.int32(N))),
            ("ffn_cond", lambda m, t, s, i: ffn_skip.skip_step(m, t, s, i, _never, branch="cond"), ())):
        gd, params = _model("bfloat16")
        fn = lambda p, *a: per_token.generate(nnx.merge(gd, p), PROMPT, LENGTHS, G,   # noqa: E731
                                              lambda m, t, s, i: step(m, t, s, i, *a))
        dots = hlo.dot_dtypes_of(jax.jit(fn).lower(params, *args).as_text())
        assert dots and _f32_dots(dots) == 0, (name, dots)
    # The old default (a float32 cache under a bfloat16 model) shows up as float32 dots: the check has teeth.
    assert _f32_dots(_dot_dtypes("full", "bfloat16", jnp.float32)) > 0
    # Parameters cast to bfloat16 with LMConfig.dtype=None compute in bfloat16 too (the benchmarks did this).
    for name in ("full", "threshold_cheap_gate"):
        assert _f32_dots(_dot_dtypes(name, cast=True)) == 0, name


def _bytes(shape: str) -> int:
    """Bytes of an HLO array shape such as ``f32[4,2,1,8,8]{...}``."""
    m = re.match(r"(\w+)\[([\d,]*)\]", shape)
    size = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1}.get(m.group(1), 4) if m else 0
    return size * int(np.prod([int(d) for d in m.group(2).split(",") if d])) if m else 0


def test_cache_is_not_copied_inside_exit_decisions():
    """Steps with exits read the cache and write their new K/V after the step, so no branch of an exit decision
    copies a cache-sized buffer (XLA cannot update a conditional's operand in place)."""
    cache_bytes = N * PROMPT.shape[0] * CFG.num_kv_heads * (PROMPT.shape[1] + G) * CFG.head_dim * 4
    for name in ("forced_threshold", "threshold_every_head", "threshold_cheap_gate"):
        prof = _profile(name)
        branches = {c for instrs in prof.computations.values() for ins in instrs if ins.op == "conditional"
                    for c in ins.calls}
        big = [ins.name for c in branches for ins in prof.computations[c]
               if ins.op == "copy" and _bytes(ins.shape) >= cache_bytes]
        assert branches and not big, (name, big)


def test_cache_dtype_follows_the_model():
    model = nnx.merge(*_model("bfloat16"))
    assert kv_lib.empty_state(model, 1, 4).cache.k_NxBxJxSxK.dtype == jnp.bfloat16
    assert kv_lib.empty_state(model, 1, 4, jnp.float32).cache.k_NxBxJxSxK.dtype == jnp.float32
    assert kv_lib.empty_state(nnx.merge(*_model()), 1, 4).cache.k_NxBxJxSxK.dtype == jnp.float32
