"""Every benchmark's preset in one call, within a time budget; one summary JSON + markdown table of the winners.

    python3 benchmarks/run_all.py --out $OUT                  # GPU: the whole suite in under 8 minutes
    python benchmarks/run_all.py --out /tmp/suite --sizes tiny   # CPU: the same pipeline on tiny models (tests)
    python benchmarks/run_all.py --summarize $OUT               # rebuild summary.{json,md} from the JSON files

Parts, in order, each a subprocess (a crash or a time-out of one part costs only that part; partial JSON is kept):

1. ``vit``: ``vit_paths.py`` on one ViT-S-shape configuration (12 layers, D=384, 65 tokens, batch 1024, bf16;
   the issue's table), paths static / masked / bucket cascade and compacted, each under two bucket lists (default,
   eighths) / gated kernel;
2. ``lm``: ``lm_decode.py``, GPT-2-small shape in bf16, batches 1/8/32/128, every decoding path;
3. ``papers``: ``lm_papers.py``, every paper's decoder in ``benchmarks/papers/`` (self-speculative variants, layer
   skipping, Jacobi decoding) on a SmolLM2-135M-shaped model in bf16, each beside plain greedy decoding;
4. ``train``: ``train_throughput.py``, ViT-B/16 size, batch 128, dtype x remat x attention candidates;
5. ``vit_cmdbuf``, ``lm_cmdbuf`` (``--sizes gpu`` only, unless named in ``--parts``): parts 1 and 2 again in a
   subprocess with ``EEJAX_COMMAND_BUFFERS=1`` (XLA command buffers for WHILE and CONDITIONAL, ``eejax.runtime``; the flag must
   be set before jax starts, hence the second process), LM at batches 1 and 32 only; the summary sets every path
   with command buffers on beside the same path with them off;
6. ``gated_kernel``: ``gated_kernel.py``, the Pallas gated MLP step against XLA's dense MLP at D = 384 / 576 / 768
   (on every ``--sizes``), one verdict per width.

Budget: ``--budget-s`` (default 450 s) is split by each part's share (``PARTS``); time a part leaves unused passes
to the next. A part stops starting new units (configurations, batches, candidates) after 75 % of its share and is
killed at 125 % of it (never past the total); its JSON is written after every unit, so a killed part keeps what it
finished. The command-buffer parts come last and get what is left. ``--part-args vit:"--paths static,cascade"``
appends arguments to a part's preset (a later ``--paths`` wins), so new variants run without editing this file.
Only the standard library is imported here, and the benchmarks import no tensorflow-datasets or grain (absent on
the GPU machine).

The summary answers, for each question, which candidate won in this run: each bucketed executor's bucket list,
the best exit executor, kernel vs XLA for the gated MLP (``gated_kernel`` vs ``masked``), the attention kind, remat,
the dtype, the speculative draft, fewer LM exits, command buffers; it shows every row's ``host_stops`` (issue 20:
per forward for ViT paths, per token for LM paths) where the row has one, the training candidates side by side by
every configuration field that differs between them, and each goal of issues 12 and 20 with the measured value.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import NamedTuple

HERE = pathlib.Path(__file__).resolve().parent


class Part(NamedTuple):
    script: str
    out: str
    share: float              # of the total budget
    presets: dict             # --sizes -> arguments
    env: dict | None = None   # added to the environment of its subprocess
    base: str | None = None   # the part this one reruns under ``env`` (a variant)


# XLA command buffers (CUDA graphs) including WHILE and CONDITIONAL, whose absence makes every data-dependent loop
# iteration and conditional a host round trip on GPU (issue 20, cause 1). The variant parts switch them on the way a
# user would, through eejax's own switch (``eejax.runtime``: XLA's default set plus WHILE and CONDITIONAL), so the
# measured setting is the one eejax would ship.
CMDBUF_ENV = {"EEJAX_COMMAND_BUFFERS": "1"}
CMDBUF_FLAGS = "EEJAX_COMMAND_BUFFERS=1 (--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL)"
VIT_PRESETS = {
    "gpu": ["--sizes", "gpu", "--dtype", "bfloat16", "--widths", "384", "--patches", "64", "--batches", "1024",
            "--paths", "static,masked,cascade,compacted,gated_kernel", "--buckets", "default,eighths",
            "--repeats", "5"],
    "small": ["--sizes", "small", "--paths", "static,masked,cascade,compacted,gated_kernel",
              "--buckets", "default,eighths"],
    "tiny": ["--sizes", "tiny", "--paths", "static,masked,cascade,compacted,gated_kernel,continuous",
             "--buckets", "default,eighths"],
}
LM_PRESETS = {
    "gpu": ["--sizes", "gpu", "--dtype", "bfloat16"],
    "small": ["--sizes", "small"],
    "tiny": ["--sizes", "tiny", "--batches", "2"],
}
PARTS = {
    "vit": Part("vit_paths.py", "vit_paths.json", 0.17, VIT_PRESETS),
    "lm": Part("lm_decode.py", "lm_decode.json", 0.22, LM_PRESETS),
    "papers": Part("lm_papers.py", "lm_papers.json", 0.19, {
        "gpu": ["--sizes", "gpu"],
        "small": ["--sizes", "small"],
        "tiny": ["--sizes", "tiny"],
    }),
    "train": Part("train_throughput.py", "train_throughput.json", 0.15, {
        "gpu": ["--sizes", "gpu"],
        "small": ["--sizes", "small"],
        "tiny": ["--sizes", "tiny", "--candidates", "bfloat16:0:einsum,bfloat16:0:dot_product,bfloat16:1:einsum",
                 "--rounds", "1"],
    }),
    # The Pallas gated MLP step against XLA's dense MLP (eejax.kernels.gated_step; off every default path unless it wins).
    "gated_kernel": Part("gated_kernel.py", "gated_kernel.json", 0.05, {
        "gpu": ["--sizes", "gpu"],
        "small": ["--sizes", "tiny"],
        "tiny": ["--sizes", "tiny", "--widths", "48", "--repeats", "1"],
    }),
    "vit_cmdbuf": Part("vit_paths.py", "vit_paths_cmdbuf.json", 0.08, VIT_PRESETS, CMDBUF_ENV, "vit"),
    "lm_cmdbuf": Part("lm_decode.py", "lm_decode_cmdbuf.json", 0.14,
                      {k: v + (["--batches", "1,32"] if k == "gpu" else []) for k, v in LM_PRESETS.items()},
                      CMDBUF_ENV, "lm"),
}
MAIN_PARTS = ("vit", "lm", "papers", "train")
EXTRA_PARTS = ("gated_kernel",)   # run on every --sizes; summarized after the main parts
GRACE = 1.25   # hard limit of a part = its share x GRACE (within what is left of the total)
SOFT = 0.75    # a part stops starting new units (configurations, batches, candidates) after SOFT x its share
MIN_PART_S = 30.0   # a part is not started with less than this left of the total


def log(msg: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def default_parts(sizes: str) -> list[str]:
    """Every part on ``gpu`` sizes; the command-buffer variants only there (on CPU the flag changes nothing)."""
    return list(PARTS) if sizes == "gpu" else list(MAIN_PARTS + EXTRA_PARTS)


def run_parts(out_dir: pathlib.Path, sizes: str, budget_s: float, parts, extra: dict[str, list[str]]) -> dict:
    t_start = time.perf_counter()
    status, carry = {}, 0.0
    for name in parts:
        part = PARTS[name]
        left = budget_s - (time.perf_counter() - t_start)
        if left < MIN_PART_S:
            status[name] = {"returncode": "skipped", "seconds": 0.0, "soft_budget_s": 0.0, "json": None,
                            "why": f"{left:.0f}s of the budget left (< {MIN_PART_S:.0f}s)"}
            log(f"{name}: skipped, {left:.0f}s of the budget left")
            continue
        soft = min(part.share * budget_s + carry, left)
        hard = max(MIN_PART_S, min(soft * GRACE, left))
        cmd = [sys.executable, str(HERE / part.script), *part.presets[sizes], *extra.get(name, []),
               "--out", str(out_dir / part.out), "--budget-s", f"{SOFT * soft:.0f}"]
        env = dict(os.environ)
        for key, value in (part.env or {}).items():
            env[key] = (env.get(key, "") + " " + value).strip() if key == "XLA_FLAGS" else value
        log(f"{name}: soft budget {soft:.0f}s, hard limit {hard:.0f}s: "
            + (" ".join(f"{k}={v!r}" for k, v in (part.env or {}).items()) + " " if part.env else "")
            + " ".join(cmd[1:]))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=hard, stdout=sys.stdout, stderr=subprocess.STDOUT, env=env)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        took = time.perf_counter() - t0
        carry = max(0.0, soft - took)
        status[name] = {"returncode": rc, "seconds": round(took, 1), "soft_budget_s": round(soft, 1),
                        "json": part.out if (out_dir / part.out).exists() else None, "env": part.env}
        log(f"{name}: finished ({rc}) in {took:.0f}s; total {time.perf_counter() - t_start:.0f}s of {budget_s:.0f}s")
    return status


# ------------------------------------------------------------------------------------------------- summary


def _load(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _gmean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _f(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def host_stops(rec: dict | None):
    """A row's host stops (issue 20: per forward for ViT paths, per token for LM paths), or None: the row's own
    ``host_stops`` or that of its ``hlo`` record (``eejax.exits.hlo.HloProfile.summary``)."""
    for src in (rec or {}, (rec or {}).get("hlo") or {}):
        v = src.get("host_stops")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _stops_cell(values) -> str:
    vals = sorted({round(v, 1) for v in values if v is not None})
    if not vals:
        return "-"
    return f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}-{vals[-1]:g}"


def vit_summary(res: dict) -> tuple[dict, list[str], dict]:
    """Winners, a markdown table and the host stops per path from a vit_paths JSON (every configuration in it)."""
    win, md, stops = {}, [], {}
    for cfg in res.get("configs", []):
        pats = cfg["patterns"]
        names = list(dict.fromkeys(n for pat in pats.values() for n in pat["paths"]))
        md += [f"**{cfg['name']} {cfg['dtype']}** (speed-up over static; in brackets realized/ideal; `full`: "
               "time / static; last row: host stops per forward, where the rows record them)", "",
               "| pattern (ideal) | static ms | " + " | ".join(n for n in names if n != "static") + " |",
               "|---|---:|" + "---:|" * (len(names) - 1)]
        for pname, pat in pats.items():
            cells = []
            for n in names:
                if n == "static":
                    continue
                rec = pat["paths"].get(n, {})
                if pname == "full":
                    cells.append(_f(rec.get("overhead_vs_static"), ".3f"))
                else:
                    cells.append(f"{_f(rec.get('speedup'))} ({_f(rec.get('ratio_to_ideal'))})")
                if rec.get("agree") is False:
                    cells[-1] += " DISAGREE"
            static_ms = pat["paths"].get("static", {}).get("time_s")
            md.append(f"| {pname} ({pat['ideal_speedup']:.2f}x) | {_f(static_ms and static_ms * 1e3)} | "
                      + " | ".join(cells) + " |")
        per_path = {n: [host_stops(pat["paths"].get(n)) for pat in pats.values()] for n in names}
        if any(v is not None for vs in per_path.values() for v in vs):
            md.append("| host stops / forward | " + " | ".join(_stops_cell(per_path[n]) for n in names) + " |")
            stops.update({f"vit {cfg['name']}: {n}": _stops_cell(per_path[n]) for n in names})
        for n, err in (cfg.get("errors") or {}).items():
            md.append(f"\n`{n}`: failed: {str(err).strip().splitlines()[-1][:160]}")
        md.append("")
        exit_pats = [p for p in pats if p != "full"]
        for executor in ("cascade", "compacted"):   # the bucketed executors: which bucket list won, per executor
            bucketed = [n for n in names if n == executor or n.startswith(executor + "_")]
            if bucketed:
                score = {n: _gmean([pats[p]["paths"].get(n, {}).get("speedup") for p in exit_pats]) for n in bucketed}
                best = max(score, key=lambda n: score[n] or 0)
                win[f"{cfg['name']}: {executor} bucket list"] = {
                    "winner": best, "buckets": cfg.get("buckets", {}).get(best),
                    "geomean_speedup_over_exit_patterns": {n: score[n] for n in bucketed}}
        dynamic = [n for n in names if n != "static"]
        if len(dynamic) > 1:
            score = {n: _gmean([pats[p]["paths"].get(n, {}).get("speedup") for p in exit_pats]) for n in dynamic}
            win[f"{cfg['name']}: best exit executor"] = {"winner": max(score, key=lambda n: score[n] or 0),
                                                         "geomean_speedup_over_exit_patterns": score}
        if "gated_kernel" in names and "masked" in names:
            ratio = _gmean([pats[p]["paths"]["masked"]["time_s"] / pats[p]["paths"]["gated_kernel"]["time_s"]
                            for p in pats if "time_s" in pats[p]["paths"].get("gated_kernel", {})
                            and "time_s" in pats[p]["paths"].get("masked", {})])
            win[f"{cfg['name']}: gated MLP kernel vs XLA (masked)"] = {
                "winner": ("gated_kernel" if ratio > 1 else "masked (XLA)") if ratio else "no verdict (not timed)",
                "geomean_masked_time_over_kernel_time": ratio}
        win[f"{cfg['name']}: best exit path per pattern"] = {
            p: max((n for n in names if n != "static"), key=lambda n: pats[p]["paths"].get(n, {}).get("speedup") or 0)
            for p in pats}
    return win, md, stops


def lm_summary(res: dict) -> tuple[dict, list[str], dict]:
    win, md, stops = {}, [], {}
    batches = res.get("batches", [])
    if not batches:
        return win, md, stops
    names = list(dict.fromkeys(n for b in batches for n in b["paths"]))
    m = res["meta"]["model"]
    shape = f"{m['depth']} layers, D={m['d_model']}, {m['num_heads']} heads, vocabulary {m['vocab']}"
    md += [f"**LM decode {res['meta']['dtype']}** ({shape}, prompt {res['meta']['prompt']}, "
           f"{res['meta']['new']} new tokens): tokens/s with prefill; in brackets the decode-only speed-up over "
           "`full`; last row: host stops per token, where the rows record them", "",
           "| batch | prefill ms | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for b in batches:
        cells = []
        for n in names:
            rec = b["paths"].get(n)
            if rec is None or "tokens_per_s" not in rec:
                cells.append("-")
                continue
            cell = f"{rec['tokens_per_s']:,.0f} ({_f(rec.get('decode_speedup'))}x)"
            if rec.get("agree") is False:
                cell += " DISAGREE"
            cells.append(cell)
        pre = b.get("prefill", {}).get("prefill", {}).get("time_s")
        md.append(f"| {b['batch']} | {_f(pre and pre * 1e3)} | " + " | ".join(cells) + " |")
    per_path = {n: [host_stops(b["paths"].get(n)) for b in batches] for n in names}
    if any(v is not None for vs in per_path.values() for v in vs):
        md.append("| host stops / token | | " + " | ".join(_stops_cell(per_path[n]) for n in names) + " |")
        stops.update({f"lm: {n}": _stops_cell(per_path[n]) for n in names})
    md.append("")
    both = [b for b in batches if {"forced_exit", "forced_exit_2exits"} <= set(b["paths"])]
    if both:
        r = _gmean([b["paths"]["forced_exit"]["time_s"] / b["paths"]["forced_exit_2exits"]["time_s"] for b in both])
        win["LM forced exit: every exit vs only the used exit"] = {
            "winner": "forced_exit_2exits" if r and r > 1 else "forced_exit", "geomean_time_all_over_2exits": r}
    spec = [n for n in names if n.startswith("speculative")]
    if spec:
        score = {n: _gmean([b["paths"][n].get("decode_speedup") for b in batches if n in b["paths"]]) for n in spec}
        win["LM speculative candidate"] = {"winner": max(score, key=lambda n: score[n] or 0),
                                           "geomean_decode_speedup": score,
                                           "acceptance_rate": {n: [b["paths"][n].get("acceptance_rate")
                                                                   for b in batches if n in b["paths"]] for n in spec}}
    return win, md, stops


def papers_summary(res: dict) -> tuple[dict, list[str], dict]:
    """The paper decoders' table (written by lm_papers.py) and, per paper and batch, its fastest variant."""
    rows = res.get("rows", [])
    md = [f"**Paper decoders** ({len(rows)} rows; speed-up over the same paper's greedy row at the same batch; host "
          "stops per token where the row records them)", "",
          "| paper | variant | batch | tokens/s | speed-up | host stops |", "|---|---|---:|---:|---:|---:|"]
    best: dict = {}
    stops = {}
    for r in rows:
        sp, hs = r.get("speedup_vs_greedy"), host_stops(r)
        md.append(f"| {r['paper']} | {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {_f(sp)} | "
                  f"{_stops_cell([hs])} |")
        if hs is not None:
            stops[f"papers: {r['paper']} / {r['variant']} / batch {r['batch']}"] = _stops_cell([hs])
        key = f"{r['paper']} batch {r['batch']}: fastest variant"
        if sp is not None and sp > best.get(key, {}).get("speedup_vs_greedy", -1):
            best[key] = {"winner": r["variant"], "speedup_vs_greedy": sp}
    for name, err in res.get("errors", {}).items():
        md.append(f"| {name} | failed: {err.strip().splitlines()[-1][:80]} | | | | |")
    md.append("")
    return best, md, stops


# measurement fields of a training candidate; every other str / bool field is configuration, shown when it varies
_TRAIN_MEASURED = {"agree", "images_per_s", "steps_per_s", "achieved_tflops", "mfu", "compile_s", "first_loss",
                   "last_loss", "loss_tol", "times_s", "time_s", "host_stops", "hlo"}


def train_summary(res: dict) -> tuple[dict, list[str], dict]:
    win, md, stops = {}, [], {}
    cands = res.get("candidates", {})
    if not cands:
        return win, md, stops
    meta = res["meta"]
    fields = [k for k in dict.fromkeys(k for c in cands.values() for k in c)
              if k not in _TRAIN_MEASURED and all(isinstance(c.get(k), (str, bool, type(None))) for c in cands.values())
              and len({json.dumps(c.get(k)) for c in cands.values()}) > 1]
    has_stops = any(host_stops(c) is not None for c in cands.values())
    md += [f"**Training** ViT D={meta['model']['d_model']} T={meta['model']['tokens']} B={meta['batch']}, "
           f"{meta['model']['exits']} exits, AdamW; MFU against {meta['peak_tflops']} TFLOP/s"
           + ("" if meta["mfu_meaningful"] else " (not meaningful on CPU)"), "",
           "| candidate | " + "".join(f"{k} | " for k in fields) + "img/s | steps/s | TFLOP/s | MFU | compile s | "
           "loss agrees |" + (" host stops |" if has_stops else ""),
           "|---|" + "---|" * len(fields) + "---:|---:|---:|---:|---:|---|" + ("---:|" if has_stops else "")]
    for n, c in cands.items():
        md.append(f"| {n} | " + "".join(f"{c.get(k)} | " for k in fields)
                  + f"{_f(c.get('images_per_s'), ',.1f')} | {_f(c.get('steps_per_s'), '.3f')} | "
                  f"{_f(c.get('achieved_tflops'), '.2f')} | {_f(c.get('mfu') and 100 * c['mfu'], '.1f')}"
                  f"{'%' if c.get('mfu') is not None else ''} | {_f(c.get('compile_s'), '.1f')} | {c.get('agree')} |"
                  + (f" {_stops_cell([host_stops(c)])} |" if has_stops else ""))
        if host_stops(c) is not None:
            stops[f"train: {n}"] = _stops_cell([host_stops(c)])
    pad = " | " * (5 + len(fields) + has_stops)
    for skipped, why in res.get("skipped", {}).items():
        md.append(f"| {skipped} | skipped: {why}{pad}")
    for n, e in res.get("errors", {}).items():
        md.append(f"| {n} | failed: {e[:80]}{pad}")
    md.append("")
    ips = {n: c.get("images_per_s") or 0 for n, c in cands.items()}

    def best_of(pred):
        sel = {n: v for n, v in ips.items() if pred(cands[n])}
        return (max(sel, key=sel.get), sel) if sel else (None, sel)

    w, sel = best_of(lambda c: c["dtype"] == "bfloat16" and not c["remat"])
    if len(sel) > 1:
        win["train attention kind (bf16, no remat)"] = {"winner": cands[w]["attention"], "images_per_s": sel}
    w, sel = best_of(lambda c: c["dtype"] == "bfloat16")
    if len({json.dumps(cands[n]["remat"]) for n in sel}) > 1:
        r = cands[w]["remat"]
        win["train remat (bf16)"] = {"winner": ("remat" if r is True else f"remat {r}") if r else "no remat",
                                     "images_per_s": sel}
    if len({c["dtype"] for c in cands.values()}) > 1:
        w = max(ips, key=ips.get)
        win["train dtype"] = {"winner": cands[w]["dtype"], "images_per_s": ips}
    win["train best candidate"] = {"winner": max(ips, key=ips.get), "mfu": cands[max(ips, key=ips.get)].get("mfu")}
    return win, md, stops


def cmdbuf_summary(pairs: dict) -> tuple[dict, list[str]]:
    """Every path timed with XLA command buffers off (the main part) and on (its ``_cmdbuf`` rerun), side by side:
    time off, time on, off / on (> 1: command buffers help)."""
    win, md = {}, []
    for part, (off, on) in pairs.items():
        if not off or not on:
            continue
        cells = []
        if part == "vit":
            for cfg_on in on.get("configs", []):
                cfg_off = next((c for c in off.get("configs", []) if c["name"] == cfg_on["name"]), None)
                for pname, pat in cfg_on["patterns"].items():
                    for n, rec in pat["paths"].items():
                        base = (cfg_off or {}).get("patterns", {}).get(pname, {}).get("paths", {}).get(n, {})
                        if rec.get("time_s") and base.get("time_s"):
                            cells.append((f"{cfg_on['name']} {pname}", n, base["time_s"], rec["time_s"],
                                          host_stops(base)))
        else:
            for b_on in on.get("batches", []):
                b_off = next((b for b in off.get("batches", []) if b["batch"] == b_on["batch"]), None)
                for n, rec in b_on["paths"].items():
                    base = (b_off or {}).get("paths", {}).get(n, {})
                    if rec.get("decode_s") and base.get("decode_s"):
                        cells.append((f"batch {b_on['batch']}", n, base["decode_s"], rec["decode_s"], host_stops(base)))
        if not cells:
            continue
        unit = "ms per forward" if part == "vit" else "decode ms per call"
        md += [f"**{part}: XLA command buffers off / on** ({unit}; on = `{CMDBUF_FLAGS}`)", "",
               "| where | path | off | on | off / on | host stops (off) |", "|---|---|---:|---:|---:|---:|"]
        md += [f"| {w} | {n} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f} | {_stops_cell([s])} |"
               for w, n, a, b, s in cells]
        md.append("")
        win[f"{part}: XLA command buffers (WHILE, CONDITIONAL)"] = {
            "winner": "on" if _gmean([a / b for _, _, a, b, _ in cells]) > 1 else "off",
            "geomean_time_off_over_on": _gmean([a / b for _, _, a, b, _ in cells]),
            "per_path": {n: _gmean([a / b for _, m, a, b, _ in cells if m == n]) for n in dict.fromkeys(
                c[1] for c in cells)}}
    return win, md


# PyTorch 2.11 on the same H200 and ViT-S shape, 2026-12-04 (benchmarks/results/gpu_h200_2026-12-04/README.md): the
# references of issue 20's first two goals; only compared on an H200 at that shape.
TORCH_H200_VIT = {"eager static img/s": 91988.0, "compaction geometric img/s": 115642.0}
VIT_S_SHAPE = "L12-D384-T65-B1024"


def _nothing_skipped(r: dict) -> bool:
    """A paper row whose own statistics say it skipped nothing (a gate that never fires, a forced-0 predictor)."""
    if r["variant"] in ("greedy", "full model"):
        return False
    for key in ("ffn_skipped", "skipped_fraction"):
        if isinstance(r.get(key), (int, float)) and r[key] == 0:
            return True
    layers = r.get("mean_layers", r.get("layers_per_token"))
    return isinstance(layers, (int, float)) and isinstance(r.get("num_layers"), int) and layers == r["num_layers"]


def goals_issue20(vit, lm, papers, train) -> list[dict]:
    """The goals of issue 20 that this run measures (ratios on one GPU in one run); None: not measured here."""
    out = []

    def add(goal, value, target, ok):
        out.append({"goal": goal, "measured": value, "target": target, "met": ok})

    meta = next((r["meta"] for r in (vit, lm, train) if r), {})
    h200 = "H200" in str(meta.get("device_kind", ""))
    for cfg in (vit or {}).get("configs", []):
        if cfg["name"] != VIT_S_SHAPE or not h200:
            continue
        pats = cfg["patterns"]
        static = [p["paths"]["static"]["time_s"] for p in pats.values() if "time_s" in p["paths"].get("static", {})]
        if static:
            v = cfg["batch"] / sorted(static)[len(static) // 2] / TORCH_H200_VIT["eager static img/s"]
            add("ViT static vs PyTorch eager (91,988 img/s), same shape", v, 1.0, v >= 1.0)
        geo = pats.get("geometric", {}).get("paths", {})
        best = min((r["time_s"] for n, r in geo.items() if n != "static" and r.get("time_s")), default=None)
        if best:
            v = cfg["batch"] / best / TORCH_H200_VIT["compaction geometric img/s"]
            add("best ViT exit path, geometric, vs PyTorch compaction (115,642 img/s)", v, 1.5, v >= 1.5)
        kernel = "gated_kernel" in (cfg.get("errors") or {})
        add(f"Pallas gated kernel compiles and is timed at D={cfg['d_model']}", "fails" if kernel else "yes", "yes",
            not kernel and any("gated_kernel" in p["paths"] for p in pats.values()))
    for b in (lm or {}).get("batches", []):
        p = b["paths"]
        if b["batch"] == 1 and "full" in p:
            v = p["full"]["time_s"] / lm["meta"]["new"] * 1e6
            add("LM full decode, batch 1, us per token (with prefill)", v, 400, v <= 400)
        if "forced_exit_2exits" in p and b["batch"] in (1, 128):
            v = p["forced_exit_2exits"].get("decode_speedup")
            target = 1.7 if b["batch"] == 1 else 1.5
            add(f"LM forced exit after layer 5 (only that exit), batch {b['batch']}", v, target,
                v is not None and v >= target)
        if "skipdecode_2x" in p:
            v = p["skipdecode_2x"].get("decode_speedup")
            add(f"LM SkipDecode 2x, batch {b['batch']}", v, 1.8, v is not None and v >= 1.8)
    exits = [r.get("decode_speedup") for b in (lm or {}).get("batches", []) for n, r in b["paths"].items()
             if n != "full" and not n.startswith("speculative") and r.get("decode_speedup")]
    if exits:
        add("any LM exit variant vs full depth, any batch (worst)", min(exits), 1.0, min(exits) >= 1.0)
    rows = (papers or {}).get("rows", [])
    idle = [r["speedup_vs_greedy"] for r in rows if _nothing_skipped(r) and r.get("speedup_vs_greedy")]
    if idle:
        add("every paper decoder with nothing skipped vs greedy (worst)", min(idle), 0.97, min(idle) >= 0.97)
    uls = [r["speedup_vs_greedy"] for r in rows if r["paper"].startswith("ULS") and r["variant"] == "ULS 2x"
           and r["batch"] == 1 and r.get("speedup_vs_greedy")]
    if uls:
        add("ULS 2x vs greedy, batch 1", uls[0], 1.8, uls[0] >= 1.8)
    cands = (train or {}).get("candidates", {})
    mfus = [c.get("mfu") for c in cands.values() if c["dtype"] == "bfloat16" and c.get("mfu") is not None]
    if mfus:
        add("training MFU, ViT-B/16 size, all exits (best)", max(mfus), 0.40, max(mfus) >= 0.40)
    return out


def goals(vit, lm, train) -> list[dict]:
    """The goals of issue 12 that this run measures, with the measured value (None: not measured)."""
    out = []

    def add(goal, value, target, ok):
        out.append({"goal": goal, "measured": value, "target": target, "met": ok})

    for cfg in (vit or {}).get("configs", []):
        pats = cfg["patterns"]
        for p, pat in pats.items():
            if p == "full":
                over = {n: r.get("overhead_vs_static") for n, r in pat["paths"].items() if n != "static"}
                best = min((v for v in over.values() if v), default=None)
                add(f"ViT {cfg['name']}: dynamic path at full depth <= 3% over static (best path)", best, 1.03,
                    best is not None and best <= 1.03)
            else:
                best = max((r.get("ratio_to_ideal") or 0 for n, r in pat["paths"].items() if n != "static"),
                           default=None)
                add(f"ViT {cfg['name']} {p}: >= 0.9 of ideal speed-up (best path)", best, 0.9,
                    best is not None and best >= 0.9)
    for b in (lm or {}).get("batches", []):
        paths = b["paths"]
        if "forced_exit" in paths and b["batch"] in (1, 32):
            v = max(paths[n].get("speedup") or 0 for n in ("forced_exit", "forced_exit_2exits") if n in paths)
            add(f"LM forced exit after layer 5, batch {b['batch']}: >= 1.65x (best of both models)", v, 1.65, v >= 1.65)
        if "skipdecode_2x" in paths:
            v = paths["skipdecode_2x"].get("decode_speedup")
            add(f"LM SkipDecode 2x, batch {b['batch']}: >= 1.5x on decode steps", v, 1.5, v is not None and v >= 1.5)
        slow = [n for n, r in paths.items() if n != "full" and not n.startswith("speculative")
                and (r.get("speedup") or 0) < 1]
        add(f"LM batch {b['batch']}: exits never slower than full depth", slow or "none slower", "[]", not slow)
    cands = (train or {}).get("candidates", {})
    mfus = [c.get("mfu") for c in cands.values() if c["dtype"] == "bfloat16" and c.get("mfu") is not None]
    if mfus:
        add("Training ViT-B/16 size, all exits, bf16: >= 40% MFU (best candidate)", max(mfus), 0.40, max(mfus) >= 0.40)
    return out


def gated_kernel_summary(res: dict) -> tuple[dict, list[str]]:
    """The Pallas gated MLP step against XLA's dense MLP, one verdict per width (``benchmarks/gated_kernel.py``)."""
    md = ["**Gated MLP kernel vs XLA** (per width; the kernel stays off default paths unless it wins)", "",
          "| D | F | verdict |", "|---:|---:|---|"]
    md += [f"| {w['d']} | {w['f']} | {w['verdict']['summary']} |" for w in res.get("widths", [])]
    wins = {str(w["d"]): bool(w["verdict"]["kernel_wins"]) for w in res.get("widths", [])}
    winner = "kernel" if wins and all(wins.values()) else ("xla" if wins else "none timed")
    return {"gated MLP: Pallas kernel vs XLA": {"winner": winner, "kernel_wins_by_width": wins}}, md + [""]


def _goal_table(title: str, rows: list[dict]) -> list[str]:
    md = ["", f"## {title}", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    for g in rows:
        v = g["measured"]
        md.append(f"| {g['goal']} | {_f(v, '.3f') if isinstance(v, float) else v} | {g['target']} | "
                  f"{'yes' if g['met'] else 'no'} |")
    return md


def summarize(out_dir: pathlib.Path, status: dict | None = None) -> dict:
    res = {name: _load(out_dir / part.out) for name, part in PARTS.items()}
    vit, lm, papers, train = (res[p] for p in MAIN_PARTS)
    winners, md, stops = {}, [], {}
    meta = next((r["meta"] for r in (vit, lm, train) if r), {})
    md += [f"# Benchmark suite: {meta.get('device_kind', '?')} ({meta.get('backend', '?')}), "
           f"jax {meta.get('jax', '?')}, {meta.get('time_utc', '?')}", ""]
    if meta.get("backend") == "cpu":
        md += ["**CPU run: timings say nothing about accelerators; this checks the pipeline.**", ""]
    for part, fn in (("vit", vit_summary), ("lm", lm_summary), ("papers", papers_summary), ("train", train_summary)):
        if res[part] is None:
            md += [f"**{part}: no JSON** (see the run status)", ""]
            continue
        w, m, hs = fn(res[part])
        winners.update(w)
        stops.update(hs)
        md += m
    if res["gated_kernel"]:
        w, m = gated_kernel_summary(res["gated_kernel"])
        winners.update(w)
        md += m
    variants = {p.base: (res[p.base], res[name]) for name, p in PARTS.items() if p.base and res[name]}
    if variants:
        w, m = cmdbuf_summary(variants)
        winners.update(w)
        md += ["## Command buffers", ""] + m
    goal_rows, goal20 = goals(vit, lm, train), goals_issue20(vit, lm, papers, train)
    md += ["## Winners", "", "| question | winner | evidence |", "|---|---|---|"]
    for q, w in winners.items():
        if "winner" in w:
            ev = {k: v for k, v in w.items() if k != "winner"}
        else:
            ev, w = w, {"winner": "per pattern"}
        md.append(f"| {q} | {w['winner']} | `{json.dumps(ev, default=str)[:300]}` |")
    md += _goal_table("Goals of issue 12", goal_rows) + _goal_table(
        "Goals of issue 20 (ratios in this one run; PyTorch references: H200, 2026-12-04)", goal20)
    summary = {"meta": meta, "status": status, "winners": winners, "goals": goal_rows, "goals_issue20": goal20,
               "host_stops": stops,
               "all_agree": all(r.get("all_agree", True) for n, r in res.items() if r and n != "papers"),
               "files": {n: PARTS[n].out for n, r in res.items() if r}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="folder for every JSON, summary.json and summary.md")
    g.add_argument("--summarize", help="only rebuild summary.{json,md} from the JSON files in this folder")
    ap.add_argument("--sizes", choices=("gpu", "small", "tiny"), default="gpu")
    ap.add_argument("--budget-s", type=float, default=450.0, help="total seconds for all parts (default 450)")
    ap.add_argument("--parts", help=f"comma list from {tuple(PARTS)} (default: all on --sizes gpu, else "
                                    f"{','.join(MAIN_PARTS)})")
    ap.add_argument("--part-args", action="append", default=[], metavar="PART:ARGS",
                    help="arguments appended to a part's preset, e.g. vit:'--paths static,masked,cascade' (repeatable)")
    ap.add_argument("--peak-tflops", type=float, help="passed to train_throughput.py (default there: 989)")
    args = ap.parse_args(argv)
    if args.summarize:
        folder = pathlib.Path(args.summarize)
        if not folder.is_dir():
            ap.error(f"--summarize {folder}: no such folder")
        summary = summarize(folder)
        print((folder / "summary.md").read_text())
        return 0 if summary["all_agree"] else 1
    parts = [p for p in (args.parts.split(",") if args.parts else default_parts(args.sizes)) if p]
    if any(p not in PARTS for p in parts) or args.budget_s <= 0:
        ap.error(f"--parts {args.parts!r} must name parts of {tuple(PARTS)}; --budget-s must be > 0")
    extra: dict[str, list[str]] = {p: [] for p in PARTS}
    if args.peak_tflops:
        extra["train"] += ["--peak-tflops", str(args.peak_tflops)]
    for spec in args.part_args:
        name, _, rest = spec.partition(":")
        if name not in PARTS or not rest.strip():
            ap.error(f"--part-args {spec!r}: write PART:ARGS with PART in {tuple(PARTS)}, e.g. vit:'--repeats 3'")
        for p in [name] + [n for n, part in PARTS.items() if part.base == name]:   # a variant reruns its base's args
            extra[p] += shlex.split(rest)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"suite --sizes {args.sizes} into {out_dir}, budget {args.budget_s:.0f}s, parts {parts}")
    t0 = time.perf_counter()
    status = run_parts(out_dir, args.sizes, args.budget_s, parts, extra)
    summary = summarize(out_dir, status)
    log(f"done in {time.perf_counter() - t0:.0f}s; wrote {out_dir / 'summary.json'} and {out_dir / 'summary.md'}")
    print((out_dir / "summary.md").read_text(), flush=True)
    ok = summary["all_agree"] and all(s["returncode"] in (0, "skipped") for s in status.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
