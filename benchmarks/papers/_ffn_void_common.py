"""Shared pieces of the paper decoder benchmarks in this folder (imports only jax, numpy and eejax): presets, the
random-weight model, compile-once-and-profile (every row carries the host stops and float32 dots of its compiled
program, ``eejax.exits.hlo``), timing, rows."""
from __future__ import annotations

import json
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.decoding import per_token
from eejax.exits import costs, hlo
from eejax.models import lm as lm_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# "gpu": a SmolLM2-135M-shaped model with random weights (the GGUF file does not travel to the device machine).
SIZES = {
    "tiny": dict(depth=4, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, vocab=97, prompt=8, new=8,
                 batches=(1,), dtype="float32", repeats=1),
    "small": dict(depth=8, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=384, vocab=2048, prompt=16, new=32,
                  batches=(1, 4), dtype="float32", repeats=2),
    "gpu": dict(depth=30, d_model=576, num_heads=9, num_kv_heads=3, mlp_dim=1536, vocab=49152, prompt=64, new=64,
                batches=(1, 8, 32), dtype="bfloat16", repeats=3),
}


def preset(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use one of {sorted(SIZES)}")
    return SIZES[size]


def build(p: dict):
    """``(graphdef, params)`` of a random-weight SwiGLU DecoderLM of the preset's shape, in its compute dtype."""
    cfg = lm_lib.LMConfig(vocab_size=p["vocab"], d_model=p["d_model"], depth=p["depth"], num_heads=p["num_heads"],
                          num_kv_heads=p["num_kv_heads"], mlp_dim=p["mlp_dim"], mlp="swiglu", exits=[p["depth"] - 1],
                          rope_base=1e5, norm_eps=1e-5, dtype=None if p["dtype"] == "float32" else p["dtype"])
    graphdef, params = nnx.split(lm_lib.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    dt = jnp.dtype(p["dtype"])
    params = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    return graphdef, params


def generate_fn(graphdef, step_fn, new: int):
    """``f(params, prompt, *args) -> tokens_BxG, layers_BxG`` (to ``compiled``)."""
    f = per_token.decode_fn(graphdef, step_fn, new)

    def g(params, prompt, *args):
        out = f(params, prompt, jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32), *args)
        return out.tokens_BxG, out.layers_BxG
    return g


def compiled(fn, *args, trips=1, per: int = 1) -> tuple:
    """``jax.jit(fn)`` compiled once for ``args`` and its compiled-program costs: ``(exe, costs)`` with
    ``host_stops`` per generated token (``per``; data-dependent loops counted at ``trips`` iterations),
    ``unknown_whiles``, ``conditionals`` and ``f32_dots`` (of the lowered program)."""
    lowered = jax.jit(fn).lower(*args)
    exe = lowered.compile()
    prof = hlo.HloProfile(*hlo.parse_hlo(exe.as_text()), hlo.dot_dtypes_of(lowered.as_text()))
    return exe, {"host_stops": round(prof.host_stops(trips=trips, per=per), 3),
                 "unknown_whiles": prof.unknown_whiles, "conditionals": prof.conditionals,
                 "f32_dots": prof.f32_dots()}


def timed(fn, *args, repeats: int) -> tuple[float, tuple]:
    """Median seconds of ``fn(*args)`` after one warm-up call (compile excluded), block_until_ready each time."""
    t = costs.measure(fn, *args, warmup=1, iters=repeats)
    return statistics.median(t.times_s), t.output


def run_variant(fn, *args, repeats: int, new: int, trips=1) -> tuple[float, tuple, dict]:
    """Compile ``fn`` once (with its costs), time it: ``(seconds, outputs, costs)``."""
    exe, costs = compiled(fn, *args, trips=trips, per=new)
    sec, out = timed(exe, *args, repeats=repeats)
    return sec, out, costs


def results(name: str) -> dict | None:
    """A committed results JSON of this repository (experiments/results/...), or None."""
    path = ROOT / "experiments" / "results" / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def row(paper: str, variant: str, batch: int, new: int, seconds: float, **stats) -> dict:
    toks = batch * new
    return {"paper": paper, "variant": variant, "batch": batch, "new_tokens": toks, "seconds": seconds,
            "tokens_per_s": toks / seconds} | stats


def random_prompt(p: dict, batch: int) -> jax.Array:
    return jax.random.randint(jax.random.key(batch), (batch, p["prompt"]), 0, p["vocab"], jnp.int32)


def bernoulli_table(fraction_N, batch: int, steps: int, seed: int = 0, shared: bool = False) -> np.ndarray:
    """``bool[N, B, steps]``: i.i.d. per (layer, row, step) with the given per-layer rates (``shared``: one draw per
    (layer, step) for every row)."""
    rng = np.random.default_rng(seed)
    f = np.asarray(fraction_N, np.float64)[:, None, None]
    draw = rng.random((f.shape[0], 1 if shared else batch, steps))
    return np.broadcast_to(draw < f, (f.shape[0], batch, steps)).copy()
