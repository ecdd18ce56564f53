"""A plain single-head ViT classifier trained with label-smoothed CE on its final head: JEI-DNN's frozen backbone
and the members of the window-based cascade. Training goes through the one trainer (checkpoints, resume,
``metrics.jsonl``); evaluation helpers cache softmaxes / CLS tokens in padded batches (one compile).

Shapes: B batch, N layers, T tokens, D width, C classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data import pipeline
from eejax.exits import engine
from eejax.models import vit as vit_lib
from eejax.train import Trainer, make_optimizer
from experiments._shared_head_vit import smoothed_ce
from experiments.lgvit import _host_slice, padded_eval_images


def single_head_config(model_fields: dict, **overrides) -> vit_lib.ViTConfig:
    """One linear head after the last layer (a plain classifier)."""
    fields = {**model_fields, **overrides}
    return vit_lib.ViTConfig(**fields, num_classes=10, exits=[fields["depth"] - 1], head_types="linear")


def final_head_loss(graphdef, smoothing: float):
    def loss_fn(params, batch, rng, step):
        del rng, step
        logits_BxC = nnx.merge(graphdef, params).all_exits(batch["image"]).logits_ExBxC[-1:]
        ce = smoothed_ce(logits_BxC, batch["label"], smoothing)[0]
        return ce, {"ce": ce, "acc": jnp.mean(jnp.argmax(logits_BxC[0], -1) == batch["label"])}
    return loss_fn


def train_vit(mcfg: vit_lib.ViTConfig, cfg, train_ds, model_dir, seed: int, desc: str):
    """Train (or resume) one classifier in ``model_dir``; returns ``(graphdef, params)``."""
    graphdef, params = vit_lib.build(mcfg, seed)
    batches = pipeline.BatchIterator(train_ds, cfg.data.batch_size, seed=seed, **_host_slice())
    with Trainer(final_head_loss(graphdef, cfg.train.label_smoothing), params, make_optimizer(cfg.train.optim),
                 workdir=model_dir, seed=seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every) as tr:
        params = tr.fit(batches, cfg.train.steps, desc=desc).params
    return graphdef, jax.device_get(params)


def cached_probs(graphdef, params, ds, cfg) -> np.ndarray:
    """The final head's softmax for every example, ``probs_NxC``."""
    @jax.jit
    def fn(params, x):
        return jax.nn.softmax(nnx.merge(graphdef, params).static(x, 0).astype(jnp.float32), -1)
    return np.concatenate([np.asarray(fn(params, x))[:n] for x, n in padded_eval_images(ds, cfg)])


def cached_cls(graphdef, params, ds, cfg) -> np.ndarray:
    """The CLS token after every layer, ``cls_NxLxD`` (what linear exit heads with CLS pooling read)."""
    @jax.jit
    def fn(params, x):
        model = nnx.merge(graphdef, params)
        _, h_LxBxTxD = engine.run_layers(model.layers, model.embed(x))
        return jnp.swapaxes(h_LxBxTxD[:, :, 0], 0, 1)
    return np.concatenate([np.asarray(fn(params, x))[:n] for x, n in padded_eval_images(ds, cfg)])
