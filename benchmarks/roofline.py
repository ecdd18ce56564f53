"""Predicted beside measured: the roofline cost model of ``eejax.exits.costs`` on a GPU run of the suite.

    python benchmarks/roofline.py benchmarks/results/gpu_h200_2026-12-04          # writes cost_model.{md,json} there
    python benchmarks/roofline.py $OUT/suite --fit --out $OUT                       # refit the constants on a new run
    python benchmarks/roofline.py DIR --print                                       # print the table, write nothing

Every row of the run's JSON files that the model can describe becomes counts (layers, heads, cache, FLOPs, kernels,
host stops; ``eejax.exits.costs.decode_work`` / ``vit_layer_work``), its time is predicted on ``costs.H200`` (or on
the constants ``--fit`` finds) and set beside the measured median: predicted, measured, ratio. Rows marked
``calibration`` are the ones the constants are fitted on (least squares on log(predicted / measured), bounded
fractions); the others are held out and show how far the model carries. Host stops come from the row
(``host_stops``, written by the suite since issue 20) or, for the 2026-12-04 run that predates that field, from the
counts issue 20 read off the compiled HLO at commit 20cb676 (``STOPS_20CB676``). Rows the model cannot describe are
listed with the reason. Only numpy, scipy and ``eejax.exits.costs`` are imported (no model is built).

Decode rows are modelled as eejax's decoder ran at commit 20cb676 (``costs.EEJAX_20CB676``: ~40 kernels per layer,
a float32 KV cache read three times per step); a row or run that records another ``cache_dtype`` gets that one. After
the decoder changes (issue 20), update the implementation constants with the run they describe and refit.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run as a script from anywhere

from eejax.exits import costs  # noqa: E402

# Host stops per token (LM) / per forward (ViT) at commit 20cb676, read from the compiled HLO (issue 20, cause 1).
STOPS_20CB676 = {
    "lm forced_exit": 29.0, "lm forced_exit_2exits": 17.0, "lm skipdecode_2x": 7.0,
    "lm speculative per draft token": 17.0,
    "vit masked per exit": 4.0, "vit compacted per segment": 5.0, "vit per forward": 1.0,
    "layer skip per layer run": 1.0,   # ULS / FiRST: the layer count is traced: one loop iteration per layer + 1
    "ffn skip per layer": 1.0,         # FFN-SkipLLM: a cond around every MLP half
}
GPT2 = dict(depth=12, d_model=768, num_heads=12, num_kv_heads=12, mlp_dim=3072, vocab_size=32000, mlp="gelu")
SMOLLM2 = costs.SMOLLM2_135M._asdict()
# cache slots per row of each paper module's gpu preset (prompt + new tokens; benchmarks/papers/*.py at 20cb676)
PAPER_CACHE = {"ULS": 256, "FiRST": 256, "FFN-SkipLLM": 128, "Void-LAC": 128, "CEED-VLA": 128, "kangaroo": 96,
               "specee": 96, "greedy": 128, "LayerSkip": 128, "DEL": 128}


class Row(NamedTuple):
    part: str
    name: str
    measured_s: float
    parts: tuple
    calibration: bool
    unit: str
    note: str = ""


def _stops(rec: dict, default: float) -> float:
    """``host_stops`` of a suite row (issue 20: per token for LM rows, per forward for ViT rows), else ``default``."""
    for src in (rec, rec.get("hlo") or {}):
        if isinstance(src.get("host_stops"), (int, float)):
            return float(src["host_stops"])
    return default


# ------------------------------------------------------------------------------------------------ LM decode


def lm_rows(res: dict) -> tuple[list[Row], list[str]]:
    meta = res["meta"]
    m = meta["model"]
    shape = costs.lm_shape({**GPT2, "depth": m["depth"], "d_model": m["d_model"], "num_heads": m["num_heads"],
                            "num_kv_heads": m["num_heads"], "mlp_dim": meta.get("mlp_dim", 4 * m["d_model"]),
                            "vocab_size": m["vocab"]})
    n, new, exit_after = shape.depth, meta["new"], meta.get("exit_after", 5)
    steps = new - 1                                 # token 0 comes from the prefill (timed apart)
    rows, skipped = [], []
    for b in res.get("batches", []):
        batch = b["batch"]
        for name, rec in b["paths"].items():
            if not rec.get("decode_s") or rec["decode_s"] <= 0:
                continue
            cache = meta["prompt"] + new
            calib, note = True, ""
            if name == "full":
                counts = costs.TokenCounts(layers=n, host_stops=_stops(rec, 0.0))
            elif name in ("forced_exit", "forced_exit_2exits"):
                layers = rec.get("mean_layers_per_token", exit_after)
                heads = layers if name == "forced_exit" else 1.0   # every exit's head on the way / only the exit's
                counts = costs.TokenCounts(layers=layers, heads=heads, kv_fill_layers=n - layers,
                                           host_stops=_stops(rec, STOPS_20CB676[f"lm {name}"]))
            elif name == "skipdecode_2x":
                counts = costs.TokenCounts(layers=rec["mean_layers_per_token"],
                                           host_stops=_stops(rec, STOPS_20CB676["lm skipdecode_2x"]))
            elif name.startswith("speculative_d"):
                e, k = (int(x) for x in name[len("speculative_d"):].split("_k"))
                rounds = rec["rounds_mean"] / steps
                drafts = rounds * k
                counts = costs.TokenCounts(layers=drafts * (e + 1), heads=drafts * (e + 1), verify_passes=rounds,
                                           verify_tokens=k + 1,
                                           host_stops=_stops(rec, drafts * STOPS_20CB676["lm speculative per draft "
                                                                                         "token"]))
                cache, calib = cache + k + 1, False
                note = "held out: draft stops per token are issue 20's rough '~17'"
            else:
                skipped.append(f"lm {name} (batch {batch}): no counts for this path")
                continue
            impl = costs.EEJAX_20CB676._replace(cache_dtype=rec.get("cache_dtype", meta.get("cache_dtype", "float32")))
            parts = costs.decode_work(shape, counts, batch=batch, cache_len=cache, dtype=meta.get("dtype", "bfloat16"),
                                      impl=impl)
            rows.append(Row("lm", f"{name} B={batch}", rec["decode_s"] / steps, parts, calib, "s per token", note))
    return rows, skipped


# ------------------------------------------------------------------------------------------- paper decoders


def paper_rows(res: dict) -> tuple[list[Row], list[str]]:
    shape = costs.lm_shape(SMOLLM2)
    pc = costs.lm_param_counts(shape)
    rows, skipped = [], []
    for r in res.get("rows", []):
        paper = r["paper"].split(" (")[0]
        batch, variant = r["batch"], r["variant"]
        steps = r["tokens_per_s"] * r["seconds"] / batch
        cache = PAPER_CACHE.get(paper, 128)
        label = f"{paper} {variant} B={batch}"
        if variant in ("greedy", "full model"):
            counts = costs.TokenCounts(layers=shape.depth, host_stops=_stops(r, 0.0))
            note = ""
        elif paper in ("ULS", "FiRST") and r.get("layers_run_per_step", r.get("layers_per_token")) is not None:
            layers = float(r.get("layers_run_per_step", r.get("layers_per_token")))
            counts = costs.TokenCounts(layers=layers, host_stops=_stops(r, layers + 1.0))
            note = "stops: one per layer run + 1 (traced layer count)"
        elif paper == "FFN-SkipLLM":
            skipped_frac = float(r.get("ffn_skipped", 0.0))
            # a skipped MLP half saves its weights and about half the layer's kernels
            layers = shape.depth * (1.0 - skipped_frac * pc["mlp"] / pc["layer"])
            counts = costs.TokenCounts(layers=layers, host_stops=_stops(r, shape.depth * 1.0))
            note = "a cond per MLP half: 30 stops"
        else:
            skipped.append(f"{label}: no counts for this mechanism in the run's row (host stops, draft and verify "
                           "calls are not recorded)")
            continue
        impl = costs.EEJAX_20CB676._replace(cache_dtype=r.get("cache_dtype", "float32"))
        parts = costs.decode_work(shape, counts, batch=batch, cache_len=cache, dtype=r.get("dtype", "bfloat16"),
                                  impl=impl)
        rows.append(Row("papers", label, r["seconds"] / steps, parts, True, "s per token", note))
    return rows, skipped


# --------------------------------------------------------------------------------------------------- ViT


def _bucket(active: int, buckets) -> int:
    return 0 if active == 0 else min(s for s in buckets if s >= active)


def vit_rows(res: dict) -> tuple[list[Row], list[str]]:
    rows, skipped = [], []
    for cfg in res.get("configs", []):
        b, t, d, f, h = cfg["batch"], cfg["tokens"], cfg["d_model"], cfg["mlp_dim"], cfg["num_heads"]
        dtype, depth, classes = cfg["dtype"], cfg["depth"], cfg["num_classes"]
        layer = lambda rows_: costs.vit_layer_work(rows_, t, d, f, h, dtype)  # noqa: E731
        head = lambda rows_: costs.linear_head_work(rows_, d, classes, dtype)  # noqa: E731
        for pname, pat in cfg["patterns"].items():
            hist = np.asarray(pat["depth_histogram"])
            deepest = int(np.nonzero(hist)[0].max()) + 1
            for name, rec in pat["paths"].items():
                label = f"{name} {pname}"
                if name == "static":
                    parts, calib, note = (layer(b).times(depth), head(b)), True, ""
                elif name == "masked":
                    exits = deepest
                    stops = _stops(rec, STOPS_20CB676["vit masked per exit"] * exits + 1)
                    parts = (layer(b).times(rec.get("layers_run", deepest)), head(b).times(exits),
                             costs.Work(host_stops=stops))
                    calib, note = True, ""
                elif name.startswith("compacted"):
                    buckets = cfg.get("buckets", {}).get(name)
                    if not buckets:
                        skipped.append(f"vit {label}: bucket list not recorded")
                        continue
                    active = [int(hist[l:].sum()) for l in range(deepest)]   # rows still running at layer l
                    sizes = [_bucket(a, sorted(set(buckets) | {b})) for a in active]
                    stops = _stops(rec, STOPS_20CB676["vit compacted per segment"] * deepest + 1)
                    parts = tuple(layer(s) for s in sizes) + tuple(head(s) for s in sizes) + (
                        costs.Work(host_stops=stops),)
                    calib = False
                    note = "held out: the per-segment argsort, gathers, scatters and carry copies are not counted"
                else:
                    skipped.append(f"vit {label}: no counts for this path")
                    continue
                rows.append(Row("vit", label, rec["time_s"], parts, calib, "s per forward", note))
    return rows, skipped


# ---------------------------------------------------------------------------------------------- training


def train_rows(res: dict) -> tuple[list[Row], list[str]]:
    meta, rows, skipped = res["meta"], [], []
    fwd = meta["forward_flops_per_image"] * meta["batch"]
    for name, c in res.get("candidates", {}).items():
        if not c.get("steps_per_s"):
            continue
        passes = 4.0 if c.get("remat") else 3.0     # forward + backward (2x), + a recomputed forward with remat
        dtype = "float32" if c["dtype"] in ("float32", "f32") else "bfloat16"
        parts = (costs.Work(flops=passes * fwd, dtype=dtype, name="train step"),)
        rows.append(Row("train", name, 1.0 / c["steps_per_s"], parts, False, "s per step",
                        "held out: FLOPs only (activation traffic not counted)"))
    for name, err in res.get("errors", {}).items():
        skipped.append(f"train {name}: failed in the run ({str(err)[:60]})")
    return rows, skipped


# ------------------------------------------------------------------------------------------ fit and table

READERS = (("vit_paths.json", vit_rows), ("lm_decode.json", lm_rows), ("lm_papers_longer_budget.json", paper_rows),
           ("train_throughput.json", train_rows))


def load_rows(folder: pathlib.Path) -> tuple[list[Row], list[str]]:
    rows, skipped = [], []
    readers = list(READERS)
    if not (folder / "lm_papers_longer_budget.json").exists():
        readers[2] = ("lm_papers.json", paper_rows)
    for fname, reader in readers:
        path = folder / fname
        if not path.exists():
            skipped.append(f"{fname}: not in the folder")
            continue
        r, s = reader(json.loads(path.read_text()))
        rows += r
        skipped += s
    return rows, skipped


def fit(rows: list[Row], base: costs.Device = costs.H200_SPEC) -> costs.Device:
    """The four constants minimising the squared log ratio over the calibration rows (bounded: fractions in
    [0.02, 1], launch in [0, 20] us, stop in [0, 200] us), from several starts."""
    from scipy.optimize import least_squares   # noqa: PLC0415

    cal = [r for r in rows if r.calibration]
    if len(cal) < 4:
        raise ValueError(f"need >= 4 calibration rows to fit 4 constants, got {len(cal)}")
    meas = np.log([r.measured_s for r in cal])

    def dev(x):
        return base.calibrated(bandwidth_frac=float(x[0]), compute_frac=float(x[1]), launch_s=float(x[2]) * 1e-6,
                               stop_s=float(x[3]) * 1e-6)

    def resid(x):
        d = dev(x)
        return np.log([costs.predict(r.parts, d).time_s for r in cal]) - meas

    best = None
    for x0 in ((0.5, 0.3, 1.0, 15.0), (0.9, 0.5, 0.5, 5.0), (0.2, 0.1, 3.0, 30.0)):
        sol = least_squares(resid, x0, bounds=([0.02, 0.02, 0.0, 0.0], [1.0, 1.0, 20.0, 200.0]))
        if best is None or sol.cost < best.cost:
            best = sol
    return dev(best.x)


def table(rows: list[Row], device: costs.Device) -> list[dict]:
    out = []
    for r in rows:
        p = costs.predict(r.parts, device)
        out.append({"part": r.part, "row": r.name, "unit": r.unit, "predicted_s": p.time_s, "measured_s": r.measured_s,
                    "ratio": p.time_s / r.measured_s, "bound": p.bound, "calibration": r.calibration,
                    "flops": p.flops, "bytes": p.bytes, "kernels": p.kernels, "host_stops": p.host_stops,
                    "note": r.note})
    return out


def errors(tab: list[dict]) -> dict:
    """Geometric-mean factor and worst factor of predicted / measured, over calibration and held-out rows."""
    out = {}
    for key, sel in (("calibration", [t for t in tab if t["calibration"]]),
                     ("held_out", [t for t in tab if not t["calibration"]])):
        logs = np.abs(np.log([t["ratio"] for t in sel])) if sel else np.zeros(0)
        out[key] = {"rows": len(sel), "rms_factor": float(np.exp(np.sqrt(np.mean(logs ** 2)))) if sel else None,
                    "worst_factor": float(np.exp(logs.max())) if sel else None}
    return out


def _us(s: float) -> str:
    return f"{s * 1e6:,.0f}" if s < 1e-3 else f"{s * 1e3:,.2f} ms"


def markdown(tab: list[dict], device: costs.Device, err: dict, skipped: list[str], folder: pathlib.Path) -> str:
    consts = (f"bandwidth_frac {device.bandwidth_frac:.3f}, compute_frac {device.compute_frac:.3f}, launch "
              f"{device.launch_s * 1e6:.2f} us per kernel, host stop {device.stop_s * 1e6:.1f} us")
    md = [f"# Roofline cost model beside the measured run: {folder.name}", "",
          f"Cost model (roofline, {device.name}): `eejax.exits.costs`, constants {consts} (spec sheet: HBM "
          f"{device.hbm_bytes_per_s / 1e12:.1f} TB/s, bf16 {device.peak_flops['bfloat16'] / 1e12:.0f} TFLOP/s). "
          "Written by `python benchmarks/roofline.py " + str(folder) + "` from the run's JSON files; predicted "
          "times are model outputs, measured ones the run's medians. Units: seconds per decode step (LM, paper "
          "decoders), per forward (ViT), per training step. ratio = predicted / measured; `cal` marks the rows the "
          "constants were fitted on, the others are held out.", "",
          f"Error (factor, exp of the RMS / largest |log ratio|): calibration rows "
          f"{err['calibration']['rms_factor']:.3f} RMS, {err['calibration']['worst_factor']:.3f} worst "
          f"({err['calibration']['rows']} rows); held-out rows "
          + (f"{err['held_out']['rms_factor']:.3f} RMS, {err['held_out']['worst_factor']:.3f} worst "
             f"({err['held_out']['rows']} rows)." if err["held_out"]["rows"] else "none."), "",
          "| part | row | predicted | measured | ratio | bound | kernels | host stops | cal | note |",
          "|---|---|---:|---:|---:|---|---:|---:|---|---|"]
    for t in tab:
        md.append(f"| {t['part']} | {t['row']} | {_us(t['predicted_s'])} | {_us(t['measured_s'])} | "
                  f"{t['ratio']:.2f} | {t['bound']} | {t['kernels']:,.0f} | {t['host_stops']:.1f} | "
                  f"{'yes' if t['calibration'] else ''} | {t['note']} |")
    bad = [t for t in tab if abs(math.log(t["ratio"])) > math.log(1.15)]
    md += ["", "Times without a unit are microseconds.", "",
           f"Rows off by more than 15 % ({len(bad)} of {len(tab)}): "
           + ("; ".join(f"{t['row']} ({t['part']}) {t['ratio']:.2f}" for t in bad) if bad else "none") + ".",
           "", "Not modelled:", ""] + [f"- {s}" for s in skipped]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a GPU run's folder (the suite's JSON files)")
    ap.add_argument("--fit", action="store_true", help="refit the four constants on this run's calibration rows")
    ap.add_argument("--out", help="folder for cost_model.{md,json} (default: the run's folder)")
    ap.add_argument("--print", action="store_true", help="print the table, write nothing")
    args = ap.parse_args(argv)
    folder = pathlib.Path(args.folder)
    if not folder.is_dir():
        print(f"error: {folder}: no such folder; hint: pass the folder of a GPU run's JSON files", file=sys.stderr)
        return 2
    rows, skipped = load_rows(folder)
    if not rows:
        print(f"error: {folder}: no row the model can describe; hint: run benchmarks/run_all.py first",
              file=sys.stderr)
        return 2
    device = fit(rows) if args.fit else costs.H200
    if args.fit:
        device = device.calibrated(name=f"H200 (fitted on {folder.name})", source="benchmarks/roofline.py --fit")
    tab = table(rows, device)
    err = errors(tab)
    md = markdown(tab, device, err, skipped, folder)
    print(md)
    if not args.print:
        out = pathlib.Path(args.out) if args.out else folder
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost_model.md").write_text(md)
        (out / "cost_model.json").write_text(json.dumps(
            {"device": {k: v for k, v in device._asdict().items()}, "errors": err, "rows": tab,
             "not_modelled": skipped, "command": "python benchmarks/roofline.py " + " ".join(argv or sys.argv[1:])},
            indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
