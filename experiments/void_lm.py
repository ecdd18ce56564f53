"""Void in Language Models (LAC, arXiv:2505.14467) on SmolLM2-135M-Instruct: per-layer void maps in prompt
processing (PP) and response generation (RG), fraction of layers activated vs WikiText-2 perplexity and greedy
agreement.

    python -m experiments.void_lm --config configs/void_lm.py:smoke [--outdir DIR]

The rule is ``eejax.decoding.void`` (engine layer function + vectorised form); see configs/void_lm.py for the
protocol, the causal question and the scale.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.decoding import void
from eejax.eval import report as report_lib
from eejax.exits import engine
from eejax.models import lm as lm_lib
from experiments import _common_smollm2 as common
from experiments._common import Report, Run, experiment

NAME = "void_lm"


# the paper's headline numbers, written beside ours
PAPER = ('Paper (arXiv:2505.14467, abstract): MMLU **69.24 -> 71.29** using **30%** of layers '
         '(Qwen2.5-7B-Instruct), GPQA Diamond **13.88 -> 18.36** using **70%** (Mistral-7B-Instruct-v0.3). '
         'Ours: the fraction of layers activated and the perplexity of this 135M model in the tables below '
         '(the README sets them side by side).')

def hidden_stack(m, x_BxT):
    """``(N+1) x B x T x D``: the embedding and every layer's output of the full model (causal, one pass)."""
    pos = jnp.broadcast_to(jnp.arange(x_BxT.shape[1]), x_BxT.shape)
    mask = lm_lib.causal_mask(jnp.ones(x_BxT.shape, bool))
    h0 = m.embed_tokens(x_BxT)
    _, h_N = engine.run_layers(m.layers, h0, layer_fn=lambda layer, h, ctx: layer(h, pos, mask))
    return jnp.concatenate([h0[None], h_N])


def norms_of(stack):
    return jnp.linalg.norm(stack.astype(jnp.float32), axis=-1)


class Passes(NamedTuple):
    """The jitted teacher-forced passes of the LAC rule over the model."""
    official: Any   # (params, x_BxT, y_BxT, alphas_A) -> (full nll_B, nll_AxB, voids_AxN)
    carry: Any      # (params, x_BxT, y_BxT, alpha) -> (nll_B, voids_N)
    norms: Any      # (params, x_BxT) -> the hidden-state norms of every layer


def passes(s, last_exit) -> Passes:
    @jax.jit
    def official_fn(params, x_BxT, y_BxT, alphas_A):
        """Official LAC (run-and-discard, the full model's stream): NLL per alpha and window, void counts per layer,
        from ONE forward: the head reads the output of each token's last activated layer."""
        m = nnx.merge(s.graphdef, params)
        stack = hidden_stack(m, x_BxT)
        nrm = norms_of(stack)

        def per_alpha(a):
            vd = void.voids(nrm[0], nrm[1:], a)
            kept = jnp.take_along_axis(stack, (void.last_active(vd) + 1)[None, :, :, None], axis=0)[0]
            return common.nll_sum(m.exit_logits(kept, last_exit), y_BxT), jnp.sum(vd, axis=(1, 2))

        nll_A, voids_AxN = jax.lax.map(per_alpha, alphas_A)
        return common.nll_sum(m.exit_logits(stack[-1], last_exit), y_BxT), nll_A, voids_AxN

    @jax.jit
    def carry_fn(params, x_BxT, y_BxT, alpha):
        m = nnx.merge(s.graphdef, params)
        b, t = x_BxT.shape
        r = void.forward(m, x_BxT, kv_lib.empty_state(m, b, t), alpha, mode="carry")
        return common.nll_sum(r.logits, y_BxT), jnp.sum(r.lac.void_NxBxT, axis=(1, 2))

    @jax.jit
    def norms_fn(params, x_BxT):
        return norms_of(hidden_stack(nnx.merge(s.graphdef, params), x_BxT))

    return Passes(official_fn, carry_fn, norms_fn)


@experiment(NAME)
def main(run: Run) -> Report:
    cfg, args = run.cfg, run.args
    s = common.load_lm(cfg.model.name, depth=cfg.model.depth)
    n = s.cfg.depth
    lac = cfg.lac
    alphas = [float(a) for a in lac.alphas]
    print(f"device: {run.prov.device}; model {cfg.model.name}: {n} layers, loaded in {s.load_seconds:.0f} s",
          flush=True)
    fns = passes(s, s.cfg.num_exits - 1)
    rows, layer_void_test, full_ppl, tokens = perplexities(cfg, args, s, fns, alphas)
    pp_rg = pp_and_rg(cfg, args, s, fns, alphas)
    drows, pp_void_NxB = generating(cfg, s, pp_rg)
    return report(run, s, alphas, rows, layer_void_test, full_ppl, tokens, pp_rg, drows, pp_void_NxB)


def perplexities(cfg, args, s, fns, alphas):
    """Perplexity on test (every token processed as in prompt processing: one causal pass)."""
    n, lac, ev = s.cfg.depth, cfg.lac, cfg.ppl
    official_fn, carry_fn = fns.official, fns.carry
    test = common.wikitext_ids(args.data_dir, s.tokenizer, "test", ev.max_tokens)
    wins = common.nll_windows(test, ev.context, ev.batch)
    start = time.perf_counter()
    full_nll, nll_A, void_AxN = 0.0, np.zeros(len(alphas)), np.zeros((len(alphas), n))
    for x, y in wins:
        f, a, v = official_fn(s.params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(alphas, jnp.float32))
        full_nll += float(np.sum(f))
        nll_A += np.asarray(a).sum(1)
        void_AxN += np.asarray(v)
    tokens = len(wins) * ev.batch * ev.context
    full_ppl = float(np.exp(full_nll / tokens))
    rows = [{"mode": "full model", "alpha": None, "layers_active": 1.0, "layers_computed": 1.0,
             "token_ppl": full_ppl}]
    for i, a in enumerate(alphas):
        rows.append({"mode": "official (run-and-discard)", "alpha": a,
                     "layers_active": float(1 - void_AxN[i].sum() / (n * tokens)), "layers_computed": 1.0,
                     "token_ppl": float(np.exp(nll_A[i] / tokens))})
    print(rows, f"({time.perf_counter() - start:.0f} s)", flush=True)
    layer_void_test = {a: (void_AxN[i] / tokens).tolist() for i, a in enumerate(alphas)}
    carry_wins = wins[:max(1, lac.carry_tokens // (ev.batch * ev.context))]
    carry_tokens = len(carry_wins) * ev.batch * ev.context
    for a in lac.carry_alphas:
        nll, vc = 0.0, np.zeros(n)
        for x, y in carry_wins:
            l_, v_ = carry_fn(s.params, jnp.asarray(x), jnp.asarray(y), jnp.float32(a))
            nll += float(np.sum(l_))
            vc += np.asarray(v_)
        rows.append({"mode": f"carry (first {carry_tokens} tokens)", "alpha": float(a),
                     "layers_active": float(1 - vc.sum() / (n * carry_tokens)), "layers_computed": 1.0,
                     "token_ppl": float(np.exp(nll / carry_tokens))})
        print(rows[-1], flush=True)
    if lac.carry_alphas:   # the full model's perplexity on the same first windows, for the carry rows
        nll = sum(float(np.sum(official_fn(s.params, jnp.asarray(x), jnp.asarray(y),
                                           jnp.zeros((1,), jnp.float32))[0])) for x, y in carry_wins)
        rows.append({"mode": f"full model (first {carry_tokens} tokens)", "alpha": None, "layers_active": 1.0,
                     "layers_computed": 1.0, "token_ppl": float(np.exp(nll / carry_tokens))})

    return rows, layer_void_test, full_ppl, tokens


class PpRg(NamedTuple):
    prompt_BxP: Any
    ref: np.ndarray
    nrm: Any
    maps: dict
    focus: float
    vd_focus: np.ndarray
    pp_rg_rows: list


def pp_and_rg(cfg, args, s, fns, alphas) -> PpRg:
    """Fixed prompts: the full model's greedy continuation; void maps in PP (prompt tokens) and RG (the tokens fed
    while generating), from the full model's states (official LAC leaves the stream as it is, so the maps of a
    teacher-forced pass equal the ones measured while decoding: tests/test_ffn_skip_void.py)."""
    lac, dec, norms_fn = cfg.lac, cfg.decode, fns.norms
    val = common.wikitext_ids(args.data_dir, s.tokenizer, "validation", max(4 * dec.prompt_len * dec.prompts, 2048))
    prompt_BxP = jnp.asarray(common.spaced_prompts(val, dec.prompts, dec.prompt_len))
    full_gen = common.generator(s.graphdef, common.full_step, dec.new_tokens)
    ref = np.asarray(full_gen(s.params, prompt_BxP).tokens_BxG)
    seq = jnp.concatenate([prompt_BxP, jnp.asarray(ref[:, :-1])], axis=1)
    nrm = norms_fn(s.params, seq)
    p = dec.prompt_len
    maps = {}
    for a in alphas:
        vd = np.asarray(void.voids(nrm[0], nrm[1:], a))           # N x B x (P + G - 1)
        maps[a] = {"pp": vd[:, :, :p].mean((1, 2)).tolist(), "rg": vd[:, :, p:].mean((1, 2)).tolist(),
                   "pp_active": float(1 - vd[:, :, :p].mean()), "rg_active": float(1 - vd[:, :, p:].mean())}
    focus = min(alphas, key=lambda a: abs(a - lac.focus_alpha))
    vd_focus = np.asarray(void.voids(nrm[0], nrm[1:], focus))
    pp_rg_rows = [{"alpha": a, "PP_layers_active": maps[a]["pp_active"], "RG_layers_active": maps[a]["rg_active"],
                   "PP_vs_RG_layer_profile_L1": float(np.abs(np.subtract(maps[a]["pp"], maps[a]["rg"])).mean())}
                  for a in alphas]
    print(pp_rg_rows, flush=True)

    return PpRg(prompt_BxP, ref, nrm, maps, focus, vd_focus, pp_rg_rows)


def generating(cfg, s, pp_rg):
    """LAC while generating, and the causal PP-pattern skip."""
    n, dec, p = s.cfg.depth, cfg.decode, cfg.decode.prompt_len
    prompt_BxP, ref, nrm = pp_rg.prompt_BxP, pp_rg.ref, pp_rg.nrm
    # 3. LAC while generating (official: the head reads the last activated layer's output; RG phase; token 0 from
    # the full prefill), and a causal variant that skips layers without running them: the layers void for at least
    # half of a row's prompt tokens (PP pattern, decided before generating) are skipped for all its generated
    # tokens (engine.row_skip: K/V of a skipped layer written from its input, as CALM's propagation).
    lac_gen = common.generator(s.graphdef, lambda m, t, st, i, a: void.lac_step(m, t, st, i, a), dec.new_tokens)

    def pp_step(m, t, st, i, keep_NxB):
        out, st = kv_lib.forward(m, t[:, None], st, engine.row_skip(keep_NxB, [n - 1]), kv_lib.final_head(m))
        return out.logits_BxC, per_token.StepStats(
            out.exit_layer_B, jnp.sum(keep_NxB, 0).astype(jnp.int32), out.score_B, out.layers_run,
            out.out.hidden_BxD), st

    pp_gen = common.generator(s.graphdef, pp_step, dec.new_tokens)
    pp_void_NxB = {}
    drows = []
    for a in [float(x) for x in dec.alphas]:
        gen = lac_gen(s.params, prompt_BxP, jnp.float32(a))
        drows.append({"decoder": "LAC official (RG)", "alpha": a,
                      "layers_active": float(np.asarray(gen.layers_BxG)[:, 1:].mean() / n), "layers_computed": 1.0}
                     | common.agreement(ref, np.asarray(gen.tokens_BxG)))
        print(drows[-1], flush=True)
        vd = np.asarray(void.voids(nrm[0][:, :p], nrm[1:, :, :p], a))     # N x B x P: prompt tokens only
        keep = vd.mean(2) < 0.5
        keep[-1] = True                   # the last layer always runs (the final head reads it)
        pp_void_NxB[a] = (~keep).mean(1).tolist()
        gen = pp_gen(s.params, prompt_BxP, jnp.asarray(keep))
        frac = float(keep.mean())
        drows.append({"decoder": "PP-pattern skip (causal)", "alpha": a, "layers_active": frac,
                      "layers_computed": frac} | common.agreement(ref, np.asarray(gen.tokens_BxG)))
        print(drows[-1], flush=True)

    return drows, pp_void_NxB


def plots(rows, drows, maps, alphas, focus, vd_focus, full_ppl, n, p, folder):
    off = [r for r in rows if r["mode"].startswith("official")]
    car = [r for r in rows if r["mode"].startswith("carry")]
    curves = {"official (run-and-discard)": ([r["layers_active"] for r in off], [r["token_ppl"] for r in off])}
    if car:
        curves["carry (first windows)"] = ([r["layers_active"] for r in car], [r["token_ppl"] for r in car])
    common.plot_xy(curves, folder / "ppl_vs_layers_active.png", xlabel="fraction of layers activated (LAC)",
                   ylabel="WikiText-2 token perplexity", title="LAC on SmolLM2-135M", hline=full_ppl)
    dcurves = {}
    for name in ("LAC official (RG)", "PP-pattern skip (causal)"):
        rr = [r for r in drows if r["decoder"] == name]
        dcurves[name] = ([r["layers_active"] for r in rr], [r["match"] for r in rr])
    common.plot_xy(dcurves, folder / "agreement_vs_layers_active.png", xlabel="fraction of layers activated",
                   ylabel="token match with full greedy", title="LAC while generating")
    common.plot_xy({"PP (prompt tokens)": (np.arange(n), maps[focus]["pp"]),
                    "RG (generated tokens)": (np.arange(n), maps[focus]["rg"])}, folder / "void_by_layer.png",
                   xlabel="layer", ylabel="fraction of tokens for which the layer is a void",
                   title=f"voids per layer, alpha={focus}")
    common.plot_map(np.asarray([maps[a]["pp"] for a in alphas]), [f"PP a={a}" for a in alphas],
                    folder / "void_map_pp.png", title="void fraction per layer, prompt processing",
                    cbar="void fraction")
    common.plot_map(np.asarray([maps[a]["rg"] for a in alphas]), [f"RG a={a}" for a in alphas],
                    folder / "void_map_rg.png", title="void fraction per layer, response generation",
                    cbar="void fraction")
    common.plot_map(vd_focus[:, 0, :].astype(float), list(range(n)), folder / "void_map_prompt0.png",
                    title=f"prompt 0: voids (1) per layer and token, alpha={focus}; prompt | generated at {p}",
                    cbar="void", xlabel="token")


def report(run, s, alphas, rows, layer_void_test, full_ppl, tokens, pp_rg, drows, pp_void_NxB) -> Report:
    cfg, n, p, wall = run.cfg, s.cfg.depth, run.cfg.decode.prompt_len, run.seconds()
    ev, dec = cfg.ppl, cfg.decode
    maps, focus, vd_focus, pp_rg_rows = pp_rg.maps, pp_rg.focus, pp_rg.vd_focus, pp_rg.pp_rg_rows
    md = "\n\n".join([
        "# Void in Language Models (LAC) on SmolLM2-135M-Instruct (WikiText-2)",
        run.prov.markdown() + f"  \nModel: {cfg.model.name}, {n} layers. Rule: layer l is a void for a token when "
        "||h_l|| - ||h_{l-1}|| < alpha (max_{j<l} - min_{j<l} of the same differences) (the released lac.py). "
        f"Whole run {wall / 60:.1f} min.",
        PAPER,
        f"## Perplexity (test, first {tokens:,} tokens, windows of {ev.context}, one causal pass)\n"
        "official: the released code's skip (every layer runs and feeds the next; the head reads the output of the "
        "token's last activated layer): decided after running the layer, so layers_computed is 1. carry: a void "
        "layer's output is also dropped from the stream the next layer reads (still decided after running it). "
        "layers_active: the paper's 'fraction of layers used'.",
        report_lib.markdown_table(rows, list(rows[0]), ".4f"),
        f"## Prompt processing vs response generation ({dec.prompts} prompts of {dec.prompt_len} validation tokens, "
        f"the full model's greedy {dec.new_tokens}-token continuation)\nPP: the prompt tokens; RG: the tokens fed "
        "while generating. PP_vs_RG_layer_profile_L1: mean over layers of |void fraction PP - RG|.",
        report_lib.markdown_table(pp_rg_rows, list(pp_rg_rows[0]), ".3f"),
        "## Generating with voids skipped\nLAC official (RG): LAC on every generated token, the head reading the "
        "last activated layer (no layer is saved). PP-pattern skip (causal): a row's layers that were voids for "
        ">= half of its prompt tokens are skipped for all its generated tokens, decided before generating, so "
        "they are not run (layers_computed = layers_active; the last layer always runs). match etc. against the "
        "full model's greedy tokens.",
        report_lib.markdown_table(drows, list(drows[0]), ".3f"),
    ])
    return Report(md, {
        "load_seconds": s.load_seconds, "wall_seconds": wall,
        "ppl": rows, "full_ppl": full_ppl, "layer_void_fraction_test": layer_void_test, "pp_rg": maps,
        "pp_rg_rows": pp_rg_rows, "decode": drows, "pp_pattern_skip_fraction": pp_void_NxB, "focus_alpha": focus,
        "void_map_prompt0": vd_focus[:, 0, :].astype(int).tolist()},
        {".": lambda folder: plots(rows, drows, maps, alphas, focus, vd_focus, full_ppl, n, p, folder)})


if __name__ == "__main__":
    main()
