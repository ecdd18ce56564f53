"""Smoke runs of the LM decoding experiments: the real scripts end to end on tiny settings (CI runs these)."""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _argv(name, tmp_path, shared_data):
    return [f"--config={ROOT / 'configs' / name}.py:smoke", f"--workdir={tmp_path / 'run'}",
            f"--outdir={tmp_path / 'results'}", f"--data_dir={shared_data}"]


def test_per_token_exit_smoke(capsys, tmp_path, shared_data):
    from experiments import per_token_exit

    # A shared base-model directory records the fields the base model depends on (and is locked while used).
    argv = _argv("per_token_exit", tmp_path, shared_data) + [f"--config.model_workdir={tmp_path / 'model'}"]
    per_token_exit.main(argv)
    recorded = json.loads((tmp_path / "model" / "run_config.json").read_text())["config"]
    assert set(recorded) == {"seed", "data", "model", "train"} and not (tmp_path / "model" / ".lock").exists()
    assert (tmp_path / "model" / "base" / "ckpt").is_dir() and (tmp_path / "run" / "classifier" / "ckpt").is_dir()
    # The shared base model carries a record of the run that trained it; SkipDecode reading it names it.
    from experiments import skipdecode

    skipdecode.main(_argv("skipdecode", tmp_path, shared_data)[:1] + [
        f"--workdir={tmp_path / 'sd'}", f"--outdir={tmp_path / 'sd-results'}", f"--data_dir={shared_data}",
        f"--config.model_workdir={tmp_path / 'model'}"])
    (art,) = json.loads((tmp_path / "sd-results" / "skipdecode.json").read_text())["provenance"]["inputs"]
    assert art["producer_step"] == json.loads((tmp_path / "model" / "run_config.json").read_text())["config"][
        "train"]["steps"] and art["sha256"] != "not recorded" and art["producer_commit"] != "not recorded"
    data = json.loads((tmp_path / "results" / "per_token_exit.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"full model", "static exit L1", "per-token exit"} <= methods
    kvs = {(r["measure"], r["kv"]) for r in data["rows"] if r["method"] == "per-token exit"}
    assert kvs == {("max_softmax", "propagate"), ("max_softmax", "oracle"), ("learned", "propagate"),
                   ("learned", "oracle")}
    for r in data["rows"]:
        assert 1 <= r["avg_layers"] <= 3 and r["tok_s"] > 0 and 0 <= r["agreement"] <= 1
    static = next(r for r in data["rows"] if r["method"] == "static exit L1")
    assert static["avg_layers"] == 1.0
    assert "| method | measure |" in (tmp_path / "results" / "per_token_exit.md").read_text()
    assert len(data["ltt"]) == 1 and data["ltt"][0]["n_calib"] == 4   # Learn-then-Test on one calibration batch
    with pytest.raises(SystemExit) as exc:
        per_token_exit.main(argv)
    assert exc.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err


def test_per_token_rows_are_paired_with_the_static_model_of_their_depth():
    """Each max-softmax per-token row against the static model at its rounded depth (the full model at N, which
    agrees with itself), every row with the same columns."""
    from experiments import per_token_exit

    full = {"nll_W": [1.0, 2.0, 3.0]}
    raw = {"static exit L2|||None": {"avg_layers": 2.0, "nll_W": [1.5, 2.5, 3.5], "agreement_W": [0.2, 0.3, 0.4]},
           "per-token exit|max_softmax|propagate|0.5": {"avg_layers": 2.2, "nll_W": [1.2, 2.2, 3.2],
                                                        "agreement_W": [0.5, 0.6, 0.7]},
           "per-token exit|max_softmax|oracle|0.99": {"avg_layers": 2.9, "nll_W": [1.0, 2.0, 3.0],
                                                      "agreement_W": [1.0, 1.0, 1.0]},
           "per-token exit|margin|propagate|0.5": {"avg_layers": 2.0, "nll_W": [9.0, 9.0, 9.0],
                                                   "agreement_W": [0.0, 0.0, 0.0]}}
    rows = per_token_exit.against_static(raw, full, 3, 0)
    assert [(r["a"], r["b"]) for r in rows] == [("per-token exit", "static exit L2"), ("per-token exit", "full model")]
    assert len({tuple(r) for r in rows}) == 1
    assert rows[0]["nll_diff"] == pytest.approx(-0.3) and rows[0]["agree_diff"] == pytest.approx(0.3)
    assert rows[1]["nll_diff"] == 0.0 and rows[1]["agree_diff"] == 0.0


def test_skipdecode_smoke(tmp_path, shared_data):
    from experiments import skipdecode

    skipdecode.main(_argv("skipdecode", tmp_path, shared_data))
    # Every stage lives under the run's own workdir, the base model included.
    assert (tmp_path / "run" / "base-lm" / "base" / "ckpt").is_dir()
    assert (tmp_path / "run" / "skipdecode-2x" / "ckpt").is_dir()
    data = json.loads((tmp_path / "results" / "skipdecode.json").read_text())
    methods = [r["method"] for r in data["rows"]]
    assert methods[0] == "full model" and "SkipDecode (fine-tuned)" in methods and "static truncated" in methods
    sched = data["schedules"]["2x"]
    assert all(a >= b for a, b in zip(sched, sched[1:]))
    sd = next(r for r in data["rows"] if r["method"] == "SkipDecode (fine-tuned)")
    assert abs(sd["avg_layers"] - sum(sched[:-1]) / (len(sched) - 1)) < 1e-6
    # Every comparison at a target is paired over the windows, with its interval.
    assert [(p["a"], p["b"]) for p in data["paired_differences"]][0] == ("SkipDecode (fine-tuned)", "static truncated")
    for p in data["paired_differences"]:
        assert p["nll_ci95_lo"] <= p["nll_diff"] <= p["nll_ci95_hi"] and "agree_diff" in p


def test_self_speculative_smoke(tmp_path, shared_data):
    from experiments import self_speculative

    argv = _argv("self_speculative", tmp_path, shared_data)
    self_speculative.main(argv)
    data = json.loads((tmp_path / "results" / "self_speculative.json").read_text())
    rows = data["measured"]["2"]["rows"]
    drafters = [r["drafter"] for r in rows]
    assert drafters[0].startswith("greedy") and any(d.startswith("DEL") for d in drafters)
    assert all(r["equals_greedy"] == 1.0 for r in rows)              # lossless, static and DEL
    assert set(data["exits"]["eval_wikitext2_test"]) == {"untrained", "norm", "lowrank"}
    assert all(len(v["agree"]) == 2 for v in data["exits"]["eval_wikitext2_test"].values())
    assert (tmp_path / "results" / "both_sweep.png").exists()


def test_peri_ln_smoke(tmp_path, shared_data):
    """Every placement x learning rate x seed trains and is measured; the paired differences are against Pre-LN of
    the same seed, and every per-layer profile has one value per layer (plus the embedding where stated)."""
    from experiments import peri_ln

    peri_ln.main(_argv("peri_ln", tmp_path, shared_data))
    data = json.loads((tmp_path / "results" / "peri_ln.json").read_text())
    cfg = data["config"]
    depth, n_lr = cfg["model"]["depth"], len(cfg["train"]["lrs"])
    assert len(data["runs"]) == 3 * n_lr * len(cfg["seeds"]) and len(data["rows"]) == 3 * n_lr
    by = {(r["norm"], r["lr"], r["seed"]): r for r in data["runs"]}
    for d in data["minus_pre"]:
        s = cfg["seeds"][0]
        assert abs(d["per_seed"][0] - (by[(d["norm"], d["lr"], s)]["val_ce"] - by[("pre", d["lr"], s)]["val_ce"])) \
            < 1e-12
    for prof in data["profiles"].values():
        assert len(prof["var"]) == len(prof["maxabs"]) == depth + 1
        assert len(prof["exit_ce"]) == len(prof["skip_ce"]) == len(prof["rel_update"]) == depth
    # the last layer's read-out is the model's final exit
    r = data["runs"][0]
    assert r["exit_ce"][-1] == r["val_ce"]


def test_skippipe_smoke(tmp_path, shared_data):
    """Every arm trains from the same init and is scored in full order and under every half-depth path; the
    perplexity change is computed from the two CEs it reports."""
    import math

    from experiments import skippipe

    skippipe.main(_argv("skippipe", tmp_path, shared_data))
    data = json.loads((tmp_path / "results" / "skippipe.json").read_text())
    assert [r["arm"] for r in data["rows"]] == list(data["config"]["arms"])
    assert len(data["half_paths"]) == 3 and all(p[0] == 0 and len(p) == 2 for p in data["half_paths"])
    for r in data["runs"]:
        assert len(r["ce_paths"]) == 3 and math.isclose(r["ppl_change_half"],
                                                         math.expm1(r["ce_half"] - r["ce_full"]), rel_tol=1e-9)
