"""Ahead-of-time compilation for TPU topologies on a CPU-only machine (needs libtpu: `pip install -e ".[tpu]"`).

Compiles, for each topology libtpu offers: (a) the Trainer's sharded training step of the LGViT CIFAR-10 recipe
(stage-1 loss over `ViT.all_exits`, state replicated, batch sharded over every chip) and (b) the dynamic-depth
inference path (`ViT.dynamic`, a `lax.while_loop`) on a batch-sharded input. Inputs are `jax.ShapeDtypeStruct`s
with shardings on a mesh of the topology's abstract devices, so no TPU and no array is needed; the CPU stays the
default backend for the rest of the suite. `pytest -s` prints each program's `memory_analysis()`.

Not collected by the suite itself: tests/test_tpu_compile.py runs this file in a child process, so libtpu (its own
compiler, LLVM and thread pools) is never loaded into the process that goes on compiling the suite's CPU programs.
In CI the next module's first CPU compilation in that process died with SIGSEGV. By hand:
``python -m pytest -s tests/tpu_aot_programs.py``.
"""
import importlib.util
import os
import pathlib

# libtpu takes /tmp/libtpu_lockfile on load, so a second process that loads it (another test run, a developer's
# script) would fail here; AOT compilation uses no TPU, so sharing the library is safe.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from eejax.harness import config as config_lib  # noqa: E402
from eejax.models import vit as vit_lib  # noqa: E402
from eejax.train import Trainer, make_optimizer  # noqa: E402
from experiments import lgvit  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason='libtpu not installed: pip install -e ".[tpu]" to compile for TPU topologies')

# v5e:2x2 is the smallest v5e slice libtpu describes (one host); v4 and v5p are the 3-D-torus generations.
TOPOLOGIES = ("v5e:2x2", "v4:2x2x1", "v5p:2x2x1")
BATCH = 128  # cfg.data.batch_size of the recipe, divisible by every topology's device count.


@pytest.fixture(autouse=True)
def _keep_tpu_programs_out_of_the_cache():
    """The suite's persistent compilation cache is for CPU programs: a TPU executable stored there cannot be loaded
    without a TPU client (JAX warns and recompiles), so these tests write none."""
    old = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


def _mesh(topology_name: str) -> Mesh:
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
    except Exception as e:  # noqa: BLE001 - libtpu reports an unknown topology as a plain runtime error
        if "INVALID_ARGUMENT" not in str(e) and "NOT_FOUND" not in str(e):
            raise
        print(f"\nskipped {topology_name}: this libtpu does not describe it")
        pytest.skip(f"this libtpu does not offer topology {topology_name!r}: {e}")
    devices = np.asarray(topo.devices)
    assert {d.platform for d in devices} == {"tpu"}
    return Mesh(devices, ("data",), axis_types=(AxisType.Auto,))


def _recipe():
    cfg = config_lib.load(str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "lgvit.py") + ":cifar10")
    mcfg = vit_lib.ViTConfig(**lgvit._mkw(cfg, "lgvit"))
    model = nnx.eval_shape(lambda: vit_lib.ViT(mcfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)  # params: a tree of ShapeDtypeStructs, nothing allocated.
    return cfg, mcfg, graphdef, params


def _images(mcfg, sharding):
    return jax.ShapeDtypeStruct((BATCH, mcfg.image_size, mcfg.image_size, mcfg.channels), jnp.float32,
                                sharding=sharding)


def _report(what: str, compiled) -> None:
    mem = compiled.memory_analysis()
    print(f"\ncompiled {what}: {mem}")
    if mem is not None:  # Every program needs its parameters and some temporaries on each chip.
        assert mem.argument_size_in_bytes > 0 and mem.temp_size_in_bytes >= 0


@pytest.mark.parametrize("topology_name", TOPOLOGIES)
def test_train_step_compiles_for_tpu(topology_name, tmp_path):
    mesh = _mesh(topology_name)
    cfg, mcfg, graphdef, params = _recipe()
    loss_fn = lgvit.stage1_loss(graphdef, mcfg, cfg.stage1.weighting)
    with Trainer(loss_fn, params, make_optimizer(cfg.stage1.optim), workdir=tmp_path, mesh=mesh) as trainer:
        state = trainer._abstract_state()  # Replicated on the TPU mesh.
        batch = {"image": _images(mcfg, trainer.batch_sharding),
                 "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=trainer.batch_sharding)}
        compiled = trainer._step.lower(state, batch, None).compile()
    new_state, _ = compiled.output_shardings
    assert all(s.is_fully_replicated for s in jax.tree.leaves(new_state))
    _report(f"{topology_name} ({len(mesh.devices)} chips) LGViT stage-1 train step, batch {BATCH}", compiled)


@pytest.mark.parametrize("topology_name", TOPOLOGIES)
def test_dynamic_depth_inference_compiles_for_tpu(topology_name):
    mesh = _mesh(topology_name)
    _, mcfg, graphdef, params = _recipe()
    rep, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params)

    @jax.jit
    def infer(params, x_BxHxWxC, threshold):
        out = nnx.merge(graphdef, params).dynamic(x_BxHxWxC, threshold)
        return out.exit_B, jnp.argmax(out.logits_BxC, -1)

    threshold = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    lowered = infer.lower(params, _images(mcfg, batch_sharding), threshold)
    assert "while" in lowered.as_text()  # The dynamic-depth loop survives to the TPU program.
    compiled = lowered.compile()
    exit_sharding, _ = compiled.output_shardings
    assert exit_sharding.spec == P("data")  # Per-example outputs stay sharded over the chips.
    _report(f"{topology_name} ({len(mesh.devices)} chips) ViT.dynamic while-loop inference, batch {BATCH}", compiled)
