"""A ViT whose every layer exits through ONE shared classifier head: the multi-exit backbone of MuE and DeeR-VLA.

Both papers train every layer's output through the model's own final head (MuE: OFA's decoder layers share the
output projection, label-smoothed CE summed over every layer; DeeR: exits every 2 layers with a shared action
head). So the backbone here is a ViT with one linear head (``exits=[N-1]``) trained with the mean, over every layer,
of the label-smoothed CE of that head applied to the layer's output; at inference the same head sits after every
layer (``shared_heads``). The backbone lives in ``<workdir>/backbone``, or in ``cfg.model_workdir`` when set, so the
MuE and DeeR scripts can share one trained backbone: that directory is locked and bound to the fields the backbone
depends on (``BACKBONE_FIELDS``), so a backbone trained with another recipe is refused, not silently reused.

Shapes: B batch, N layers (= E exits, one per layer), T tokens, D width, C classes.
"""
from __future__ import annotations

import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.harness import config as config_lib
from eejax.harness import run
from eejax.data import pipeline
from eejax.harness import results
from eejax.exits import costs, engine
from eejax.models import vit as vit_lib
from eejax.train import Trainer, make_optimizer, maybe_initialize
from experiments.lgvit import _host_slice, load_data, padded_eval_images


def model_config(cfg) -> vit_lib.ViTConfig:
    """One linear head after the last layer; the engine evaluates it after every layer."""
    return vit_lib.ViTConfig(**cfg.model.to_dict(), num_classes=10, exits=[cfg.model.depth - 1],
                             head_types="linear")


def exit_layers(mcfg: vit_lib.ViTConfig) -> tuple[int, ...]:
    return tuple(range(mcfg.depth))


def all_layer_outputs(model, x_BxHxWxC):
    """Scan path: the shared head after every layer (``ExitOutputs`` with E = N)."""
    n = model.cfg.depth
    return engine.scan_exits(model.layers, [model.heads[0]] * n, model.embed(x_BxHxWxC), exit_layers(model.cfg))


def smoothed_ce(logits_ExBxC, labels_B, smoothing: float):
    c = logits_ExBxC.shape[-1]
    target = jax.nn.one_hot(labels_B, c) * (1 - smoothing) + smoothing / c
    return -jnp.mean(jnp.sum(target[None] * jax.nn.log_softmax(logits_ExBxC.astype(jnp.float32), -1), -1), axis=1)


def loss(graphdef, smoothing: float):
    def loss_fn(params, batch, ctx):
        del ctx
        outs = all_layer_outputs(nnx.merge(graphdef, params), batch["image"])
        ce_E = smoothed_ce(outs.logits_ExBxC, batch["label"], smoothing)
        acc_E = jnp.mean(jnp.argmax(outs.logits_ExBxC, -1) == batch["label"][None], axis=1)
        return jnp.mean(ce_E), {"ce_first": ce_E[0], "ce_last": ce_E[-1], "acc_first": acc_E[0],
                                "acc_last": acc_E[-1]}
    return loss_fn


BACKBONE_FIELDS = ("seed", "data", "model", "train")   # what the backbone's checkpoints depend on


def backbone_dir(cfg, args, workdir):
    """``cfg.model_workdir`` (locked, bound to ``BACKBONE_FIELDS``) or ``<workdir>/backbone``."""
    if not cfg.model_workdir:
        return workdir / "backbone"
    from eejax.harness import run  # noqa: PLC0415

    data = {k: v for k, v in cfg.data.to_dict().items() if k not in ("eval_batch_size", "test_size")}
    base = {"seed": cfg.seed, "data": data, "model": cfg.model.to_dict(), "train": cfg.train.to_dict()}
    return run.open_workdir(cfg.model_workdir, cfg, fresh=getattr(args, "fresh", False), what="model_workdir",
                            record=run.config_record(base))


def train(cfg, train_ds, model_dir):
    """Train (or resume) the backbone in ``model_dir``; returns ``(graphdef, params)``."""
    mcfg = model_config(cfg)
    graphdef, params = vit_lib.build(mcfg, cfg.seed)
    batches = pipeline.BatchIterator(train_ds, cfg.data.batch_size, seed=cfg.seed, **_host_slice())
    with Trainer(loss(graphdef, cfg.train.label_smoothing), params, make_optimizer(cfg.train.optim),
                 workdir=model_dir, seed=cfg.seed, log_every=cfg.log_every,
                 ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(batches, cfg.train.steps, desc="shared-head ViT").params
    return graphdef, params


def flat_state(h_BxTxD):
    """MuE compares the whole layer state (every token), as one vector per example."""
    return h_BxTxD.reshape(h_BxTxD.shape[0], -1).astype(jnp.float32)


def cached_outputs(graphdef, params, ds, cfg):
    """Per layer and example: the shared head's softmax ``probs_ExNxC`` and MuE's cosine similarity of the layer's
    output with its input, ``cos_ExN`` (layer 1 against the embedding)."""
    @jax.jit
    def fn(params, x):
        model = nnx.merge(graphdef, params)
        h0 = model.embed(x)
        h_last, h_SxBxTxD = engine.run_layers(model.layers, h0)
        del h_last
        flat_SxBxF = jax.vmap(flat_state)(jnp.concatenate([h0[None], h_SxBxTxD]))
        a, b = flat_SxBxF[1:], flat_SxBxF[:-1]
        cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-9)
        logits = jax.vmap(lambda h: model.heads[0](h).logits_BxC)(h_SxBxTxD)
        return jax.nn.softmax(logits, -1), cos

    probs, cos = [], []
    for x, n in padded_eval_images(ds, cfg):
        p, c = fn(params, x)
        probs.append(np.asarray(p)[:, :n])
        cos.append(np.asarray(c)[:, :n])
    return np.concatenate(probs, 1), np.concatenate(cos, 1)


def shared_heads(model, report_state: bool):
    """The shared head once per layer; ``report_state``: its ``hidden_BxD`` is the whole flattened layer state
    (what MuE's saturation policy compares)."""
    head = model.heads[0]
    if not report_state:
        return [head] * model.cfg.depth

    def full(h):
        return head(h)._replace(hidden_BxD=flat_state(h))
    return [full] * model.cfg.depth


def run_engine(model, x, policy, executor=engine.Compacted(), report_state: bool = False):
    """The dynamic path: the engine's prefix program over every layer, the shared head at each exit."""
    n = model.cfg.depth
    return engine.run(model.layers, shared_heads(model, report_state), model.embed(x),
                      engine.prefix(n, exit_layers(model.cfg)), policy, executor)


def executed_exits(graphdef, params, ds, cfg, make_policy, thr, report_state=False):
    """Exit index and prediction per test example, executed by the engine (compacted executor)."""
    @jax.jit
    def fn(params, x, thr):
        out = run_engine(nnx.merge(graphdef, params), x, make_policy(thr), report_state=report_state)
        return out.exit_B, jnp.argmax(out.logits_BxC, -1)

    exits, preds = [], []
    for x, n in padded_eval_images(ds, cfg):
        e, p = fn(params, x, thr)
        exits.append(np.asarray(e)[:n])
        preds.append(np.asarray(p)[:n])
    return np.concatenate(exits), np.concatenate(preds)


def layer_costs(mcfg: vit_lib.ViTConfig) -> costs.ExitCosts:
    """FLOPs per exit: the shared linear head counted at every exit evaluated on the way (``cum_flops_E``)."""
    t, d = mcfg.tokens, mcfg.d_model
    layer = costs.transformer_layer_flops(t, d, mcfg.mlp_dim, mcfg.num_heads)
    return costs.exit_costs(costs.patch_embed_flops(t - 1, mcfg.patch_size ** 2 * mcfg.channels, d),
                            [layer] * mcfg.depth, exit_layers(mcfg),
                            [costs.linear_head_flops(d, mcfg.num_classes)] * mcfg.depth)


class Setup(NamedTuple):
    """What experiments/mue.py and experiments/deer.py start from: the run, the data, the shared-head backbone and
    every exit's cached softmax / layer-state cosine on validation and test, and the static model's throughput."""
    cfg: Any
    args: Any
    prov: Any
    outdir: pathlib.Path
    train: Any
    val: Any
    test: Any
    mcfg: vit_lib.ViTConfig
    ec: costs.ExitCosts       # analytic FLOPs per exit
    graphdef: Any
    params: Any
    probs_val: np.ndarray
    cos_val: np.ndarray
    probs_test: np.ndarray
    cos_test: np.ndarray
    xb: np.ndarray            # one test batch of cfg.eval.throughput_batch images, for throughput
    static_tp: float          # images/s of the static full-depth model on xb


def setup(argv, name: str, description: str) -> Setup:
    """Parse and validate the config, load the data, lock and bind the workdir, train (or resume) the shared
    backbone and cache its outputs."""
    cfg, args = config_lib.parse_cli(argv, description=description)  # every value validated before any work
    train_ds, val, test = load_data(cfg, args.data_dir)
    maybe_initialize()
    prov = results.provenance(f"experiments.{name}", argv)
    workdir, outdir = run.prepare(cfg, args, name)
    print(f"data {cfg.data.name}: train {len(train_ds)} / val {len(val)} / test {len(test)}; devices: "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    mcfg = model_config(cfg)
    graphdef, params = train(cfg, train_ds, backbone_dir(cfg, args, workdir))
    probs_val, cos_val = cached_outputs(graphdef, params, val, cfg)
    probs_test, cos_test = cached_outputs(graphdef, params, test, cfg)
    xb = next(iter(pipeline.BatchIterator(test, cfg.eval.throughput_batch, shuffle=False)))["image"]
    static_tp = costs.throughput(jax.jit(lambda p, x: nnx.merge(graphdef, p).static(x, 0)), xb.shape[0], params, xb)
    return Setup(cfg, args, prov, outdir, train_ds, val, test, mcfg, layer_costs(mcfg), graphdef, params, probs_val,
                 cos_val, probs_test, cos_test, xb, static_tp)
