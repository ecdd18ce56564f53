"""Tokens/s of KV-cached LM decoding on the engine: full depth, forced per-token exit, SkipDecode, self-speculation,
each beside the variant it replaces, with the host stops and dot dtypes of its compiled program.

    python benchmarks/lm_decode.py --sizes gpu --dtype bfloat16 --out $OUT/lm_decode.json
    python benchmarks/lm_decode.py --sizes small --out /tmp/lm_cpu.json           # CPU sanity run (noisy)

Model: ``eejax.models.lm.DecoderLM``, random init, an exit after every layer (``exits="all"``, shared head tied to
the embedding); ``gpu`` is the GPT-2-small shape (12 layers, D=768, 12 heads, MHA, MLP 3072, vocabulary 32000), its
parameters and compute dtype (``LMConfig.dtype``) set to ``--dtype``. Random prompts of ``prompt`` tokens (every row
the same length), ``new`` greedy tokens per row, batch sizes from the preset.

Paths (``decoding`` entry points, each jitted as one call: prefill + ``new`` tokens), in pairs (issue 20):

* ``full``: ``per_token.full_depth_step``, the KV cache in the compute dtype (``kv.empty_state``'s default);
  ``full_f32_cache``: the same with a float32 cache (the old default: under bf16 it promotes attention and every
  projection after it to float32).
* ``forced_exit``: ``per_token.exit_step`` with ``per_token.static_thresholds``: every row exits after layer
  ``exit_after`` (5 in ``gpu``; ideal N / 5 = 2.4x in layers); every exit on the way evaluates its vocabulary head
  and decides on it, one ``lax.cond`` per decision (``kv.Unrolled``); ``forced_exit_masked``: the same on the
  engine's masked while loop (the old executor: a data-dependent loop over exits, a segment loop with traced bounds,
  a head ``switch``); ``forced_exit_cheap_gate``: the same decisions on a cheap gate of the hidden state (the
  cosine measure, thresholds +-inf), the vocabulary projected only at the exit taken; ``forced_exit_static``:
  ``per_token.forced_step``, the truncated program (layers up to the exit, its head only, no decision);
  ``forced_exit_2exits``: ``forced_exit`` on a model with exits only after layer ``exit_after`` and the last.
  CALM's state propagation writes the K/V of the layers not run (``kv.propagate``, one batched computation).
* ``skipdecode_2x``: ``skipdecode.phases`` (the schedule grouped into static programs: known trip counts) under
  ``skipdecode.schedule_for_speedup(new, N, 2)``; ``skipdecode_2x_traced``: ``skipdecode.skip_step`` with the
  schedule traced (a data-dependent layer loop). The record holds the realised mean layers per token.
* ``speculative_d{e}_k{k}``: ``speculative.self_speculative`` drafting ``k`` tokens from exit ``e``. With a random
  init the acceptance rate is near 0 (recorded), so this times the draft-and-verify machinery, not a trained model.

Every path's record holds, from its compiled program (``eejax.exits.hlo``, the CPU-checkable half of the cost):
``host_stops`` per generated token (device-to-host round trips on a GPU: data-dependent loop predicates and
conditionals; each data-dependent loop counted at the trips it runs here), ``unknown_whiles``, ``conditionals``
and ``dot_dtypes`` / ``f32_dots`` (of the lowered program: what a GPU runs).

Timing: the paths of one batch size are timed round-robin (median of ``repeats`` rounds after a warm-up round).
``kv.prefill`` alone (same batch and prompt) is timed beside them; ``decode_s = total_s - prefill_s`` (for the
speculative path against a prefill with its longer cache). ``tokens_per_s`` counts prefill (the issue's numbers),
``decode_tokens_per_s`` does not; speed-ups are against ``full`` at the same batch, on both.

Agreement (before timing; teacher-forced references on the generated sequence, float32 argmax):

* ``full`` / ``full_f32_cache``: every token is the argmax of the full model (``DecoderLM.all_exits``) given its
  prefix;
* ``forced_exit*``: token 0 is the full model's (prefill), every later one the argmax of the static truncated model
  (layers up to ``exit_after`` and that exit's head);
* ``skipdecode_2x*``: the argmax of the teacher-forced SkipDecode program (``skipdecode.sequence_mask``);
* ``speculative``: the tokens equal ``full``'s tokens (greedy-exact).

References are checked at batch sizes up to ``check_max_batch`` (8 in ``gpu``, to save compile time; larger
batches record ``agree: null``). ``agree`` requires every token to match in float32; in bfloat16 near-tied logits
may flip an argmax between two matmul orders, so there ``match_frac`` is reported and ``agree`` means
``match_frac >= 0.9`` for the teacher-forced checks; the speculative one compares with ``full``'s own tokens and
is reported only.
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run as a script from anywhere
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _util  # noqa: E402

from eejax.decoding import kv, per_token, skipdecode, speculative  # noqa: E402
from eejax.exits import confidence, hlo  # noqa: E402
from eejax.models import lm as lm_lib  # noqa: E402

SIZES = {
    "tiny": dict(depth=4, d_model=32, num_heads=4, vocab=97, prompt=8, new=8, batches=(1, 4), exit_after=2,
                 spec=((0, 2),), repeats=2),
    "small": dict(depth=12, d_model=128, num_heads=4, vocab=2048, prompt=16, new=16, batches=(1, 8), exit_after=5,
                  spec=((3, 4),), repeats=3),
    "gpu": dict(depth=12, d_model=768, num_heads=12, vocab=32000, prompt=64, new=64, batches=(1, 8, 32, 128),
                exit_after=5, spec=((3, 4), (5, 4)), repeats=5, check_max_batch=8),
}
BASE_PATHS = ("full", "full_f32_cache", "forced_exit", "forced_exit_masked", "forced_exit_cheap_gate",
              "forced_exit_static", "forced_exit_2exits", "skipdecode_2x", "skipdecode_2x_traced", "speculative")


def make_cfg(preset: dict, exits, dtype: str = "float32") -> lm_lib.LMConfig:
    d, h = preset["d_model"], preset["num_heads"]
    return lm_lib.LMConfig(vocab_size=preset["vocab"], d_model=d, depth=preset["depth"], num_heads=h,
                           num_kv_heads=h, mlp_dim=4 * d, exits=exits, exit_head="shared", tie_embeddings=True,
                           dtype=None if dtype == "float32" else dtype)


def build(cfg: lm_lib.LMConfig, dtype):
    graphdef, params = lm_lib.build(cfg, 0)
    return graphdef, _util.cast_floats(params, dtype)


def compile_profiled(fn, *args) -> tuple:
    """``jax.jit(fn)`` compiled for ``args``, the seconds it took, and its ``hlo.HloProfile`` (loops and
    conditionals of the compiled program, dot dtypes of the lowered one) from the same compilation."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    exe = lowered.compile()
    secs = time.perf_counter() - t0
    return exe, secs, hlo.HloProfile(*hlo.parse_hlo(exe.as_text()), hlo.dot_dtypes_of(lowered.as_text()))


def cost_record(prof: hlo.HloProfile, trips, new: int) -> dict:
    """The row's compiled-program costs: host stops per generated token (data-dependent loops at ``trips``)."""
    return {"host_stops": round(prof.host_stops(trips=trips, per=new), 3), "unknown_whiles": prof.unknown_whiles,
            "conditionals": prof.conditionals, "f32_dots": prof.f32_dots(),
            "dot_dtypes": {"x".join(k): v for k, v in sorted(prof.dot_dtypes.items())}}


def path_fns(preset: dict, gd_all, gd_two, num_layers: int, layers_G) -> dict:
    """Each path as ``fn(params, prompt_BxP, lengths_B) -> tokens_BxG`` (+ extras), ready for ``jax.jit``."""
    new, exit_idx = preset["new"], preset["exit_after"] - 1

    def gen(graphdef, step_fn, *step_args, **kw):
        f = per_token.decode_fn(graphdef, step_fn, new, **kw)
        return lambda params, prompt, lengths: f(params, prompt, lengths, *step_args)

    forced = per_token.static_thresholds(num_layers, exit_idx)
    fns = {
        "full": gen(gd_all, per_token.full_depth_step),
        "full_f32_cache": gen(gd_all, per_token.full_depth_step, cache_dtype=jnp.float32),
        "forced_exit": gen(gd_all, functools.partial(per_token.exit_step, kv="propagate"), forced),
        "forced_exit_masked": gen(gd_all, functools.partial(per_token.exit_step, kv="propagate", executor="masked"),
                                  forced),
        "forced_exit_cheap_gate": gen(gd_all, functools.partial(per_token.exit_step, measure=confidence.cosine,
                                                                heads="taken"), forced),
        "forced_exit_static": gen(gd_all, functools.partial(per_token.forced_step, exit_index=exit_idx)),
        "forced_exit_2exits": gen(gd_two, functools.partial(per_token.exit_step, kv="propagate"),
                                  per_token.static_thresholds(2, 0)),
        "skipdecode_2x": gen(gd_all, skipdecode.phases(layers_G, num_layers)),
        "skipdecode_2x_traced": gen(gd_all, skipdecode.skip_step, jnp.asarray(layers_G)),
    }
    for draft_exit, k in preset["spec"]:
        def spec(params, prompt, lengths, draft_exit=draft_exit, k=k):
            return speculative.self_speculative(nnx.merge(gd_all, params), prompt, lengths, new, draft_exit=draft_exit,
                                                k=k)
        fns[f"speculative_d{draft_exit}_k{k}"] = spec
    return fns


def loop_trips(name: str, preset: dict, layers_G) -> tuple:
    """Iterations of the data-dependent loops of a path per token (outermost first), for ``host_stops``."""
    if name == "forced_exit_masked":
        return (preset["exit_after"], 1)        # the loop over exits reaches exit_after exits of one layer each
    if name == "skipdecode_2x_traced":
        return (float(np.mean(layers_G)),)      # the layer loop runs the position's budget
    if name.startswith("speculative"):
        k = int(name.rsplit("_k", 1)[1])
        return (k + 1, 1)                       # rounds of k drafts (an estimate: acceptance decides)
    return (1,)                                 # the others have no data-dependent loop


def prefill_fn(graphdef, cache_len: int):
    def f(params, prompt, lengths):
        return kv.prefill(nnx.merge(graphdef, params), prompt, lengths, cache_len)
    return f


@functools.partial(jax.jit, static_argnums=(0, 3), static_argnames=("exit_index",))
def reference_tokens(graphdef, params, seq_BxS, prompt_len: int, *, exit_index=None, pos_mask=None):
    """Teacher-forced argmax for each generated position: position g of the output is predicted from the prefix
    ``seq[:, :prompt_len + g]``. Token 0 always comes from the full model (the prefill)."""
    model = nnx.merge(graphdef, params)
    last = model.cfg.num_exits - 1
    exits = [last] if exit_index is None else [last, exit_index]
    outs = model.all_exits(seq_BxS, exits=exits, pos_mask_NxT=pos_mask)
    pred_ExBxS = jnp.argmax(outs.logits_ExBxTxV.astype(jnp.float32), -1)
    pred = pred_ExBxS[-1]                                       # exit_index's (or the final) predictions
    pred = pred.at[:, prompt_len - 1].set(pred_ExBxS[0][:, prompt_len - 1])   # token 0: the full prefill
    return pred[:, prompt_len - 1:-1]


def bench_batch(preset, batch, gd_all, p_all, gd_two, p_two, *, paths, dtype, repeats, log) -> dict:
    n, new, plen = preset["depth"], preset["new"], preset["prompt"]
    layers_G = skipdecode.schedule_for_speedup(new, n, 2.0)
    fns = path_fns(preset, gd_all, gd_two, n, layers_G)
    names = [nm for nm in fns if nm in paths or (nm.startswith("speculative") and "speculative" in paths)]
    prompt = jax.random.randint(jax.random.key(batch), (batch, plen), 0, preset["vocab"], jnp.int32)
    lengths = jnp.full((batch,), plen, jnp.int32)
    res = {"batch": batch, "prompt": plen, "new": new, "compile_s": {}, "errors": {}, "paths": {}}
    exes, params_of = {}, {}
    for name in names:
        params = p_two if name == "forced_exit_2exits" else p_all
        try:
            exes[name], res["compile_s"][name], prof = compile_profiled(fns[name], params, prompt, lengths)
            params_of[name] = params
            res["paths"][name] = cost_record(prof, loop_trips(name, preset, layers_G), new)
        except Exception as err:  # noqa: BLE001  (a path that fails to compile is recorded, not fatal)
            res["errors"][name] = f"{type(err).__name__}: {str(err)[:500]}"
            log(f"  {name}: compile failed: {res['errors'][name][:200]}")
    prefills = {"prefill": plen + new}
    for draft_exit, k in preset["spec"]:
        prefills[f"prefill_k{k}"] = plen + new + k + 1
    pre_exes = {}
    for name, cache_len in prefills.items():
        if name == "prefill" or any(nm.endswith(f"_k{name[9:]}") for nm in exes):
            pre_exes[name], res["compile_s"][name] = _util.compile_fn(prefill_fn(gd_all, cache_len), p_all, prompt,
                                                                      lengths)
    outs = {name: exe(params_of[name], prompt, lengths) for name, exe in exes.items()}
    tol_frac = 1.0 if dtype == jnp.float32 else 0.9
    full_tokens = np.asarray(outs["full"].tokens_BxG) if "full" in outs else None
    for name, out in outs.items():
        rec = res["paths"][name]
        if name.startswith("speculative"):
            tokens = np.asarray(out.tokens_BxG)
            rec.update(acceptance_rate=float(out.acceptance_rate), tokens_per_verify=float(out.tokens_per_verify),
                       rounds_mean=float(np.mean(out.rounds_B)))
            if full_tokens is not None:
                rec["match_frac"] = float(np.mean(tokens == full_tokens))
                rec["agree"] = bool(rec["match_frac"] == 1.0) if dtype == jnp.float32 else None
            else:
                rec["agree"] = None
        elif batch > preset.get("check_max_batch", batch):
            rec["match_frac"] = rec["agree"] = None   # references checked at the smaller batches only (time)
        else:
            tokens = np.asarray(out.tokens_BxG)
            seq = jnp.concatenate([prompt, jnp.asarray(tokens)], axis=1)
            if name.startswith("full"):
                ref = reference_tokens(gd_all, p_all, seq, plen)
            elif name.startswith("forced_exit") and name != "forced_exit_2exits":
                ref = reference_tokens(gd_all, p_all, seq, plen, exit_index=preset["exit_after"] - 1)
            elif name == "forced_exit_2exits":
                ref = reference_tokens(gd_two, p_two, seq, plen, exit_index=0)
            else:
                mask = skipdecode.sequence_mask(plen, layers_G, n)
                ref = reference_tokens(gd_all, p_all, seq, plen, pos_mask=jnp.asarray(mask))
            rec["match_frac"] = float(np.mean(np.asarray(ref) == tokens))
            rec["agree"] = bool(rec["match_frac"] >= tol_frac)
        if not name.startswith("speculative"):
            mean_layers = float(np.mean(np.asarray(out.layers_BxG)[:, 1:]))   # decode steps (0 is the prefill)
            rec["mean_layers_per_token"] = mean_layers
            rec["ideal_layer_speedup"] = n / mean_layers
    timed = _util.time_interleaved({**{nm: (e, (params_of[nm], prompt, lengths)) for nm, e in exes.items()},
                                    **{nm: (e, (p_all, prompt, lengths)) for nm, e in pre_exes.items()}},
                                   repeats=repeats)
    res["prefill"] = {nm: timed[nm] for nm in pre_exes}
    for name in exes:
        rec = res["paths"][name]
        rec.update(timed[name])
        pre = "prefill_k" + name.rsplit("_k", 1)[1] if name.startswith("speculative") else "prefill"
        rec["prefill_s"] = timed[pre]["time_s"]
        rec["decode_s"] = rec["time_s"] - rec["prefill_s"]
        rec["tokens_per_s"] = batch * new / rec["time_s"]
        rec["decode_tokens_per_s"] = batch * new / rec["decode_s"] if rec["decode_s"] > 0 else None
    if "full" in res["paths"]:
        f = res["paths"]["full"]
        for rec in res["paths"].values():
            rec["speedup"] = f["time_s"] / rec["time_s"]
            rec["decode_speedup"] = (f["decode_s"] / rec["decode_s"]) if rec["decode_s"] > 0 and f["decode_s"] > 0 \
                else None
    log(f"  B={batch:4d} prefill {timed['prefill']['time_s'] * 1e3:.1f}ms  " + "  ".join(
        f"{k} {v['tokens_per_s']:.0f} tok/s ({v.get('decode_speedup') or float('nan'):.2f}x dec, "
        f"{v['host_stops']:g} stops/tok{'' if v['agree'] is not False else ', DISAGREE'})"
        for k, v in res["paths"].items() if "tokens_per_s" in v))
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--sizes", choices=sorted(SIZES), default="small")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--batches", help="comma list overriding the preset's batch sizes")
    ap.add_argument("--paths", default=",".join(BASE_PATHS), help=f"comma list from {BASE_PATHS}")
    ap.add_argument("--spec", help="speculative candidates as draft_exit:k pairs, e.g. 3:4,5:4 (preset default)")
    ap.add_argument("--repeats", type=int, help="timed rounds (median reported); preset default")
    ap.add_argument("--budget-s", type=float, help="stop starting new batch sizes after this many seconds")
    args = ap.parse_args(argv)

    preset = dict(SIZES[args.sizes])
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in BASE_PATHS]
    if bad:
        ap.error(f"unknown paths {bad} (choose from {BASE_PATHS})")
    try:
        if args.batches:
            preset["batches"] = tuple(int(v) for v in args.batches.split(","))
        if args.spec:
            preset["spec"] = tuple(tuple(int(x) for x in pair.split(":")) for pair in args.spec.split(","))
    except ValueError as err:
        ap.error(f"bad --batches/--spec value ({err}); e.g. --batches 1,8 --spec 3:4")
    n = preset["depth"]
    if not 1 <= preset["exit_after"] < n or any(not 0 <= e < n - 1 or k < 1 for e, k in preset["spec"]):
        ap.error(f"exits must name early exits of the {n}-layer model: exit_after={preset['exit_after']}, "
                 f"spec={preset['spec']}")
    dtype = jnp.dtype(args.dtype).type
    repeats = args.repeats or preset["repeats"]
    budget = _util.Budget(args.budget_s)
    log = functools.partial(print, flush=True)

    gd_all, p_all = build(make_cfg(preset, "all", args.dtype), dtype)
    gd_two, p_two = build(make_cfg(preset, (preset["exit_after"] - 1, n - 1), args.dtype), dtype)
    out = {"meta": {**_util.provenance([sys.argv[0]] + argv), "sizes": args.sizes, "dtype": args.dtype,
                    "repeats": repeats, "model": {k: preset[k] for k in ("depth", "d_model", "num_heads", "vocab")},
                    "mlp_dim": 4 * preset["d_model"], "prompt": preset["prompt"], "new": preset["new"],
                    "exit_after": preset["exit_after"], "spec": [list(s) for s in preset["spec"]],
                    "skipdecode_layers_G": skipdecode.schedule_for_speedup(preset["new"], n, 2.0).tolist(),
                    "timing": "median of `repeats` round-robin rounds after one warm-up round, block_until_ready; "
                              "one call = prefill + `new` greedy tokens; decode_s = time_s - prefill_s",
                    "host_stops": "per generated token, read from the compiled program (eejax.exits.hlo): "
                                  "data-dependent loop predicates and conditionals (prefill included, divided by "
                                  "`new`)"},
           "batches": [], "skipped": []}
    log(f"{out['meta']['backend']} {out['meta']['device_kind']} jax {jax.__version__} dtype {args.dtype}")
    for batch in preset["batches"]:
        if budget.over():
            out["skipped"].append(batch)
            log(f"B={batch}: skipped (budget of {args.budget_s:.0f}s spent)")
            continue
        out["batches"].append(bench_batch(preset, batch, gd_all, p_all, gd_two, p_two, paths=paths, dtype=dtype,
                                          repeats=repeats, log=log))
        _util.write_json(args.out, out)   # partial results survive a time limit
    out["all_agree"] = all(rec["agree"] is not False for b in out["batches"] for rec in b["paths"].values())
    out["errors"] = {str(b["batch"]): b["errors"] for b in out["batches"] if b["errors"]}
    out["elapsed_s"] = budget.elapsed()
    _util.write_json(args.out, out)
    log(f"wrote {args.out}; all paths agree: {out['all_agree']}")
    return 0 if out["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
