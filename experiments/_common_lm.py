"""Shared plumbing of the experiments on LMs trained here (experiments/per_token_exit.py, experiments/skipdecode.py,
experiments/dynamax.py).

data (offline text, char/byte tokenizer) -> base model (multi-exit LM loss, LayerSkip dropout, EE-LLM warm-up, the
one Trainer; resumable, in <workdir>/base-lm or a shared model_workdir) -> optional stages on top (CALM's learned exit
classifier on the frozen model; SkipDecode fine-tuning under a schedule) -> a decoding *policy* evaluated on held-out
windows: validation loss through the real decode loop (teacher forced), token agreement of free-running greedy
generation with the full model, average layers per token, and measured tokens/s.

A policy is ``(step_fn, arg)`` with ``step_fn(model, tok_B, state, i, arg)``; ``arg`` is traced, so sweeping a
threshold or a schedule reuses one compiled program.
"""
from __future__ import annotations

import functools
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data.files import DataError
from eejax.data.lm import WindowIterator
from eejax.data.text import ByteTokenizer, CharTokenizer, load_text
from eejax.decoding import per_token, skipdecode
from eejax.exits import confidence as conf_lib
from eejax.exits import costs
from eejax.harness import results as result_files
from eejax.models import lm as lm_lib
from eejax.train import Trainer, make_optimizer

# ------------------------------------------------------------------------------------------------------ data


def model_dir(run, corpus) -> pathlib.Path:
    """Where the base model lives: ``<workdir>/base-lm``, or ``cfg.model_workdir`` when set (to share it between
    experiments), that directory then locked and bound to the fields the base model depends on. Prints the data
    line every LM run starts with."""
    cfg = run.cfg
    print(f"data: {corpus.description}; device: {run.prov.device}")
    base = {k: cfg[k].to_dict() if hasattr(cfg[k], "to_dict") else cfg[k] for k in BASE_MODEL_FIELDS}
    return run.shared_workdir(cfg.model_workdir, base, run.workdir / "base-lm")


BASE_MODEL_FIELDS = ("seed", "data", "model", "train")  # what the base model's checkpoints depend on


def shared_base(run, corpus, *, producer: bool) -> tuple[Any, Any, lm_lib.LMConfig, float]:
    """``train_base`` in ``model_dir(run, corpus)``, with the provenance of a base model shared through
    ``cfg.model_workdir``: the run that trains it (``producer``: per_token_exit) leaves a record beside its
    checkpoint for its readers (``results.write_artefact_record``); a run that reads one another run trained
    (skipdecode, or the producer resuming someone else's) names it among its inputs (``results.record_input``)."""
    cfg = run.cfg
    directory = model_dir(run, corpus)
    ckpt = directory / "base" / "ckpt"
    trained_elsewhere = bool(cfg.model_workdir) and ckpt.with_name(f"ckpt{result_files.RECORD_SUFFIX}").exists()
    out = train_base(cfg, corpus, directory)
    if cfg.model_workdir and producer and not trained_elsewhere:
        result_files.write_artefact_record(ckpt, run.prov, step=cfg.train.steps)
    elif cfg.model_workdir:
        result_files.record_input(run.prov, ckpt, "base model (config.model_workdir)")
    return out


class Corpus(NamedTuple):
    tokenizer: Any
    train_ids: np.ndarray
    eval_ids: np.ndarray
    description: str


def corpus(cfg, args) -> Corpus:
    """The runner's ``data`` hook: ``load_corpus`` from ``--data_dir``, before any file is written."""
    return load_corpus(cfg, args.data_dir)


def load_corpus(cfg, data_dir) -> Corpus:
    """Train ids from ``cfg.data.name``'s train split; eval ids from ``eval_name/eval_split`` (default: validation
    of the same corpus). The char tokenizer is built from the training text."""
    d = cfg.data
    if data_dir is not None and not pathlib.Path(data_dir).is_dir():
        raise DataError(f"--data_dir {data_dir} is not a directory")
    train_text = load_text(data_dir, d.name, "train")
    eval_name = d.eval_name or d.name
    eval_text = load_text(data_dir, eval_name, d.eval_split)
    if d.tokenizer == "char":
        tok = CharTokenizer.from_text(train_text)
        eval_text = "".join(c for c in eval_text if c in set(tok.chars))  # (none dropped for Tiny Shakespeare)
    elif d.tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        raise ValueError(f"data.tokenizer={d.tokenizer!r}: use 'char' or 'byte'")
    train_ids, eval_ids = tok.encode(train_text), tok.encode(eval_text)
    desc = (f"{d.name} train ({len(train_ids):,} tokens), {eval_name}/{d.eval_split} ({len(eval_ids):,} tokens), "
            f"{d.tokenizer}-level, vocabulary {tok.vocab_size}")
    return Corpus(tok, train_ids, eval_ids, desc)


def model_config(cfg, vocab_size: int) -> lm_lib.LMConfig:
    return lm_lib.LMConfig(vocab_size=vocab_size, **cfg.model.to_dict())


# -------------------------------------------------------------------------------------------------- training


def fit(loss_fn, params, optim_cfg, batches, steps, workdir, cfg, desc, trainable=None):
    """``steps`` updates of ``loss_fn`` on the one Trainer, resumable in ``workdir`` (its log and checkpoint
    cadence from ``cfg``); returns the trained parameters."""
    with Trainer(loss_fn, params, make_optimizer(optim_cfg, trainable=trainable), workdir=workdir, seed=cfg.seed,
                 log_every=cfg.log_every, ckpt_every=cfg.ckpt_every) as tr:
        return tr.fit(batches, steps, desc=desc).params


def train_base(cfg, corpus: Corpus, workdir) -> tuple[Any, Any, lm_lib.LMConfig, float]:
    """Stage 1 (resumes from ``workdir``): the multi-exit LM. Returns (graphdef, params, model config, seconds)."""
    mcfg = model_config(cfg, corpus.tokenizer.vocab_size)
    graphdef, params = lm_lib.build(mcfg, cfg.seed)
    t = cfg.train
    loss_fn = lm_lib.multi_exit_lm_loss(graphdef, mcfg, weighting=t.weighting, gamma=t.gamma,
                                        warmup_steps=t.warmup_steps, layer_drop=t.layer_drop)
    batches = WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.seed)
    start = time.perf_counter()
    params = fit(loss_fn, params, t.optim, batches, t.steps, pathlib.Path(workdir) / "base", cfg, "base LM")
    return graphdef, params, mcfg, time.perf_counter() - start


def train_classifier(cfg, graphdef, params, mcfg, corpus: Corpus, workdir) -> dict:
    """Stage 2 on the frozen model: CALM's learned exit classifier (label: exit argmax == final argmax)."""
    batches = WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.seed + 1)
    return fit(lm_lib.classifier_loss(graphdef, params), lm_lib.init_classifier(mcfg), cfg.classifier.optim,
                batches, cfg.classifier.steps, pathlib.Path(workdir) / "classifier", cfg, "exit classifier")


def finetune_skipdecode(cfg, graphdef, params, mcfg, corpus: Corpus, layers_G, workdir, name: str):
    """SkipDecode fine-tuning: final-exit LM loss under the schedule's per-position layer program (prompt positions
    run every layer, as prefill does)."""
    e = cfg.eval
    if cfg.data.seq_len != e.prompt_len + e.new_tokens:
        raise ValueError(f"SkipDecode fine-tuning needs data.seq_len == prompt_len + new_tokens, got "
                         f"{cfg.data.seq_len} != {e.prompt_len} + {e.new_tokens}")
    mask = jnp.asarray(skipdecode.sequence_mask(e.prompt_len, layers_G, mcfg.depth, cfg.skipdecode.keep_bottom))
    loss_fn = lm_lib.multi_exit_lm_loss(graphdef, mcfg, pos_mask_NxT=mask)
    batches = WindowIterator(corpus.train_ids, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.seed + 2)
    kb = cfg.skipdecode.keep_bottom
    run = f"skipdecode-{name}" + (f"-keep{kb}" if kb else "")   # one checkpoint directory per schedule
    return fit(loss_fn, params, cfg.skipdecode.optim, batches, cfg.skipdecode.finetune_steps,
                pathlib.Path(workdir) / run, cfg, f"SkipDecode fine-tune {name}")


# -------------------------------------------------------------------------------------------------- policies


def full_policy(model, tok, state, i, arg):
    del arg
    return per_token.full_depth_step(model, tok, state, i)


def exit_policy(measure: str, kv: str = "propagate", tau: float = 0.0, horizon: int = 1):
    """Per-token exit; ``arg = (threshold, classifier)`` (classifier used by the ``learned`` measure only)."""
    return _exit_policy(measure, kv, float(tau), int(horizon))


@functools.lru_cache(maxsize=None)   # one function object per setting, so the Decoder compiles it once
def _exit_policy(measure: str, kv: str, tau: float, horizon: int):
    fn = conf_lib.get_measure(measure)

    def step(model, tok, state, i, arg):
        thr, clf = arg
        return per_token.exit_step(model, tok, state, i, thr, measure=fn, kv=kv, tau=tau, horizon=horizon,
                                   classifier=clf if measure == "learned" else None)
    step.__name__ = f"exit_{measure}_{kv}_{tau}"
    return step


@functools.lru_cache(maxsize=None)
def skip_policy(keep_bottom: int = 0):
    def step(model, tok, state, i, layers_G):
        return skipdecode.skip_step(model, tok, state, i, layers_G, keep_bottom=keep_bottom)
    step.__name__ = f"skip_{keep_bottom}"
    return step


class Windows(NamedTuple):
    prompts: list           # int32[B, P] per batch
    continuations: list     # int32[B, G] per batch


def eval_windows(ids: np.ndarray, batch: int, prompt_len: int, new_tokens: int, first: int, count: int) -> Windows:
    """``count`` batches of consecutive non-overlapping windows starting at batch index ``first``."""
    it = WindowIterator(ids, batch, prompt_len + new_tokens - 1, shuffle=False)
    it.load_state_dict({"index": first})
    prompts, conts = [], []
    for _ in range(count):
        try:
            b = next(it)
        except StopIteration:
            break
        if len(b["tokens"]) < batch:
            break
        seq = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)
        prompts.append(seq[:, :prompt_len])
        conts.append(seq[:, prompt_len:])
    if not prompts:
        raise ValueError(f"no full evaluation batch at index {first} ({len(ids)} tokens)")
    return Windows(prompts, conts)


class Decoder:
    """Jitted generate functions per policy (and per teacher-forced / free-running), over one graphdef."""

    def __init__(self, graphdef, new_tokens: int):
        self.graphdef, self.new_tokens, self._fns = graphdef, new_tokens, {}

    def fn(self, step: Callable) -> Callable:
        if step not in self._fns:
            gd, g = self.graphdef, self.new_tokens

            def run(params, prompt, lengths, arg, force):
                return per_token.generate(nnx.merge(gd, params), prompt, lengths, g,
                                          lambda m, t, s, i: step(m, t, s, i, arg), force_BxG=force)
            self._fns[step] = jax.jit(run)
        return self._fns[step]

    def __call__(self, step, params, prompt_BxP, arg, force=None) -> per_token.Generation:
        lengths = jnp.full((prompt_BxP.shape[0],), prompt_BxP.shape[1], jnp.int32)
        return self.fn(step)(params, jnp.asarray(prompt_BxP), lengths, arg, force)


def evaluate(dec: Decoder, step, params, arg, windows: Windows, ref_tokens: list | None) -> dict:
    """Quality and compute of a policy over ``windows``.

    nll / ppl: teacher forced through the decode loop, over the tokens predicted by decode steps (not the prefill);
    nll_W / agreement_W: the same per window (row), for paired intervals (``paired_quality``).
    agreement: fraction of free-running greedy tokens equal to the full model's at the same position; prefix: mean
    length of the identical prefix. avg_layers: mean layers a token ran (exit depth, or the SkipDecode budget);
    loop_layers: mean layers the batched loop executed (the deepest row) in free-running decoding.
    """
    nll = count = 0.0
    agree, prefix, layers, loop_layers, tf_layers, tokens = [], [], [], [], [], []
    nll_w, agree_w = [], []
    for j, (prompt, cont) in enumerate(zip(windows.prompts, windows.continuations)):
        forced = jax.device_get(dec(step, params, prompt, arg, jnp.asarray(cont)))
        nll += -float(np.sum(forced.logprob_BxG[:, 1:]))
        nll_w += (-np.asarray(forced.logprob_BxG[:, 1:], np.float64).mean(1)).tolist()
        count += forced.logprob_BxG[:, 1:].size
        tf_layers.append(_layers(forced))
        free = jax.device_get(dec(step, params, prompt, arg))
        tokens.append(free.tokens_BxG)
        layers.append(_layers(free))
        loop_layers.append(float(np.mean(free.layers_run_G[1:])))
        if ref_tokens is not None:
            same = free.tokens_BxG == ref_tokens[j]
            agree.append(float(same.mean()))
            agree_w += same.mean(1).tolist()
            prefix.append(float(np.mean(np.where(same.all(1), same.shape[1], np.argmin(same, axis=1)))))
    out = {"nll": nll / count, "ppl": float(np.exp(nll / count)), "avg_layers": float(np.mean(layers)),
           "avg_layers_teacher_forced": float(np.mean(tf_layers)), "loop_layers": float(np.mean(loop_layers)),
           "tokens": tokens, "nll_W": nll_w}
    if ref_tokens is not None:
        out.update(agreement=float(np.mean(agree)), prefix=float(np.mean(prefix)), agreement_W=agree_w)
    return out


def paired_quality(res_a: dict, res_b: dict, a: str, b: str, seed: int = 0) -> dict:
    """``a`` minus ``b`` on the same windows (``evaluate`` outputs): validation NLL and, when both have it, greedy
    agreement, each with its paired bootstrap 95% interval over the windows (eejax.eval.bootstrap)."""
    from eejax.eval import bootstrap  # noqa: PLC0415

    d = bootstrap.paired_bootstrap(res_a["nll_W"], res_b["nll_W"], seed=seed)
    row = {"a": a, "b": b, "nll_diff": d.diff, "nll_ci95_lo": d.lo, "nll_ci95_hi": d.hi,
           "nll_reading": d.reading("a", "b").replace(" above ", " worse than ").replace(" below ", " better than ")}
    if "agreement_W" in res_a and "agreement_W" in res_b:
        g = bootstrap.paired_bootstrap(res_a["agreement_W"], res_b["agreement_W"], seed=seed)
        row |= {"agree_diff": g.diff, "agree_ci95_lo": g.lo, "agree_ci95_hi": g.hi,
                "agree_reading": g.reading("a", "b")}
    return row


def _layers(gen) -> float:
    """Mean layers per token over the tokens produced by decode steps (token 0 comes from the prefill)."""
    return float(np.mean(gen.layers_BxG[:, 1:]))


def tokens_per_second(dec: Decoder, step, params, arg, prompt_BxP, iters: int = 3) -> float:
    """Measured wall-clock tokens/s of free-running generation (batch x new tokens / best call), compile excluded."""
    timing = costs.measure(lambda: dec(step, params, prompt_BxP, arg), warmup=1, iters=iters)
    return prompt_BxP.shape[0] * dec.new_tokens / min(timing.times_s)


def calibrate_to_layers(dec: Decoder, step, params, clf, windows: Windows, thresholds, target_layers: float
                        ) -> tuple[float, float]:
    """The threshold (from ``thresholds``) whose free-running average layers per token is closest to
    ``target_layers`` on the calibration windows; returns (threshold, its average layers)."""
    best = None
    for t in thresholds:
        layers = []
        for prompt in windows.prompts:
            gen = jax.device_get(dec(step, params, prompt, (jnp.float32(t), clf)))
            layers.append(_layers(gen))
        gap = abs(np.mean(layers) - target_layers)
        if best is None or gap < best[0]:
            best = (gap, float(t), float(np.mean(layers)))
    return best[1], best[2]


def sequence_losses(dec: Decoder, step, params, arg, windows: Windows, ref_tokens: list) -> tuple[np.ndarray,
                                                                                                   float]:
    """Per-sequence textual inconsistency with the full model (1 - fraction of equal greedy tokens), in [0, 1], and
    the mean layers per token, over free-running generation on ``windows`` (the LTT calibration loss)."""
    losses, layers = [], []
    for prompt, ref in zip(windows.prompts, ref_tokens):
        gen = jax.device_get(dec(step, params, prompt, arg))
        losses.append(1.0 - (gen.tokens_BxG == ref).mean(1))
        layers.append(_layers(gen))
    return np.concatenate(losses), float(np.mean(layers))
