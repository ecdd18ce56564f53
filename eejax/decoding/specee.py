"""SpecEE: speculative early exiting (Xu et al., ISCA 2025, arXiv:2504.08850) as an engine policy on per-token,
KV-cached decoding.

Per generated token and row: a **draft head** proposes ``k`` candidate tokens (its top-k; here a Kangaroo drafter,
``eejax.decoding.kangaroo``, stands in for the paper's EAGLE head); the target model then runs the prefix program
with an exit after every *scheduled* layer. At an exit the head (``candidate_heads``) projects the normed hidden
state on only the ``k`` candidate rows of the LM head; a tiny per-layer 2-layer MLP (``Predictors``) reads the k
logits, their softmax and the change of that softmax since the previous scheduled layer (``features``), trained with
BCE on "this layer's argmax equals the final token". The policy (``SpecEEPolicy``) fires for a row when the score
is above 0.5 **and** the full LM head at that layer puts its argmax on one of the candidates; the row's token is
then that argmax.

When the full head runs (``head_check``) trades a host round trip against one read of the vocabulary matrix:
``"cond"`` (the paper's saving) computes it only when some row's score passes, so a decision point costs two host
stops on a GPU (that ``lax.cond`` and the executor's "is any row left?"); ``"always"`` computes it at every scheduled
layer reached, one host stop per decision point. ``"auto"`` (default, ``resolve_head_check``) asks the roofline
cost model (``eejax.exits.costs``, the calibrated H200 unless another device is named) which is cheaper at the
model's shape and batch: ``"always"`` when one full head is predicted to take less than one host stop, else
``"cond"``. On the calibrated H200 a SmolLM2-135M head (V x D = 49152 x 576 bf16, 57 MB) is about 19 us against a
23 us stop up to batch 32, so ``"auto"`` is ``"always"`` there and ``"cond"`` at batch 128 or for a Llama-7B-sized
head (``benchmarks/papers/specee.py`` times both on the GPU). Decisions and tokens are the same in every mode
(tested); the cost model counts the heads each one runs. Rows that never fire leave at the last layer with
the full head. So the output is near-lossless, not lossless: an exited token may differ from the full model's.

K/V of exited tokens at deeper layers (the PAPERS.md red flag: SpecEE's ``AutoEE/Pure`` never writes them): CALM's
state propagation, as ``per_token.exit_step`` does, on the same decode executor (``kv.propagating``: one
``lax.cond`` per exit decision, no data-dependent loop). Every layer the step runs writes every row's K/V, an exited
row's from its frozen hidden state; in the branch where the batch stops the layers no row reached get their K/V
from the same frozen states (one batched computation). Later tokens therefore attend over every slot of every layer.

Shapes: B batch, K candidates (``k``), F = 3K features, H predictor width, E exits (scheduled layers + the last),
D width, V vocabulary, G generated tokens, N layers.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.decoding import kangaroo as kg
from eejax.decoding import kv as kv_lib
from eejax.exits import costs, engine
from eejax.models.lm import DecoderLM


class Predictors(NamedTuple):
    """One 2-layer MLP per scheduled layer (leading axis S = scheduled layers, the last layer excluded)."""

    w1_SxFxH: jax.Array
    b1_SxH: jax.Array
    w2_SxH: jax.Array
    b2_S: jax.Array


def init_predictors(key: jax.Array, num: int, k: int, hidden: int = 32) -> Predictors:
    k1, k2 = jax.random.split(key)
    f = 3 * k
    return Predictors(jax.random.normal(k1, (num, f, hidden)) / np.sqrt(f), jnp.zeros((num, hidden)),
                      jax.random.normal(k2, (num, hidden)) / np.sqrt(hidden), jnp.zeros((num,)))


def features(cand_logits_BxK: jax.Array, prev_p_BxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SpecEE's predictor input: the k candidate logits, their softmax, and the softmax's change since the previous
    scheduled layer (zeros before the first). Returns ``(f_BxF, p_BxK)``."""
    logits = cand_logits_BxK.astype(jnp.float32)
    p = jax.nn.softmax(logits, -1)
    return jnp.concatenate([logits, p, p - prev_p_BxK], -1), p


def logit(pred: Predictors, s, f_BxF: jax.Array) -> jax.Array:
    """Predictor ``s`` (a scheduled layer's index) before the sigmoid (trained with BCE on it)."""
    hid = jax.nn.relu(f_BxF @ pred.w1_SxFxH[s] + pred.b1_SxH[s][None])
    return hid @ pred.w2_SxH[s] + pred.b2_S[s]


def score(pred: Predictors, s, f_BxF: jax.Array) -> jax.Array:
    """Sigmoid score of predictor ``s``."""
    return jax.nn.sigmoid(logit(pred, s, f_BxF))


def head_rows(model: DecoderLM, cand_BxK: jax.Array) -> jax.Array:
    """The LM head's rows of the candidate tokens, ``B x K x D``."""
    if model.cfg.tie_embeddings:
        return model.embed.embedding[...][cand_BxK]
    return jnp.moveaxis(model.unembed.kernel[...][:, cand_BxK], 0, -1)


def candidate_heads(model: DecoderLM, cand_BxK: jax.Array, num_exits: int) -> list:
    """Engine heads for the scheduled exits: the final norm, then only the k candidate rows of the LM head
    (``logits_BxC`` = ``B x K``; ``feat_BxD`` = the normed hidden state, for the full head when needed)."""
    rows_BxKxD = head_rows(model, cand_BxK)

    def head(h_BxTxD):
        x = model.final_norm(h_BxTxD[:, -1])
        # In the compute dtype, accumulated in float32 (no float32 dot in a bfloat16 decode).
        logits = jnp.einsum("bd,bkd->bk", x, rows_BxKxD.astype(x.dtype), preferred_element_type=jnp.float32)
        return engine.HeadOut(logits_BxC=logits, feat_BxD=x, hidden_BxD=h_BxTxD[:, -1],
                              gate_B=jnp.zeros(x.shape[:1], jnp.float32))

    return [head] * num_exits


class SpecEEState(NamedTuple):
    prev_p_BxK: jax.Array   # candidate softmax at the previous scheduled layer
    final_tok_B: jax.Array  # the full head's argmax at the last layer, for the rows that reach it (else -1)


HEAD_CHECKS = ("auto", "cond", "always")


def resolve_head_check(cfg, head_check: str = "auto", *, batch: int = 1, device="h200", dtype=None) -> str:
    """``"cond"`` or ``"always"`` for a ``head_check`` (module docstring). ``"auto"``: ``"always"`` when the roofline
    cost model (``costs.decode_time``, eejax's decoder as it is now: cache in the compute dtype) predicts one full
    head of ``cfg`` at ``batch`` rows on ``device`` to take no longer than one host stop there, else ``"cond"``
    (whose head runs only when a predictor passes, at the price of a stop at every decision point). ``dtype``: the
    head weights' (``target_step`` passes the model's); default ``cfg.dtype``, else float32."""
    if head_check not in HEAD_CHECKS:
        raise ValueError(f"head_check={head_check!r}: use one of {HEAD_CHECKS}")
    if head_check != "auto":
        return head_check
    dev = costs.get_device(device)
    head = costs.decode_time(cfg, costs.TokenCounts(layers=0.0, heads=1.0), batch=int(batch), device=dev,
                             dtype=dtype or getattr(cfg, "dtype", None) or "float32",
                             impl=costs.DecodeImpl(cache_dtype=None))
    return "always" if head.time_s <= dev.stop_s else "cond"


def model_head_check(model: DecoderLM, head_check: str = "auto", *, batch: int = 1, device="h200") -> str:
    """``resolve_head_check`` for ``model`` (its config and its head weights' dtype) at ``batch`` rows."""
    head_w = model.embed.embedding[...] if model.cfg.tie_embeddings else model.unembed.kernel[...]
    return resolve_head_check(model.cfg, head_check, batch=batch, device=device, dtype=head_w.dtype)


class SpecEEPolicy(NamedTuple):
    """SpecEE's exit rule (module docstring). ``num_exits``: at the last exit (a Python int ``e``, as the decode
    executor ``kv.Unrolled`` passes it) no predictor runs: the full head's argmax is recorded for the rows still
    running, with no conditional of its own (the stage runs only when some row reached it). ``head_check``: when
    the full head runs at a scheduled layer (module docstring)."""

    pred: Predictors
    cand_BxK: jax.Array
    full_head: object           # normed hidden B x D -> vocabulary logits B x V
    threshold: float = 0.5
    num_exits: int | None = None
    head_check: str = "always"   # "cond" or "always" (resolve_head_check resolves "auto")

    def init(self, probe, zero_B, h0=None):
        return SpecEEState(jnp.zeros(probe.logits_BxC.shape, jnp.float32) + zero_B[:, None], zero_B - 1)

    def decide(self, out, state, e):
        if self.num_exits is not None and isinstance(e, int) and e == self.num_exits - 1:
            tok_B = jnp.argmax(self.full_head(out.feat_BxD), -1).astype(jnp.int32)
            zero_B = jnp.zeros(tok_B.shape, jnp.float32)
            return zero_B > 0, zero_B, state._replace(final_tok_B=tok_B)
        if self.head_check not in ("cond", "always"):
            raise ValueError(f"SpecEEPolicy(head_check={self.head_check!r}): use 'cond' or 'always' "
                             "(resolve_head_check turns 'auto' into one of them)")
        f, p = features(out.logits_BxC, state.prev_p_BxK)
        s_B = score(self.pred, jnp.minimum(e, self.pred.b2_S.shape[0] - 1), f)
        want_B = s_B > self.threshold
        full_argmax = lambda x: jnp.argmax(self.full_head(x), -1).astype(jnp.int32)   # noqa: E731
        if self.head_check == "always":   # no conditional: one head read more, one host stop less
            argmax_B = full_argmax(out.feat_BxD)
        else:   # the full head only when some row's predictor passes (the saving of SpecEE's k-row features)
            argmax_B = jax.lax.cond(jnp.any(want_B), full_argmax, lambda x: jnp.full(x.shape[:1], -1, jnp.int32),
                                    out.feat_BxD)
        fire_B = want_B & jnp.any(argmax_B[:, None] == self.cand_BxK, -1)
        return fire_B, s_B, state._replace(prev_p_BxK=p)


def schedule_program(num_layers: int, schedule: Sequence[int]) -> engine.Program:
    """The prefix program with an exit after every scheduled layer (0-based) and after the last layer."""
    return engine.prefix(num_layers, sorted(set(int(l) for l in schedule) | {num_layers - 1}))


class StepOut(NamedTuple):
    tok_B: jax.Array
    exit_layer_B: jax.Array   # 0-based layer whose output gave the token
    layers_run: jax.Array     # layers the batch loop ran
    preds_B: jax.Array        # predictor evaluations of this token (scheduled layers reached)


def target_step(model: DecoderLM, tok_B, state: kv_lib.DecodeState, cand_BxK, pred: Predictors,
                schedule: Sequence[int], threshold: float = 0.5,
                head_check: str = "auto") -> tuple[StepOut, kv_lib.DecodeState]:
    """One token per row through the target with SpecEE's exit policy on the decode executor
    (``kv.propagating``: one ``lax.cond`` per scheduled exit decision, the K/V of the layers no row reached filled
    from each row's frozen exit state in the branch where the batch stops). Host round trips per token on a GPU:
    per scheduled layer reached the decision, and when ``head_check`` resolves to ``"cond"`` (``resolve_head_check``,
    at this batch) the full-head check (a cond, taken only when some row's score passes); the last layer's full
    head runs in the last stage (reached only when some row is left)."""
    head_check = model_head_check(model, head_check, batch=tok_B.shape[0])
    n = model.cfg.depth
    program = schedule_program(n, schedule)
    num_exits = program.num_exits
    full_head = lambda x: model.shared_head(x)   # noqa: E731  (x is already normed by the final norm)
    policy = SpecEEPolicy(pred, cand_BxK, full_head, threshold, num_exits, head_check)
    out, new_state = kv_lib.forward(model, tok_B[:, None], state, program,
                                    candidate_heads(model, cand_BxK, num_exits), policy, kv_lib.propagating(model))
    last = out.exit_B == num_exits - 1
    cand_tok = jnp.take_along_axis(cand_BxK, jnp.argmax(out.out.logits_BxC, -1)[:, None], 1)[:, 0]
    tok = jnp.where(last, out.policy_state.final_tok_B, cand_tok).astype(jnp.int32)
    sched = jnp.asarray(program.exit_step_E)
    preds_B = jnp.where(last, num_exits - 1, out.exit_B + 1)   # predictor evaluations (the last layer has none)
    return StepOut(tok, sched[out.exit_B], out.layers_run, preds_B), new_state


class SpecEEOutputs(NamedTuple):
    tokens_BxG: jax.Array
    exit_layer_BxG: jax.Array   # layer whose output gave token g (prefill: N-1)
    layers_run_G: jax.Array     # layers the batch loop ran for token g (prefill: N)
    preds_BxG: jax.Array        # predictor evaluations for token g


class _Token(NamedTuple):
    """Carry of the per-token loop."""
    tok_B: jax.Array                 # the newest token (not yet in either cache)
    state: kv_lib.DecodeState        # the target's cache
    draft: kg.KangarooState          # the drafter's own cache


def decode(model: DecoderLM, adapter: dict, prompt_BxP, lengths_B, num_new: int, *, exit_layer: int,
           pred: Predictors, schedule: Sequence[int], k: int = 4, threshold: float = 0.5,
           head_check: str = "auto") -> SpecEEOutputs:
    """Greedy SpecEE decoding: per token the Kangaroo drafter (``kangaroo.drafter``: first ``exit_layer`` layers +
    adapter + head, its own KV cache) proposes its top-``k``, then the target runs with SpecEE's exit policy
    (``head_check``: module docstring)."""
    cfg = model.cfg
    sched = [int(l) for l in schedule]
    if not sched or sched != sorted(set(sched)) or sched[0] < 0 or sched[-1] >= cfg.depth - 1:
        raise ValueError(f"schedule={list(schedule)} must name increasing layers in [0, {cfg.depth - 1}) (the last "
                         "layer always exits)")
    if len(sched) != pred.b2_S.shape[0]:
        raise ValueError(f"schedule has {len(sched)} layers but pred has {pred.b2_S.shape[0]} predictors")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= cfg.vocab_size:
        raise ValueError(f"k={k!r} candidates must be an int in [1, {cfg.vocab_size}] (the vocabulary)")
    if pred.w1_SxFxH.shape[1] != 3 * k:
        raise ValueError(f"pred reads {pred.w1_SxFxH.shape[1]} features; k={k} candidates give {3 * k}")
    if isinstance(num_new, bool) or not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"num_new={num_new!r} must be an int >= 1")
    if head_check not in HEAD_CHECKS:
        raise ValueError(f"head_check={head_check!r}: use one of {HEAD_CHECKS}")
    if checks.is_concrete(threshold) and not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold={threshold!r} must lie in (0, 1): the predictor's sigmoid score never reaches "
                         "0 or 1")
    kv_lib.check_prompts(prompt_BxP, lengths_B, cfg.vocab_size)
    drafter = kg.drafter(model, adapter, exit_layer)
    b, p = prompt_BxP.shape
    cache_len = p + num_new
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    logits, state = kv_lib.prefill(model, prompt_BxP, lengths_B, cache_len)
    n = cfg.depth

    def body(c: _Token, _):
        dlogits, dstate = drafter.propose(c.tok_B, c.draft)
        cand_BxK = jax.lax.top_k(dlogits.astype(jnp.float32), k)[1].astype(jnp.int32)
        so, state = target_step(model, c.tok_B, c.state, cand_BxK, pred, sched, threshold, head_check)
        return _Token(so.tok_B, state, dstate), so

    first_B = jnp.argmax(logits, -1).astype(jnp.int32)
    init = _Token(first_B, state, drafter.init(model, prompt_BxP, lengths_B, cache_len))
    _, steps = jax.lax.scan(body, init, None, length=num_new - 1)
    full = lambda x, v: jnp.concatenate([jnp.full((1, b), v, x.dtype), x], 0).T   # noqa: E731
    return SpecEEOutputs(jnp.concatenate([first_B[:, None], steps.tok_B.T], 1), full(steps.exit_layer_B, n - 1),
                         jnp.concatenate([jnp.asarray([n], steps.layers_run.dtype), steps.layers_run]),
                         full(steps.preds_B, 0))


def decode_fn(graphdef, num_new: int, *, exit_layer: int, schedule: Sequence[int], k: int = 4,
              head_check: str = "auto"):
    """``jit``-ready ``f(params, adapter, pred, prompt_BxP, lengths_B)``."""

    def f(params, adapter, pred, prompt_BxP, lengths_B):
        return decode(nnx.merge(graphdef, params), adapter, prompt_BxP, lengths_B, num_new, exit_layer=exit_layer,
                      pred=pred, schedule=schedule, k=k, head_check=head_check)

    return f


# ------------------------------------------------------------------------------------------------ cost model


def host_stops_per_token(head_check: str, preds_per_token: float) -> float:
    """Host stops per generated token at batch 1: one exit decision per scheduled layer reached, and under
    ``"cond"`` one full-head check there too (``tests/test_spec_budgets.py`` holds both)."""
    if head_check not in ("cond", "always"):
        raise ValueError(f"head_check={head_check!r}: use 'cond' or 'always' (resolve 'auto' first)")
    return (2.0 if head_check == "cond" else 1.0) * float(preds_per_token)


def predicted_speedup(cfg, *, exit_layer: int, mean_layers: float, preds_per_token: float, full_heads: float,
                      predictor_params: int, head_check: str, batch: int = 1,
                      cache_len: int = 256) -> "costs.PredictedSpeedup":
    """Predicted speed-up over greedy (``costs.predicted_speedup``: roofline, calibrated H200) of SpecEE decoding
    that evaluates, per generated token: the drafter (``exit_layer`` layers, its adapter and head), ``mean_layers``
    target layers, ``preds_per_token`` predictors, ``full_heads`` full heads besides the drafter's, and the host
    stops of ``head_check`` (``host_stops_per_token``)."""
    counts = costs.TokenCounts(layers=exit_layer + mean_layers, heads=1.0 + full_heads, drafter=1.0,
                               predictors=preds_per_token, predictor_params=predictor_params,
                               host_stops=host_stops_per_token(head_check, preds_per_token))
    return costs.predicted_speedup(cfg, counts, batch=batch, cache_len=cache_len)


def cost_per_token(cfg, *, exit_layer: int, k: int, hidden: int, mean_layers: float, mean_preds: float,
                   mean_full: float) -> dict:
    """Parameters read per token (memory-bound decoding at batch 1): drafter (l layers + adapter attention + head),
    target layers run, per predictor evaluation the k head rows and the MLP, the full head per predictor pass and
    at the last layer. ``mean_full`` counts full-head evaluations per token (passes + final-layer tokens)."""
    c = kg.layer_params(cfg)
    pred = k * cfg.d_model + 3 * k * hidden + 2 * hidden + 1
    draft = exit_layer * c["layer"] + c["attn"] + c["head"]
    total = draft + mean_layers * c["layer"] + mean_preds * pred + mean_full * c["head"]
    return {"full_model": cfg.depth * c["layer"] + c["head"], "specee": total, "drafter": draft,
            "predictor_per_eval": pred, "layer": c["layer"], "head": c["head"]}


__all__ = ["HEAD_CHECKS", "resolve_head_check", "model_head_check", "Predictors", "init_predictors", "features",
           "logit", "score", "head_rows", "candidate_heads", "SpecEEState", "SpecEEPolicy", "schedule_program",
           "StepOut", "target_step", "SpecEEOutputs", "decode", "decode_fn", "cost_per_token",
           "host_stops_per_token", "predicted_speedup"]
