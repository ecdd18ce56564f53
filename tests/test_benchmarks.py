"""The benchmark suite runs end to end on tiny sizes, writes the documented JSON, and its compared paths agree.

One ``run_all.py --sizes tiny`` call (each benchmark a subprocess) feeds the schema tests. Never a timed test: the
timings are only checked to be positive numbers. Also: the compacted executor really compiles bucket-sized shapes.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUMPY_RANK_PROMOTION": "raise"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--sizes", "tiny", "--out",
                           str(out)], cwd=out, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return out


def _json(folder, name):
    return json.loads((folder / name).read_text())


# ------------------------------------------------------------------------------------------------ vit_paths


def test_vit_schema_and_provenance(suite):
    result = _json(suite, "vit_paths.json")
    meta = result["meta"]
    for key in ("command", "jax", "jaxlib", "flax", "backend", "device_kind", "dtype", "repeats", "time_utc"):
        assert key in meta, key
    assert "vit_paths.py" in meta["command"] and "--sizes tiny" in meta["command"]
    assert result["all_agree"] is True and result["errors"] == {}
    (cfg,) = result["configs"]
    assert cfg["batch"] == 16 and cfg["depth"] == 4 and cfg["num_slots"] == 4
    eighths = [2, 4, 6, 8, 10, 12, 14, 16]
    assert cfg["buckets"] == {"cascade": [8, 16], "cascade_eighths": eighths, "compacted": [8, 16],
                              "compacted_eighths": eighths}
    assert set(cfg["patterns"]) == {"bimodal", "uniform", "geometric", "full"}
    for name, pat in cfg["patterns"].items():
        assert set(pat["paths"]) == {"static", "masked", "cascade", "cascade_eighths", "compacted",
                                     "compacted_eighths", "gated_kernel", "continuous"}, name
        assert sum(pat["depth_histogram"]) == cfg["batch"]
        mean = np.dot(np.arange(1, cfg["depth"] + 1), pat["depth_histogram"]) / cfg["batch"]
        assert pat["mean_depth"] == pytest.approx(mean)
        assert pat["ideal_speedup"] == pytest.approx(cfg["depth"] / mean)
        for path, rec in pat["paths"].items():
            assert rec["time_s"] > 0 and len(rec["times_s"]) == meta["repeats"], (name, path)
            assert rec["speedup"] == pytest.approx(pat["paths"]["static"]["time_s"] / rec["time_s"])
            assert rec["ratio_to_ideal"] == pytest.approx(rec["speedup"] / pat["ideal_speedup"])
            assert ("overhead_vs_static" in rec) == (name == "full")


def test_vit_every_path_agreed(suite):
    """Forced exits: every dynamic path exits each sample at its target and matches the masked path's logits."""
    cfg = _json(suite, "vit_paths.json")["configs"][0]
    for name, pat in cfg["patterns"].items():
        for path, rec in pat["paths"].items():
            assert rec["agree"] is True, (name, path, rec)
            if path != "static":
                assert rec["exits_match_target"] is True, (name, path)
            if path != "masked" and (path != "static" or name == "full"):
                assert rec["logits_match"] is True and rec["max_abs_logit_diff"] <= 1e-4 * max(rec["logit_scale"], 1)
        cont = pat["paths"]["continuous"]   # a step applies one layer to each slot
        layers_applied = np.dot(np.arange(1, cfg["depth"] + 1), pat["depth_histogram"])
        assert cont["steps"] >= layers_applied / cfg["num_slots"]
        assert cont["slot_utilization"] == pytest.approx(layers_applied / (cont["steps"] * cfg["num_slots"]))
    hist = {k: np.asarray(v["depth_histogram"]) for k, v in cfg["patterns"].items()}
    assert np.count_nonzero(hist["bimodal"]) == 2 and hist["full"][-1] == cfg["batch"]
    assert np.count_nonzero(hist["uniform"]) == cfg["depth"]


def test_forced_patterns_and_bucket_schemes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vit_paths
    for pattern, mean in (("bimodal", 7.5), ("uniform", 6.5), ("geometric", 4.8), ("full", 12.0)):
        depth = vit_paths.target_depths(pattern, 12, 1000)
        assert depth.min() >= 1 and depth.max() <= 12
        assert depth.mean() == pytest.approx(mean, abs=0.01), pattern
    with pytest.raises(ValueError, match="unknown pattern"):
        vit_paths.target_depths("zipf", 12, 10)
    assert vit_paths.bucket_list("default", 1024) is None
    assert vit_paths.bucket_list("eighths", 1024) == tuple(range(128, 1025, 128))
    assert vit_paths.bucket_list("sixteenths", 100) == tuple(range(7, 100, 7)) + (100,)
    assert vit_paths.bucket_list("128+512", 1024) == (128, 512, 1024)
    with pytest.raises(ValueError, match="bucket scheme 'tenths'"):
        vit_paths.bucket_list("tenths", 64)


# ------------------------------------------------------------------------------------------------ lm_decode


def test_lm_decode_schema_and_agreement(suite):
    result = _json(suite, "lm_decode.json")
    meta = result["meta"]
    assert "lm_decode.py" in meta["command"] and meta["dtype"] == "float32" and result["all_agree"] is True
    assert result["errors"] == {} and result["skipped"] == []
    (b,) = result["batches"]
    assert b["batch"] == 2 and set(b["prefill"]) == {"prefill", "prefill_k2"}
    assert set(b["paths"]) == {"full", "full_f32_cache", "forced_exit", "forced_exit_masked", "forced_exit_cheap_gate",
                               "forced_exit_static", "forced_exit_2exits", "skipdecode_2x", "skipdecode_2x_traced",
                               "speculative_d0_k2"}
    new, depth = meta["new"], meta["model"]["depth"]
    for name, rec in b["paths"].items():
        # float32 on CPU: every token equals its teacher-forced reference (speculative: full depth's tokens).
        assert rec["agree"] is True and rec["match_frac"] == 1.0, name
        assert rec["time_s"] > 0 and rec["prefill_s"] > 0 and len(rec["times_s"]) == meta["repeats"]
        assert rec["decode_s"] == pytest.approx(rec["time_s"] - rec["prefill_s"])
        assert rec["tokens_per_s"] == pytest.approx(b["batch"] * new / rec["time_s"])
        assert rec["speedup"] == pytest.approx(b["paths"]["full"]["time_s"] / rec["time_s"])
    assert b["paths"]["full"]["mean_layers_per_token"] == depth
    for name in ("forced_exit", "forced_exit_masked", "forced_exit_cheap_gate", "forced_exit_static",
                 "forced_exit_2exits"):
        assert b["paths"][name]["mean_layers_per_token"] == meta["exit_after"]
        assert b["paths"][name]["ideal_layer_speedup"] == pytest.approx(depth / meta["exit_after"])
    sched = meta["skipdecode_layers_G"]
    for name in ("skipdecode_2x", "skipdecode_2x_traced"):
        assert b["paths"][name]["mean_layers_per_token"] == pytest.approx(np.mean(sched[:-1]))
    # Every path's compiled-program costs (issue 20): the static paths stop nowhere, an exit step at most once per
    # decision point, the kept variants (masked while loop, traced schedule) more.
    stops = {name: rec["host_stops"] for name, rec in b["paths"].items()}
    assert stops["full"] == stops["full_f32_cache"] == stops["forced_exit_static"] == stops["skipdecode_2x"] == 0
    assert 0 < stops["forced_exit"] <= depth - 1 and stops["forced_exit_cheap_gate"] == stops["forced_exit"]
    assert stops["forced_exit_masked"] > stops["forced_exit"] and stops["skipdecode_2x_traced"] > 0
    assert all(rec["f32_dots"] > 0 for rec in b["paths"].values())      # float32 run: every dot is float32
    spec = b["paths"]["speculative_d0_k2"]
    assert 0 <= spec["acceptance_rate"] <= 1 and 1 <= spec["tokens_per_verify"] <= 3


def test_lm_decode_rejects_bad_input():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_decode.py"), "--sizes", "tiny", "--out",
                           "/dev/null", "--spec", "9:2"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "early exits of the 4-layer model" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ train_throughput


def test_train_throughput_schema(suite):
    from eejax.models import vit as vit_lib
    result = _json(suite, "train_throughput.json")
    meta = result["meta"]
    assert "train_throughput.py" in meta["command"] and meta["mfu_meaningful"] is False
    assert set(result["candidates"]) == {"bf16-einsum-noremat", "bf16-dot_product-noremat", "bf16-einsum-remat"}
    assert result["errors"] == {} and result["all_agree"] is True and result["best"] in result["candidates"]
    m = meta["model"]
    cfg = vit_lib.ViTConfig(image_size=m["image"], channels=3, patch_size=m["patch"], d_model=m["d_model"],
                            depth=m["depth"], num_heads=m["num_heads"], mlp_dim=m["mlp_dim"], num_classes=m["classes"],
                            exits="all", head_types="linear")
    assert meta["forward_flops_per_image"] == float(vit_lib.flops(cfg).cum_flops_E[-1])
    assert meta["model_flops_per_step"] == pytest.approx(3 * meta["forward_flops_per_image"] * meta["batch"])
    for name, c in result["candidates"].items():
        assert c["mfu"] is None and c["steps_per_s"] > 0 and np.isfinite(c["last_loss"]), name
        assert c["images_per_s"] == pytest.approx(meta["batch"] * c["steps_per_s"])
        assert abs(c["first_loss"] - result["reference_loss"]) <= c["loss_tol"] * max(1, result["reference_loss"])
    assert result["skipped"] == {}


# ------------------------------------------------------------------------------------------------ run_all


def test_suite_summary_names_every_winner(suite):
    summary = _json(suite, "summary.json")
    assert summary["all_agree"] is True
    assert {s["returncode"] for s in summary["status"].values()} == {0}
    keys = " | ".join(summary["winners"])
    for question in ("cascade bucket list", "compacted bucket list", "gated MLP kernel vs XLA", "train attention kind",
                     "train remat", "LM forced exit: every exit vs only the used exit", "LM speculative candidate"):
        assert question in keys, question
    for executor in ("cascade", "compacted"):   # both bucketed executors, each with its winning bucket list
        (bucket,) = [w for k, w in summary["winners"].items() if k.endswith(f": {executor} bucket list")]
        assert bucket["winner"] in (executor, f"{executor}_eighths")
    best = next(w for k, w in summary["winners"].items() if k.endswith("best exit executor"))
    assert {"cascade", "cascade_eighths"} <= set(best["geomean_speedup_over_exit_patterns"])
    assert any("MFU" in g["goal"] for g in summary["goals"]) is False   # MFU is not a goal result on CPU
    md = (suite / "summary.md").read_text()
    assert "## Winners" in md and "## Goals of issue 12" in md and "CPU run" in md


def test_paper_decoders_schema(suite):
    """The paper-decoder part ran every module in benchmarks/papers/ that its budget reached without error (each
    module also has its own tiny test); every row has the documented keys, and each paper's rows at a batch read
    their speed-up off that paper's greedy row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import lm_papers
    result = _json(suite, "lm_papers.json")
    assert result["errors"] == {}
    assert result["meta"]["modules"] == lm_papers.modules()
    assert result["rows"], "no module produced a row"
    greedy = {(r["paper"], r["batch"]) for r in result["rows"] if r["variant"] == "greedy"}
    for row in result["rows"]:
        assert set(lm_papers.REQUIRED) <= set(row), row
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0
        assert (row["speedup_vs_greedy"] is not None) == ((row["paper"], row["batch"]) in greedy), row
    assert (suite / "lm_papers.md").read_text().startswith("# Paper decoders")


def test_benchmarks_import_no_tfds_or_grain():
    code = ("import sys, importlib; sys.path.insert(0, 'benchmarks'); "
            "import run_all, vit_paths, lm_decode, train_throughput, lm_papers; "
            "[importlib.import_module('papers.' + m) for m in lm_papers.modules()]; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow_datasets', 'grain', 'tensorflow', "
            "'ml_collections', 'gguf', 'tokenizers')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------------- compacted: compiled shapes


def _dot_rows(hlo_text: str, width: int) -> set[int]:
    """Leading (row) sizes of the compiled dots whose output has ``width`` columns (``f32[R,width]``)."""
    return {int(r) for r in re.findall(rf"= f32\[(\d+),{width}\]\{{[^}}]*\}} dot\(", hlo_text)}


def test_compacted_executor_compiles_bucket_sized_matmuls():
    """``engine.Compacted((4, 8))`` on a batch of 16: the optimized HLO holds the QKV projection at 4, 8 and 16 rows
    (x 5 tokens); the masked executor's only at 16. So a bucket really runs smaller matmuls, not masked full ones."""
    from eejax.exits import engine, policies
    from eejax.models.vit import ViT, ViTConfig
    cfg = ViTConfig(image_size=8, channels=1, patch_size=4, d_model=32, depth=4, num_heads=2, mlp_dim=64,
                    num_classes=5, exits="all", head_types="linear")
    gd, state = nnx.split(ViT(cfg, rngs=nnx.Rngs(0)))
    x = jnp.zeros((16, 8, 8, 1))

    def hlo(executor):
        def f(state, x):
            m = nnx.merge(gd, state)
            out = engine.run(m.layers, list(m.heads), m.embed(x), engine.prefix(cfg.depth, cfg.exit_layers),
                             policies.threshold("max_softmax", 0.5, len(cfg.exit_layers)), executor)
            return out.logits_BxC
        lowered = jax.jit(f).lower(state, x)
        return lowered.as_text(), lowered.compile().as_text()

    tokens, qkv = cfg.tokens, 3 * cfg.d_model
    stablehlo, compiled = hlo(engine.Compacted((4, 8)))
    assert _dot_rows(compiled, qkv) == {4 * tokens, 8 * tokens, 16 * tokens}
    assert _dot_rows(compiled, cfg.num_classes) >= {4, 8, 16}           # the heads run on the bucket too
    lead = {int(m) for m in re.findall(r"stablehlo.dot_general[^\n]*: \(tensor<(\d+)x\d+x\d+xf32>", stablehlo)}
    assert {4, 8, 16} <= lead
    _, masked = hlo(engine.Masked())
    assert _dot_rows(masked, qkv) == {16 * tokens}
