"""SmolLM2-135M-Instruct loaded from its GGUF file into eejax's DecoderLM: WikiText-2 test perplexity (float32 and
bfloat16), greedy continuations of fixed prompts, and the perplexity with the Q/K rotary permutation left undone.

    python -m experiments.pretrained_lm --config configs/pretrained_lm.py:smoke [--outdir DIR]

See configs/pretrained_lm.py for the runbook (protocol, scale, wall-clock).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.lm import WindowIterator
from eejax.data.text import detokenize_wikitext, load_text
from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.errors import ConfigError
from eejax.eval import report as report_lib
from eejax.models import pretrained
from experiments._common import Report, Run, experiment

NAME = "pretrained_lm"
TEXTS = ("stored", "detokenized")   # WikiText-2 as stored (word-tokenized), or after `detokenize_wikitext`


def window_nll(graphdef):
    """``f(params, tokens_BxT, targets_BxT) -> summed NLL per window (B)``, jitted once per graphdef."""

    def f(params, tokens_BxT, targets_BxT):
        logits = nnx.merge(graphdef, params)(tokens_BxT).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(logp, targets_BxT[..., None], -1)[..., 0].sum(-1)

    return jax.jit(f)


def window_nlls(pre: pretrained.Pretrained, ids: np.ndarray, context: int, batch: int) -> tuple[list, float]:
    """Summed NLL of each non-overlapping window of ``context`` tokens over ``ids`` (only full batches of windows,
    so one program is compiled), and the forward throughput in tokens/s (the first, compiling batch excluded)."""
    n_windows = (len(ids) - 1) // (context * batch) * batch
    if not n_windows:
        raise ValueError(f"{len(ids)} tokens do not fill one batch of {batch} windows of {context}")
    fn = window_nll(pre.graphdef)
    it = WindowIterator(ids[:n_windows * context + 1], batch, context, shuffle=False)
    nll_W, seconds = [], 0.0
    for i, b in enumerate(it):
        start = time.perf_counter()
        nll_W += jax.device_get(fn(pre.params, jnp.asarray(b["tokens"]), jnp.asarray(b["targets"]))).tolist()
        if i:
            seconds += time.perf_counter() - start
    return nll_W, (n_windows - batch) * context / seconds if seconds else None


def summarize(tokenizer, ids: np.ndarray, nll_W, context: int) -> dict:
    """Token / word perplexity and bits per byte of the windows' scored tokens ``ids[1 : W*context + 1]``."""
    scored = ids[1:len(nll_W) * context + 1]
    text = tokenizer.decode(scored)
    total = float(np.sum(nll_W))
    return {"tokens": int(scored.size), "windows": len(nll_W), "nll": total / scored.size,
            "token_ppl": float(np.exp(total / scored.size)), "word_ppl": float(np.exp(total / len(text.split()))),
            "bits_per_byte": float(total / np.log(2) / len(text.encode("utf-8")))}


def greedy(pre: pretrained.Pretrained, prompts, new_tokens: int) -> list[dict]:
    """Greedy continuations through the KV-cached decode loop (batched, right-padded), each checked against the argmax
    of an uncached full forward over prompt + continuation."""
    tok = pre.tokenizer
    encoded = [tok.encode(p) for p in prompts]
    prompt_BxP, lengths_B = kv_lib.pad_prompts(encoded, pad_id=tok.eos_id or 0)
    run = jax.jit(per_token.decode_fn(pre.graphdef, per_token.full_depth_step, new_tokens))
    start = time.perf_counter()
    gen_BxG = np.asarray(jax.device_get(run(pre.params, jnp.asarray(prompt_BxP), jnp.asarray(lengths_B)).tokens_BxG))
    seconds = time.perf_counter() - start
    forward = jax.jit(lambda p, x: nnx.merge(pre.graphdef, p)(x))
    out = []
    for prompt, ids_P, gen_G in zip(prompts, encoded, gen_BxG):
        seq = np.concatenate([ids_P, gen_G])
        argmax = np.asarray(forward(pre.params, jnp.asarray(seq[None, :-1]))[0].argmax(-1))[len(ids_P) - 1:]
        out.append({"prompt": prompt, "continuation": tok.decode(gen_G), "ids": gen_G.tolist(),
                    "uncached_argmax_agree": float(np.mean(argmax == gen_G)),
                    "first_disagreement": int(np.argmin(argmax == gen_G)) if (argmax != gen_G).any() else None})
    out[0]["batch_seconds_incl_compile"] = seconds
    return out


def _md_text(s: str) -> str:
    """One table cell: newlines shown as \\n (markdown_table escapes the pipes)."""
    return s.replace("\n", "\\n")


@experiment(NAME, bind_workdir=False)
def main(run: Run) -> Report:
    cfg, args = run.cfg, run.args
    p, g = cfg.ppl, cfg.generate
    print(f"device: {run.prov.device}")

    runs = [tuple(r.split(":")) for r in p.runs]
    if bad := [r for r in runs if len(r) != 2 or r[0] not in TEXTS]:
        raise ConfigError(f"ppl.runs entries are 'TEXT:DTYPE' with TEXT in {TEXTS}; got {bad}")
    start = time.perf_counter()
    depth = cfg.model.depth or None
    models = {dt: pretrained.load(cfg.model.name, dtype=dt, depth=depth)
              for dt in dict.fromkeys([g.dtype, *(dt for _, dt in runs)])}
    load_s = (time.perf_counter() - start) / len(models)
    tok = next(iter(models.values())).tokenizer
    stored = load_text(args.data_dir, p.dataset, p.split)
    texts = {"stored": stored, "detokenized": detokenize_wikitext(stored) if p.dataset == "wikitext2" else None}
    all_ids = {name: tok.encode(t) for name, t in texts.items() if t is not None and name in dict(runs)}
    ids = {name: a[:p.max_tokens + 1] for name, a in all_ids.items()}
    for name, a in all_ids.items():
        print(f"{p.dataset}/{p.split} ({name}): {len(texts[name]):,} characters, {len(a):,} tokens; evaluating the "
              f"first {len(ids[name]) - 1:,} in windows of {p.context}")

    rows, raw = perplexities(runs, models, tok, ids, p)
    qk_rows = rotary_check(cfg, runs, tok, ids, raw)
    gens = greedy(models[g.dtype], list(g.prompts), g.new_tokens)
    for r in gens:
        print(repr(r["prompt"]), "->", repr(r["continuation"]), f"(uncached agreement {r['uncached_argmax_agree']})")
    return report(run, next(iter(models.values())).cfg, load_s, texts, all_ids, rows, raw, qk_rows, gens)


def perplexities(runs, models, tok, ids, p):
    """Window perplexity of every TEXT:DTYPE run."""
    rows, raw = [], {}
    for name, dt in runs:
        nll_W, tok_s = window_nlls(models[dt], ids[name], p.context, p.batch)
        res = summarize(tok, ids[name], nll_W, p.context)
        raw[f"{name}:{dt}"] = res | {"tok_s": tok_s, "window_nll": nll_W}
        rows.append({"text": name, "weights": dt, "tokens": res["tokens"], "token_ppl": res["token_ppl"],
                     "word_ppl": res["word_ppl"], "bits_per_byte": res["bits_per_byte"], "tok_s": tok_s})
        print(rows[-1], flush=True)

    return rows, raw


def rotary_check(cfg, runs, tok, ids, raw):
    """The first windows again, with the Q/K rows as stored in the GGUF (GGML's adjacent-pair order) under
    eejax's half-split RoPE."""
    p, depth = cfg.ppl, cfg.model.depth or None
    wrong = pretrained.load_gguf(pretrained.weights_path(cfg.model.name), depth=depth, qk_order="gguf")
    first = runs[0][0]
    wrong_W, _ = window_nlls(wrong, ids[first][:p.qk_check_tokens + 1], p.context, p.batch)
    del wrong
    qk_rows = [{"qk_order": "GGUF as stored (wrong)"} | summarize(tok, ids[first], wrong_W, p.context)]
    if f"{first}:float32" in raw:
        right = summarize(tok, ids[first], raw[f"{first}:float32"]["window_nll"][:len(wrong_W)], p.context)
        qk_rows.insert(0, {"qk_order": "HF (un-permuted, as loaded)"} | right)
    qk_rows = [{k: r[k] for k in ("qk_order", "tokens", "token_ppl", "word_ppl")} for r in qk_rows]
    print(qk_rows, flush=True)

    return qk_rows


def report(run, cfg_m, load_s, texts, all_ids, rows, raw, qk_rows, gens) -> Report:
    cfg, p, g = run.cfg, run.cfg.ppl, run.cfg.generate
    md = "\n\n".join([
        "# SmolLM2-135M-Instruct in eejax: WikiText-2 perplexity and greedy continuations",
        run.prov.markdown() + f"  \nModel: {cfg.model.name} from `{pretrained.weights_path(cfg.model.name).name}` "
        f"(GGUF, Q4_1 blocks + Q8_0 embedding, dequantized to float32 on load, {load_s:.0f} s per load): "
        f"{cfg_m.depth} layers, width {cfg_m.d_model}, {cfg_m.num_heads} query / {cfg_m.num_kv_heads} KV heads, "
        f"SwiGLU {cfg_m.mlp_dim}, RoPE base {cfg_m.rope_base:g}, RMSNorm eps {cfg_m.norm_eps:.0e}, tied "
        f"embeddings, vocabulary {cfg_m.vocab_size:,}.  \n"
        f"Data: {p.dataset}/{p.split} from the shared data directory; text `stored`: the file as is (WikiText's "
        "word-tokenized `wiki.test.tokens`: `<unk>`, ` @-@ `, spaces around punctuation); `detokenized`: after "
        "lm-evaluation-harness's WikiText detokenizer (`eejax.data.text.detokenize_wikitext`; `<unk>` stays). "
        + "; ".join(f"{name}: {len(texts[name]):,} characters = {len(a):,} tokens of this BPE"
                    for name, a in all_ids.items())
        + f". Scale: the first {p.max_tokens:,} tokens of each.",
        "Published figure: none from the model's authors: the SmolLM2 paper (arXiv:2502.02737) reports no WikiText "
        "perplexity; a third-party card's 'WikiText-2 PPL ~31' (Q4_K_M, protocol unstated) is not comparable (see "
        "this folder's README).",
        f"## Perplexity (fixed context {p.context}, non-overlapping windows)\n"
        "Every token of each window is scored, no BOS. token_ppl = exp(mean NLL per BPE token); word_ppl = "
        "exp(total NLL / whitespace-separated words of the scored text, so it is per stored WikiText word for "
        "`stored` and per detokenized word, fewer, for `detokenized`); bits_per_byte = total NLL in bits / UTF-8 "
        f"bytes. tok_s: measured forward throughput (batch {p.batch} x {p.context}, compile excluded).",
        report_lib.markdown_table(rows, list(rows[0].keys()), ".3f"),
        "## Rotary convention check\n"
        "llama.cpp stores each head's Q/K rows permuted for GGML's adjacent-pair RoPE; eejax's RoPE rotates the two "
        "halves of a head, so the loader undoes the permutation. Left as stored, the attention is wrong:",
        report_lib.markdown_table(qk_rows, list(qk_rows[0].keys()), ".3f"),
        f"## Greedy continuations ({g.dtype}, {g.new_tokens} new tokens, KV-cached decode loop)\n"
        "agree: fraction of generated tokens equal to the argmax of an uncached full forward over prompt + "
        "continuation (1.0 = the cached decode path and the plain forward agree).",
        report_lib.markdown_table([{"prompt": _md_text(r["prompt"]), "continuation": _md_text(r["continuation"]),
                                "agree": r["uncached_argmax_agree"]} for r in gens],
                              ["prompt", "continuation", "agree"], ".2f"),
    ])
    return Report(md, {
        "load_seconds": load_s,
        "eval_tokens_available": {name: len(a) for name, a in all_ids.items()}, "rows": rows, "qk_check": qk_rows,
        "raw": raw,
        "greedy": gens})


if __name__ == "__main__":
    main()
