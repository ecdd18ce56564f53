"""CE-CoLLM (arXiv:2411.02829) at small scale: cloud-edge split decoding of a multi-exit char LM at the paper's
thresholds, with the bytes sent counted and the latency from a stated cost model.

    python -m experiments.cecollm --config configs/cecollm.py:smoke --data_dir DIR [--outdir DIR]

See configs/cecollm.py for the runbook. The recipe: the shared multi-exit base LM (experiments/_common_lm.py), then
held-out validation windows decoded (greedy, KV-cached) by the full model (cloud-only deployment), the static
exit-k model (edge standalone) and the split executor (``eejax.decoding.split.split_step``) at each threshold and
cloud K/V rule; quality against the full model (greedy agreement, teacher-forced NLL, paired bootstrap over windows),
the edge share, the bytes (``split.traffic``) and the modelled latency (``split.latency``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from eejax.decoding import per_token, split
from eejax.eval import bootstrap
from eejax.eval import report as report_lib
from eejax.exits import costs
from experiments import _common_lm as recipe
from experiments._common import Report, Run, experiment

NAME = "cecollm"
CLOUD_KV = split.CLOUD_KV
# The projection's decoder shape: SmolLM2-135M (30 layers, d=576, 9 / 3 heads, SwiGLU 1536, vocabulary 49,152).
SMOLLM2_SHAPE = costs.SMOLLM2_135M


@functools.lru_cache(maxsize=None)   # one function object per setting, so the Decoder compiles it once
def split_policy(edge_layers: int, cloud_kv: str):
    """``split_step`` as a recipe policy; ``arg`` is the (traced) threshold."""
    def step(model, tok, state, i, thr):
        return split.split_step(model, tok, state, i, thr, edge_layers=edge_layers, cloud_kv=cloud_kv)
    step.__name__ = f"split_{edge_layers}_{cloud_kv}"
    return step


@functools.lru_cache(maxsize=None)
def edge_only_policy(exit_index: int):
    """Edge standalone: every token at the edge exit (``per_token.forced_step``)."""
    def step(model, tok, state, i, arg):
        del arg
        return per_token.forced_step(model, tok, state, i, exit_index)
    step.__name__ = f"edge_only_{exit_index}"
    return step


def edge_masks(dec, step, params, arg, windows, edge_layers: int) -> np.ndarray:
    """``bool[W, G]``: which free-running greedy tokens the edge finished, over every window (row)."""
    return np.concatenate([split.edge_mask(jax.device_get(dec(step, params, p, arg)), edge_layers)
                           for p in windows.prompts])


def mean_ci(x, seed: int) -> dict:
    """Mean over sequences with its bootstrap 95% interval (``paired_bootstrap`` against 0)."""
    d = bootstrap.paired_bootstrap(np.asarray(x, np.float64), np.zeros(len(x)), seed=seed)
    return {"mean": d.diff, "lo": d.lo, "hi": d.hi}


@experiment(NAME, data=recipe.corpus)
def main(run: Run, corpus) -> Report:
    cfg = run.cfg
    graphdef, params, mcfg, train_s = recipe.shared_base(run, corpus, producer=True)
    e, s = cfg.eval, cfg.split
    test = recipe.eval_windows(corpus.eval_ids, e.batch, e.prompt_len, e.new_tokens, 0, e.eval_batches)
    dec = recipe.Decoder(graphdef, e.new_tokens)
    windows = len(test.prompts) * e.batch
    lengths_W = np.full(windows, e.prompt_len)

    full = recipe.evaluate(dec, recipe.full_policy, params, None, test, None)
    ref = full["tokens"]
    full |= {"agreement": 1.0, "agreement_W": [1.0] * windows}
    raw = {"full": {kk: v for kk, v in full.items() if kk != "tokens"}}
    base_rows = [{"method": "full model (cloud only)", "k": mcfg.depth, "val_nll": full["nll"],
                  "val_ppl": full["ppl"], "agreement": 1.0}]
    rows, paired, latency_rows = [], [], []
    for k in s.ks:
        edge_only = recipe.evaluate(dec, edge_only_policy(list(mcfg.exit_layers).index(k - 1)), params, None, test,
                                    ref)
        base_rows.append({"method": f"edge only (exit after layer {k})", "k": k, "val_nll": edge_only["nll"],
                          "val_ppl": edge_only["ppl"], "agreement": edge_only["agreement"]})
        raw[f"edge_only k={k}"] = {kk: v for kk, v in edge_only.items() if kk != "tokens"}
        print(base_rows[-1], flush=True)
        for rule in s.cloud_kv:
            r, p, lt, rw = split_rows(cfg, mcfg, dec, params, test, ref, lengths_W, full, edge_only, k, rule)
            rows += r
            paired += p
            latency_rows += lt
            raw |= rw
    return report(run, corpus, mcfg, test, train_s, base_rows, rows, paired, latency_rows, raw)


def split_rows(cfg, mcfg, dec, params, test, ref, lengths_W, full, edge_only, k: int, rule: str):
    """The split after layer ``k`` with one cloud K/V rule at every threshold: quality, edge share, bytes, latency."""
    e, s = cfg.eval, cfg.split
    step = split_policy(k, rule)
    rows, paired, latency_rows, raw = [], [], [], {}
    for thr in s.thresholds:
        res = recipe.evaluate(dec, step, params, jnp.float32(thr), test, ref)
        edge = edge_masks(dec, step, params, jnp.float32(thr), test, k)
        t = split.traffic(edge, lengths_W, d_model=mcfg.d_model, depth=mcfg.depth, edge_layers=k, cloud_kv=rule,
                          bytes_per_value=s.bytes_per_value, token_bytes=s.token_id_bytes)
        frac = mean_ci(t.edge_tokens / (e.new_tokens - 1), cfg.seed)
        name = f"split k={k} ({rule}) thr={thr:g}"
        row = {"method": name, "k": k, "cloud_kv": rule, "threshold": thr, "edge_frac": frac["mean"],
               "edge_frac_lo": frac["lo"], "edge_frac_hi": frac["hi"], "agreement": res["agreement"],
               "val_nll": res["nll"], "val_ppl": res["ppl"], "cloud_calls": float(t.cloud_calls.mean()),
               "up_kB": float(t.up_bytes.mean()) / 1e3, "naive_up_kB": float(t.naive_up_bytes.mean()) / 1e3,
               "down_kB": float(t.down_bytes.mean()) / 1e3,
               "cloud_token_layers": float(t.cloud_token_layers.mean()),
               "cloud_kv_token_layers": float(t.cloud_kv_token_layers.mean())}
        rows.append(row)
        print(" ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in row.items()), flush=True)
        raw[name] = {kk: v for kk, v in res.items() if kk != "tokens"} | {
            "traffic": {kk: v.tolist() for kk, v in t._asdict().items()}}
        paired.append(equal_as_floats({"k": k, "threshold": thr, "cloud_kv": rule}
                      | recipe.paired_quality(res, full, name, "full model (cloud only)", cfg.seed)))
        paired.append(equal_as_floats({"k": k, "threshold": thr, "cloud_kv": rule}
                      | recipe.paired_quality(res, edge_only, name, f"edge only (exit L{k})", cfg.seed)))
        latency_rows += latency_table(t, edge, lengths_W, costs.lm_shape(mcfg), k, s, name, thr, rule, cfg.seed,
                                      "ours")
        if rule == s.cloud_kv[0]:   # the same token pattern, a SmolLM2-135M-shaped model cut at the same fraction
            kp = round(SMOLLM2_SHAPE.depth * k / mcfg.depth)
            tp = split.traffic(edge, lengths_W, d_model=SMOLLM2_SHAPE.d_model, depth=SMOLLM2_SHAPE.depth,
                               edge_layers=kp, cloud_kv=rule, bytes_per_value=s.bytes_per_value,
                               token_bytes=s.token_id_bytes)
            latency_rows += latency_table(tp, edge, lengths_W, SMOLLM2_SHAPE, kp, s, name, thr, rule, cfg.seed,
                                          f"SmolLM2-135M shape, cut after {kp} (projection)")
    return rows, paired, latency_rows, raw


def equal_as_floats(row: dict, tol: float = 1e-6) -> dict:
    """A paired row whose difference and interval are all within ``tol`` of 0 (the same computation in another
    order: threshold 1.0 against the full model) reads "equal up to float rounding", not a tiny win or loss."""
    for key in ("nll", "agree"):
        if all(abs(row.get(f"{key}_{f}", 1.0)) < tol for f in ("diff", "ci95_lo", "ci95_hi")):
            row[f"{key}_reading"] = "equal up to float rounding"
    return row


def latency_table(t, edge, lengths_W, shape, k, s, name, thr, rule, seed, scale) -> list[dict]:
    """One row per uplink speed: modelled seconds per sequence of the split, naive collaboration, cloud only and
    edge only, and the split's time saved against cloud only (paired bootstrap over sequences)."""
    out = []
    for mbps in s.uplink_mbps:
        cm = split.CostModel(uplink_bps=mbps * 1e6, downlink_bps=s.downlink_mbps * 1e6, rtt_s=s.rtt_ms / 1e3,
                             edge_flops=s.edge_tflops * 1e12, cloud_flops=s.cloud_tflops * 1e12)
        lat = split.latency(t, edge, lengths_W, shape, k, cm)
        saved = bootstrap.paired_bootstrap(lat.cloud_only, lat.split, seed=seed)
        rel = saved.diff / float(lat.cloud_only.mean())
        out.append({"scale": scale, "method": name, "threshold": thr, "cloud_kv": rule, "uplink_mbps": mbps,
                    "split_s": float(lat.split.mean()), "naive_s": float(lat.naive.mean()),
                    "cloud_only_s": float(lat.cloud_only.mean()), "edge_only_s": float(lat.edge_only.mean()),
                    "saved_vs_cloud": rel, "saved_lo": saved.lo / float(lat.cloud_only.mean()),
                    "saved_hi": saved.hi / float(lat.cloud_only.mean()),
                    "cloud_flops_share": float(lat.cloud_flops.mean() / lat.cloud_only_flops.mean())})
    return out


def report(run, corpus, mcfg, test, train_s, base_rows, rows, paired, latency_rows, raw) -> Report:
    cfg, e, s = run.cfg, run.cfg.eval, run.cfg.split
    m = cfg.model
    lp = costs.lm_param_counts(mcfg)
    md = "\n\n".join([
        "# CE-CoLLM: cloud-edge split decoding (split after layer k, max-probability exit on the edge)",
        run.prov.markdown() + f"  \nData: {corpus.description}; {len(test.prompts)} batches of {e.batch} validation "
        f"windows ({e.prompt_len} prompt + {e.new_tokens} generated characters).  \n"
        f"Scale: decoder LM, {m.depth} layers, width {m.d_model}, {m.num_heads} query / {m.num_kv_heads} KV heads, "
        f"exits after every layer, {cfg.train.steps} steps of batch {cfg.data.batch_size} x {cfg.data.seq_len} "
        f"(training wall-clock in this run {train_s:.0f} s; about 0 when resumed). Split after layer k for k in "
        f"{list(s.ks)}: the edge runs layers 1..k and the exit after layer k, the cloud layers k+1..{m.depth} and the "
        "final exit. Head cost: one vocabulary head is "
        f"{lp['head']:,} parameters against {lp['layer']:,} per layer ({lp['head'] / lp['layer']:.2f} layers; "
        "SmolLM2-135M's is about 8 of its 30 layers).",
        "Paper: CE-CoLLM (Jin, Wu; arXiv:2411.02829) reports up to 13.81% less inference time and 84.55% less "
        "cloud computation than cloud-only deployment with comparable accuracy (abstract v1; v2: 13.81% and over "
        "84.53% of the workload offloaded to the edge), on LLaMA-class models with real links.",
        "## Reference models\nval_nll / val_ppl: teacher forced through the decode loop; agreement: fraction of "
        "free-running greedy tokens equal to the full model's.",
        report_lib.markdown_table(base_rows, list(base_rows[0]), ".4f"),
        "## Split decoding at the paper's thresholds\n"
        "edge_frac: fraction of generated tokens (after the first, which the prefill's cloud call returns) "
        "finished on the edge, free-running greedy, with its bootstrap 95% interval over sequences. up_kB: mean "
        f"kB uploaded per sequence with the cloud context manager (fp16 layer-k hidden states, "
        f"{m.d_model} x {s.bytes_per_value} bytes each: the prompt's, then at each cloud call the pending states of "
        "the edge-finished tokens since the last call and its own); naive_up_kB: without it (each cloud call "
        f"re-sends the whole context); down_kB: token ids returned ({s.token_id_bytes} bytes per call). "
        "cloud_token_layers: token-layers the cloud runs per sequence (`deferred`: every uploaded state through "
        "its layers, so the cloud's cache is the full model's; `propagate`: CALM's state propagation, K/V "
        "projections only for edge-finished tokens, counted in cloud_kv_token_layers).",
        report_lib.markdown_table(rows, list(rows[0]), ".4g"),
        "## Quality against the full model and the edge-only model, paired\n"
        "a minus b on the same windows, paired bootstrap 95% intervals over windows (`eejax.eval.bootstrap`).",
        report_lib.markdown_table(paired, list(paired[0]), ".4f"),
        "## Modelled latency per sequence (cost model, not measured)\n"
        f"Stated speeds: uplink in the table, downlink {s.downlink_mbps:g} Mbit/s, one round trip of "
        f"{s.rtt_ms:g} ms per cloud call, edge {s.edge_tflops:g} TFLOP/s, cloud {s.cloud_tflops:g} TFLOP/s "
        "effective; FLOPs = 2 x parameters per token-layer + attention over the mean context; every cloud call on "
        "the critical path (autoregressive). cloud_only: the token ids go up and the full model runs in the cloud; "
        "edge_only: every token at the edge exit; naive: the split's exits without the context manager. "
        "saved_vs_cloud: 1 - split / cloud_only with its paired bootstrap 95% interval over sequences; "
        "cloud_flops_share: the cloud's FLOPs under the split over cloud-only's. The projection rows keep our "
        "model's per-token edge/cloud pattern and charge the bytes and FLOPs of a SmolLM2-135M-shaped model split "
        "cut after the same fraction of its depth (that model's own exit rates would differ).",
        report_lib.markdown_table(latency_rows, list(latency_rows[0]), ".4g")])
    return Report(md, {"data": corpus.description, "train_seconds": train_s, "reference": base_rows,
                       "rows": rows, "paired_differences": paired, "latency": latency_rows, "raw": raw})


if __name__ == "__main__":
    main()
