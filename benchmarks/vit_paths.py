"""Wall-clock of the early-exit inference paths on a 12-layer ViT under forced exit patterns; writes JSON.

    python benchmarks/vit_paths.py --out benchmarks/results/h100_bf16.json --sizes gpu --dtype bfloat16
    python benchmarks/vit_paths.py --out /tmp/cpu.json --sizes small         # CPU sanity run (noisy)

Paths, all on the same embedded batch ``h0_BxTxD`` (the patch embedding is outside every timing):

* ``static``: plain ``engine.run_layers`` over all N layers + the final head (no exits): the baseline.
* ``masked``: ``engine.run`` with ``engine.Masked()`` (a row that exited is frozen but computed until the deepest
  row is done).
* ``cascade``: ``engine.BucketCascade`` with its default buckets (``engine.default_buckets``: about B, B/2, B/4, B/8),
  the library's compaction path: one loop per bucket size, rows compacted only when they fit the next bucket.
* ``compacted``: the baseline ``engine.Compacted`` (a bucket picked and the rows gathered and scattered back at
  every exit segment), as measured on the H200 (issue 20), side by side with ``cascade``. ``--buckets`` adds both
  executors under other bucket lists as paths ``cascade_<scheme>`` / ``compacted_<scheme>``: ``eighths`` (every
  multiple of B/8), ``sixteenths`` (of B/16), or an explicit list such as ``128+512+1024``.
* ``gated_kernel``: the masked loop with each layer's MLP half in the gated-step kernel (``paths.GatedKernel``).
* ``continuous``: ``exits.continuous.continuous_exits``, the batch as a queue streamed through ``B // slots_div``
  slots; on GPU also ``continuous_triton``, the same with ``ragged_dot`` lowered by jax's Pallas/Triton kernel.

Forced exit patterns. To time a *given* depth distribution (rather than whatever a random-init model's confidences
produce) each sample carries its target exit in one residual channel that no layer writes: channel D-1 of the
attention output projection and of fc2 (kernel column and bias) is zeroed in every layer, so ``h[..., D-1]`` is
carried exactly (``x + 0 == x``, any dtype) from the embedding, where it is set to the target, to every exit. Each
exit head ``e`` is the model's linear head with its gate replaced by ``e - h[:, 0, D-1]``, and the measure scores
that gate against threshold 0: a sample exits exactly at its target, in every path and dtype. The FLOPs are those
of the unmodified ViT. Patterns (depths 1..N; for N=12):

* ``bimodal``: half the batch exits after layer N/4 (3), half after layer N (12); mean depth 7.5.
* ``uniform``: depth uniform over 1..N, equal counts; mean 6.5.
* ``geometric``: a geometric law truncated to 1..N with mean 0.4*N (4.8), counts by quantiles.
* ``full``: threshold +inf, nobody exits early: the overhead of each path's machinery against ``static``.

The exit heads are stacked (``engine.stack_heads``, the forced gate computed from the traced exit index), so no
path but ``compacted`` switches between heads; every dynamic path carries only the logits of the head outputs
(``fields``), as a classifier does.

Each path's row also records what its compiled program costs a GPU beyond the arithmetic (``eejax.exits.hlo``, read
on any backend): ``host_stops`` for this pattern's forward (data-dependent loop iterations and conditionals, each a
round trip to the host on a GPU; the number of exit decisions is the deepest row's exit count),
``unknown_whiles`` and ``conditionals`` (static counts), and ``big_memory_ops`` (copies, gathers, scatters and sorts
of at least an eighth of the hidden state's bytes: a pass over memory each).

Samples are shuffled (fixed seed), so every batch mixes depths. Before timing, every path's exits must equal the
targets and its logits the masked path's (and ``static``'s for ``full``) within a dtype/backend tolerance; the
JSON records the measured difference and ``agree``, and the script exits with status 1 if anything disagreed.

The paths of one (config, pattern) are timed round-robin (one call of each per round), so a slow spell of a
shared machine hits them alike. Reported per (config, pattern, path): median wall-clock (``time_s``), realized
speed-up over ``static``, ideal speed-up N / mean depth, their ratio, and for ``full`` the overhead
``time / static``. CPU timings are noisy and, for ``continuous``, meaningless: jax lowers ``ragged_dot`` on CPU to a masked dense dot over all N layer groups.
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

from eejax.exits import confidence as conf_lib  # noqa: E402
from eejax.exits import continuous, engine, hlo, paths, policies  # noqa: E402
from eejax.models.vit import ViT, ViTConfig  # noqa: E402

# (depth, d_model, num_heads, image_size, patch_size, batch, num_classes); patches = (image/patch)**2.
SIZES = {
    "tiny": dict(depth=4, widths=(32,), head_dim=16, images=((16, 4),), batches=(16,), classes=10, repeats=2),
    "small": dict(depth=12, widths=(64,), head_dim=16, images=((32, 8),), batches=(64,), classes=10, repeats=5),
    # CPU proxy at compute-bound sizes (benchmarks/results/cpu_proxy.json): D=256, 17 tokens, batch 64.
    "cpu_proxy": dict(depth=12, widths=(256,), head_dim=64, images=((32, 8),), batches=(64,), classes=10, repeats=7),
    "gpu": dict(depth=12, widths=(384, 768), head_dim=64, images=((128, 16), (224, 16)), batches=(256, 1024),
                classes=1000, repeats=10),
}
PATTERNS = ("bimodal", "uniform", "geometric", "full")
PATHS = ("static", "masked", "cascade", "compacted", "gated_kernel", "continuous", "continuous_triton")
BUCKETED = ("cascade", "compacted")   # the paths that take a bucket list
BUCKET_SCHEMES = ("default", "eighths", "sixteenths")


def bucket_list(scheme: str, batch: int) -> tuple[int, ...] | None:
    """Bucket sizes of a scheme for a batch (None = the engine's default): ``eighths`` / ``sixteenths`` are every
    multiple of ceil(B/8) / ceil(B/16) up to B; ``a+b+c`` an explicit list (the full batch is always added)."""
    if scheme == "default":
        return None
    if scheme in ("eighths", "sixteenths"):
        step = -(-batch // (8 if scheme == "eighths" else 16))
        return tuple(sorted({min(batch, step * i) for i in range(1, batch // step + 2)}))
    try:
        sizes = tuple(int(v) for v in scheme.split("+"))
    except ValueError:
        raise ValueError(f"bucket scheme {scheme!r}: use one of {BUCKET_SCHEMES} or sizes like 128+512") from None
    return engine.check_buckets(sizes, batch)


def bucketed_name(kind: str, scheme: str) -> str:
    """The path name of a bucketed executor (``cascade`` / ``compacted``) under a bucket scheme."""
    return kind if scheme == "default" else f"{kind}_{scheme}"


def compacted_name(scheme: str) -> str:
    return bucketed_name("compacted", scheme)


def target_depths(pattern: str, num_layers: int, batch: int, seed: int = 0) -> np.ndarray:
    """Per-sample exit depth (1..N) for a pattern, in counts that realise it exactly up to rounding, shuffled."""
    u = (np.arange(batch) + 0.5) / batch                      # quantile of each sample
    if pattern == "bimodal":
        depth = np.where(np.arange(batch) < batch // 2, max(1, num_layers // 4), num_layers)
    elif pattern == "uniform":
        depth = 1 + (np.arange(batch) * num_layers) // batch
    elif pattern == "geometric":
        p = _geometric_p(0.4 * num_layers, num_layers)
        pmf = p * (1 - p) ** np.arange(num_layers)
        cdf = np.cumsum(pmf / pmf.sum())
        depth = 1 + np.minimum(np.searchsorted(cdf, u), num_layers - 1)
    elif pattern == "full":
        depth = np.full(batch, num_layers)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")
    return np.random.default_rng(seed).permutation(depth).astype(np.int32)


def _geometric_p(mean: float, n: int) -> float:
    """``p`` of a geometric law on 1..n (truncated) with the given mean, by bisection (the mean falls with p)."""
    def trunc_mean(p):
        k = np.arange(1, n + 1)
        w = p * (1 - p) ** (k - 1)
        return float((k * w).sum() / w.sum())
    lo, hi = 1e-6, 1 - 1e-6
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if trunc_mean(mid) > mean else (lo, mid)
    return (lo + hi) / 2


def forced_measure(out: engine.HeadOut, state):
    """Score = the forced gate ``e - target`` (exit when >= 0); the state advances as for max_softmax."""
    _, state = conf_lib.max_softmax(out, state)
    return out.gate_B.astype(jnp.float32), state


forced_measure.reads = ("logits_BxC", "gate_B")   # what the engine must keep of the head outputs


def _forced_head(head, e, h_BxTxD):
    """Head ``e`` (a Python or traced int) with its gate replaced by ``e - target``."""
    out = head(h_BxTxD)
    return out._replace(gate_B=(e - h_BxTxD[:, 0, -1].astype(jnp.float32)))


def build_model(cfg: ViTConfig, dtype) -> ViT:
    """A random-init ViT whose residual channel D-1 is never written by a layer (see the module docstring)."""
    model = ViT(cfg, rngs=nnx.Rngs(0))
    for lin in (model.layers.attn.out, model.layers.mlp.fc2):
        lin.kernel[...] = lin.kernel[...].at[:, :, -1].set(0.0)
        lin.bias[...] = lin.bias[...].at[:, -1].set(0.0)
    if dtype != jnp.float32:
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module) and hasattr(node, "dtype"):
                node.dtype = dtype
        state = nnx.state(model)
        nnx.update(model, jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
    return model


def path_fns(cfg: ViTConfig, num_slots: int, bucket_schemes=("default",), batch: int | None = None) -> dict:
    """Each path as ``fn(graphdef_state, h0, thr) -> (logits_BxC, exit_B, aux)``, ready for ``jax.jit``."""
    program = engine.prefix(cfg.depth, cfg.exit_layers)
    num_exits = len(cfg.exit_layers)

    def dynamic(gs, h0, thr, executor):
        m = nnx.merge(*gs)
        heads = engine.stack_heads(m.heads, call=_forced_head)
        o = engine.run(m.layers, heads, h0, program, policies.threshold(forced_measure, thr, num_exits), executor,
                       fields=("logits_BxC",))
        return o.logits_BxC, o.exit_B, o.layers_run

    def static(gs, h0, thr):
        del thr
        m = nnx.merge(*gs)
        h_last, _ = engine.run_layers(m.layers, h0)
        logits = m.heads[-1](h_last).logits_BxC
        return logits, jnp.full(logits.shape[:1], len(cfg.exit_layers) - 1, jnp.int32), jnp.int32(cfg.depth)

    def cont(gs, h0, thr):
        m = nnx.merge(*gs)
        heads = [functools.partial(_forced_head, h, e) for e, h in enumerate(m.heads)]
        o = continuous.continuous_exits(m.layers, heads, h0, cfg.exit_layers, thr, num_slots=num_slots,
                                        measure=forced_measure)
        return o.logits_BxC, o.exit_B, o.steps

    fns = {"static": static, "masked": functools.partial(dynamic, executor=engine.Masked()),
           "gated_kernel": functools.partial(dynamic, executor=paths.GatedKernel()), "continuous": cont,
           "continuous_triton": cont}
    executors = {"cascade": engine.BucketCascade, "compacted": engine.Compacted}
    for scheme in dict.fromkeys(("default",) + tuple(bucket_schemes)):
        buckets = None if scheme == "default" else bucket_list(scheme, batch)
        for kind in BUCKETED:
            fns[bucketed_name(kind, scheme)] = functools.partial(dynamic, executor=executors[kind](buckets))
    return fns


def _compile(name, fn, args):
    """Compile a path (``continuous_triton`` under jax's Pallas/Triton lowering of ragged_dot, GPU only); returns
    the executable, the seconds it took and its ``hlo.HloProfile``."""
    flag = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
    if name == "continuous_triton":
        jax.config.update(flag, True)
    try:
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        exe = lowered.compile()
        secs = time.perf_counter() - t0
    finally:
        if name == "continuous_triton":
            jax.config.update(flag, False)
    comps, entry = hlo.parse_hlo(exe.as_text())
    return exe, secs, hlo.HloProfile(comps, entry, hlo.dot_dtypes_of(lowered.as_text()))


def program_costs(prof: hlo.HloProfile, decisions: int, h_bytes: int) -> dict:
    """A path's GPU costs beyond the arithmetic, for one forward with ``decisions`` iterations of its loops."""
    return {"host_stops": round(prof.stops_per_call(decisions), 3), "unknown_whiles": prof.unknown_whiles,
            "conditionals": prof.conditionals, "big_memory_ops": prof.memory_ops(max(1, h_bytes // 8)),
            "dot_dtypes": {"x".join(k): v for k, v in sorted(prof.dot_dtypes.items())}}


def logits_tol(dtype, backend: str) -> float:
    """Max |logits - reference| / max |reference| accepted as agreement (matmul orders differ between paths)."""
    if dtype == jnp.bfloat16:
        return 0.1
    return 1e-4 if backend == "cpu" else 2e-2   # f32 matmuls may run as TF32 on GPUs


def bench_config(cfg: ViTConfig, batch: int, dtype, *, repeats: int, slots_div: int, path_names, log,
                 bucket_schemes=("default",), progress=None) -> dict:
    """One configuration, every pattern; ``progress(result)`` is called after each pattern (partial JSON)."""
    model = build_model(cfg, dtype)
    gs = nnx.split(model)
    num_slots = max(1, batch // slots_div)
    n = cfg.depth
    x = jax.random.normal(jax.random.key(1), (batch, cfg.image_size, cfg.image_size, cfg.channels), dtype)
    h_embed = jax.jit(lambda gs, x: nnx.merge(*gs).embed(x))(gs, x)
    fns = path_fns(cfg, num_slots, bucket_schemes, batch)
    path_names = list(path_names) + [bucketed_name(k, s) for k in BUCKETED for s in bucket_schemes
                                     if s != "default" and k in path_names]
    tol = logits_tol(dtype, jax.default_backend())
    result = {"name": f"L{n}-D{cfg.d_model}-T{cfg.tokens}-B{batch}", "depth": n, "d_model": cfg.d_model,
              "num_heads": cfg.num_heads, "mlp_dim": cfg.mlp_dim, "patches": cfg.tokens - 1, "tokens": cfg.tokens,
              "batch": batch, "num_slots": num_slots, "num_classes": cfg.num_classes, "dtype": jnp.dtype(dtype).name,
              "logits_tol": tol, "compile_s": {}, "errors": {}, "patterns": {},
              "buckets": {bucketed_name(k, s): list(bucket_list(s, batch) or engine.default_buckets(batch))
                          for k in BUCKETED if k in path_names for s in bucket_schemes}}
    thr0 = jnp.float32(0.0)
    exes, profiles = {}, {}
    h_bytes = h_embed.size * h_embed.dtype.itemsize
    for name in path_names:
        if name == "continuous_triton" and jax.default_backend() != "gpu":
            continue
        try:
            exes[name], result["compile_s"][name], profiles[name] = _compile(name, fns[name], (gs, h_embed, thr0))
        except Exception as err:  # noqa: BLE001  (a path that fails to compile is recorded, not fatal)
            result["errors"][name] = f"{type(err).__name__}: {str(err)[:500]}"
            log(f"  {name}: compile failed: {result['errors'][name][:200]}")
    for pattern in PATTERNS:
        depth_B = target_depths(pattern, n, batch)
        tgt_BxT = jnp.broadcast_to(jnp.asarray(depth_B - 1, h_embed.dtype)[:, None], h_embed.shape[:2])
        h0 = h_embed.at[:, :, -1].set(tgt_BxT)   # the target exit index (exits "all") in channel D-1
        thr = jnp.float32(jnp.inf if pattern == "full" else 0.0)
        mean_depth = float(depth_B.mean())
        entry = {"threshold": float(thr), "mean_depth": mean_depth, "ideal_speedup": n / mean_depth,
                 "depth_histogram": np.bincount(depth_B, minlength=n + 1)[1:].tolist(), "paths": {}}
        outs = {name: exe(gs, h0, thr) for name, exe in exes.items()}
        ref = outs.get("masked")
        for name, (logits, exit_B, aux) in outs.items():
            # None = not compared: static has no exits, and its logits are full-depth ones (compared for ``full``).
            rec = {"exits_match_target": None if name == "static" else
                   bool(np.array_equal(np.asarray(exit_B), depth_B - 1)), "logits_match": None}
            if ref is not None and name != "masked" and (name != "static" or pattern == "full"):
                diff = float(jnp.max(jnp.abs(logits.astype(jnp.float32) - ref[0].astype(jnp.float32))))
                scale = float(jnp.max(jnp.abs(ref[0].astype(jnp.float32))))
                rec["max_abs_logit_diff"], rec["logit_scale"] = diff, scale
                rec["logits_match"] = bool(np.isfinite(diff) and diff <= tol * max(scale, 1.0))
            rec["agree"] = all(v for v in (rec["exits_match_target"], rec["logits_match"]) if v is not None)
            if name.startswith("continuous"):
                rec["steps"] = int(aux)
                rec["slot_utilization"] = float(depth_B.sum() / (int(aux) * num_slots))
            elif name != "static":
                rec["layers_run"] = int(aux)
            # Exit decisions: one per loop step of the continuous path, else one per exit evaluated (exits "all").
            rec.update(program_costs(profiles[name], 0 if name == "static" else int(aux), h_bytes))
            entry["paths"][name] = rec
        timed = _util.time_interleaved({name: (exe, (gs, h0, thr)) for name, exe in exes.items()}, repeats=repeats)
        for name, rec in entry["paths"].items():
            rec.update(timed[name])
        if "static" in entry["paths"]:
            t_static = entry["paths"]["static"]["time_s"]
            for name, rec in entry["paths"].items():
                rec["speedup"] = t_static / rec["time_s"]
                rec["ratio_to_ideal"] = rec["speedup"] / entry["ideal_speedup"]
                if pattern == "full":
                    rec["overhead_vs_static"] = rec["time_s"] / t_static
        result["patterns"][pattern] = entry
        if progress is not None:
            progress(result)
        log(f"  {pattern:9s} ideal {entry['ideal_speedup']:.2f}x  " + "  ".join(
            f"{k} {v['time_s'] * 1e3:.2f}ms ({v.get('speedup', float('nan')):.2f}x{'' if v['agree'] else ' DISAGREE'})"
            for k, v in entry["paths"].items()))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--sizes", choices=sorted(SIZES), default="small")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--widths", help="comma list overriding the preset's widths (e.g. 384)")
    ap.add_argument("--patches", help="comma list of patch counts to keep from the preset (e.g. 64)")
    ap.add_argument("--batches", help="comma list overriding the preset's batch sizes")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list from {PATHS}")
    ap.add_argument("--repeats", type=int, help="timed calls per path (median reported); preset default")
    ap.add_argument("--slots-div", type=int, default=4, help="continuous path: slots = batch // slots_div")
    ap.add_argument("--buckets", default="default", help="comma list of bucket schemes for the cascade and compacted "
                    f"paths: {BUCKET_SCHEMES} or explicit sizes like 128+512 (each scheme is one path per executor)")
    ap.add_argument("--budget-s", type=float, help="stop starting new configurations after this many seconds")
    args = ap.parse_args(argv)

    preset = SIZES[args.sizes]
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    widths = ints(args.widths) if args.widths else preset["widths"]
    batches = ints(args.batches) if args.batches else preset["batches"]
    images = [(i, p) for i, p in preset["images"] if not args.patches or (i // p) ** 2 in ints(args.patches)]
    path_names = [p for p in args.paths.split(",") if p]
    bad = [p for p in path_names if p not in PATHS]
    if bad or not images:
        ap.error(f"unknown paths {bad} (choose from {PATHS})" if bad else f"no preset image has {args.patches=}")
    schemes = [s for s in args.buckets.split(",") if s]
    try:
        for s in schemes:
            for b in batches:
                bucket_list(s, b)
    except ValueError as err:
        ap.error(str(err))
    budget = _util.Budget(args.budget_s)
    dtype = jnp.dtype(args.dtype).type
    repeats = args.repeats or preset["repeats"]
    log = functools.partial(print, flush=True)

    out = {"meta": {**_util.provenance([sys.argv[0]] + argv), "sizes": args.sizes, "dtype": args.dtype,
                    "repeats": repeats, "slots_div": args.slots_div, "patterns": list(PATTERNS),
                    "bucket_schemes": schemes,
                    "timing": "median wall-clock of `repeats` round-robin rounds (one call of every path each) "
                              "after one warm-up round, block_until_ready; the patch embedding is outside the "
                              "timing; static = run_layers + final head",
                    "program_costs": "from the compiled program (eejax.exits.hlo): host_stops of this pattern's "
                                     "forward (data-dependent loop iterations + conditionals), unknown_whiles and "
                                     "conditionals (static counts), big_memory_ops (copies / gathers / scatters / "
                                     "sorts of >= 1/8 of the hidden state's bytes), dot_dtypes (lowered program)"},
           "configs": [], "skipped": []}
    log(f"{out['meta']['backend']} {out['meta']['device_kind']} jax {jax.__version__} dtype {args.dtype}")
    for d in widths:
        for image, patch in images:
            for batch in batches:
                cfg = ViTConfig(image_size=image, channels=3, patch_size=patch, d_model=d, depth=preset["depth"],
                                num_heads=max(1, d // preset["head_dim"]), mlp_dim=4 * d,
                                num_classes=preset["classes"], exits="all", head_types="linear")
                if budget.over():
                    out["skipped"].append(f"D{d}-T{cfg.tokens}-B{batch}")
                    log(f"D={d} T={cfg.tokens} B={batch}: skipped (budget of {args.budget_s:.0f}s spent)")
                    continue
                log(f"D={d} T={cfg.tokens} B={batch}")
                done = list(out["configs"])

                def progress(partial, done=done):
                    _util.write_json(args.out, {**out, "configs": done + [partial]})

                out["configs"].append(bench_config(cfg, batch, dtype, repeats=repeats, slots_div=args.slots_div,
                                                   path_names=path_names, log=log, bucket_schemes=schemes,
                                                   progress=progress))
                _util.write_json(args.out, out)   # partial results survive a time limit
    out["all_agree"] = all(rec["agree"] for c in out["configs"] for p in c["patterns"].values()
                           for rec in p["paths"].values())
    out["errors"] = {c["name"]: c["errors"] for c in out["configs"] if c["errors"]}
    out["elapsed_s"] = budget.elapsed()
    _util.write_json(args.out, out)
    log(f"wrote {args.out}; all paths agree: {out['all_agree']}")
    return 0 if out["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
