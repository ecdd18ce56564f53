"""A tiny LGViT stage-1 run with the real Trainer, one process of a multi-process job, for tests/test_multihost.py.

    EEJAX_COORDINATOR=127.0.0.1:PORT EEJAX_NUM_PROCESSES=2 EEJAX_PROCESS_ID=i \
        python tests/multihost_script.py WORKDIR OUT.npz NUM_STEPS [RESUME_AT]

Without the EEJAX_* variables it is a plain single-process run. Each process feeds its rows of every global batch
(`BatchIterator(process_index, process_count)`); the Trainer assembles the global batch from the slices. With
RESUME_AT the run stops at that step (checkpoint), and a new Trainer and iterator resume from the checkpoint to
NUM_STEPS, so orbax saves and restores across processes. Writes this process's final params to OUT.npz (keys are
tree paths). Shapes: N examples, H = W image side, C classes.
"""
import sys

import numpy as np

from eejax.train import maybe_initialize

maybe_initialize()  # Before anything below asks jax about devices.

import jax  # noqa: E402

from eejax.data import pipeline  # noqa: E402
from eejax.data.vision import ArrayDataset  # noqa: E402
from eejax.models import vit as vit_lib  # noqa: E402
from eejax.train import Trainer, default_optim_config, make_optimizer  # noqa: E402
from experiments import lgvit  # noqa: E402

N, H, C, B = 64, 8, 4, 16
MODEL = vit_lib.ViTConfig(image_size=H, channels=1, patch_size=4, d_model=16, depth=2, num_heads=2, mlp_dim=32,
                          num_classes=C, exits="from:1", head_types="linear")


def dataset() -> ArrayDataset:
    rng = np.random.default_rng(0)
    images_NxHxWx1 = rng.integers(0, 256, size=(N, H, H, 1), dtype=np.uint8)
    labels_N = (images_NxHxWx1.reshape(N, -1).mean(1) > 127.5).astype(np.int32) + 2 * (np.arange(N) % 2)
    return ArrayDataset(images_NxHxWx1, labels_N.astype(np.int32), name="synthetic", num_classes=C, split="train")


def batches(ds: ArrayDataset) -> pipeline.BatchIterator:
    return pipeline.BatchIterator(ds, B, seed=0, process_index=jax.process_index(),
                                  process_count=jax.process_count(),
                                  normalization=pipeline.Normalization((0.5,), (0.25,)))


def train(workdir: str, num_steps: int, stop_at: int):
    graphdef, params = vit_lib.build(MODEL, seed=0)
    # SGD, not Adam: the key bias of attention has an exactly zero gradient, and Adam turns the rounding noise
    # left there (which depends on the all-reduce order, so differs between 1 and 2 processes) into +-lr steps.
    optim = default_optim_config()
    optim.update(name="sgd", lr=0.1, grad_clip=1.0)
    loss_fn = lgvit.stage1_loss(graphdef, MODEL, "alternating")
    ds = dataset()
    for end in sorted({stop_at, num_steps}):  # A new Trainer and iterator per leg: the second one resumes.
        with Trainer(loss_fn, params, make_optimizer(optim), workdir=workdir, ckpt_every=stop_at, log_every=1) as t:
            state = t.fit(batches(ds), end)
    return state.params


def main(workdir: str, out: str, num_steps: int, stop_at: int | None = None) -> None:
    params = train(workdir, num_steps, stop_at or num_steps)
    flat = {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out, **flat)
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
          f"{jax.device_count()} devices, wrote {len(flat)} arrays", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
