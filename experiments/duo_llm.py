"""Duo-LLM (arXiv:2410.10846) at small scale: a char LM with a big and a small FFN per layer, trained with uniform
random routing per token and layer; per budget of k big layers the oracle route (it sees the next token), random
routes, the best fixed pattern and a learned router, scored by validation NLL per token.

    python -m experiments.duo_llm --config configs/duo_llm.py:smoke --data_dir DIR [--outdir DIR]

See configs/duo_llm.py for the runbook. The mechanism is the library's: ``engine.ffn_route`` programs run by
``lm.routed_nll`` / ``lm.pattern_nll``, ``lm.duo_lm_loss`` on the one Trainer, ``routing.oracle`` /
``routing.budget_routes`` / ``routing.router_loss``, ``costs.ffn_route_flops``.
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.lm import WindowIterator
from eejax.exits import costs, engine, routing
from eejax.eval import bootstrap, report
from eejax.models import lm
from eejax.train import ArrayIterator
from experiments import _common_lm as lm_common
from experiments._common import Report, Run, experiment

NAME = "duo_llm"
BUCKETS = ((0, 8), (8, 2), (2, 1))   # position buckets, as fractions 1/n of T: [0, T/8), [T/8, T/2), [T/2, T)

PAPER = ("arXiv:2410.10846 (abstract): trained routers behave differently from oracles and are often suboptimal; "
         "with oracle routing, a large module in just one layer outperforms large modules in all layers")


def windows(ids, batch: int, seq_len: int, batches: int, seed: int, shuffle: bool) -> dict:
    """``batches`` x ``batch`` windows stacked into one ``W x T`` batch of tokens and targets."""
    it = WindowIterator(ids, batch, seq_len, seed=seed, shuffle=shuffle, max_batches=batches)
    got = [next(it) for _ in range(batches)]
    return {k: jnp.concatenate([jnp.asarray(g[k]) for g in got]) for k in ("tokens", "targets")}


class Fns:
    """The jitted evaluations of one model definition (NLL per token, ``W x T`` flattened to N)."""

    def __init__(self, graphdef, patterns_PxL):
        model = lambda p: nnx.merge(graphdef, p)
        self.table = jax.jit(lambda p, w: lm.pattern_nll(model(p), w["tokens"], w["targets"], patterns_PxL))
        self.routed = jax.jit(lambda p, w, r: lm.routed_nll(model(p), w["tokens"], w["targets"], r))
        self.feats = jax.jit(lambda p, w: lm.router_features(model(p), w["tokens"]))
        self.patterns = patterns_PxL

    def pattern_table(self, params, w) -> np.ndarray:
        return np.asarray(self.table(params, w)).reshape(len(self.patterns), -1)             # P x N

    def per_token(self, params, w, route_NxWxT) -> np.ndarray:
        return np.asarray(self.routed(params, w, jnp.asarray(route_NxWxT, jnp.int32))).reshape(-1)

    def route_of(self, pattern_idx_N, w) -> np.ndarray:
        """``L x W x T``: each token's route from its pattern index."""
        wt = w["tokens"].shape
        return np.moveaxis(self.patterns[np.asarray(pattern_idx_N)].reshape(*wt, -1), -1, 0)


def random_arm(fns, params, val, calib, k: int, count: int) -> dict:
    """``count`` per-token random routes of k big layers: each one's mean validation NLL, the per-token mean over
    them, and the validation NLL of the one with the lowest calibration loss (selected off the validation set)."""
    means, calib_means, per_token = [], [], []
    for r in range(count):
        key = jax.random.fold_in(jax.random.key(1000 + k), r)
        nll = fns.per_token(params, val, routing.budget_routes(key, len(fns.patterns[0]), k, val["tokens"].shape))
        cal = fns.per_token(params, calib, routing.budget_routes(key, len(fns.patterns[0]), k, calib["tokens"].shape))
        means.append(nll.mean())
        calib_means.append(cal.mean())
        per_token.append(nll)
    best = int(np.argmin(calib_means))
    return {"means": np.asarray(means), "token_mean_N": np.mean(per_token, 0), "best_N": per_token[best]}


def train_router(cfg, run, fns, params, router_w, budgets) -> dict:
    """The linear pattern router on the oracle's labels of the router windows (the one Trainer)."""
    table = fns.pattern_table(params, router_w)
    labels_NxK = np.stack([routing.oracle(table, fns.patterns, k).pattern_N for k in budgets], 1).astype(np.int32)
    feat_NxD = np.asarray(fns.feats(params, router_w)).reshape(labels_NxK.shape[0], -1)
    batches = ArrayIterator({"feat": feat_NxD, "oracle": labels_NxK}, cfg.router.batch_tokens, seed=cfg.seed)
    start = routing.init_router(feat_NxD.shape[1], len(fns.patterns))
    return lm_common.fit(routing.router_loss(fns.patterns, budgets), start, cfg.router.optim, batches,
                         cfg.router.steps, pathlib.Path(run.workdir) / "router", cfg, "router")


def compare(a_N, b_N, groups_N, a: str, b: str, k: int) -> dict:
    d = bootstrap.paired_bootstrap(a_N, b_N, groups_N=groups_N, seed=0)
    return {"k": k, "a": a, "b": b, "nll_diff": d.diff, "ci95_lo": d.lo, "ci95_hi": d.hi,
            "reading": d.reading(a, b).replace(" above ", " worse than ").replace(" below ", " better than ")}


def evaluate(cfg, run, fns, params, mcfg, val, calib, router_w) -> dict:
    """Every arm at every budget on the validation windows, the comparisons, and the oracle's route shapes."""
    pats, depth = fns.patterns, mcfg.depth
    budgets = list(range(1, depth))
    table, cal_table = fns.pattern_table(params, val), fns.pattern_table(params, calib)
    w, t = val["tokens"].shape
    groups_N, pos_N = np.repeat(np.arange(w), t), np.tile(np.arange(t), w)
    router = train_router(cfg, run, fns, params, router_w, budgets)
    feat = fns.feats(params, val).reshape(w * t, -1)
    small, big = table[0], table[-1]
    flops = lambda route: float(costs.ffn_route_flops(mcfg, route, mcfg.small_mlp_dim).mean())
    full = flops(np.full((depth, 1, t), engine.FFN_BIG))
    rows, comps, shapes, oracles = [], [], [], {0: small, depth: big}
    for k in budgets:
        orc = routing.oracle(table, pats, k)
        oracles[k] = orc.loss_N
        rnd = random_arm(fns, params, val, calib, k, cfg.eval.random_routes)
        mask = routing.num_big(pats) == k
        fixed = int(np.argmin(np.where(mask, cal_table.mean(1), np.inf)))
        pick = np.asarray(routing.router_pick(router, feat, pats, k))
        rout = fns.per_token(params, val, fns.route_of(pick, val))
        p5, p50, p95 = np.percentile(rnd["means"], [5, 50, 95])
        rows.append({"k": k, "flops_rel": flops(fns.route_of(orc.pattern_N, val)) / full, "oracle": orc.loss_N.mean(),
                     "random_mean": rnd["means"].mean(), "random_p5": p5, "random_p50": p50, "random_p95": p95,
                     "random_min_on_val": rnd["means"].min(), "random_best": rnd["best_N"].mean(),
                     "best_fixed": table[fixed].mean(), "router": rout.mean()})
        comps += [compare(orc.loss_N, rnd["token_mean_N"], groups_N, "oracle", "random mean", k),
                  compare(rout, rnd["best_N"], groups_N, "router", "best random", k),
                  compare(rout, orc.loss_N, groups_N, "router", "oracle", k),
                  compare(rout, table[fixed], groups_N, "router", "best fixed pattern", k),
                  compare(orc.loss_N, big, groups_N, "oracle", "all-big", k)]
        big_L = (pats[orc.pattern_N] == engine.FFN_BIG).mean(0)
        shapes.append({"k": k, "prefix_frac": float(np.mean([routing.is_prefix(pats[p]) for p in orc.pattern_N])),
                       "chance": 1 / math.comb(depth, k), "fixed_pattern": _bits(pats[fixed]),
                       "router_prefix_frac": float(np.mean([routing.is_prefix(pats[p]) for p in pick])),
                       "router_oracle_agree": float(np.mean(pick == orc.pattern_N)),
                       "big_by_layer": " ".join(f"{x:.2f}" for x in big_L)})
    res = {"rows": rows, "compare": comps, "shapes": shapes, "all_small": small.mean(), "all_big": big.mean(),
           "all_small_flops_rel": flops(np.full((depth, 1, t), engine.FFN_SMALL)) / full, "all_big_flops": full,
           "position": position_rows(oracles, big, groups_N, pos_N, depth, t)}
    return json.loads(json.dumps(res, default=float))       # numpy scalars as plain floats


def _bits(pattern_L) -> str:
    return "".join("B" if c == engine.FFN_BIG else "s" for c in pattern_L)


def position_rows(oracles, big_N, groups_N, pos_N, depth: int, t: int) -> dict:
    """Per token the fewest big layers at which the oracle's NLL reaches the all-big NLL (``k*``), by position;
    the first bucket minus the last, paired over windows."""
    k_star = np.full(big_N.shape, depth)
    for k in range(depth - 1, -1, -1):
        k_star = np.where(oracles[k] <= big_N, k, k_star)
    spans = [(0 if a == 0 else t // a, t // b) for a, b in BUCKETS]
    rows = [{"positions": f"{lo}-{hi - 1}", "mean_k_star": float(k_star[(pos_N >= lo) & (pos_N < hi)].mean())}
            for lo, hi in spans]
    per_w = lambda lo, hi: np.asarray([k_star[(groups_N == g) & (pos_N >= lo) & (pos_N < hi)].mean()
                                       for g in np.unique(groups_N)])
    d = bootstrap.paired_bootstrap(per_w(*spans[0]), per_w(*spans[-1]), seed=0)
    return {"rows": rows, "first_minus_last": d.diff, "ci95_lo": d.lo, "ci95_hi": d.hi}


def write_report(cfg, run, corpus, res, wall_s) -> Report:
    m, rows = cfg.model, res["rows"]
    curves = {a: [(r["flops_rel"], r[a]) for r in rows] for a in ("oracle", "random_mean", "random_best", "router")}
    pos = res["position"]
    md = "\n\n".join([
        "# Duo-LLM: oracle, random, fixed and learned per-token FFN routes at k big layers",
        run.prov.markdown() + f"  \nData: {corpus.description}.  \nScale: {m.depth} layers, width {m.d_model}, big FFN "
        f"{m.mlp_dim}, small FFN {m.small_mlp_dim}; {cfg.train.steps} steps of batch {cfg.data.batch_size} x "
        f"{cfg.data.seq_len} with uniform random routes over {list(cfg.train.choices)}; validation "
        f"{cfg.eval.batches * cfg.eval.batch} windows of {cfg.data.seq_len}; {cfg.eval.random_routes} random routes per "
        f"budget; wall-clock {wall_s:.0f} s.  \nPaper: {PAPER}.",
        f"Validation NLL per token (nats). All-small {res['all_small']:.4f} (FLOPs {res['all_small_flops_rel']:.3f} "
        f"of all-big), all-big {res['all_big']:.4f}. `oracle` sees the next token (an upper bound, not a method); "
        "random routes: mean, percentiles, minimum over the validation means (optimistic), and `random_best`, the "
        "route with the lowest calibration NLL; `best_fixed`: the pattern of k big layers with the lowest "
        "calibration NLL; `router`: the learned linear router. `flops_rel`: FLOPs per token relative to all-big "
        "(attention always paid).",
        report.markdown_table(rows, list(rows[0]), ".4f"),
        "A minus B, NLL per token, paired bootstrap 95% interval over validation windows.",
        report.markdown_table(res["compare"], ["k", "a", "b", "nll_diff", "ci95_lo", "ci95_hi", "reading"], ".4f"),
        "Route shapes: fraction of oracle patterns whose big layers are a prefix (chance: 1 / C(L, k)), the "
        "router's, its agreement with the oracle, the best fixed pattern (B big, s small, layer 0 first) and the "
        "oracle's big-layer frequency per layer.",
        report.markdown_table(res["shapes"], list(res["shapes"][0]), ".3f"),
        "Fewest big layers at which the oracle reaches the all-big NLL (`k*`), mean by token position; first "
        f"bucket minus last {pos['first_minus_last']:+.3f} [{pos['ci95_lo']:+.3f}, {pos['ci95_hi']:+.3f}] "
        "(paired over windows).",
        report.markdown_table(pos["rows"], ["positions", "mean_k_star"], ".3f")])
    files = {"duo_llm_curves.png": lambda path: report.plot_accuracy_vs_flops(
        {k: [(x * res["all_big_flops"], y) for x, y in v] for k, v in curves.items()},
        [(res["all_small_flops_rel"] * res["all_big_flops"], res["all_small"], "all-small"),
         (res["all_big_flops"], res["all_big"], "all-big")], path,
        title="Duo-LLM routes at k big layers (x: MFLOPs per token)", ylabel="validation NLL (nats)")}
    return Report(md, res | {"data": corpus.description, "wall_seconds": wall_s}, files)


@experiment(NAME, data=lm_common.corpus)
def main(run: Run, corpus) -> Report:
    cfg = run.cfg
    mcfg = lm.LMConfig(vocab_size=corpus.tokenizer.vocab_size, exits=(cfg.model.depth - 1,), **cfg.model.to_dict())
    graphdef, params = lm.build(mcfg, cfg.seed)
    choices = tuple(engine.FFN_VARIANTS.index(c) for c in cfg.train.choices)
    params = lm_common.fit(lm.duo_lm_loss(graphdef, mcfg, choices=choices), params, cfg.train.optim,
                           WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.seed),
                           cfg.train.steps, pathlib.Path(run.workdir) / "duo", cfg, "duo LM (random routes)")
    e, s = cfg.eval, cfg.data.seq_len
    val = windows(corpus.eval_ids, e.batch, s, e.batches, 0, False)
    calib = windows(corpus.train_ids, e.batch, s, e.calib_batches, 7001, True)
    router_w = windows(corpus.train_ids, e.batch, s, cfg.router.batches, 7002, True)
    res = evaluate(cfg, run, Fns(graphdef, routing.patterns(mcfg.depth)), params, mcfg, val, calib, router_w)
    for r in res["rows"]:
        print(f"k={r['k']}: oracle {r['oracle']:.4f} random mean {r['random_mean']:.4f} best {r['random_best']:.4f} "
              f"fixed {r['best_fixed']:.4f} router {r['router']:.4f}", flush=True)
    return write_report(cfg, run, corpus, res, run.seconds())


if __name__ == "__main__":
    main()
