"""benchmarks/run_all.py's summary on the committed H200 run: it rebuilds the run's tables, shows each row's host
stops when the row has them, sets the command-buffer reruns beside the default, shows training candidates by every
field that differs, and reads issue 20's goals off the run (the issue's own numbers). No benchmark runs here."""
import json
import pathlib
import shutil
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "results" / "gpu_h200_2026-12-04"
sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402


@pytest.fixture()
def run(tmp_path):
    for name in ("vit_paths.json", "lm_decode.json", "lm_papers.json", "train_throughput.json"):
        shutil.copy(RUN / name, tmp_path / name)
    return tmp_path


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_summary_rebuilds_the_committed_run(run):
    summary = run_all.summarize(run)
    committed = json.loads((RUN / "summary.json").read_text())
    for question, w in committed["winners"].items():
        assert summary["winners"][question].get("winner", "per pattern") == w.get("winner", "per pattern"), question
    assert [g["goal"] for g in summary["goals"]] == [g["goal"] for g in committed["goals"]]
    for new, old in zip(summary["goals"], committed["goals"]):
        assert new["measured"] == (pytest.approx(old["measured"]) if isinstance(old["measured"], float)
                                   else old["measured"]), new["goal"]
    assert summary["host_stops"] == {}                        # the 2026-12-04 rows predate the field
    md = (run / "summary.md").read_text()
    assert "host stops / forward" not in md and "## Command buffers" not in md
    goals = {g["goal"]: g["measured"] for g in summary["goals_issue20"]}
    # issue 20's table: static vs PyTorch 0.72x, best geometric path vs PyTorch compaction 0.83x, 780 us per token,
    # forced exit with only that exit 1.04x / 1.31x, worst exit variant 0.61x
    assert goals["ViT static vs PyTorch eager (91,988 img/s), same shape"] == pytest.approx(0.714, abs=0.005)
    assert goals["best ViT exit path, geometric, vs PyTorch compaction (115,642 img/s)"] == pytest.approx(0.828,
                                                                                                        abs=0.005)
    assert goals["LM full decode, batch 1, us per token (with prefill)"] == pytest.approx(780, abs=1)
    assert goals["LM forced exit after layer 5 (only that exit), batch 1"] == pytest.approx(1.04, abs=0.005)
    assert goals["LM forced exit after layer 5 (only that exit), batch 128"] == pytest.approx(1.31, abs=0.005)
    assert goals["any LM exit variant vs full depth, any batch (worst)"] == pytest.approx(0.61, abs=0.005)
    assert goals["Pallas gated kernel compiles and is timed at D=384"] == "fails"


def test_summary_shows_host_stops_and_command_buffers_side_by_side(run):
    stops = {"static": 0, "masked": 49, "compacted": 61, "compacted_eighths": 61}

    def add_stops(d):
        for cfg in d["configs"]:
            for pat in cfg["patterns"].values():
                for n, rec in pat["paths"].items():
                    rec["hlo"] = {"host_stops": stops[n], "dot_dtypes": {}}

    _edit(run / "vit_paths.json", add_stops)
    _edit(run / "lm_decode.json", lambda d: [rec.update(host_stops=29.0 if n == "forced_exit" else 0.0)
                                             for b in d["batches"] for n, rec in b["paths"].items()])
    _edit(run / "lm_papers.json", lambda d: d["rows"][4].update(host_stops=30))
    _edit(run / "train_throughput.json", lambda d: [c.update(remat_policy="dots" if c["remat"] else None)
                                                    for c in d["candidates"].values()])
    shutil.copy(run / "vit_paths.json", run / "vit_paths_cmdbuf.json")
    _edit(run / "vit_paths_cmdbuf.json", lambda d: [
        rec.update(time_s=rec["time_s"] / 2) for cfg in d["configs"] for pat in cfg["patterns"].values()
        for rec in pat["paths"].values()])
    summary = run_all.summarize(run)
    md = (run / "summary.md").read_text()
    assert "| host stops / forward | 0 | 49 | 61 | 61 |" in md
    assert "| host stops / token | | 0 | 29 | 0 | 0 | 0 | 0 |" in md
    assert summary["host_stops"]["vit L12-D384-T65-B1024: masked"] == "49"
    assert summary["host_stops"]["papers: FFN-SkipLLM / gate_never / batch 1"] == "30"
    assert "| FFN-SkipLLM | gate_never | 1 | 440.4 | 0.61 | 30 |" in md
    # the configuration fields that differ between candidates, side by side (a new field needs no code)
    assert "| candidate | dtype | remat | attention | remat_policy | img/s |" in md
    assert "| bf16-einsum-remat | bfloat16 | True | einsum | dots | 1,924.8 |" in md
    assert "**vit: XLA command buffers off / on**" in md
    assert "| L12-D384-T65-B1024 full | masked | 16.77 | 8.39 | 2.00 |" in md
    cb = summary["winners"]["vit: XLA command buffers (WHILE, CONDITIONAL)"]
    assert cb["winner"] == "on" and cb["geomean_time_off_over_on"] == pytest.approx(2.0)
    assert summary["files"]["vit_cmdbuf"] == "vit_paths_cmdbuf.json"


def test_summary_sets_the_cascade_beside_compacted(run):
    """The ViT part lists the bucket cascade by default beside compacted; the summary gives it its column, its host
    stops and its own bucket-list question, and lets it win the best-executor question when it is fastest."""
    for size, preset in run_all.VIT_PRESETS.items():
        paths = preset[preset.index("--paths") + 1].split(",")
        assert {"cascade", "compacted"} <= set(paths), size
    stops = {"static": 0, "masked": 49, "compacted": 61, "compacted_eighths": 61, "cascade": 20, "cascade_eighths": 24}

    def add_cascade(d):   # the cascade rows: compacted's timings halved (eighths: / 1.5), with their host stops
        for cfg in d["configs"]:
            cfg["buckets"].update({"cascade": cfg["buckets"]["compacted"],
                                   "cascade_eighths": cfg["buckets"]["compacted_eighths"]})
            for pat in cfg["patterns"].values():
                for name, div in (("cascade", 2.0), ("cascade_eighths", 1.5)):
                    rec = dict(pat["paths"]["compacted"], time_s=pat["paths"]["compacted"]["time_s"] / div)
                    rec["speedup"] = pat["paths"]["static"]["time_s"] / rec["time_s"]
                    pat["paths"][name] = rec
                for n, rec in pat["paths"].items():
                    rec["hlo"] = {"host_stops": stops[n], "dot_dtypes": {}}

    _edit(run / "vit_paths.json", add_cascade)
    summary = run_all.summarize(run)
    md = (run / "summary.md").read_text()
    cfg = next(k.split(":")[0] for k in summary["winners"] if k.endswith("compacted bucket list"))
    assert summary["winners"][f"{cfg}: cascade bucket list"]["winner"] == "cascade"
    assert summary["winners"][f"{cfg}: compacted bucket list"]["winner"] in ("compacted", "compacted_eighths")
    assert summary["winners"][f"{cfg}: best exit executor"]["winner"] == "cascade"
    assert summary["host_stops"][f"vit {cfg}: cascade"] == "20"
    header = next(line for line in md.splitlines() if line.startswith("| pattern (ideal) | static ms |"))
    assert "| cascade | cascade_eighths |" in header and "compacted" in header


def test_parts_and_budget_shares():
    assert sum(p.share for p in run_all.PARTS.values()) == pytest.approx(1.0)
    assert run_all.default_parts("gpu") == list(run_all.PARTS)
    assert run_all.default_parts("tiny") == list(run_all.MAIN_PARTS + run_all.EXTRA_PARTS)
    for name, part in run_all.PARTS.items():
        assert set(part.presets) == {"gpu", "small", "tiny"}, name
        if part.base:
            assert part.env == {"EEJAX_COMMAND_BUFFERS": "1"} and part.script == run_all.PARTS[part.base].script


def test_bad_part_args_are_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        run_all.main(["--out", "/tmp/never", "--part-args", "nope:--x"])
    assert err.value.code == 2 and "--part-args 'nope:--x'" in capsys.readouterr().err
