"""A tiny linear classifier on synthetic data trained with `eejax.train.Trainer`, for tests/test_trainer.py.

    python tests/train_script_for_tests.py WORKDIR NUM_STEPS [CKPT_EVERY]

Writes WORKDIR/final_params.npz. The resume test kills it with EEJAX_CRASH_AT_STEP and reruns the same command.
Shapes: B batch, D features, C classes.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eejax.train import Trainer, default_optim_config, make_optimizer

D, C, B = 8, 4, 16
_W_TRUE_DxC = np.random.default_rng(123).normal(size=(D, C)).astype(np.float32)


class Batches:
    """Endless synthetic batches; batch i depends only on (seed, i), so the position is the whole state."""

    def __init__(self, seed: int = 0, batch_size: int = B, nan_at_step: int | None = None):
        self.seed, self.batch_size, self.nan_at_step, self.pos = seed, batch_size, nan_at_step, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.pos])
        x_BxD = rng.normal(size=(self.batch_size, D)).astype(np.float32)
        y_B = np.argmax(x_BxD @ _W_TRUE_DxC, axis=-1).astype(np.int32)
        self.pos += 1
        if self.pos == self.nan_at_step:  # The pos-th batch feeds step pos.
            x_BxD[0, 0] = np.nan
        return {"x": x_BxD, "y": y_B}

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (0.1 * rng.normal(size=(D, C))).astype(np.float32), "b": np.zeros((C,), np.float32)}


def logits_fn(params, x_BxD):
    """Works for a dict {"w", "b"} and for the state of `nnx.Linear(D, C)` {"kernel", "bias"}."""
    w, b = (params["w"], params["b"]) if "w" in params else (params["kernel"][...], params["bias"][...])
    return x_BxD @ w + b[None]


def loss_fn(params, batch, ctx):
    logits_BxC = logits_fn(params, batch["x"])
    # Small logit noise so the test also covers the per-step RNG (fold_in) being reproduced on resume.
    logits_BxC = logits_BxC + 0.01 * jax.random.normal(ctx.rng, logits_BxC.shape)
    logp_BxC = jax.nn.log_softmax(logits_BxC)
    loss = -jnp.mean(jnp.take_along_axis(logp_BxC, batch["y"][:, None], axis=-1))
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits_BxC, -1) == batch["y"])}


def eval_fn(params, batch):
    correct_B = jnp.argmax(logits_fn(params, batch["x"]), -1) == batch["y"]
    return {"correct": jnp.sum(correct_B * batch["_mask"]), "count": jnp.sum(batch["_mask"])}


def optim_config(**overrides):
    cfg = default_optim_config()
    cfg.update(dict(lr=0.1, schedule="warmup_cosine", warmup_steps=3, total_steps=20, grad_clip=1.0), **overrides)
    return cfg


def make_trainer(workdir, *, params=None, ckpt_every: int = 5, log_every: int = 5, trainable=None, **kwargs):
    params = init_params() if params is None else params
    return Trainer(loss_fn, params, make_optimizer(optim_config(), trainable), workdir=workdir,
                   ckpt_every=ckpt_every, log_every=log_every, **kwargs)


def main(workdir: str, num_steps: int, ckpt_every: int = 5) -> dict[str, np.ndarray]:
    with make_trainer(workdir, ckpt_every=ckpt_every) as trainer:
        state = trainer.fit(Batches(), num_steps)
    params = jax.tree.map(np.asarray, state.params)
    np.savez(os.path.join(workdir, "final_params.npz"), **params)
    return params


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:]))
