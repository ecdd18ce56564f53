"""Analytic FLOPs (hand counts and XLA's own count), per-exit costs, speed-up, timing, and the report writer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax.eval import report
from eejax.harness import results
from eejax.exits import costs


def _xla_flops(fn, *shapes):
    """XLA's cost model counts a [M, K] @ [K, N] dot as 2*M*K*N FLOPs: an independent check of our counts."""
    analysis = jax.jit(fn).lower(*(jnp.ones(s) for s in shapes)).compile().cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def _attention_matmuls(x_TxD, wqkv_Dx3D, wo_DxD, num_heads):
    """Attention with softmax left out (not counted), so only the matmuls reach XLA's count."""
    t, d = x_TxD.shape
    q, k, v = (a.reshape(t, num_heads, d // num_heads) for a in jnp.split(x_TxD @ wqkv_Dx3D, 3, -1))
    scores_HxTxT = jnp.einsum("thd,shd->hts", q, k)
    return jnp.einsum("hts,shd->thd", scores_HxTxT, v).reshape(t, d) @ wo_DxD


def test_transformer_layer_hand_count():
    # T=3, D=4, F=8, H=2: QKV 2*3*4*12 = 288, scores 2*(2 heads * 3*3*2) = 72, attn@V 72, out 2*3*4*4 = 96,
    # MLP 2*3*4*8*2 = 384.
    assert costs.transformer_layer_flops(tokens=3, d_model=4, mlp_dim=8, num_heads=2) == 288 + 72 + 72 + 96 + 384
    assert costs.transformer_layer_flops(3, 4, 8, 1) == costs.transformer_layer_flops(3, 4, 8, 4)
    with pytest.raises(ValueError, match="num_heads"):
        costs.transformer_layer_flops(3, 4, 8, 3)


def test_transformer_layer_matches_xla():
    t, d, f, h = 5, 8, 16, 2

    def layer(x, wqkv, wo, w1, w2):
        return (_attention_matmuls(x, wqkv, wo, h) @ w1) @ w2

    assert _xla_flops(layer, (t, d), (d, 3 * d), (d, d), (d, f), (f, d)) == costs.transformer_layer_flops(t, d, f, h)


def test_head_flops():
    assert costs.patch_embed_flops(tokens=4, patch_dim=12, d_model=8) == 2 * 4 * 12 * 8
    assert costs.linear_head_flops(8, 10) == 160
    # 2x3 grid, D=4, hidden=6, C=5: expand 2*6*4*6 = 288, depthwise 2*6*6*9 = 648, project 288, classifier 40.
    assert costs.local_perception_head_flops(2, 3, 4, 6, 5) == 288 + 648 + 288 + 40
    # 4x6 grid pooled by 2 -> 2x3 = 6 tokens; attention on 6 tokens of width 8, then an 8->10 classifier.
    d, pooled = 8, 6

    def attention(x, wqkv, wo):
        return _attention_matmuls(x, wqkv, wo, 2)

    want = _xla_flops(attention, (pooled, d), (d, 3 * d), (d, d)) + 2 * d * 10
    assert costs.global_aggregation_head_flops(4, 6, d, pool=2, num_heads=2, num_classes=10) == want
    assert costs.global_aggregation_head_flops(5, 7, d, 2, 2, 10) == want  # 'VALID' pooling floors
    with pytest.raises(ValueError, match="pool"):
        costs.global_aggregation_head_flops(4, 6, d, pool=5, num_heads=2, num_classes=10)
    assert costs.vit_ee_head_flops(3, 4, 8, 2, 5) == 912 + 40


def test_exit_costs_cumulative_vs_static():
    c = costs.exit_costs(embed_flops=100, layer_flops_N=[10, 20, 30, 40], exit_layers_E=[0, 2, 3],
                         head_flops_E=[1, 2, 3])
    np.testing.assert_array_equal(c.static_flops_E, [100 + 10 + 1, 100 + 60 + 2, 100 + 100 + 3])
    # A sample stopping at exit e also paid for heads 0..e-1.
    np.testing.assert_array_equal(c.cum_flops_E, [100 + 10 + 1, 100 + 60 + 1 + 2, 100 + 100 + 1 + 2 + 3])
    assert costs.expected_flops(np.array([0, 2, 2, 1]), c.cum_flops_E) == (111 + 206 + 206 + 163) / 4
    with pytest.raises(ValueError, match="exit_layers_E"):
        costs.exit_costs(100, [10, 20], [1, 1], [1, 2])
    with pytest.raises(ValueError, match="exit_layers_E"):
        costs.exit_costs(100, [10, 20], [0, 2], [1, 2])
    with pytest.raises(ValueError, match="head"):
        costs.exit_costs(100, [10, 20], [0, 1], [1])


def test_layer_speedup():
    assert costs.layer_speedup(np.full(7, 11), num_layers=12) == 1.0
    # Exits after layers 2 and 5 run 3 and 6 layers: 12 / 4.5.
    assert costs.layer_speedup(np.array([2, 5]), num_layers=12) == pytest.approx(12 / 4.5)
    with pytest.raises(ValueError, match="num_layers"):
        costs.layer_speedup(np.array([12]), num_layers=12)


def test_measure_and_throughput():
    fn = jax.jit(lambda x: x @ x)
    x = jnp.ones((16, 16))
    timing = costs.measure(fn, x, warmup=1, iters=3)
    assert timing.mean_s > 0 and timing.std_s >= 0 and timing.iters == 3 and len(timing.times_s) == 3
    assert costs.throughput(fn, 16, x, iters=2) > 0
    np.testing.assert_array_equal(timing.output, np.asarray(x @ x))       # the timed call's result comes back
    assert timing.min_s == min(timing.times_s)
    calls = []
    both = costs.measure_interleaved({"a": (lambda v: calls.append("a") or fn(v), (x,)),
                                      "b": (lambda v: calls.append("b") or fn(v), (x,))}, warmup=1, iters=2)
    assert calls == ["a", "b"] * 3                                          # round-robin: one of each per round
    assert set(both) == {"a", "b"} and all(t.iters == 2 and len(t.times_s) == 2 for t in both.values())
    with pytest.raises(ValueError, match="iters"):
        costs.measure_interleaved({"a": (fn, (x,))}, iters=0)


def test_markdown_table():
    rows = [{"policy": "a|b", "acc": 0.91234, "flops": 3}, {"policy": "c", "acc": None, "flops": 4}]
    assert report.markdown_table(rows, ["policy", "acc", "flops"], floatfmt=".3f") == (
        "| policy | acc | flops |\n|---|---:|---:|\n| a\\|b | 0.912 | 3 |\n| c |  | 4 |\n")
    with pytest.raises(ValueError, match="lacks"):
        report.markdown_table(rows, ["speed"])


def test_write_results_refuses_overwrite(tmp_path):
    files = results.write_results(tmp_path / "out", "curve", "| a |\n", {"acc_E": np.array([0.5, -np.inf])})
    assert files.md_path.read_text() == "| a |\n"
    assert json.loads(files.json_path.read_text()) == {"acc_E": [0.5, -np.inf]}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        results.write_results(tmp_path / "out", "curve", "| b |\n", {})
    assert files.md_path.read_text() == "| a |\n"  # untouched
    results.write_results(tmp_path / "out", "curve", "| b |\n", {}, overwrite=True)
    assert files.md_path.read_text() == "| b |\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["curve.json", "curve.md"]  # no temp files left


def test_plots_write_png(tmp_path):
    curves = {"msdnet": [(2e6, 0.7), (1e6, 0.6), (3e6, 0.75)], "sweep": [(1.5e6, 0.65)]}
    report.plot_accuracy_vs_flops(curves, [(1e6, 0.55, "exit 0"), (3e6, 0.74)], tmp_path / "acc.png", "toy")
    report.plot_exit_histogram({"p=0.5": np.array([0, 0, 1, 2]), "p=1.5": np.array([2, 2, 1])}, 3,
                               tmp_path / "hist.png")
    for name in ("acc.png", "hist.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="num_exits"):
        report.plot_exit_histogram({"bad": np.array([3])}, 3, tmp_path / "bad.png")


def test_provenance_names_command_device_and_commit():
    from eejax.harness import results

    prov = results.provenance("experiments.demo", ["--config=configs/demo.py:smoke", "--config.x=a b"])
    assert prov.command == "python -m experiments.demo --config=configs/demo.py:smoke '--config.x=a b'"
    assert "cpu" in prov.device and prov.jax_version and prov.commit and prov.date.endswith("UTC")
    assert prov.command in prov.markdown()
