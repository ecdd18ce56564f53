"""What the inference executors cost a GPU beyond the arithmetic, read from their compiled programs on CPU
(``eejax.exits.hlo``; issue 20): host stops (data-dependent ``while`` iterations and conditionals, each a round trip
to the host on a GPU), big memory passes and dot dtypes. The budgets fail when a change adds a stop.

* static ViT: 0 stops;
* masked: one stop per exit decision plus one per loop (one loop per run of equal-length segments);
* bucket cascade: one stop per exit decision plus one per (bucket, run) loop; no sort, no scatter of the hidden
  state, one gather of it per bucket change; matmuls at the bucket sizes;
* heterogeneous heads: one conditional per exit decision (the head switch), counted;
* sharded and continuous: held at their counts when the cascade landed;
* a bf16 ViT: every dot in bf16.

Tiny configurations: the counts depend on the program's structure, not its size.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType

from eejax.exits import continuous, engine, hlo, paths, policies
from eejax.models.vit import ViT, ViTConfig

B = 16
BUCKETS = (4, 8)          # with the full batch: K = 3 buckets
K = len(BUCKETS) + 1
INNER = 100               # trips assumed for any inner data-dependent loop: a nested loop would show


def _vit(exits="all", heads="linear", depth=6, dtype=None, patch=4):
    cfg = ViTConfig(image_size=8, channels=1, patch_size=patch, d_model=32, depth=depth, num_heads=2, mlp_dim=64,
                    num_classes=5, exits=exits, head_types=heads, local_hidden=8, global_pool=2)
    model = ViT(cfg, rngs=nnx.Rngs(0))
    if dtype is not None:   # as benchmarks/vit_paths.py casts the model
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module) and hasattr(node, "dtype"):
                node.dtype = dtype
        nnx.update(model, jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                       nnx.state(model)))
    return cfg, model


def _profile(cfg, model, executor, *, policy=True, fields=("logits_BxC",)):
    gd, state = nnx.split(model)
    x = jnp.zeros((B, cfg.image_size, cfg.image_size, 1), jax.tree.leaves(state)[0].dtype)
    num_exits = len(cfg.exit_layers)

    def f(state, x):
        m = nnx.merge(gd, state)
        pol = policies.threshold("max_softmax", 0.5, num_exits) if policy else None
        out = engine.run(m.layers, list(m.heads), m.embed(x), engine.prefix(cfg.depth, cfg.exit_layers), pol,
                         executor, fields=fields)
        return out.out
    return hlo.profile(f, state, x)


def _h_bytes(cfg, batch=B, itemsize=4):
    return batch * cfg.tokens * cfg.d_model * itemsize


def _per_iteration(prof):
    """Stops one iteration of every outermost data-dependent loop adds (1 each when nothing inside stops)."""
    return prof.host_stops(trips=(1, INNER)) - prof.host_stops(trips=(0, INNER))


def test_static_vit_has_no_host_stop():
    cfg, model = _vit()
    prof = _profile(cfg, model, None, policy=False)
    assert prof.host_stops(trips=1000) == 0 and prof.unknown_whiles == 0 and prof.conditionals == 0


@pytest.mark.parametrize("exits,runs", [("all", 1), ("every:2", 1), ("from:3", 2)])
def test_masked_one_stop_per_exit_decision(exits, runs):
    cfg, model = _vit(exits=exits)
    num_exits = len(cfg.exit_layers)
    prof = _profile(cfg, model, engine.Masked())
    assert len(engine.exit_runs(engine.prefix(cfg.depth, cfg.exit_layers))) == runs
    assert prof.unknown_whiles == prof.top_unknown_whiles() == runs and prof.conditionals == 0
    assert _per_iteration(prof) == runs                         # nothing inside a loop iteration stops
    assert prof.stops_per_call(num_exits, inner=INNER) == num_exits + runs
    # keep_running (oracle K/V) runs every exit: loops of known trip count, no stop at all.
    assert _profile(cfg, model, engine.Masked(keep_running=True)).host_stops(trips=1000) == 0


@pytest.mark.parametrize("exits,runs", [("all", 1), ("from:3", 2)])
def test_cascade_one_stop_per_decision_plus_one_per_bucket(exits, runs):
    cfg, model = _vit(exits=exits)
    num_exits = len(cfg.exit_layers)
    prof = _profile(cfg, model, engine.BucketCascade(BUCKETS))
    assert prof.unknown_whiles == prof.top_unknown_whiles() == K * runs and prof.conditionals == 0
    assert _per_iteration(prof) == K * runs
    # The loops share the exit counter: all iterations together are the exit decisions.
    assert prof.stops_per_call(num_exits, inner=INNER) == num_exits + K * runs


def test_cascade_moves_only_small_results():
    """No sort; no scatter of anything near the hidden state's size (only per-row results, B x C and smaller); one
    gather of the hidden state per bucket change. The baseline compacted executor sorts and scatters h."""
    cfg, model = _vit()
    small = _h_bytes(cfg) // 16     # every bucket's hidden state is larger; every per-row result smaller
    cascade = _profile(cfg, model, engine.BucketCascade(BUCKETS)).memory_ops(small)
    assert "sort" not in cascade and "scatter" not in cascade
    assert cascade.get("gather", 0) == K - 1
    assert "sort" not in _profile(cfg, model, engine.BucketCascade(BUCKETS)).memory_ops(0)
    compacted = _profile(cfg, model, engine.Compacted(BUCKETS))
    assert compacted.memory_ops(0).get("sort", 0) >= 1 and compacted.memory_ops(small).get("scatter", 0) >= K


def _dot_rows(hlo_text: str, width: int) -> set[int]:
    """Leading (row) sizes of the compiled dots whose output has ``width`` columns (``f32[R,width]``)."""
    return {int(r) for r in re.findall(rf"= f32\[(\d+),{width}\]\{{[^}}]*\}} dot\(", hlo_text)}


def test_cascade_runs_bucket_sized_matmuls():
    """The QKV projection compiles at 4, 8 and 16 rows (x tokens): a bucket runs smaller matmuls, not masked full
    ones; the masked executor's only at 16."""
    cfg, model = _vit()
    text = _profile(cfg, model, engine.BucketCascade(BUCKETS)).text
    assert _dot_rows(text, 3 * cfg.d_model) == {4 * cfg.tokens, 8 * cfg.tokens, 16 * cfg.tokens}
    assert _dot_rows(_profile(cfg, model, engine.Masked()).text, 3 * cfg.d_model) == {16 * cfg.tokens}


def test_heterogeneous_heads_switch_is_counted():
    """LGViT's local / global / linear heads cannot be stacked: a switch between the three groups (each stacked)
    costs one conditional per exit decision."""
    cfg, model = _vit(heads="lgvit", patch=2)
    assert engine.head_program(list(model.heads))[1] == "switch"
    num_exits = len(cfg.exit_layers)
    for executor, loops in ((engine.Masked(), 1), (engine.BucketCascade(BUCKETS), K)):
        prof = _profile(cfg, model, executor)
        assert prof.conditionals == loops     # one head switch in each loop body
        assert prof.stops_per_call(num_exits, inner=INNER) == 2 * num_exits + loops
    _, linear = _vit()
    assert engine.head_program(list(linear.heads))[1] == "stacked"
    assert engine.head_program([model.heads[0]] * 3)[1] == "shared"


def test_sharded_and_continuous_hold_their_counts():
    cfg, model = _vit()
    num_exits = len(cfg.exit_layers)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    # Each device runs the masked loop on its rows: one stop per exit decision + 1 (was 4 per decision + 1).
    prof = _profile(cfg, model, paths.Sharded(mesh))
    assert prof.conditionals == 0 and prof.stops_per_call(num_exits, inner=INNER) == num_exits + 1
    prof = _profile(cfg, model, paths.Sharded(mesh, engine.BucketCascade()))   # 2 rows per device: one bucket
    assert prof.conditionals == 0 and prof.stops_per_call(num_exits, inner=INNER) == num_exits + 1
    # Continuous batching: one loop over steps; each exit's head under a conditional (skipped when no slot sits at
    # that exit): 1 + E stops per step.
    gd, state = nnx.split(model)

    def cont(state, x):
        m = nnx.merge(gd, state)
        return continuous.vit_continuous_exits(m, x, 0.5, num_slots=4).logits_BxC
    prof = hlo.profile(cont, state, jnp.zeros((B, 8, 8, 1)))
    assert prof.unknown_whiles == 1 and prof.conditionals == num_exits
    assert prof.stops_per_call(10) == 1 + 10 * (1 + num_exits)


def test_unread_head_fields_cost_no_work():
    """A policy on max softmax reads only the logits: the pooled hidden state (a reduction over the tokens at every
    exit) is not computed when the caller asks for the logits only."""
    cfg, model = _vit()
    reduces = {}
    for fields in (None, ("logits_BxC",)):
        prof = _profile(cfg, model, engine.Masked(), fields=fields)
        reduces[fields] = sum(1 for comp in prof.computations.values() for ins in comp if ins.op == "reduce")
    assert reduces[("logits_BxC",)] < reduces[None]
    gd, state = nnx.split(model)
    out = engine.run(model.layers, list(model.heads), model.embed(jnp.zeros((B, 8, 8, 1))),
                     engine.prefix(cfg.depth, cfg.exit_layers), policies.threshold("max_softmax", 0.5, 6),
                     fields=("logits_BxC",))
    assert out.out.hidden_BxD is None and out.out.feat_BxD is None and out.out.logits_BxC.shape == (B, 5)


def test_bf16_vit_runs_every_dot_in_bf16():
    """No float32 dot in a bf16 ViT on any path (the attention softmax is float32, its probabilities are cast
    back before the value product; the measures' softmax has no dot)."""
    cfg, model = _vit(depth=4, dtype=jnp.bfloat16)
    for executor, policy in ((None, False), (engine.Masked(), True), (engine.BucketCascade(BUCKETS), True)):
        prof = _profile(cfg, model, executor, policy=policy)
        assert prof.f32_dots() == 0 and set(prof.dot_dtypes) == {("bf16", "bf16", "bf16")}, prof.dot_dtypes
