"""Shared plumbing of the experiments on the frozen, pretrained SmolLM2-135M (ULS, FiRST, FFN-SkipLLM, LAC voids,
Kangaroo, SpecEE, self-speculative decoding, the depth-efficiency / CoLa / CEED-VLA analyses): the model (or, for
smoke runs, a tiny random-weight LM with a byte tokenizer), the text it is evaluated and trained on, and the pieces
several of those papers share. Not a paper: a shared piece.

* model: ``load_lm`` (SmolLM2 from its GGUF, frozen; or ``name in RANDOM_NAMES``: a tiny random LM);
* text: WikiText-2 ids / windows / prompts, Gutenberg training windows, evenly spread chunks;
* layer skipping (ULS, FiRST): decoding *methods* evaluated alike (``Runner``, ``perplexity``, ``greedy``,
  ``timing``): each window's prompt is prefilled at full depth, then its G tokens are fed teacher-forced through
  the method's real KV-cached decode step (token 0, predicted by the prefill, is left out); greedy agreement with
  the full model; decode-only tokens/s, methods timed round-robin;
* FFN / layer skips (FFN-SkipLLM, LAC): windowed NLL, greedy generation and agreement, per-token matmul counts,
  plots;
* analyses (depth efficiency, CoLa, CEED-VLA): the teacher-forced forward of a layer program;
* drafters (Kangaroo, SpecEE): the frozen model's features cached once, adapter training on them (the one
  Trainer), timed greedy decoding;
* exits trained on the frozen model (self-speculative decoding): ``train_exits`` (the one Trainer, the backbone
  passed frozen), and the self-speculative cost model (``cost_speedups``, ``plot_sweep``), which
  experiments/self_speculative_costs.py also applies to a committed folder.

A layer-skip method is ``(name, step_fn, args_fn)``: ``step_fn(model, tok_B, state, i, *args)``, ``args_fn(prefilled)
-> args`` (traced: every skip set of one kind shares one compiled program; FiRST's args come from the prefill).

Shapes: W windows, B batch, P prompt tokens, G generated tokens, N layers, L drafter layers (cached), T tokens,
K top-k candidates, D width, E exits.
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure

from eejax.data.text import ByteTokenizer, detokenize_wikitext, load_text, load_tokens
from eejax.decoding import exit_training as et
from eejax.decoding import kangaroo as kg
from eejax.decoding import layer_skip as ls
from eejax.decoding import per_token
from eejax.exits import costs, engine
from eejax.models import lm as lm_lib
from eejax.train import ArrayIterator, Trainer, one_device_mesh, read_metrics
from experiments._common import logged_loss

RANDOM_NAMES = ("random", "random-tiny")   # smoke models: random weights, byte tokenizer (configs' model.name)

# ----------------------------------------------------------------------------------------------------- model


class LM(NamedTuple):
    graphdef: Any
    params: Any
    tokenizer: Any
    cfg: lm_lib.LMConfig
    description: str
    load_seconds: float

    @property
    def model(self) -> lm_lib.DecoderLM:
        return nnx.merge(self.graphdef, self.params)


def load_lm(name: str, *, dtype: str = "float32", depth: int = 0, seed: int = 0, random: dict | None = None,
            **exits) -> LM:
    """SmolLM2 (``pretrained.load(name, dtype, depth, **exits)``, frozen), or for ``name in RANDOM_NAMES`` a tiny
    random-weight LM over bytes: 4 layers (``depth`` when set), width 32, 4 query / 2 KV heads, SwiGLU 64
    (``random`` overrides those fields), the final exit only unless ``exits`` say otherwise, initialised from
    ``seed``. ``exits``: ``exits``, ``exit_head``, ``exit_rank`` as ``LMConfig`` / ``pretrained.load`` take them."""
    start = time.perf_counter()
    if name in RANDOM_NAMES:
        fields = {**dict(d_model=32, depth=depth or 4, num_heads=4, num_kv_heads=2, mlp_dim=64), **(random or {})}
        exit_layers = tuple(exits.pop("exits", ())) + (fields["depth"] - 1,)
        cfg = lm_lib.LMConfig(vocab_size=256, mlp="swiglu", exits=exit_layers,
                              dtype=None if dtype == "float32" else dtype, **fields, **exits)
        graphdef, params = lm_lib.build(cfg, seed)
        desc = (f"a tiny random-weight LM ({cfg.depth} layers, width {cfg.d_model}, byte vocabulary; smoke runs "
                "only: the numbers mean nothing)")
        return LM(graphdef, params, ByteTokenizer(), cfg, desc, time.perf_counter() - start)
    from eejax.models import pretrained  # noqa: PLC0415

    pre = pretrained.load(name, dtype=dtype, depth=depth or None, **exits)
    c = pre.cfg
    desc = (f"{name} (SmolLM2-135M-Instruct from `{pretrained.weights_path(name).name}`, GGUF Q4_1 dequantized "
            f"to {dtype}): {c.depth} layers, width {c.d_model}, {c.num_heads}/{c.num_kv_heads} heads, SwiGLU "
            f"{c.mlp_dim}, vocabulary {c.vocab_size:,}, pre-RMSNorm, tied embeddings; frozen")
    return LM(pre.graphdef, pre.params, pre.tokenizer, c, desc, time.perf_counter() - start)


def model_of(run) -> LM:
    """The run's model from ``cfg.model`` (``name``; ``dtype``, ``depth`` and the smoke LM's ``random`` fields when
    the config has them; seeded by ``cfg.seed``), after printing the device."""
    cfg, m = run.cfg, run.cfg.model
    print(f"device: {run.prov.device}", flush=True)
    return load_lm(m.name, dtype=m.get("dtype", "float32"), depth=m.get("depth", 0), seed=cfg.get("seed", 0),
                   random=m.random.to_dict() if "random" in m else None)


class Setup(NamedTuple):
    """What the layer-skip scripts (uls.py, first.py) start from: the run and the loaded model."""
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


def setup(run) -> Setup:
    """The run and its model (``model_of``)."""
    lm = model_of(run)
    return Setup(run.cfg, run.args, run.prov, run.workdir, run.outdir, lm.graphdef, lm.params, lm.tokenizer, lm.cfg,
                 lm.load_seconds)


def model_line(su) -> str:
    m = su.mcfg
    what = (f"{su.cfg.model.name} ({su.cfg.model.dtype})" if su.cfg.model.name != "random"
            else "a tiny random LM (smoke run: the numbers mean nothing)")
    return (f"Model: {what}: {m.depth} layers, width {m.d_model}, {m.num_heads} query / {m.num_kv_heads} KV heads, "
            f"SwiGLU {m.mlp_dim}, vocabulary {m.vocab_size:,}; frozen (no fine-tuning, no LoRA).")


# ------------------------------------------------------------------------------------------------------ text


def wikitext_ids(data_dir, tokenizer, split: str, num_tokens: int, chars: int | None = None) -> np.ndarray:
    """The first ``num_tokens + 1`` token ids of WikiText-2 ``split`` (as stored); only the first ``chars``
    characters are tokenized (default 12 a token + 1000: ~4 chars/token, an ample margin), all of them if short."""
    text = load_text(data_dir, "wikitext2", split)
    chars = num_tokens * 12 + 1000 if chars is None else chars
    ids = np.asarray(tokenizer.encode(text[:chars]), np.int32)
    if ids.size < num_tokens + 1:
        ids = np.asarray(tokenizer.encode(text), np.int32)
    if ids.size < num_tokens + 1:
        raise ValueError(f"wikitext2/{split} has {ids.size} tokens, fewer than the {num_tokens + 1} asked for")
    return ids[:num_tokens + 1]


def nll_windows(ids: np.ndarray, context: int, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows of ``context`` tokens (inputs, targets), ``batch`` per item; only full batches."""
    n = (ids.size - 1) // (context * batch) * batch
    if not n:
        raise ValueError(f"{ids.size} tokens do not fill one batch of {batch} windows of {context}")
    x = ids[:n * context].reshape(n, context)
    y = ids[1:n * context + 1].reshape(n, context)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def spaced_prompts(ids: np.ndarray, num: int, length: int) -> np.ndarray:
    """``int32[num, length]``: fixed prompts, slices of ``ids`` at evenly spaced offsets (all the same length)."""
    starts = np.linspace(0, ids.size - length - 1, num).astype(int)
    return np.stack([ids[s:s + length] for s in starts]).astype(np.int32)


def wikitext_head(data_dir, tokenizer, max_tokens: int, split: str = "test") -> np.ndarray:
    """The first ``max_tokens`` ids of WikiText-2 (as stored) under the model's tokenizer (only the characters
    needed are tokenized: about 6 characters per token is plenty)."""
    return wikitext_ids(data_dir, tokenizer, split, max_tokens - 1, chars=max_tokens * 8)


def spread_windows(text: str, tokenizer, num: int, length: int, chars: int = 4000) -> np.ndarray:
    """``num`` windows of ``length`` token ids, each the start of a chunk of ``chars`` characters taken at evenly
    spaced offsets over ``text`` (so every book contributes), cut at a line start."""
    if num < 1:
        return np.zeros((0, length), np.int32)
    offsets = np.linspace(0, max(len(text) - chars, 0), num).astype(int)
    out = []
    for o in offsets:
        start = text.find("\n", o)
        start = o if start < 0 or start - o > chars // 2 else start + 1
        ids = tokenizer.encode(text[start:start + chars])
        if len(ids) < length:
            raise ValueError(f"a chunk of {chars} characters gave {len(ids)} < {length} tokens; raise chars")
        out.append(ids[:length])
    return np.asarray(out, np.int32)


def contiguous_windows(text: str, tokenizer, num: int, length: int) -> np.ndarray:
    """The first ``num`` non-overlapping windows of ``length`` ids of ``text`` (tokenized up to what is needed)."""
    chars = num * length * 8
    ids = tokenizer.encode(text[:chars])
    if len(ids) < num * length:
        raise ValueError(f"{len(ids)} tokens < {num} x {length}")
    return np.asarray(ids[:num * length], np.int32).reshape(num, length)


def paragraph_prompts(text: str, tokenizer, num: int, length: int, chars: int = 2000) -> list[list[int]]:
    """``num`` prompts of ``length`` ids from evenly spaced paragraphs of ``text`` (WikiText headings skipped)."""
    offsets = np.linspace(0, max(len(text) - chars, 0), num + 2)[1:-1].astype(int)
    out = []
    for o in offsets:
        start = o
        while True:   # the next line that is prose, not a heading or blank
            nl = text.find("\n", start)
            if nl < 0:
                break
            line = text[nl + 1:text.find("\n", nl + 1)]
            start = nl + 1
            if len(line.strip()) > 200 and not line.strip().startswith("="):
                break
        ids = tokenizer.encode(text[start:start + chars])
        if len(ids) < length:                     # too close to the end of the text: take the offset itself
            ids = tokenizer.encode(text[o:o + chars])
        if len(ids) < length:
            raise ValueError(f"{chars} characters at offset {o} give {len(ids)} < {length} tokens")
        out.append([int(i) for i in ids[:length]])
    return out


def gutenberg_windows(data_dir, tokenizer, split: str, num: int, context: int) -> np.ndarray:
    """``num`` consecutive windows of ``context + 1`` tokens from the start of a Gutenberg split."""
    text = load_text(data_dir, "gutenberg", split)
    ids = np.asarray(tokenizer.encode(text[:num * (context + 1) * 8]), np.int32)
    if len(ids) < num * (context + 1):
        raise ValueError(f"gutenberg/{split}: {len(ids)} tokens do not fill {num} windows of {context + 1}")
    return ids[:num * (context + 1)].reshape(num, context + 1)


def wikitext_prompts(data_dir, tokenizer, split: str, num: int, length: int) -> np.ndarray:
    """``num`` prompts of ``length`` tokens from WikiText-2 ``split`` (detokenized): the start of each of the first
    paragraphs that have at least ``length`` tokens (article text, not headings)."""
    text = detokenize_wikitext(load_text(data_dir, "wikitext2", split))
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        ids = tokenizer.encode(line)
        if len(ids) >= length:
            out.append(np.asarray(ids[:length], np.int32))
        if len(out) == num:
            return np.stack(out)
    raise ValueError(f"wikitext2/{split}: only {len(out)} paragraphs with >= {length} tokens (need {num})")


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


# ------------------------------------------------------------------------------------------ layer skipping


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
        calls = {m.name: (runner.decode_fn(m, False), (params, pre.logits_BxV, pre.state, None, *m.args_fn(pre)))
                 for m in methods}
        # one warm-up round (compile), then best of the interleaved rounds
        best = {name: t.min_s for name, t in costs.measure_interleaved(calls, warmup=1, iters=rounds).items()}
        for name in best:
            tps = b * runner.g / best[name]
            out[name][f"b{b}_tok_s"] = tps
            out[name][f"b{b}_speedup"] = tps / (b * runner.g / best[methods[0].name])
        log(f"  timing batch {b}: " + ", ".join(f"{k}: {out[k][f'b{b}_tok_s']:.1f} tok/s" for k in best))
    return out


# ---------------------------------------------------------------------------------------- FFN / layer skips


def nll_sum(logits_BxTxV, targets_BxT) -> jax.Array:
    """Summed NLL per window (B)."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None], -1)[..., 0].sum(-1)


def generator(graphdef, step_fn, num_new: int):
    """``jit(f(params, prompt_BxP, *step_args) -> Generation)`` with every prompt of full length."""
    f = per_token.decode_fn(graphdef, step_fn, num_new)
    return jax.jit(lambda params, prompt, *a: f(params, prompt, jnp.full((prompt.shape[0],), prompt.shape[1],
                                                                         jnp.int32), *a))


def full_step(m, t, s, i):
    return per_token.full_depth_step(m, t, s, i)


def agreement(ref_BxG: np.ndarray, gen_BxG: np.ndarray) -> dict:
    """Position-wise token match with the full model's greedy continuation, and the identical prefix length."""
    eq = np.asarray(ref_BxG) == np.asarray(gen_BxG)
    prefix = np.where(eq.all(1), eq.shape[1], np.argmin(eq, axis=1))
    return {"match": float(eq.mean()), "identical_prefix": float(prefix.mean()),
            "identical_rows": float(eq.all(1).mean())}


def time_generate(fn, params, prompt_BxP, *args, repeats: int = 1) -> float:
    """Seconds of one jitted generate call, the best of ``repeats`` after a warm-up call (compile excluded)."""
    return costs.measure(fn, params, prompt_BxP, *args, warmup=1, iters=repeats).min_s


def layer_flops(cfg: lm_lib.LMConfig) -> dict:
    """Matmul multiply-adds per token (attention scores and norms excluded): per layer's attention projections,
    per FFN, and the output head."""
    d, kv = cfg.d_model, cfg.num_kv_heads * cfg.head_dim
    attn = 2 * d * d + 2 * d * kv
    ffn = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.mlp_dim
    return {"attn": attn, "ffn": ffn, "head": d * cfg.vocab_size}


def plot_xy(curves: dict, path, *, xlabel: str, ylabel: str, title: str = "", hline: float | None = None,
            logy: bool = False):
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for name, (x, y) in curves.items():
        order = np.argsort(x)
        ax.plot(np.asarray(x)[order], np.asarray(y)[order], marker="o", label=name)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8, label="full model")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_map(map_RxN: np.ndarray, row_labels, path, *, title: str, cbar: str, xlabel: str = "layer"):
    fig = Figure(figsize=(7, min(0.35 * len(row_labels) + 1.6, 7.0)))
    ax = fig.subplots()
    im = ax.imshow(map_RxN, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(np.nanmax(map_RxN))))
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=7)
    ax.set(xlabel=xlabel, title=title)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------- analyses


def causal_inputs(tokens_BxT):
    """Positions and causal mask of full (unpadded) rows."""
    b, t = tokens_BxT.shape
    pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    return pos_BxT, lm_lib.causal_mask(jnp.ones((b, t), bool))


def half_layer_program(layers) -> engine.Program:
    """Each stored layer of ``layers`` (in the given order) as two steps, its attention half then its MLP half, so
    the scan path returns the residual stream after every sublayer."""
    layers = [int(l) for l in layers]
    prog = engine.sequence(np.repeat(np.asarray(layers, np.int32), 2))
    return prog._replace(sub_S=np.tile(np.asarray([engine.ATTN, engine.MLP], np.int32), len(layers)))


def padded_program(prog: engine.Program, max_steps: int) -> engine.Program:
    """A static chain as a fixed-size traced table (padding steps after the last exit never run), so chains of any
    length up to ``max_steps`` share one compiled program."""
    s = prog.num_steps
    if s > max_steps:
        raise ValueError(f"a chain of {s} steps is longer than max_steps={max_steps}")
    pad = lambda a: np.concatenate([np.asarray(a, np.int32), np.zeros(max_steps - s, np.int32)])   # noqa: E731
    return engine.Program(jnp.asarray(pad(prog.layer_S)), jnp.asarray(pad(prog.repeat_S)),
                          jnp.asarray(prog.exit_step_E, jnp.int32))


def nll_of(logits_BxTxV, targets_BxT):
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None], -1)[..., 0]


# ---------------------------------------------------------------------------------------------------- drafters


def _features_fn(graphdef, layers, topk):
    def f(params, tokens_BxT):
        model = nnx.merge(graphdef, params)
        h0 = model.embed_tokens(tokens_BxT)
        valid = jnp.ones(tokens_BxT.shape, bool)
        pos, mask = model.positions(valid), lm_lib.causal_mask(valid)
        h_last, h_NxBxTxD = engine.run_layers(model.layers, h0, layer_fn=lambda layer, h, ctx: layer(h, pos, mask))
        logits = model.shared_head(model.final_norm(h_last)).astype(jnp.float32)
        p, idx = jax.lax.top_k(jax.nn.softmax(logits, -1), topk)
        hs = jnp.stack([h_NxBxTxD[l - 1] for l in layers]).astype(jnp.float16)
        return hs, idx.astype(jnp.int32), p.astype(jnp.float16), jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.jit(f)


def cache_draft_features(model: LM, tokens_WxT1: np.ndarray, layers, topk: int, batch: int, path: pathlib.Path,
                   log=print) -> dict:
    """The frozen model once over the windows: hidden states after the first l layers (float16, ``LxWxTxD``) and
    the full model's top-k next-token probabilities (``WxTxK``); stored at ``path`` and reused."""
    if path.exists():
        z = np.load(path)
        if list(z["layers"]) == list(layers) and z["h_LxWxTxD"].shape[1] == len(tokens_WxT1) and \
                z["top_idx"].shape[-1] == topk:
            return dict(z)
    fn = _features_fn(model.graphdef, tuple(layers), topk)
    parts, start = [], time.perf_counter()
    for i in range(0, len(tokens_WxT1), batch):
        parts.append(jax.device_get(fn(model.params, jnp.asarray(tokens_WxT1[i:i + batch, :-1]))))
        log(f"  cached {min(i + batch, len(tokens_WxT1))}/{len(tokens_WxT1)} windows "
            f"({time.perf_counter() - start:.0f} s)")
    hs, idx, p, argmax = (np.concatenate(x, axis=1 if j == 0 else 0) for j, x in enumerate(zip(*parts)))
    out = {"layers": np.asarray(layers), "tokens": tokens_WxT1, "h_LxWxTxD": hs, "top_idx": idx, "top_p": p,
           "argmax": argmax, "seconds": np.asarray(time.perf_counter() - start)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def _soft_ce(model, adapter, h, idx, p, vocab_U=None):
    """Soft CE against the full model's (renormalised) top-k; with ``vocab_U`` the softmax runs over that subset
    and ``idx`` indexes into it."""
    logits = kg.adapter_logits(model, adapter, h.astype(jnp.float32), vocab_U=vocab_U)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    q = p.astype(jnp.float32)
    q = q / jnp.sum(q, -1, keepdims=True)
    ce = -jnp.mean(jnp.sum(q * jnp.take_along_axis(logp, idx, -1), -1))
    draft_top = jnp.take_along_axis(jnp.exp(logp), idx, -1)
    accept = jnp.mean(jnp.sum(jnp.minimum(p.astype(jnp.float32), draft_top), -1))   # sum_v min(p_full, p_draft)
    top1 = jnp.mean(jnp.argmax(logp, -1) == idx[..., 0])
    return ce, {"expected_acceptance": accept, "top1_agreement": top1}


def train_adapter(model: LM, layer_index: int, exit_layer: int, train: dict, val: dict, tcfg, seed: int, workdir,
                  log=print) -> tuple[dict, list[dict]]:
    """Adam on the adapter only (the frozen model passed to the step: head, norm and layers untouched), on
    ``tcfg.batch`` cached windows a step drawn without replacement; resumable in ``workdir``. Returns the adapter
    and the log: validation soft CE / expected acceptance / top-1 agreement before training and at every
    ``tcfg.log_every`` steps, with the training loss of that step."""
    lm = nnx.merge(model.graphdef, model.params)
    adapter = kg.init_adapter(lm, exit_layer)
    # The training softmax runs over the tokens in the full model's top-k on the TRAINING windows (a CPU budget:
    # the tied head is 49k x 576); validation metrics use the full vocabulary.
    vocab_U = np.unique(train["top_idx"]) if getattr(tcfg, "restrict_vocab", False) else None
    sub_idx = (np.searchsorted(vocab_U, train["top_idx"]).astype(np.int32) if vocab_U is not None
               else train["top_idx"])
    vocab = None if vocab_U is None else jnp.asarray(vocab_U)

    def loss_fn(a, batch, ctx):
        return _soft_ce(nnx.merge(model.graphdef, ctx.frozen), a, batch["h"], batch["idx"], batch["p"], vocab)

    @jax.jit
    def evaluate(params, adapter, h, idx, p):
        return _soft_ce(nnx.merge(model.graphdef, params), adapter, h, idx, p)

    def val_metrics(a):
        ce, aux = evaluate(model.params, a, val["h_LxWxTxD"][layer_index], val["top_idx"], val["top_p"])
        return {"val_soft_ce": float(ce), **{f"val_{k}": float(v) for k, v in aux.items()}}

    batches = ArrayIterator({"h": train["h_LxWxTxD"][layer_index], "idx": sub_idx, "p": train["top_p"]},
                            tcfg.batch, seed=seed, draw="without_replacement")
    rows = [{"step": 0, **val_metrics(adapter)}]
    start = time.perf_counter()
    with Trainer(loss_fn, adapter, optax.adam(tcfg.lr), workdir=workdir, seed=seed, mesh=one_device_mesh(),
                 log_every=tcfg.log_every, ckpt_every=tcfg.log_every) as tr:
        for s in sorted({*range(tcfg.log_every, tcfg.steps + 1, tcfg.log_every), tcfg.steps}):
            adapter = tr.fit(batches, s, desc=f"adapter l={exit_layer}", frozen=model.params).params
            rows.append({"step": s, "train_soft_ce": logged_loss(workdir, s), **val_metrics(adapter),
                         "seconds": time.perf_counter() - start})
            log(f"  l={exit_layer} step {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                                            if k != "step"))
    return adapter, rows


def shared_head_adapter(model: LM, exit_layer: int) -> dict:
    """The shared-head-only drafter of the same depth as an adapter whose attention adds nothing (output projection
    zero) and whose norm is the model's final norm: first l layers + final norm + shared head."""
    a = kg.init_adapter(nnx.merge(model.graphdef, model.params), exit_layer)
    a["attn"]["o"] = jax.tree.map(jnp.zeros_like, a["attn"]["o"])
    return a


def save_tree(path: pathlib.Path, tree) -> None:
    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    np.savez(path, **flat)


def load_tree(path: pathlib.Path, like):
    z = np.load(path)
    paths = ["/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
    return jax.tree_util.tree_unflatten(jax.tree.structure(like), [jnp.asarray(z[p]) for p in paths])


def timed(fn, *args):
    """AOT-compile ``fn`` for ``args``, one warm-up call, then one timed call (compile excluded, blocked until
    ready): ``(output, seconds, compile seconds)``."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    t = costs.measure(compiled, *args, warmup=1, iters=1)
    return t.output, t.mean_s, compile_s


def greedy_decode(model: LM, prompt_BxP: np.ndarray, num_new: int):
    lengths = jnp.full((prompt_BxP.shape[0],), prompt_BxP.shape[1], jnp.int32)
    f = per_token.decode_fn(model.graphdef, per_token.full_depth_step, num_new)
    gen, seconds, compile_s = timed(f, model.params, jnp.asarray(prompt_BxP), lengths)
    return np.asarray(gen.tokens_BxG), seconds, compile_s



# ------------------------------------------------------------------------------------ exits on the frozen model


def train_exits(graphdef, params, cache: et.FeatureCache, p0: et.ExitParams, *, steps: int, batch_tokens: int,
                lr: float, workdir, seed: int = 0, log_every: int = 50, log: Callable[[str], None] | None = None
                ) -> tuple[et.ExitParams, list[dict], float]:
    """Adam on the summed per-exit soft CE to the full model (``et.exit_metrics``), ``batch_tokens`` cached tokens
    a step drawn with replacement (the same tokens for every exit), the backbone and the shared head passed frozen;
    resumable in ``workdir``. Returns the trained parameters, the log (step, loss, mean KL and agreement over exits
    on the step's batch, at every ``log_every`` steps and the last) and the training wall-clock."""
    n = cache.final_NxD.shape[0]
    if steps < 0 or batch_tokens < 1 or batch_tokens > n:
        raise ValueError(f"need {steps=} >= 0 and 1 <= {batch_tokens=} <= {n} cached tokens")

    def loss_fn(p, batch, ctx):
        exit_params = et.ExitParams(p["scale_ExD"], p.get("down_ExDxR"), p.get("up_ExRxD"))
        m = et.exit_metrics(nnx.merge(graphdef, ctx.frozen), exit_params, jnp.swapaxes(batch["h_NxExD"], 0, 1),
                            batch["final_NxD"])
        return jnp.sum(m["soft_ce"]), {"mean_kl": jnp.mean(m["kl"]), "mean_agree": jnp.mean(m["agree"])}

    # The trainer shards the example axis, which leads: the cache keeps its exits first, so swap (a view).
    arrays = {"h_NxExD": np.swapaxes(cache.hidden_ExNxD, 0, 1), "final_NxD": cache.final_NxD}
    start = time.perf_counter()
    with Trainer(loss_fn, et.params_to_numpy(p0), optax.adam(lr), workdir=workdir, seed=seed, mesh=one_device_mesh(),
                 log_every=log_every, ckpt_every=max(steps, 1)) as tr:
        trained = tr.fit(ArrayIterator(arrays, batch_tokens, seed=seed, draw="with_replacement"), steps,
                         desc="exits", frozen=params).params
    seconds = time.perf_counter() - start
    hist = {}
    for r in read_metrics(workdir):      # a rerun appends: the last record of a step wins
        hist[r["step"]] = {"step": r["step"], "loss": r["loss"], "mean_kl": r["mean_kl"],
                           "mean_agree": r["mean_agree"]}
    if log is not None:
        for row in hist.values():
            log(f"step {row['step']}: loss {row['loss']:.3f}, mean KL {row['mean_kl']:.3f}, mean top-1 agreement "
                f"{row['mean_agree']:.3f}")
    return et.params_from_numpy(jax.device_get(trained)), list(hist.values()), seconds


# ------------------------------------------------------------------------------- self-speculative cost model


ARMS = ("untrained", "norm", "lowrank")   # exit heads: the model's own final norm; trained norm; norm + adapter


COST_COLUMNS = ("Speed-up columns: `speedup_measured` = measured (this machine, its load); `speedup_cost_cpu` = "
                "cost model (CPU, measured verify); `speedup_cost_h200` = cost model (roofline, H200 calibrated "
                "2026-12-04; eejax.exits.costs); `speedup_cost_h200_floor` = cost model (roofline floor, H200 spec "
                "sheet). Every cost model counts each draft's vocabulary head and DEL's shadow heads.")


def cost_speedups(tpv: float, k_mean: float, draft_layers: float, mcfg, verify_s: dict, step_s: float, *,
                  batch: int, cache_len: int, shadow_heads: int = 0) -> dict:
    """Cost-model speed-ups over greedy of a round drafting ``k_mean`` tokens at ``draft_layers`` layers each (mean)
    that yields ``tpv`` tokens. Every draft pays its exit's vocabulary head (SmolLM2's tied 49,152 x 576 head is
    ~21 % of the weights) and DEL's verify ``shadow_heads`` more heads on every verified position; both models
    count them (``eejax.exits.costs``, the one cost model of every decoder):

    * ``speedup_cost_cpu``: cost model (CPU, measured verify): a draft token costs (E layers + head) / (L layers +
      head) of a measured full step in FLOPs, the verify of k + 1 tokens its measured time;
    * ``speedup_cost_h200``: cost model (roofline, H200 calibrated 2026-12-04): ``costs.predicted_speedup`` with
      bf16 weights, eejax's decoder as it ran on the H200 (launch-bound at these batches);
    * ``speedup_cost_h200_floor``: the same counts on the roofline floor (H200 spec sheet: weights, cache, FLOPs)."""
    counts = costs.self_speculative_counts(draft_layers, k_mean, tpv, shadow_heads=shadow_heads)
    flops = lambda c: costs.predict(costs.decode_work(mcfg, c, batch=batch, cache_len=cache_len)).flops  # noqa: E731
    step = flops(costs.greedy_counts(mcfg))
    draft = (k_mean * flops(costs.TokenCounts(layers=draft_layers)) + shadow_heads * (k_mean + 1) *
             flops(costs.TokenCounts(layers=0))) / step * step_s
    verify = verify_s.get(int(round(k_mean)) + 1, (k_mean + 1) * step_s)
    sp = costs.predicted_speedup(mcfg, counts, batch=batch, cache_len=cache_len)
    return {"speedup_cost_cpu": tpv * step_s / (draft + verify), "speedup_cost_h200": sp.value,
            "speedup_cost_h200_floor": sp.limit}


def plot_sweep(sweep, layers, ks, path, title):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for arm in ARMS:
        acc = [sweep[arm][(l, 1)]["acceptance"] for l in layers]
        ax[0].plot(layers, acc, "o-", label=arm)
    ax[0].set(xlabel="draft exit E (layers)", ylabel="per-token acceptance (k=1)", title="acceptance vs E")
    ax[0].legend()
    best_arm = "norm"
    for i, key in enumerate(("speedup_cost_cpu", "speedup_cost_h200")):
        for k in ks:
            ax[1 + i].plot(layers, [sweep[best_arm][(l, k)][key] for l in layers], "o-", label=f"k={k}")
        ax[1 + i].axhline(1.0, color="gray", lw=0.8)
        ax[1 + i].set(xlabel="draft exit E (layers)", ylabel=key, title=f"{key} (trained norm exits)")
        ax[1 + i].legend(fontsize=7)
    finish_figure(fig, (), title, path)


def finish_figure(fig, axes, title: str, path) -> None:
    """Grid and legend on each of ``axes``, the title, then save ``fig`` to ``path`` and close it (the tail of every
    multi-panel figure of the SmolLM2 papers)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
