"""Cloud-edge split decoding (CE-CoLLM, Jin and Wu 2025, arXiv:2411.02829): the layer program cut after layer k into
an edge part (layers ``1..k`` and the exit at ``k``) and a cloud part (layers ``k+1..N`` and the final exit), with the
bytes each token sends between them counted and a latency cost model for stated link and device speeds.

The exit rule is CE-CoLLM's: a token whose edge-exit top-1 probability reaches the threshold is emitted on the edge
(``>=``, as the engine's threshold policy; the paper tried 0.8, 0.9 and 1.0); every other token's hidden state at
layer k goes to the cloud, which runs the remaining layers and returns the token.

The executor (``split_step``) is the per-token exit decode path (``kv.forward`` x ``kv.Unrolled``) on a two-exit
program: ``engine.prefix(N, [k-1, N-1])`` with the model's exit heads at those layers and a max-probability threshold
policy. So a step has exactly one exit decision (one ``lax.cond``, one host stop on a GPU) and the edge's output is
the static exit-k model's.

The cloud's K/V of the tokens the edge finished (``cloud_kv=``): the paper's cloud context manager keeps the layer-k
hidden states the edge uploads so that "deeper-layer KV can be built" without re-sending the context
(PAPERS-WAVE4.md, [abs + 2nd]; which computation builds them could not be read from the paper: [unv]). Two rules:

* ``"deferred"`` (default): the edge keeps the layer-k states of the tokens it finished; the next cloud call uploads
  them with its own, and the cloud runs its layers over all of them (a KV-cached ``extend`` of those positions).
  Their layer-k states are exact (the edge runs layers ``1..k`` for every token), so the cloud's cache equals the
  full model's, and running the cloud layers for every token in the step computes the same K/V the deferred call
  would (``kv="oracle"`` of ``per_token.exit_step``); only *when* the cloud computes them differs, and ``traffic``
  counts them at the cloud call that uploads them. Cloud work is then not saved per token, only per call.
* ``"propagate"``: CALM's state propagation (arXiv:2207.07061, Sec. 3.1): the cloud writes the K/V of its layers
  for an edge-finished token from that token's layer-k state alone (K/V projections only, ``kv.propagate``).

``traffic`` counts what crosses the link per row from the per-token edge/cloud record of a generation (bytes of
fp16 hidden states up, token ids down, cloud calls, the token-layers the cloud runs), for CE-CoLLM's context manager
and for naive collaboration (every cloud call re-sends the whole context's hidden states and the cloud recomputes
it). ``latency`` turns those counts into seconds with a ``CostModel``: never CPU wall-clock.

Prefill: the prompt runs at full depth (``kv.prefill``) and is counted as the first cloud call: the edge runs layers
``1..k`` over the prompt and uploads its P hidden states, the cloud runs the rest and returns token 0.

Shapes: B batch, G generated tokens, D width, N layers.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from eejax.decoding import kv as kv_lib
from eejax.decoding import per_token
from eejax.exits import confidence as conf_lib
from eejax.exits import costs, engine, policies
from eejax.models.lm import DecoderLM

CLOUD_KV = ("deferred", "propagate")


def edge_exit_index(model: DecoderLM, edge_layers: int) -> int:
    """The index of the model's exit after layer ``edge_layers`` (1-based count: the cut is after that layer); a
    ValueError names ``edge_layers`` when there is no exit there or nothing would be left for the cloud."""
    cfg = model.cfg
    if isinstance(edge_layers, bool) or not isinstance(edge_layers, (int, np.integer)) \
            or not 1 <= edge_layers < cfg.depth:
        raise ValueError(f"{edge_layers=} must be an integer in [1, {cfg.depth - 1}] (the layers the edge runs)")
    exits = list(cfg.exit_layers)
    if edge_layers - 1 not in exits:
        raise ValueError(f"{edge_layers=}: the model has no exit after layer {edge_layers} (exits after layers "
                         f"{[l + 1 for l in exits]})")
    return exits.index(edge_layers - 1)


def split_step(model: DecoderLM, tok_B: jax.Array, state: kv_lib.DecodeState, i, threshold, *, edge_layers: int,
               cloud_kv: str = "deferred") -> tuple[jax.Array, per_token.StepStats, kv_lib.DecodeState]:
    """One token per row on the split program: layers ``1..edge_layers`` and the edge exit; rows whose top-1
    probability there is ``>= threshold`` stop (finished on the edge), the others run the cloud's layers and the
    final exit. ``per_token``'s step interface (``per_token.generate(..., lambda m, t, s, i: split_step(...))``);
    ``StepStats.exit_layer_B == edge_layers - 1`` marks the rows the edge finished. ``cloud_kv``: the module
    docstring."""
    del i
    if cloud_kv not in CLOUD_KV:
        raise ValueError(f"cloud_kv={cloud_kv!r}: use one of {CLOUD_KV}")
    e = edge_exit_index(model, edge_layers)
    per_token.check_threshold(threshold, conf_lib.max_softmax, 1)
    cfg = model.cfg
    program = engine.prefix(cfg.depth, [edge_layers - 1, cfg.depth - 1])
    heads = kv_lib.model_heads(model, exits=[e, cfg.num_exits - 1])
    policy = policies.threshold(conf_lib.max_softmax, threshold, 2)
    ex = kv_lib.Unrolled(keep_running=True) if cloud_kv == "deferred" else kv_lib.propagating(model)
    out, new_state = kv_lib.forward(model, tok_B[:, None], state, program, heads, policy, ex)
    stats = per_token.StepStats(out.exit_layer_B, out.exit_layer_B + 1, out.score_B, out.layers_run,
                                out.out.hidden_BxD)
    return out.logits_BxC, stats, new_state


def edge_mask(gen: per_token.Generation, edge_layers: int) -> np.ndarray:
    """``bool[B, G]``: token g was finished on the edge (token 0 comes from the prefill: the cloud)."""
    return np.asarray(gen.exit_layer_BxG) == edge_layers - 1


# ------------------------------------------------------------------------------------------------ traffic


class Traffic(NamedTuple):
    """Per-row counts of one generation on the split (all ``float64[B]``; prefill included as a cloud call).

    edge_tokens: generated tokens finished on the edge (token 0, from the prefill, is the cloud's);
    cloud_calls: requests to the cloud (the prefill and every token the edge did not finish);
    up_states: layer-k hidden states uploaded with the cloud context manager (each position at most once: the
        prompt, then at each cloud call the pending states of the edge-finished tokens since the last call and its
        own); up_bytes = up_states x D x bytes_per_value;
    naive_up_states: the same without a context manager: each cloud call re-sends the whole context (P + g states
        at step g); naive_up_bytes likewise;
    down_bytes: token ids returned by the cloud (token_bytes per cloud call);
    cloud_token_layers: token-layers the cloud runs with the context manager (``deferred``: every uploaded state
        through its N-k layers; ``propagate``: N-k layers for each cloud token and the prompt, K/V projections only
        for edge-finished tokens: ``cloud_kv_token_layers``);
    cloud_kv_token_layers: token-layers of K/V projections only (``propagate``);
    naive_cloud_token_layers: without a context manager the cloud recomputes the whole context at every call.
    """
    edge_tokens: np.ndarray
    cloud_calls: np.ndarray
    up_states: np.ndarray
    up_bytes: np.ndarray
    naive_up_states: np.ndarray
    naive_up_bytes: np.ndarray
    down_bytes: np.ndarray
    cloud_token_layers: np.ndarray
    cloud_kv_token_layers: np.ndarray
    naive_cloud_token_layers: np.ndarray


def traffic(edge_BxG, lengths_B, *, d_model: int, depth: int, edge_layers: int, cloud_kv: str = "deferred",
            bytes_per_value: int = 2, token_bytes: int = 4) -> Traffic:
    """What crosses the edge-cloud link per row (``Traffic``), from ``edge_BxG`` (``edge_mask``: token g finished
    on the edge; column 0 must be False, the prefill's token) and the prompt lengths.

    Step g >= 1 feeds token g-1 (position P+g-1) and produces token g. Its layer-k state is pending on the edge until
    a cloud call: at a cloud step g after the last cloud step c (the prefill is step 0), the call uploads the
    ``g - c`` states of positions ``P+c .. P+g-1``. States still pending after the last token are never needed and
    not counted. fp16 transfers: ``bytes_per_value=2``."""
    edge = np.asarray(edge_BxG, bool)
    lengths = np.asarray(lengths_B, np.float64)
    if edge.ndim != 2 or edge.shape[1] < 1:
        raise ValueError(f"edge_BxG of shape {edge.shape} must be B x G with G >= 1")
    if lengths.shape != (edge.shape[0],) or lengths.min() < 1:
        raise ValueError(f"lengths_B of shape {lengths.shape} must hold one prompt length >= 1 per row of edge_BxG")
    if edge[:, 0].any():
        raise ValueError("edge_BxG[:, 0] must be False: token 0 comes from the prefill, a cloud call")
    if cloud_kv not in CLOUD_KV:
        raise ValueError(f"cloud_kv={cloud_kv!r}: use one of {CLOUD_KV}")
    for name, v in (("d_model", d_model), ("depth", depth), ("bytes_per_value", bytes_per_value),
                    ("token_bytes", token_bytes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if isinstance(edge_layers, bool) or not isinstance(edge_layers, (int, np.integer)) \
            or not 1 <= edge_layers < depth:
        raise ValueError(f"{edge_layers=} must be an integer in [1, {depth - 1}]")
    b, g = edge.shape
    cloud = ~edge
    steps_G = np.arange(g)
    # The last cloud step at or before g (the prefill, step 0, is always one), per row.
    last_cloud_BxG = np.maximum.accumulate(np.where(cloud, steps_G[None], 0), axis=1)
    prev_cloud_BxG = np.concatenate([np.zeros((b, 1), np.int64), last_cloud_BxG[:, :-1]], axis=1)
    pending_BxG = np.where(cloud, steps_G[None] - prev_cloud_BxG, 0)      # states uploaded at cloud step g >= 1
    pending_BxG[:, 0] = 0
    calls = cloud.sum(1).astype(np.float64)
    up_states = lengths + pending_BxG.sum(1)
    naive_BxG = np.where(cloud, lengths[:, None] + steps_G[None], 0.0)    # the whole context, P + g states
    naive_BxG[:, 0] = lengths
    naive_states = naive_BxG.sum(1)
    upper = depth - edge_layers
    edge_tokens = edge.sum(1).astype(np.float64)
    if cloud_kv == "deferred":
        cloud_layers, kv_layers = up_states * upper, np.zeros(b)
    else:   # the prompt and each cloud token run the upper layers; the pending edge tokens only their K/V
        cloud_layers = (lengths + (calls - 1)) * upper
        kv_layers = (up_states - lengths - (calls - 1)) * upper
    state_bytes = d_model * bytes_per_value
    return Traffic(edge_tokens=edge_tokens, cloud_calls=calls, up_states=up_states, up_bytes=up_states * state_bytes,
                   naive_up_states=naive_states, naive_up_bytes=naive_states * state_bytes,
                   down_bytes=calls * token_bytes, cloud_token_layers=cloud_layers, cloud_kv_token_layers=kv_layers,
                   naive_cloud_token_layers=naive_states * upper)


# ----------------------------------------------------------------------------------------------- cost model


class CostModel(NamedTuple):
    """Link and device speeds of the latency model (stated, not measured). One request per cloud call: one round
    trip (``rtt_s``) plus its bytes over the link; device time = FLOPs / effective FLOP/s."""
    uplink_bps: float          # edge -> cloud, bits/s
    downlink_bps: float        # cloud -> edge, bits/s
    rtt_s: float               # one round trip per cloud call
    edge_flops: float          # effective FLOP/s of the edge device
    cloud_flops: float         # effective FLOP/s of the cloud device


class Latency(NamedTuple):
    """Modelled seconds per row for one prompt + G tokens, by deployment (``float64[B]``)."""
    split: np.ndarray          # CE-CoLLM: edge layers + exit for every token, cloud calls with the context manager
    naive: np.ndarray          # the same exits, no context manager (whole context re-sent and recomputed per call)
    cloud_only: np.ndarray     # every token on the cloud (token ids up, full model there)
    edge_only: np.ndarray      # every token at the edge exit (no link)
    cloud_flops: np.ndarray    # FLOPs the cloud spends for the split (context manager)
    cloud_only_flops: np.ndarray


def layer_flops(shape: costs.LMShape) -> tuple[float, float, float]:
    """FLOPs per token of one decoder layer (matrix products, 2 x parameters), of its K/V projections only, and of
    one vocabulary head. Attention over the context (4 x context x D per layer) is added by ``latency``."""
    p = costs.lm_param_counts(shape)
    return 2.0 * p["layer"], 2.0 * p["kv_proj"], 2.0 * p["head"]


def latency(t: Traffic, edge_BxG, lengths_B, shape: costs.LMShape, edge_layers: int, cm: CostModel) -> Latency:
    """Modelled latency per row (``Latency``) of the split and its three comparisons, from the counts of
    ``traffic`` (its ``cloud_kv`` rule already in ``cloud_token_layers``) and a decoder shape (``costs.lm_shape``);
    autoregressive, so every cloud call is on the critical path. Attention FLOPs are charged at the mean context
    length of the generation."""
    check_cost_model(cm)
    edge = np.asarray(edge_BxG, bool)
    lengths = np.asarray(lengths_B, np.float64)
    g = edge.shape[1]
    n, d = shape.depth, shape.d_model
    lay, kvp, head = layer_flops(shape)
    lay = lay + 4.0 * d * (lengths + g / 2.0)   # attention over the mean context, per token-layer
    prompt_edge = lengths * edge_layers * lay   # the edge's layers over the prompt
    # Edge: layers 1..k and the edge head for every generated token after the first.
    edge_time = (prompt_edge + (g - 1) * (edge_layers * lay + head)) / cm.edge_flops
    cloud_flops = t.cloud_token_layers * lay + t.cloud_kv_token_layers * kvp + t.cloud_calls * head
    link = (t.cloud_calls * cm.rtt_s + t.up_bytes * 8 / cm.uplink_bps + t.down_bytes * 8 / cm.downlink_bps)
    split = edge_time + cloud_flops / cm.cloud_flops + link
    naive_flops = t.naive_cloud_token_layers * lay + t.cloud_calls * head
    naive = edge_time + naive_flops / cm.cloud_flops + (t.cloud_calls * cm.rtt_s + t.naive_up_bytes * 8 / cm.uplink_bps
                                                        + t.down_bytes * 8 / cm.downlink_bps)
    token_bytes = t.down_bytes / np.maximum(t.cloud_calls, 1)
    cloud_only_flops = (lengths + g - 1) * n * lay + g * head
    cloud_only = (cloud_only_flops / cm.cloud_flops + g * cm.rtt_s
                  + (lengths + g - 1) * token_bytes * 8 / cm.uplink_bps + g * token_bytes * 8 / cm.downlink_bps)
    edge_only = (prompt_edge + g * (edge_layers * lay + head)) / cm.edge_flops
    return Latency(split=split, naive=naive, cloud_only=cloud_only, edge_only=edge_only, cloud_flops=cloud_flops,
                   cloud_only_flops=cloud_only_flops)


def check_cost_model(cm: CostModel) -> CostModel:
    """``cm`` with every field a finite number (speeds > 0, ``rtt_s >= 0``), else a ValueError naming the field."""
    for name, v in cm._asdict().items():
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)
        if not ok or v < 0 or (v == 0 and name != "rtt_s"):
            raise ValueError(f"{name}={v!r} must be a finite number {'>= 0' if name == 'rtt_s' else '> 0'}")
    return cm


__all__ = ["CLOUD_KV", "CostModel", "Latency", "Traffic", "check_cost_model", "edge_exit_index", "edge_mask",
           "latency", "layer_flops", "split_step", "traffic"]
