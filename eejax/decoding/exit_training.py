"""Exits for an LM that was not trained with them: cache a frozen model's hidden states once, evaluate per-exit
parameters on the cache, load them back into the model's exit heads. The training itself runs on the one Trainer
(``eejax.train``: the exit parameters trained, the model passed as frozen parameters, the cache served by
``ArrayIterator``); experiments/_common_smollm2.py ``train_exits`` is that recipe.

A pretrained decoder read at an early layer through its own final norm and tied head (LayerSkip's reading without
LayerSkip's training recipe) drafts poorly. What self-speculative decoding needs at inference is an exit head whose
greedy token agrees with the full model's; the cheapest such head keeps the shared LM head frozen and learns, per
exit, an RMSNorm scale (``exit_head="shared"``) and optionally a residual low-rank adapter after it
(``exit_head="lowrank"``: ``x + up(down(x))``, ``up`` starting at zero so training starts from the norm-only head).

Loss: soft cross-entropy against the full model's next-token distribution, i.e. KL(p_full || p_exit) up to the
full model's entropy (Kangaroo trains its adapter the same way). Not CE to the text: a draft is accepted when it
equals the *full model's* greedy token, which differs from the next text token most of the time on real text.

Frugal on CPU: the frozen model runs ONCE over a bounded token budget (``cache_features``: hidden states after the
exits' layers and after the last layer); each training step then costs only the exits' heads on a few cached
tokens (the teacher's distribution is recomputed from the cached last hidden state through the final norm and head).

    cache = exit_training.cache_features(graphdef, params, windows_WxT1, batch=4)
    p0 = exit_training.init_exit_params(model, rank=0)
    # train p0 on the cache: loss sum(exit_metrics(model, p, h_ExNxD, final_NxD)["soft_ce"]), the Trainer
    params = exit_training.load_exit_params(graphdef, params, p)     # the model's exit heads now give p's logits

Shapes: W windows, T tokens per window, N cached tokens, E early exits (the model's exits but the last), D width,
R adapter rank, V vocabulary.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.exits import engine
from eejax.models import lm as lm_lib


class FeatureCache(NamedTuple):
    """A frozen model's hidden states on N tokens (host arrays)."""
    hidden_ExNxD: np.ndarray   # after the layer of each early exit (before the exit's own norm)
    final_NxD: np.ndarray      # after the last layer (before the final norm)
    targets_N: np.ndarray      # the next text token at each position (for perplexity)


class ExitParams(NamedTuple):
    """What is trained per early exit; ``down``/``up`` are None for the norm-only head."""
    scale_ExD: jax.Array
    down_ExDxR: jax.Array | None = None
    up_ExRxD: jax.Array | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down_ExDxR is None else self.down_ExDxR.shape[-1]


def _early_layers(cfg: lm_lib.LMConfig) -> list[int]:
    if cfg.num_exits < 2:
        raise ValueError(f"the model has no early exit (exits {cfg.exit_layers}); load it with exits=...")
    return list(cfg.exit_layers[:-1])


def cache_features(graphdef, params, windows_WxT1: np.ndarray, batch: int,
                   log: Callable[[str], None] | None = None) -> FeatureCache:
    """One frozen forward over ``W`` windows of ``T + 1`` token ids (inputs ``[:, :-1]``, targets ``[:, 1:]``), in
    batches of ``batch`` windows (only full batches: one compiled program); keeps the hidden states after every
    early exit's layer and after the last layer, as float32 host arrays."""
    cfg = nnx.merge(graphdef, params).cfg
    layers = _early_layers(cfg)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch={batch!r} (windows per forward) must be an int >= 1")
    windows_WxT1 = np.asarray(windows_WxT1)
    if windows_WxT1.ndim != 2 or windows_WxT1.shape[1] < 2 or windows_WxT1.shape[0] < batch \
            or not np.issubdtype(windows_WxT1.dtype, np.integer):
        raise ValueError(f"windows_WxT1 must be int token ids W x (T+1) with T >= 1 and W >= batch={batch}, got "
                         f"{windows_WxT1.dtype} {windows_WxT1.shape}")
    w = windows_WxT1.shape[0] // batch * batch

    @jax.jit
    def fn(params, tokens_BxT):
        model = nnx.merge(graphdef, params)
        h_last, h_NxBxTxD = engine.run_layers(model.layers, model.embed_tokens(tokens_BxT),
                                              layer_fn=causal_layer(tokens_BxT))
        return h_NxBxTxD[jnp.asarray(layers)], h_last

    hid, fin = [], []
    start = time.perf_counter()
    for i in range(0, w, batch):
        h_ExBxTxD, last_BxTxD = fn(params, jnp.asarray(windows_WxT1[i:i + batch, :-1], jnp.int32))
        hid.append(np.asarray(h_ExBxTxD, np.float32).reshape(len(layers), -1, cfg.d_model))
        fin.append(np.asarray(last_BxTxD, np.float32).reshape(-1, cfg.d_model))
        if log is not None:
            n = (i + batch) * (windows_WxT1.shape[1] - 1)
            log(f"cached {n} tokens in {time.perf_counter() - start:.0f} s")
    return FeatureCache(np.concatenate(hid, 1), np.concatenate(fin, 0),
                        windows_WxT1[:w, 1:].reshape(-1).astype(np.int32))


def causal_layer(tokens_BxT):
    """``layer_fn`` of a plain causal forward over whole windows (positions 0..T-1, no padding)."""
    b, t = tokens_BxT.shape
    pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask_BxTxT = lm_lib.causal_mask(jnp.ones((b, t), bool))
    return lambda layer, h, ctx: layer(h, pos_BxT, mask_BxTxT)


def save_cache(path, cache: FeatureCache) -> None:
    np.savez(path, **cache._asdict())


def load_cache(path) -> FeatureCache:
    with np.load(path) as z:
        return FeatureCache(**{k: z[k] for k in FeatureCache._fields})


# ------------------------------------------------------------------------------------------------- exit heads


def init_exit_params(model: lm_lib.DecoderLM, rank: int = 0, seed: int = 0) -> ExitParams:
    """The model's current exit norms (a pretrained model: its final norm's scale, i.e. the untrained LayerSkip
    reading) and, for ``rank > 0``, an adapter whose output starts at zero (``up = 0``; ``down`` small random)."""
    layers = _early_layers(model.cfg)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"rank={rank!r} must be an int >= 0 (0: the norm-only head)")
    scale = jnp.asarray(model.exit_heads.norm.scale[...], jnp.float32)
    if rank == 0:
        return ExitParams(scale)
    e, d = len(layers), model.cfg.d_model
    down = jax.random.normal(jax.random.key(seed), (e, d, rank), jnp.float32) / np.sqrt(d)
    return ExitParams(scale, down, jnp.zeros((e, rank, d), jnp.float32))


def exit_logits(model: lm_lib.DecoderLM, p: ExitParams, h_ExNxD: jax.Array) -> jax.Array:
    """``E x N x V`` logits of every early exit under ``p``: RMSNorm (the model's epsilon) -> adapter -> the shared
    head. Equals ``model.exit_logits`` once ``p`` is loaded (tested)."""
    h = h_ExNxD.astype(jnp.float32)
    x = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + model.cfg.norm_eps) * p.scale_ExD[:, None, :]
    if p.down_ExDxR is not None:
        x = x + jnp.einsum("enr,erd->end", jnp.einsum("end,edr->enr", x, p.down_ExDxR), p.up_ExRxD)
    return model.shared_head(x).astype(jnp.float32)


def teacher_logprobs(model: lm_lib.DecoderLM, final_NxD: jax.Array) -> jax.Array:
    """The full model's next-token log-distribution from its last hidden state (final norm + head)."""
    return jax.nn.log_softmax(model.shared_head(model.final_norm(final_NxD)).astype(jnp.float32), -1)


def exit_metrics(model, p: ExitParams, h_ExNxD, final_NxD, targets_N=None) -> dict:
    """Per exit: soft CE to the full model (``soft_ce``), ``kl`` = soft CE minus the full model's entropy, top-1
    ``agree``ment with the full model, and with ``targets_N`` the CE to the text (``nll``); plus the full model's."""
    logp_t = teacher_logprobs(model, final_NxD)
    logp_s = jax.nn.log_softmax(exit_logits(model, p, h_ExNxD), -1)
    p_t = jnp.exp(logp_t)
    soft_ce_E = -jnp.mean(jnp.sum(p_t[None] * logp_s, -1), -1)
    ent = -jnp.mean(jnp.sum(p_t * logp_t, -1))
    out = {"soft_ce": soft_ce_E, "kl": soft_ce_E - ent,
           "agree": jnp.mean(jnp.argmax(logp_s, -1) == jnp.argmax(logp_t, -1)[None], -1)}
    if targets_N is not None:
        pick = lambda lp: -jnp.take_along_axis(lp, targets_N[..., None], -1)[..., 0]  # noqa: E731
        out["nll"] = jnp.mean(jax.vmap(pick)(logp_s), -1)
        out["full_nll"] = jnp.mean(pick(logp_t))
    return out


def evaluate_exits(graphdef, params, cache: FeatureCache, p: ExitParams, batch_tokens: int = 512,
                   max_tokens: int = 0) -> dict:
    """Per-exit KL to the full model, top-1 agreement with it and perplexity on the text, over the first
    ``max_tokens`` cached tokens (0: all) in chunks of ``batch_tokens`` (a last partial chunk is dropped so one
    program is compiled)."""
    for name, value, lo in (("batch_tokens", batch_tokens, 1), ("max_tokens", max_tokens, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"{name}={value!r} must be an int >= {lo}")
    fn = jax.jit(lambda p, params, h, f, t: exit_metrics(nnx.merge(graphdef, params), p, h, f, t))
    total = cache.final_NxD.shape[0] if max_tokens <= 0 else min(max_tokens, cache.final_NxD.shape[0])
    n = total // batch_tokens * batch_tokens
    if n == 0:
        raise ValueError(f"{total} cached tokens, fewer than {batch_tokens=}")
    b = batch_tokens
    parts = [fn(p, params, jnp.asarray(cache.hidden_ExNxD[:, i:i + b]), jnp.asarray(cache.final_NxD[i:i + b]),
                jnp.asarray(cache.targets_N[i:i + b])) for i in range(0, n, b)]
    mean = {k: np.mean([np.asarray(q[k]) for q in parts], 0) for k in parts[0]}
    return {"tokens": n, "kl": mean["kl"].tolist(), "agree": mean["agree"].tolist(),
            "ppl": np.exp(mean["nll"]).tolist(), "full_ppl": float(np.exp(mean["full_nll"]))}


def load_exit_params(graphdef, params, p: ExitParams):
    """``params`` with the model's early-exit heads set to ``p`` (norm scales; adapter kernels when ``p`` has
    them, which needs a model built with ``exit_head="lowrank"`` and ``exit_rank`` = ``p.rank``). ``params`` itself is
    left as it was (the model is merged from a copy: ``nnx.merge`` would share its variables)."""
    model = nnx.merge(graphdef, params, copy=True)
    cfg = model.cfg
    e = len(_early_layers(cfg))
    if p.scale_ExD.shape != (e, cfg.d_model):
        raise ValueError(f"exit params for {p.scale_ExD.shape[0]} exits of width {p.scale_ExD.shape[1]}; the model "
                         f"has {e} early exits of width {cfg.d_model}")
    if p.rank and (cfg.exit_head != "lowrank" or cfg.exit_rank != p.rank):
        raise ValueError(f"adapter of rank {p.rank} needs a model with exit_head='lowrank', exit_rank={p.rank} "
                         f"(this one: exit_head={cfg.exit_head!r}, exit_rank={cfg.exit_rank})")
    heads = model.exit_heads
    heads.norm.scale[...] = jnp.asarray(p.scale_ExD, heads.norm.scale[...].dtype)
    if cfg.exit_head == "lowrank":
        r = cfg.exit_rank
        down = p.down_ExDxR if p.rank else jnp.zeros((e, cfg.d_model, r))
        up = p.up_ExRxD if p.rank else jnp.zeros((e, r, cfg.d_model))
        heads.down.kernel[...] = jnp.asarray(down, heads.down.kernel[...].dtype)
        heads.up.kernel[...] = jnp.asarray(up, heads.up.kernel[...].dtype)
    return nnx.split(model)[1]


def params_to_numpy(p: ExitParams) -> dict:
    return {k: np.asarray(v) for k, v in p._asdict().items() if v is not None}


def params_from_numpy(d) -> ExitParams:
    return ExitParams(jnp.asarray(d["scale_ExD"]), *(jnp.asarray(d[k]) if k in d else None
                                                     for k in ("down_ExDxR", "up_ExRxD")))


__all__ = ["FeatureCache", "ExitParams", "cache_features", "save_cache", "load_cache", "init_exit_params",
           "causal_layer", "exit_logits", "teacher_logprobs", "exit_metrics", "evaluate_exits",
           "load_exit_params", "params_to_numpy", "params_from_numpy"]
