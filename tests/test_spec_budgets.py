"""Host-stop, dot-dtype and cost budgets of the speculative family (issue 20), read from the compiled programs on CPU
(``eejax.exits.hlo``: the CPU backend has the GPU's loop and conditional structure).

On a GPU every data-dependent loop iteration and every conditional waits on the host. Budgets held here:
* a draft token (static truncated model, per-row exits, Kangaroo's draft model) has no host stop at all;
* LayerSkip-style self-speculation: the round loop is the only data-dependent loop and nothing else decides on the
  host, so a round costs one stop (plus one to leave the loop);
* Kangaroo adds only its own keep-drafting decisions (one per draft step after the first) and the choice of the
  verify length; with ``gamma = 1`` it has exactly the static loop's structure;
* SpecEE adds nothing to its target step's exit decisions (the drafter and the token loop: no stop), and the target
  step runs on the decode executor: per scheduled layer one decision and (``head_check="cond"``) one full-head
  check, nothing else, no data-dependent loop; with ``head_check="always"`` one stop per decision point;
* CEED Jacobi decoding: one stop per fixed-point iteration (+1 to leave the block), no conditional;
* bfloat16 decoding has no float32 dot that plain greedy decoding of the same model does not have;
* a draft token's matrix products read less than a greedy step's, and less than the masked engine's draft.
"""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks.papers._spec_costs import dot_cost
from eejax.decoding import jacobi, kangaroo, kv as kv_lib, per_token, specee, speculative
from eejax.exits import hlo
from eejax.models import lm

CFG = lm.LMConfig(vocab_size=64, d_model=32, depth=6, num_heads=4, num_kv_heads=2, mlp_dim=48, exits="all")
G = 8
ROUNDS = 5   # the trips the budgets below are written for (any value gives the same per-round figure)


def _model(dtype=None):
    cfg = CFG if dtype is None else lm.LMConfig(**{**CFG.__dict__, "dtype": dtype})
    gd, params = lm.build(cfg, 0)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return gd, params


@pytest.fixture(scope="module")
def setup():
    gd, params = _model()
    prompt, lengths = (jnp.asarray(a) for a in kv_lib.pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8]]))
    return gd, params, prompt, lengths


def _state(gd, params, prompt, lengths):
    return jax.jit(lambda p: kv_lib.prefill(nnx.merge(gd, p), prompt, lengths, prompt.shape[1] + G)[1])(params)


def test_a_draft_token_has_no_host_stop(setup):
    gd, params, prompt, lengths = setup
    st = _state(gd, params, prompt, lengths)
    tok = prompt[:, 0]
    exit_B = jnp.asarray([1, 3], jnp.int32)
    adapter = kangaroo.init_adapter(nnx.merge(gd, params), 2)
    drafts = {
        "static truncated": lambda p, t, s: speculative.draft_step(nnx.merge(gd, p), t, s, 3),
        "per-row exits": lambda p, t, s: speculative.rows_draft_step(nnx.merge(gd, p), t, s, exit_B, 3),
        "kangaroo": lambda p, t, s: kangaroo.drafter(nnx.merge(gd, p), adapter, 2).forward(t[:, None], s)[0],
    }
    draft_cache = kv_lib.empty_state(kangaroo.make_draft(nnx.merge(gd, params), adapter, 2), 2, 16)
    for name, fn in drafts.items():
        prof = hlo.profile(fn, params, tok, draft_cache if name == "kangaroo" else st)
        assert (prof.unknown_whiles, prof.conditionals, prof.host_stops(trips=100)) == (0, 0, 0), name
    # The masked engine's draft (the old path, kept as the reference) decides on the host at every exit.
    masked = hlo.profile(lambda p, t, s: speculative.masked_draft_step(nnx.merge(gd, p), t, s, 3), params, tok, st)
    assert masked.host_stops(trips=(4, 1)) >= 4


def test_static_self_speculation_stops_once_per_round(setup):
    gd, params, prompt, lengths = setup
    prof = hlo.profile(lambda p, t, l: speculative.self_speculative(nnx.merge(gd, p), t, l, G, draft_exit=2, k=3),
                       params, prompt, lengths)
    assert prof.unknown_whiles == 1 and prof.conditionals == 0
    assert prof.host_stops(trips=ROUNDS) == ROUNDS + 1     # one predicate per round, one to leave


@pytest.mark.parametrize("gamma", [1, 3])
def test_kangaroo_adds_only_its_keep_rule(setup, gamma):
    gd, params, prompt, lengths = setup
    adapter = kangaroo.init_adapter(nnx.merge(gd, params), 2)
    prof = hlo.profile(lambda p, a, t, l, eta: kangaroo.kangaroo(nnx.merge(gd, p), a, t, l, G, exit_layer=2,
                                                                 eta=eta, gamma=gamma),
                       params, adapter, prompt, lengths, jnp.float32(0.6))
    # The round loop; gamma - 1 keep decisions (nested: evaluated only while some row drafts) and, for gamma > 1,
    # the verify length's switch. With nothing accepted and no row keeping on, a round evaluates 1 + 1 + 1.
    assert prof.unknown_whiles == 1
    assert prof.conditionals == (gamma - 1) + (gamma > 1)
    assert prof.host_stops(trips=ROUNDS) == ROUNDS + 1 + ROUNDS * ((gamma - 1) + (gamma > 1))


def test_specee_adds_nothing_to_its_target_step(setup):
    gd, params, prompt, lengths = setup
    model = nnx.merge(gd, params)
    schedule, k = (1, 3), 3
    adapter = kangaroo.init_adapter(model, 1)
    pred = specee.init_predictors(jax.random.key(0), len(schedule), k)
    forced0 = pred._replace(b2_S=jnp.full_like(pred.b2_S, -1e9))
    whole = hlo.profile(specee.decode_fn(gd, G, exit_layer=1, schedule=schedule, k=k), params, adapter, forced0,
                        prompt, lengths)
    st = _state(gd, params, prompt, lengths)
    cand = jnp.zeros((2, k), jnp.int32)
    step = hlo.profile(lambda p, t, s, c: specee.target_step(nnx.merge(gd, p), t, s, c, forced0, schedule),
                       params, prompt[:, 0], st, cand)
    assert (whole.unknown_whiles, whole.conditionals) == (step.unknown_whiles, step.conditionals)
    for trips in (1, 3):
        assert whole.host_stops(trips=trips) == (G - 1) * step.host_stops(trips=trips)


@pytest.mark.parametrize("head_check, per_exit", [("cond", 2), ("always", 1), ("auto", 1)])
def test_specee_target_step_has_no_loop_and_its_stops_per_scheduled_exit(setup, head_check, per_exit):
    """``kv.propagating`` (the decode executor): no data-dependent loop, a ``lax.cond`` per scheduled exit decision
    and, with ``head_check="cond"``, one per scheduled layer's full-head check (run only when some predictor
    passes); ``"always"`` runs that head without a conditional, so the decision is the only stop of a decision point
    (issue 20's budget); the default ``"auto"`` is ``"always"`` at this shape (a head cheaper than a stop). The last layer's full head runs in the last stage with no conditional of its own. With the
    predictor forced to 0 every one is evaluated: ``per_exit`` x S per token. The masked executor it replaced had a
    while loop over the exits and a segment loop."""
    gd, params, prompt, lengths = setup
    model = nnx.merge(gd, params)
    st = _state(gd, params, prompt, lengths)
    cand = jnp.zeros((2, 3), jnp.int32)
    for schedule in ((1, 3), (0, 2, 4)):
        pred = specee.init_predictors(jax.random.key(0), len(schedule), 3)
        forced0 = pred._replace(b2_S=jnp.full_like(pred.b2_S, -1e9))
        step = hlo.profile(lambda p, t, s, c: specee.target_step(nnx.merge(gd, p), t, s, c, forced0, schedule,
                                                                 head_check=head_check), params, prompt[:, 0], st, cand)
        assert step.unknown_whiles == 0 and step.conditionals == per_exit * len(schedule), schedule
        assert step.host_stops(trips=100) == per_exit * len(schedule), schedule
        adapter = kangaroo.init_adapter(model, 1)
        whole = hlo.profile(specee.decode_fn(gd, G, exit_layer=1, schedule=schedule, k=3, head_check=head_check),
                            params, adapter, forced0, prompt, lengths)
        assert whole.host_stops(trips=100, per=G - 1) == per_exit * len(schedule), schedule


def test_jacobi_stops_once_per_iteration(setup):
    """CEED-VLA's Jacobi decoding: the blocks in a loop of known trip count, inside each the fixed-point iteration
    (a data-dependent loop: it stops when no token changes), nothing else decides on the host."""
    gd, params, prompt, lengths = setup
    block = 4
    prof = hlo.profile(lambda p, t, l: jacobi.jacobi_decode(nnx.merge(gd, p), t, l, G, block=block), params, prompt,
                       lengths)
    assert prof.unknown_whiles == 1 and prof.conditionals == 0
    for iters in (1, 3):
        assert prof.host_stops(trips=iters) == (G // block) * (iters + 1)


def _f32_dots(text: str, exempt_rhs=()) -> set:
    """Dtype triples of a lowered program's dots with a float32 operand, leaving out dots whose right operand has
    one of the ``exempt_rhs`` MLIR types."""
    keep = "\n".join(line for line in text.splitlines() if not any(f"{t}>) ->" in line for t in exempt_rhs))
    return {t for t in hlo.dot_dtypes_of(keep) if "f32" in t[:2]}


def test_bf16_decoders_add_no_float32_dot(setup):
    """No dot with a float32 operand beyond those of plain greedy decoding of the same bfloat16 model (the float32
    statistics of softmax and norms are no dots; the KV cache's dtype is kv.py's, shared by greedy decoding). The
    one exemption: SpecEE's predictor, a float32 MLP over softmax statistics (3k -> H -> 1) by design."""
    gd, params = _model("bfloat16")
    _, _, prompt, lengths = setup
    model = nnx.merge(gd, params)
    adapter = kangaroo.init_adapter(model, 2)
    k, hidden = 3, 8
    pred = specee.init_predictors(jax.random.key(0), 2, k, hidden)
    predictor = (f"tensor<{3 * k}x{hidden}xf32", f"tensor<{hidden}xf32")
    lower = lambda fn: jax.jit(fn).lower(params, prompt, lengths).as_text()   # noqa: E731 (no compile needed)
    allowed = _f32_dots(lower(per_token.decode_fn(gd, per_token.full_depth_step, G)))
    decoders = {
        "static": lambda p, t, l: speculative.self_speculative(nnx.merge(gd, p), t, l, G, draft_exit=2, k=3),
        "DEL": lambda p, t, l: speculative.self_speculative(nnx.merge(gd, p), t, l, G, drafter=speculative.dynamic(
            CFG, [1, 3], 2)),
        "kangaroo": lambda p, t, l: kangaroo.kangaroo(nnx.merge(gd, p), adapter, t, l, G, exit_layer=2, gamma=3),
        "specee": lambda p, t, l: specee.decode(nnx.merge(gd, p), adapter, t, l, G, exit_layer=2, pred=pred,
                                                schedule=(1, 3), k=k),
        "jacobi": lambda p, t, l: jacobi.jacobi_decode(nnx.merge(gd, p), t, l, G, block=4),
    }
    assert allowed == set()   # greedy decoding of a bfloat16 model runs no float32 dot at all
    for name, fn in decoders.items():
        text = lower(fn)
        f32 = _f32_dots(text, exempt_rhs=predictor if name == "specee" else ())
        assert f32 <= allowed, (name, f32, allowed)
        assert any("bf16" in t[:2] for t in hlo.dot_dtypes_of(text)), name   # it does compute in bfloat16
        if name == "specee":   # the exemption names only the predictor: without it, float32 x float32 dots only
            assert _f32_dots(text) == {("f32", "f32", "f32")}


def test_draft_token_reads_less_than_a_greedy_step(setup):
    """The matrix products' operand bytes (weights dominate at batch 1: the memory-bound GPU's cost), per call,
    with the trip counts multiplied in: a shallower exit reads less, every draft less than a full step, and the
    truncated draft less than the masked engine's (which runs every exit's head on the way)."""
    gd, params, prompt, lengths = setup
    st = _state(gd, params, prompt, lengths)
    tok = prompt[:, 0]
    cost = {}
    for name, fn, trips in (
            ("full", lambda p, t, s: kv_lib.full_step(nnx.merge(gd, p), t, s)[0], 1),
            ("exit 1", lambda p, t, s: speculative.draft_step(nnx.merge(gd, p), t, s, 1)[0], 1),
            ("exit 3", lambda p, t, s: speculative.draft_step(nnx.merge(gd, p), t, s, 3)[0], 1),
            ("masked exit 3", lambda p, t, s: speculative.masked_draft_step(nnx.merge(gd, p), t, s, 3)[0], (4, 1))):
        cost[name] = dot_cost(hlo.profile(fn, params, tok, st), trips=trips)["bytes"]
    assert cost["exit 1"] < cost["exit 3"] < cost["full"]
    assert cost["exit 3"] < cost["masked exit 3"]
