"""Shared plumbing of the layer-skipping experiments on the pretrained LM (experiments/uls.py, experiments/first.py).

model (SmolLM2-135M from its GGUF, or a tiny random LM with a byte tokenizer for smoke runs) -> WikiText-2 test
windows (a P-token prompt + G scored tokens each) and greedy prompts (disjoint, later in the file) -> decoding
*methods* evaluated the same way:

* perplexity: each window's prompt is prefilled at full depth (``layer_skip.prefill_pooled``), then its G tokens are
  fed teacher-forced through the method's real KV-cached decode step; the G - 1 tokens predicted by decode steps
  are scored (token 0 is predicted by the full-depth prefill for every method and is left out);
* greedy agreement: G free-running greedy tokens from the same prefill, compared position by position with the full
  model's (token 0 again excluded), and the mean identical prefix;
* layers: the mean layers a generated token ran (measured in the decode loop);
* wall-clock: decode-only tokens/s of free-running greedy decoding from a prefilled state (compile excluded, rounds
  interleaved across methods, best round), at the batch sizes of ``cfg.timing.batches``, against plain greedy
  decoding (``per_token.full_depth_step``).

A method is ``(name, step_fn, args_fn)``: ``step_fn(model, tok_B, state, i, *args)``, ``args_fn(prefilled) ->
args`` (traced: every skip set of one kind shares one compiled program; FiRST's args come from the prefill).

Shapes: W windows, B batch, P prompt tokens, G generated tokens, N layers.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.harness import config as config_lib
from eejax.harness import run
from eejax.data.text import ByteTokenizer, load_tokens
from eejax.decoding import layer_skip as ls
from eejax.decoding import per_token
from eejax.harness import results as result_files
from eejax.models import lm as lm_lib
from eejax.models import pretrained


class Setup(NamedTuple):
    cfg: Any
    args: Any
    prov: Any
    workdir: Any
    outdir: Any
    graphdef: Any
    params: Any
    tokenizer: Any
    mcfg: lm_lib.LMConfig
    load_s: float


def load_model(cfg):
    """``(graphdef, params, tokenizer, LMConfig)``: the pretrained LM, or (``model.name == "random"``) a tiny
    random LM of ``model.random`` with a byte tokenizer (smoke runs: no weight file)."""
    m = cfg.model
    if m.name == "random":
        mcfg = lm_lib.LMConfig(vocab_size=256, mlp="swiglu", **m.random.to_dict())
        mcfg = lm_lib.LMConfig(**{**mcfg.__dict__, "exits": (mcfg.depth - 1,)})
        graphdef, params = lm_lib.build(mcfg, cfg.seed)
        return graphdef, params, ByteTokenizer(), mcfg
    pre = pretrained.load(m.name, dtype=m.dtype, depth=m.depth or None)
    return pre.graphdef, pre.params, pre.tokenizer, pre.cfg


def setup(argv, name: str, doc: str) -> Setup:
    cfg, args = config_lib.parse_cli(argv, description=doc)
    prov = result_files.provenance(f"experiments.{name}", argv)
    workdir, outdir = run.prepare(cfg, args, name)
    print(f"device: {prov.device}", flush=True)
    start = time.perf_counter()
    graphdef, params, tok, mcfg = load_model(cfg)
    return Setup(cfg, args, prov, workdir, outdir, graphdef, params, tok, mcfg, time.perf_counter() - start)


def model_line(su: Setup) -> str:
    m = su.mcfg
    what = (f"{su.cfg.model.name} ({su.cfg.model.dtype})" if su.cfg.model.name != "random"
            else "a tiny random LM (smoke run: the numbers mean nothing)")
    return (f"Model: {what}: {m.depth} layers, width {m.d_model}, {m.num_heads} query / {m.num_kv_heads} KV heads, "
            f"SwiGLU {m.mlp_dim}, vocabulary {m.vocab_size:,}; frozen (no fine-tuning, no LoRA).")


# ----------------------------------------------------------------------------------------------------- data


class EvalData(NamedTuple):
    windows_WxL: np.ndarray    # perplexity windows: P prompt + G scored tokens
    prompts_QxP: np.ndarray    # greedy prompts (after the windows in the file)
    description: str


def wikitext_eval(cfg, args, tok) -> EvalData:
    e = cfg.eval
    ids = load_tokens(args.data_dir, "wikitext2", "test", tok)
    length = e.prompt_len + e.new_tokens
    need = e.windows * length + e.prompts * e.prompt_len
    if ids.size < need:
        raise ValueError(f"WikiText-2 test has {ids.size} tokens under this tokenizer; eval.windows={e.windows} x "
                         f"{length} + eval.prompts={e.prompts} x {e.prompt_len} need {need}")
    windows = ids[:e.windows * length].reshape(e.windows, length)
    prompts = ids[e.windows * length:need].reshape(e.prompts, e.prompt_len)
    desc = (f"WikiText-2 test (the stored, word-tokenized file) under the model's tokenizer ({ids.size:,} tokens): "
            f"perplexity on the first {e.windows} non-overlapping windows of {e.prompt_len} prompt + {e.new_tokens} "
            f"tokens ({e.windows * (e.new_tokens - 1):,} scored tokens); greedy agreement on the next {e.prompts} "
            f"prompts of {e.prompt_len} tokens x {e.new_tokens} new tokens")
    return EvalData(windows, prompts, desc)


# ----------------------------------------------------------------------------------------------------- methods


class Method(NamedTuple):
    name: str
    kind: str                       # compiled-program key: methods of one kind share a compiled decode
    step_fn: Callable
    args_fn: Callable               # Prefilled -> tuple of traced args
    detail: str = ""


def full_method() -> Method:
    return Method("full model", "full", lambda m, t, s, i: per_token.full_depth_step(m, t, s, i), lambda pre: ())


def table_method(name: str, layers, num_layers: int, detail: str = "") -> Method:
    table, count = ls.layer_table(layers, num_layers)
    return Method(name, "table", ls.table_step, lambda pre, t=table, c=count: (jnp.asarray(t), jnp.int32(c)), detail)


def row_method(name: str, keep_fn: Callable, detail: str = "", compact: bool = True) -> Method:
    """Per-row skip sets from the prefill: ``keep_fn(prefilled) -> bool[N, B]``."""
    step = (lambda m, t, s, i, keep: ls.row_step(m, t, s, i, keep, compact=compact))
    return Method(name, f"row-{compact}", step, lambda pre: (keep_fn(pre),), detail)


class Runner:
    """Jitted prefill and decode loops, one compiled program per (kind, forced or free)."""

    def __init__(self, graphdef, prompt_len: int, new_tokens: int):
        self.graphdef, self.p, self.g = graphdef, prompt_len, new_tokens
        self._fns: dict = {}
        cache = prompt_len + new_tokens

        def prefill(params, prompts_BxP):
            b = prompts_BxP.shape[0]
            return ls.prefill_pooled(nnx.merge(graphdef, params), prompts_BxP, jnp.full((b,), self.p, jnp.int32),
                                     cache)

        self.prefill = jax.jit(prefill)

    def decode_fn(self, method: Method, forced: bool):
        key = (method.kind, forced)
        if key not in self._fns:
            step, g, graphdef = method.step_fn, self.g, self.graphdef

            def f(params, logits, state, force, *args):
                return per_token.decode(nnx.merge(graphdef, params), logits, state, g,
                                        lambda m, t, s, i: step(m, t, s, i, *args),
                                        force_BxG=force if forced else None)

            self._fns[key] = jax.jit(f)
        return self._fns[key]

    def run(self, method: Method, params, pre: ls.Prefilled, force=None) -> per_token.Generation:
        fn = self.decode_fn(method, force is not None)
        return fn(params, pre.logits_BxV, pre.state, force, *method.args_fn(pre))


def perplexity(runner: Runner, params, windows_WxL: np.ndarray, methods: list[Method], batch: int,
               log=print) -> dict[str, dict]:
    """Teacher-forced NLL of each method over the windows (each batch prefilled once, shared by the methods), and
    each window's mean NLL (``nll_W``, for paired intervals: eejax.eval.bootstrap)."""
    p = runner.p
    nll = {m.name: 0.0 for m in methods}
    nll_w = {m.name: [] for m in methods}
    layers = {m.name: [] for m in methods}
    count = 0
    for start in range(0, windows_WxL.shape[0] - batch + 1, batch):
        w = jnp.asarray(windows_WxL[start:start + batch])
        pre = runner.prefill(params, w[:, :p])
        for m in methods:
            dec = runner.run(m, params, pre, force=w[:, p:])
            nll[m.name] -= float(jnp.sum(dec.logprob_BxG[:, 1:]))
            nll_w[m.name] += (-np.asarray(dec.logprob_BxG[:, 1:], np.float64).mean(1)).tolist()
            layers[m.name].append(np.asarray(dec.layers_BxG[:, 1:], np.float64))
        count += batch * (windows_WxL.shape[1] - p - 1)
        log(f"  perplexity: {start + batch}/{windows_WxL.shape[0]} windows, "
            + ", ".join(f"{k}: {np.exp(v / count):.2f}" for k, v in list(nll.items())[:4]) + " ...")
    return {k: {"nll": v / count, "ppl": float(np.exp(v / count)), "avg_layers": float(np.mean(layers[k])),
                "scored_tokens": count, "nll_W": nll_w[k]} for k, v in nll.items()}


def greedy(runner: Runner, params, prompts_QxP: np.ndarray, methods: list[Method], batch: int
           ) -> dict[str, dict]:
    """Free-running greedy tokens of each method and their agreement with the first method's (the full model)."""
    toks = {m.name: [] for m in methods}
    layers = {m.name: [] for m in methods}
    for start in range(0, prompts_QxP.shape[0] - batch + 1, batch):
        pre = runner.prefill(params, jnp.asarray(prompts_QxP[start:start + batch]))
        for m in methods:
            dec = runner.run(m, params, pre)
            toks[m.name].append(np.asarray(dec.tokens_BxG))
            layers[m.name].append(np.asarray(dec.layers_BxG[:, 1:], np.float64))
    ref = np.concatenate(toks[methods[0].name])[:, 1:]
    out = {}
    for m in methods:
        t = np.concatenate(toks[m.name])[:, 1:]
        same = t == ref
        prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
        out[m.name] = {"agreement": float(same.mean()), "prefix": float(prefix.mean()),
                       "avg_layers_greedy": float(np.mean(layers[m.name])), "tokens": t}
    return out


def timing(runner: Runner, params, prompts_QxP: np.ndarray, methods: list[Method], batches, rounds: int,
           log=print) -> dict[str, dict]:
    """Decode-only tokens/s of free-running greedy decoding per method and batch size (compile excluded; the
    methods are timed round-robin, best of ``rounds``), and the speed-up over the full model (first method)."""
    out = {m.name: {} for m in methods}
    for b in batches:
        pre = runner.prefill(params, jnp.asarray(prompts_QxP[:b]))
        calls = []
        for m in methods:
            fn = runner.decode_fn(m, False)
            args = (params, pre.logits_BxV, pre.state, None, *m.args_fn(pre))
            jax.block_until_ready(fn(*args))             # compile + warm-up
            calls.append((m.name, fn, args))
        best = {name: np.inf for name, _, _ in calls}
        for _ in range(rounds):
            for name, fn, args in calls:
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                best[name] = min(best[name], time.perf_counter() - t0)
        for name in best:
            tps = b * runner.g / best[name]
            out[name][f"b{b}_tok_s"] = tps
            out[name][f"b{b}_speedup"] = tps / (b * runner.g / best[methods[0].name])
        log(f"  timing batch {b}: " + ", ".join(f"{k}: {out[k][f'b{b}_tok_s']:.1f} tok/s" for k in best))
    return out
