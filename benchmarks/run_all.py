"""Every benchmark's preset in one call, within a time budget; one summary JSON + markdown table of the winners.

    python3 benchmarks/run_all.py --out $OUT                  # GPU: the whole suite in under 8 minutes
    python benchmarks/run_all.py --out /tmp/suite --sizes tiny   # CPU: the same pipeline on tiny models (tests)
    python benchmarks/run_all.py --summarize $OUT               # rebuild summary.{json,md} from the JSON files

Parts, in order, each a subprocess (a crash or a time-out of one part costs only that part; partial JSON is kept):

1. ``vit``: ``vit_paths.py`` on one ViT-S-shape configuration (12 layers, D=384, 65 tokens, batch 1024, bf16;
   the issue's table), paths static / masked / compacted under two bucket lists (default, eighths) / gated kernel;
2. ``lm``: ``lm_decode.py``, GPT-2-small shape in bf16, batches 1/8/32/128, every decoding path;
3. ``papers``: ``lm_papers.py``, every paper's decoder in ``benchmarks/papers/`` (self-speculative variants, layer
   skipping, Jacobi decoding) on a SmolLM2-135M-shaped model in bf16, each beside plain greedy decoding;
4. ``train``: ``train_throughput.py``, ViT-B/16 size, batch 128, dtype x remat x attention candidates.

Budget: ``--budget-s`` (default 450 s) is split 25/25/25/25 %; time a part leaves unused passes to the next. A part
stops starting new units (configurations, batches, candidates) after 75 % of its share and is killed at 125 % of
it (never past the total); its JSON is written after every unit, so a killed part keeps what it finished. Only
the standard library is imported here, and the benchmarks import no
tensorflow-datasets or grain (absent on the GPU machine).

The summary answers, for each question, which candidate won in this run: the compacted executor's bucket list,
kernel vs XLA for the gated MLP (``gated_kernel`` vs ``masked``), the attention kind, remat, the dtype, the
speculative draft, fewer LM exits; and lists each goal of issue 12 with the measured value.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent

# name -> (script, output file, share of the budget, arguments per --sizes)
PARTS = {
    "vit": ("vit_paths.py", "vit_paths.json", 0.25, {
        "gpu": ["--sizes", "gpu", "--dtype", "bfloat16", "--widths", "384", "--patches", "64", "--batches", "1024",
                "--paths", "static,masked,compacted,gated_kernel", "--buckets", "default,eighths",
                "--repeats", "5"],
        "small": ["--sizes", "small", "--paths", "static,masked,compacted,gated_kernel",
                  "--buckets", "default,eighths"],
        "tiny": ["--sizes", "tiny", "--paths", "static,masked,compacted,gated_kernel,continuous",
                 "--buckets", "default,eighths"],
    }),
    "lm": ("lm_decode.py", "lm_decode.json", 0.25, {
        "gpu": ["--sizes", "gpu", "--dtype", "bfloat16"],
        "small": ["--sizes", "small"],
        "tiny": ["--sizes", "tiny", "--batches", "2"],
    }),
    "papers": ("lm_papers.py", "lm_papers.json", 0.25, {
        "gpu": ["--sizes", "gpu"],
        "small": ["--sizes", "small"],
        "tiny": ["--sizes", "tiny"],
    }),
    "train": ("train_throughput.py", "train_throughput.json", 0.25, {
        "gpu": ["--sizes", "gpu"],
        "small": ["--sizes", "small"],
        "tiny": ["--sizes", "tiny", "--candidates", "bfloat16:0:einsum,bfloat16:0:dot_product,bfloat16:1:einsum",
                 "--rounds", "1"],
    }),
}
GRACE = 1.25   # hard limit of a part = its share x GRACE (within what is left of the total)
SOFT = 0.75    # a part stops starting new units (configurations, batches, candidates) after SOFT x its share


def log(msg: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_parts(out_dir: pathlib.Path, sizes: str, budget_s: float, parts, extra: dict[str, list[str]]) -> dict:
    t_start = time.perf_counter()
    status, carry = {}, 0.0
    for name in parts:
        script, out_file, share, presets = PARTS[name]
        left = budget_s - (time.perf_counter() - t_start)
        soft = min(share * budget_s + carry, max(left, 0.0))
        hard = max(30.0, min(soft * GRACE, left))
        cmd = [sys.executable, str(HERE / script), *presets[sizes], *extra.get(name, []),
               "--out", str(out_dir / out_file), "--budget-s", f"{SOFT * soft:.0f}"]
        log(f"{name}: soft budget {soft:.0f}s, hard limit {hard:.0f}s: {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=hard, stdout=sys.stdout, stderr=subprocess.STDOUT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        took = time.perf_counter() - t0
        carry = max(0.0, soft - took)
        status[name] = {"returncode": rc, "seconds": round(took, 1), "soft_budget_s": round(soft, 1),
                        "json": out_file if (out_dir / out_file).exists() else None}
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


def vit_summary(res: dict) -> tuple[dict, list[str]]:
    """Winners and a markdown table from a vit_paths JSON (every configuration in it)."""
    win, md = {}, []
    for cfg in res.get("configs", []):
        pats = cfg["patterns"]
        names = list(next(iter(pats.values()))["paths"]) if pats else []
        md += [f"**{cfg['name']} {cfg['dtype']}** (speed-up over static; in brackets realized/ideal; `full`: "
               "time / static)", "",
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
        md.append("")
        exit_pats = [p for p in pats if p != "full"]
        compacted = [n for n in names if n.startswith("compacted")]
        if compacted:
            score = {n: _gmean([pats[p]["paths"][n].get("speedup") for p in exit_pats]) for n in compacted}
            best = max(score, key=lambda n: score[n] or 0)
            win[f"{cfg['name']}: compacted bucket list"] = {
                "winner": best, "buckets": cfg.get("buckets", {}).get(best),
                "geomean_speedup_over_exit_patterns": {n: score[n] for n in compacted}}
        if "gated_kernel" in names and "masked" in names:
            ratio = _gmean([pats[p]["paths"]["masked"]["time_s"] / pats[p]["paths"]["gated_kernel"]["time_s"]
                            for p in pats])
            win[f"{cfg['name']}: gated MLP kernel vs XLA (masked)"] = {
                "winner": "gated_kernel" if ratio and ratio > 1 else "masked (XLA)",
                "geomean_masked_time_over_kernel_time": ratio}
        win[f"{cfg['name']}: best exit path per pattern"] = {
            p: max((n for n in names if n != "static"), key=lambda n: pats[p]["paths"][n].get("speedup") or 0)
            for p in pats}
    return win, md


def lm_summary(res: dict) -> tuple[dict, list[str]]:
    win, md = {}, []
    batches = res.get("batches", [])
    if not batches:
        return win, md
    names = list(batches[0]["paths"])
    m = res["meta"]["model"]
    shape = f"{m['depth']} layers, D={m['d_model']}, {m['num_heads']} heads, vocabulary {m['vocab']}"
    md += [f"**LM decode {res['meta']['dtype']}** ({shape}, prompt {res['meta']['prompt']}, "
           f"{res['meta']['new']} new tokens): tokens/s with prefill; in brackets the decode-only speed-up over "
           "`full`", "", "| batch | prefill ms | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
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
        md.append(f"| {b['batch']} | {b['prefill']['prefill']['time_s'] * 1e3:.2f} | " + " | ".join(cells) + " |")
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
    return win, md


def papers_summary(res: dict) -> tuple[dict, list[str]]:
    """The paper decoders' table (written by lm_papers.py) and, per paper and batch, its fastest variant."""
    rows = res.get("rows", [])
    md = [f"**Paper decoders** ({len(rows)} rows; speed-up over the same paper's greedy row at the same batch)", "",
          "| paper | variant | batch | tokens/s | speed-up |", "|---|---|---:|---:|---:|"]
    best: dict = {}
    for r in rows:
        sp = r.get("speedup_vs_greedy")
        md.append(f"| {r['paper']} | {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {_f(sp)} |")
        key = f"{r['paper']} batch {r['batch']}: fastest variant"
        if sp is not None and sp > best.get(key, {}).get("speedup_vs_greedy", -1):
            best[key] = {"winner": r["variant"], "speedup_vs_greedy": sp}
    for name, err in res.get("errors", {}).items():
        md.append(f"| {name} | failed: {err.strip().splitlines()[-1][:80]} | | | |")
    md.append("")
    return best, md


def train_summary(res: dict) -> tuple[dict, list[str]]:
    win, md = {}, []
    cands = res.get("candidates", {})
    if not cands:
        return win, md
    meta = res["meta"]
    md += [f"**Training** ViT D={meta['model']['d_model']} T={meta['model']['tokens']} B={meta['batch']}, "
           f"{meta['model']['exits']} exits, AdamW; MFU against {meta['peak_tflops']} TFLOP/s"
           + ("" if meta["mfu_meaningful"] else " (not meaningful on CPU)"), "",
           "| candidate | img/s | steps/s | TFLOP/s | MFU | compile s | loss agrees |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for n, c in cands.items():
        md.append(f"| {n} | {_f(c.get('images_per_s'), ',.1f')} | {_f(c.get('steps_per_s'), '.3f')} | "
                  f"{_f(c.get('achieved_tflops'), '.2f')} | {_f(c.get('mfu') and 100 * c['mfu'], '.1f')}"
                  f"{'%' if c.get('mfu') is not None else ''} | {_f(c.get('compile_s'), '.1f')} | {c.get('agree')} |")
    for skipped, why in res.get("skipped", {}).items():
        md.append(f"| {skipped} | skipped: {why} | | | | | |")
    for n, e in res.get("errors", {}).items():
        md.append(f"| {n} | failed: {e[:80]} | | | | | |")
    md.append("")
    ips = {n: c.get("images_per_s") or 0 for n, c in cands.items()}

    def best_of(pred):
        sel = {n: v for n, v in ips.items() if pred(cands[n])}
        return (max(sel, key=sel.get), sel) if sel else (None, sel)

    w, sel = best_of(lambda c: c["dtype"] == "bfloat16" and not c["remat"])
    if len(sel) > 1:
        win["train attention kind (bf16, no remat)"] = {"winner": cands[w]["attention"], "images_per_s": sel}
    w, sel = best_of(lambda c: c["dtype"] == "bfloat16")
    if len({cands[n]["remat"] for n in sel}) > 1:
        win["train remat (bf16)"] = {"winner": "remat" if cands[w]["remat"] else "no remat", "images_per_s": sel}
    if len({c["dtype"] for c in cands.values()}) > 1:
        w = max(ips, key=ips.get)
        win["train dtype"] = {"winner": cands[w]["dtype"], "images_per_s": ips}
    win["train best candidate"] = {"winner": max(ips, key=ips.get), "mfu": cands[max(ips, key=ips.get)].get("mfu")}
    return win, md


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


def summarize(out_dir: pathlib.Path, status: dict | None = None) -> dict:
    vit = _load(out_dir / PARTS["vit"][1])
    lm = _load(out_dir / PARTS["lm"][1])
    train = _load(out_dir / PARTS["train"][1])
    winners, md = {}, []
    meta = next((r["meta"] for r in (vit, lm, train) if r), {})
    md += [f"# Benchmark suite: {meta.get('device_kind', '?')} ({meta.get('backend', '?')}), "
           f"jax {meta.get('jax', '?')}, {meta.get('time_utc', '?')}", ""]
    if meta.get("backend") == "cpu":
        md += ["**CPU run: timings say nothing about accelerators; this checks the pipeline.**", ""]
    papers = _load(out_dir / PARTS["papers"][1])
    for part, res, fn in (("vit", vit, vit_summary), ("lm", lm, lm_summary), ("papers", papers, papers_summary),
                          ("train", train, train_summary)):
        if res is None:
            md += [f"**{part}: no JSON** (see the run status)", ""]
            continue
        w, m = fn(res)
        winners.update(w)
        md += m
    goal_rows = goals(vit, lm, train)
    md += ["## Winners", "", "| question | winner | evidence |", "|---|---|---|"]
    for q, w in winners.items():
        if "winner" in w:
            ev = {k: v for k, v in w.items() if k != "winner"}
        else:
            ev, w = w, {"winner": "per pattern"}
        md.append(f"| {q} | {w['winner']} | `{json.dumps(ev, default=str)[:300]}` |")
    md += ["", "## Goals of issue 12", "", "| goal | measured | met |", "|---|---|---|"]
    for g in goal_rows:
        v = g["measured"]
        md.append(f"| {g['goal']} | {_f(v, '.3f') if isinstance(v, float) else v} | {'yes' if g['met'] else 'no'} |")
    summary = {"meta": meta, "status": status, "winners": winners, "goals": goal_rows,
               "all_agree": all(r.get("all_agree", True) for r in (vit, lm, train) if r),
               "files": {p: PARTS[p][1] for p, r in (("vit", vit), ("lm", lm), ("papers", papers), ("train", train))
                         if r}}
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
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list from {tuple(PARTS)}")
    ap.add_argument("--peak-tflops", type=float, help="passed to train_throughput.py (default there: 989)")
    args = ap.parse_args(argv)
    if args.summarize:
        folder = pathlib.Path(args.summarize)
        if not folder.is_dir():
            ap.error(f"--summarize {folder}: no such folder")
        summary = summarize(folder)
        print((folder / "summary.md").read_text())
        return 0 if summary["all_agree"] else 1
    parts = [p for p in args.parts.split(",") if p]
    if any(p not in PARTS for p in parts) or args.budget_s <= 0:
        ap.error(f"--parts {args.parts!r} must name parts of {tuple(PARTS)}; --budget-s must be > 0")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"train": ["--peak-tflops", str(args.peak_tflops)]} if args.peak_tflops else {}
    log(f"suite --sizes {args.sizes} into {out_dir}, budget {args.budget_s:.0f}s, parts {parts}")
    t0 = time.perf_counter()
    status = run_parts(out_dir, args.sizes, args.budget_s, parts, extra)
    summary = summarize(out_dir, status)
    log(f"done in {time.perf_counter() - t0:.0f}s; wrote {out_dir / 'summary.json'} and {out_dir / 'summary.md'}")
    print((out_dir / "summary.md").read_text(), flush=True)
    ok = summary["all_agree"] and all(s["returncode"] == 0 for s in status.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
