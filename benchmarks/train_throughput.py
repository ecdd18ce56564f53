"""Training throughput of a multi-exit ViT (steps/s, images/s, MFU) for candidate settings side by side; writes JSON.

    python benchmarks/train_throughput.py --sizes gpu --out $OUT/train_throughput.json [--peak-tflops 989]
    python benchmarks/train_throughput.py --sizes small --out /tmp/train_cpu.json       # CPU sanity run

Model: ``eejax.models.vit.ViT`` with an exit after every layer (linear heads), trained with the multi-exit
cross-entropy (``losses.multi_exit_ce``, uniform weights) and AdamW (``optax.adamw``), one pure jitted step
``(params, opt_state, images, labels) -> (params, opt_state, loss)`` with donated state, on random images and
labels. ``gpu`` is the ViT-B/16 shape (224 px, 16 px patches: 197 tokens, 12 layers, D=768, 12 heads, MLP 3072,
1000 classes) at batch 128.

Candidates (timed in the same run, round-robin), ``dtype:remat:attention[:options]``:

* compute dtype: ``float32``; ``bfloat16`` = bf16 compute over float32 parameters and optimizer state (the
  modules' ``dtype``);
* remat policy of each layer (``ViT.all_exits(remat=...)``, ``engine.remat_policy``): ``none`` (or ``0``),
  ``full`` (or ``1``), ``dots_saveable`` (keep the projection GEMM outputs, recompute the rest);
* attention kind (``eejax.nn.layers.SelfAttention(attention=...)``): ``einsum``, ``dot_product`` =
  ``jax.nn.dot_product_attention`` with jax's choice, ``cudnn`` = its cuDNN flash kernel (GPU and bf16 only; at
  odd T, 197 here, training runs it padded to an even length and masked by sequence lengths), ``auto``;
* options, ``+``-joined: ``bf16res`` = a bf16 residual stream (``all_exits(residual_dtype=bfloat16)``),
  ``hidden`` = the scan stacks every layer's B x T x D hidden state (``readout="hidden"``) instead of the
  CLS token and token mean the linear heads read (the default since issue 20).

Before timing, every candidate's first loss (the warm-up step's, at the initial parameters) must equal the
reference loss, float32 einsum attention without remat, forward only, within a dtype tolerance (same parameters
and batch). Each candidate also records the compiled step's temporary memory (``memory_analysis``).

MFU = model FLOPs per step / step time / peak FLOP/s. Model FLOPs = 3 x the forward FLOPs of ``eejax.models.vit.flops``
(all exit heads, matmuls only, 2 FLOPs per multiply-add; the backward counted as twice the forward, remat not
counted). ``--peak-tflops`` (default 989: H100 SXM dense bf16) is the peak of the device; on CPU MFU is recorded as
``null`` (``mfu_meaningful: false``).
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run as a script from anywhere
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _util  # noqa: E402

from eejax import runtime  # noqa: E402
from eejax.exits import engine, losses  # noqa: E402
from eejax.models import vit as vit_lib  # noqa: E402
from eejax.nn.layers import ATTENTION_KINDS, SelfAttention  # noqa: E402

SIZES = {
    "tiny": dict(image=16, patch=4, d_model=32, depth=2, num_heads=2, classes=10, batch=4, steps=2, rounds=2),
    "small": dict(image=32, patch=8, d_model=64, depth=4, num_heads=4, classes=10, batch=16, steps=3, rounds=3),
    "gpu": dict(image=224, patch=16, d_model=768, depth=12, num_heads=12, classes=1000, batch=128, steps=5,
                rounds=3),
}
OPTIONS = ("bf16res", "hidden")
# (dtype, remat policy, attention, options), most informative first: a spent budget drops the tail. The first is
# the H200 run's best (1,925 img/s, 20.5% MFU); "hidden" and the no-remat einsum repeat that run's settings.
CANDIDATES = (("bfloat16", "full", "einsum", ()), ("bfloat16", "dots_saveable", "cudnn", ()),
              ("bfloat16", "full", "cudnn", ()), ("bfloat16", "dots_saveable", "einsum", ()),
              ("bfloat16", "dots_saveable", "cudnn", ("bf16res",)), ("bfloat16", "none", "cudnn", ()),
              ("bfloat16", "full", "einsum", ("hidden",)), ("bfloat16", "none", "einsum", ()),
              ("float32", "none", "einsum", ()))
REMAT_TAGS = {"none": "noremat", "full": "remat", "dots_saveable": "remat_dots"}


def cand_name(dtype: str, remat: str, attention: str, options=()) -> str:
    """``bf16-cudnn-remat_dots-bf16res``; the three-part names of earlier runs are kept for their settings."""
    return "-".join([{"bfloat16": "bf16", "float32": "f32"}[dtype], attention, REMAT_TAGS[remat]]
                    + [{"bf16res": "bf16res", "hidden": "hiddenstack"}[o] for o in options])


def parse_candidates(spec: str) -> tuple:
    """``dtype:remat:attention[:opt+opt]`` comma list -> candidate tuples; ValueError naming the bad one."""
    cands = []
    for c in spec.split(","):
        parts = c.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"candidate {c!r}: give dtype:remat:attention[:options]")
        dtype, remat, attention = parts[:3]
        options = tuple(o for o in (parts[3].split("+") if len(parts) == 4 else ()) if o)
        remat = {"0": "none", "1": "full"}.get(remat, remat)
        if dtype not in ("float32", "bfloat16") or remat not in engine.REMAT_POLICIES \
                or attention not in ATTENTION_KINDS or any(o not in OPTIONS for o in options):
            raise ValueError(f"candidate {c!r}: dtype float32|bfloat16, remat 0|1|{'|'.join(engine.REMAT_POLICIES)}, "
                             f"attention one of {ATTENTION_KINDS}, options from {OPTIONS} joined by '+'")
        cands.append((dtype, remat, attention, options))
    return tuple(cands)


def make_cfg(p: dict) -> vit_lib.ViTConfig:
    return vit_lib.ViTConfig(image_size=p["image"], channels=3, patch_size=p["patch"], d_model=p["d_model"],
                             depth=p["depth"], num_heads=p["num_heads"], mlp_dim=4 * p["d_model"],
                             num_classes=p["classes"], exits="all", head_types="linear")


def build_model(cfg: vit_lib.ViTConfig, dtype, attention: str):
    """``(graphdef, params)``: float32 parameters, every module computing in ``dtype``, attention of that kind."""
    model = vit_lib.ViT(cfg, rngs=nnx.Rngs(0))
    for _, node in nnx.iter_graph(model):
        if isinstance(node, SelfAttention):
            node.attention = attention
        if isinstance(node, nnx.Module) and hasattr(node, "dtype") and dtype != jnp.float32:
            node.dtype = dtype
    return nnx.split(model)


def make_step(graphdef, cfg: vit_lib.ViTConfig, tx, remat: bool | str, options=()):
    weights_E = losses.exit_weights(cfg.exit_layers, "uniform")
    kw = dict(remat=remat, readout="hidden" if "hidden" in options else "auto",
              residual_dtype=jnp.bfloat16 if "bf16res" in options else None)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params).all_exits(x, **kw).logits_ExBxC
        return losses.multi_exit_ce(logits, y, weights_E)[0]

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, loss_fn


def _temp_bytes(exe) -> int | None:
    """The compiled step's temporary memory (activations kept for the backward pass, workspace), if reported."""
    try:
        return int(exe.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runtime.configure_xla()   # before the backend starts (importing eejax did it too; the call is idempotent)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--sizes", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, help="override the preset's batch size")
    ap.add_argument("--candidates", help="comma list of dtype:remat:attention[:options], e.g. "
                    "bfloat16:dots_saveable:cudnn:bf16res,float32:0:einsum (see the module docstring)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak FLOP/s of the device, in TFLOP/s")
    ap.add_argument("--steps", type=int, help="steps per timed round (preset default)")
    ap.add_argument("--rounds", type=int, help="timed rounds per candidate, round-robin (preset default)")
    ap.add_argument("--budget-s", type=float, help="stop compiling new candidates after this many seconds")
    args = ap.parse_args(argv)

    p = dict(SIZES[args.sizes])
    if args.batch:
        p["batch"] = args.batch
    cands = CANDIDATES
    if args.candidates:
        try:
            cands = parse_candidates(args.candidates)
        except ValueError as err:
            ap.error(str(err))
    if args.peak_tflops <= 0:
        ap.error(f"--peak-tflops {args.peak_tflops} must be > 0")
    steps, rounds = args.steps or p["steps"], args.rounds or p["rounds"]
    budget = _util.Budget(args.budget_s)
    log = functools.partial(print, flush=True)
    backend = jax.default_backend()
    warnings.filterwarnings("ignore", message=".*donated buffers.*")   # CPU cannot donate; harmless

    cfg = make_cfg(p)
    fwd_flops = float(vit_lib.flops(cfg).cum_flops_E[-1])   # per image, every exit head evaluated
    step_flops = 3.0 * fwd_flops * p["batch"]
    tx = optax.adamw(1e-4, weight_decay=0.05)
    x = jax.random.normal(jax.random.key(1), (p["batch"], cfg.image_size, cfg.image_size, 3), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (p["batch"],), 0, cfg.num_classes, jnp.int32)
    out = {"meta": {**_util.provenance([sys.argv[0]] + argv), "sizes": args.sizes, "batch": p["batch"],
                    "steps_per_round": steps, "rounds": rounds, "peak_tflops": args.peak_tflops,
                    "mfu_meaningful": backend != "cpu", "command_buffers": runtime.command_buffer_setting(),
                    "model": {"image": cfg.image_size, "patch": cfg.patch_size, "tokens": cfg.tokens,
                              "d_model": cfg.d_model, "depth": cfg.depth, "num_heads": cfg.num_heads,
                              "mlp_dim": cfg.mlp_dim, "classes": cfg.num_classes, "exits": len(cfg.exit_layers)},
                    "forward_flops_per_image": fwd_flops, "model_flops_per_step": step_flops,
                    "timing": "per round: `steps` jitted steps back to back, block_until_ready at the end; "
                              "candidates round-robin; median over rounds"},
           "candidates": {}, "skipped": {}, "errors": {}}
    log(f"{backend} {out['meta']['device_kind']} jax {jax.__version__}  ViT D={cfg.d_model} T={cfg.tokens} "
        f"B={p['batch']}  {step_flops / 1e12:.3f} TFLOP/step")

    # The reference loss: float32, einsum attention, no remat, forward only, at the initial parameters.
    graphdef, params = build_model(cfg, jnp.float32, "einsum")
    _, ref_loss_fn = make_step(graphdef, cfg, tx, "none")
    ref_loss = float(jax.jit(ref_loss_fn)(params, x, y))
    out["reference"], out["reference_loss"] = "f32-einsum-noremat forward", ref_loss
    log(f"  reference (f32 einsum, forward): loss {ref_loss:.4f}")

    live = {}
    for dtype_name, remat, attention, options in cands:
        name = cand_name(dtype_name, remat, attention, options)
        if attention == "cudnn" and (backend != "gpu" or dtype_name != "bfloat16"):
            out["skipped"][name] = "cudnn attention needs a GPU and bf16"
            continue
        if budget.over():
            out["skipped"][name] = f"budget of {args.budget_s:.0f}s spent"
            continue
        dtype = jnp.dtype(dtype_name).type
        graphdef, params = build_model(cfg, dtype, attention)
        step, _ = make_step(graphdef, cfg, tx, remat, options)
        opt_state = tx.init(params)
        try:
            t0 = time.perf_counter()
            exe = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y).compile()
            compile_s = time.perf_counter() - t0
            temp_bytes = _temp_bytes(exe)
            # Warm-up step; its loss is the loss at the initial parameters (the same for every candidate).
            params, opt_state, loss = exe(params, opt_state, x, y)
            loss0 = float(loss)
        except Exception as err:  # noqa: BLE001  (a candidate that fails to compile or run is recorded, not fatal)
            out["errors"][name] = f"{type(err).__name__}: {str(err)[:500]}"
            log(f"  {name}: failed: {out['errors'][name][:200]}")
            continue
        live[name] = {"exe": exe, "state": (params, opt_state), "last_loss": loss0}
        out["candidates"][name] = {"dtype": dtype_name, "remat": remat != "none", "remat_policy": remat,
                                   "attention": attention, "residual": "bfloat16" if "bf16res" in options else
                                   "compute", "readout": "hidden" if "hidden" in options else "auto",
                                   "compile_s": compile_s, "temp_bytes": temp_bytes, "first_loss": loss0}
        log(f"  {name}: compiled in {compile_s:.1f}s, first loss {loss0:.4f}"
            + (f", temp {temp_bytes / 2**30:.2f} GiB" if temp_bytes is not None else ""))
        _util.write_json(args.out, out)

    # Rounds of `steps` steps per candidate, round-robin (the compile step above was the warm-up).
    times = {name: [] for name in live}
    for _ in range(rounds):
        for name, c in live.items():
            params, opt_state = c["state"]
            t0 = time.perf_counter()
            for _ in range(steps):
                params, opt_state, loss = c["exe"](params, opt_state, x, y)
            jax.block_until_ready((params, loss))
            times[name].append((time.perf_counter() - t0) / steps)
            c["state"], c["last_loss"] = (params, opt_state), float(loss)
    for name, rec in out["candidates"].items():
        t = statistics.median(times[name])
        tol = 1e-4 if rec["dtype"] == "float32" else 5e-2
        rec.update(step_s=t, step_times_s=times[name], steps_per_s=1 / t, images_per_s=p["batch"] / t,
                   achieved_tflops=step_flops / t / 1e12,
                   mfu=(step_flops / t / (args.peak_tflops * 1e12)) if backend != "cpu" else None,
                   last_loss=live[name]["last_loss"], loss_tol=tol,
                   agree=bool(np.isfinite(rec["first_loss"]) and abs(rec["first_loss"] - ref_loss) <= tol * max(
                       1.0, abs(ref_loss))))
        log(f"  {name}: {rec['images_per_s']:.1f} img/s, {rec['achieved_tflops']:.2f} TFLOP/s"
            + (f", MFU {100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else " (MFU not meaningful on CPU)")
            + ("" if rec["agree"] else "  LOSS DISAGREES"))
    if out["candidates"]:
        best = max(out["candidates"], key=lambda k: out["candidates"][k]["images_per_s"])
        out["best"] = best
    out["all_agree"] = all(rec["agree"] for rec in out["candidates"].values())
    out["elapsed_s"] = budget.elapsed()
    _util.write_json(args.out, out)
    log(f"wrote {args.out}; all candidates agree: {out['all_agree']}")
    return 0 if out["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
