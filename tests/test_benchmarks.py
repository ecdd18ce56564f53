"""The benchmark scripts run end to end on tiny sizes, write the documented JSON, and their paths agree.

Never a timed test: the timings are only checked to be positive numbers.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(tmp_path, *extra):
    out = tmp_path / "vit_paths.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUMPY_RANK_PROMOTION": "raise"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vit_paths.py"), "--sizes", "tiny",
                           "--out", str(out), *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bench"))


def test_schema_and_provenance(result):
    meta = result["meta"]
    for key in ("command", "jax", "jaxlib", "flax", "backend", "device_kind", "dtype", "repeats", "time_utc"):
        assert key in meta, key
    assert "vit_paths.py" in meta["command"] and "--sizes tiny" in meta["command"]
    assert result["all_agree"] is True and result["errors"] == {}
    (cfg,) = result["configs"]
    assert cfg["batch"] == 16 and cfg["depth"] == 4 and cfg["num_slots"] == 4
    assert set(cfg["patterns"]) == {"bimodal", "uniform", "geometric", "full"}
    for name, pat in cfg["patterns"].items():
        assert set(pat["paths"]) == {"static", "masked", "compacted", "gated_kernel", "continuous"}, name
        assert sum(pat["depth_histogram"]) == cfg["batch"]
        mean = np.dot(np.arange(1, cfg["depth"] + 1), pat["depth_histogram"]) / cfg["batch"]
        assert pat["mean_depth"] == pytest.approx(mean)
        assert pat["ideal_speedup"] == pytest.approx(cfg["depth"] / mean)
        for path, rec in pat["paths"].items():
            assert rec["time_s"] > 0 and len(rec["times_s"]) == result["meta"]["repeats"], (name, path)
            assert rec["speedup"] == pytest.approx(pat["paths"]["static"]["time_s"] / rec["time_s"])
            assert rec["ratio_to_ideal"] == pytest.approx(rec["speedup"] / pat["ideal_speedup"])
            assert ("overhead_vs_static" in rec) == (name == "full")


def test_every_path_agreed(result):
    """Forced exits: every dynamic path exits each sample at its target and matches the masked path's logits."""
    cfg = result["configs"][0]
    for name, pat in cfg["patterns"].items():
        for path, rec in pat["paths"].items():
            assert rec["agree"] is True, (name, path, rec)
            if path != "static":
                assert rec["exits_match_target"] is True, (name, path)
            if path in ("compacted", "continuous") or (path == "static" and name == "full"):
                assert rec["logits_match"] is True and rec["max_abs_logit_diff"] <= 1e-4 * max(rec["logit_scale"], 1)
        # Continuous batching: a step applies one layer to each slot.
        cont = pat["paths"]["continuous"]
        layers_applied = np.dot(np.arange(1, cfg["depth"] + 1), pat["depth_histogram"])
        assert cont["steps"] >= layers_applied / cfg["num_slots"]
        assert cont["slot_utilization"] == pytest.approx(layers_applied / (cont["steps"] * cfg["num_slots"]))
    # The patterns really differ: bimodal has only two depths, full only the last.
    hist = {k: np.asarray(v["depth_histogram"]) for k, v in cfg["patterns"].items()}
    assert np.count_nonzero(hist["bimodal"]) == 2 and hist["full"][-1] == cfg["batch"]
    assert np.count_nonzero(hist["uniform"]) == cfg["depth"]


def test_forced_patterns():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vit_paths
    for pattern, mean in (("bimodal", 7.5), ("uniform", 6.5), ("geometric", 4.8), ("full", 12.0)):
        depth = vit_paths.target_depths(pattern, 12, 1000)
        assert depth.min() >= 1 and depth.max() <= 12
        assert depth.mean() == pytest.approx(mean, abs=0.01), pattern
    with pytest.raises(ValueError, match="unknown pattern"):
        vit_paths.target_depths("zipf", 12, 10)
