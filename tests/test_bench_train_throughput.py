"""benchmarks/train_throughput.py: candidate parsing and names (the three-part names of earlier runs kept), and a
tiny CPU run of a candidate with every option, whose first loss agrees with the float32 reference."""
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_throughput as tt  # noqa: E402


def test_candidate_parsing_and_names():
    cands = tt.parse_candidates("bfloat16:0:einsum,bfloat16:1:cudnn,float32:dots_saveable:auto:bf16res+hidden")
    assert cands == (("bfloat16", "none", "einsum", ()), ("bfloat16", "full", "cudnn", ()),
                     ("float32", "dots_saveable", "auto", ("bf16res", "hidden")))
    assert [tt.cand_name(*c) for c in cands] == ["bf16-einsum-noremat", "bf16-cudnn-remat",
                                                 "f32-auto-remat_dots-bf16res-hiddenstack"]
    assert len({tt.cand_name(*c) for c in tt.CANDIDATES}) == len(tt.CANDIDATES)
    for bad in ("bfloat16:dots:einsum", "float16:0:einsum", "bfloat16:0:flash", "bfloat16:0:einsum:fast",
                "bfloat16:0"):
        with pytest.raises(ValueError, match="candidate"):
            tt.parse_candidates(bad)


def test_tiny_run_with_every_option(tmp_path):
    out = tmp_path / "tt.json"
    rc = tt.main(["--sizes", "tiny", "--rounds", "1", "--steps", "1", "--out", str(out),
                  "--candidates", "bfloat16:dots_saveable:einsum:bf16res+hidden"])
    res = json.loads(out.read_text())
    assert rc == 0 and res["all_agree"] is True and res["errors"] == {}
    c = res["candidates"]["bf16-einsum-remat_dots-bf16res-hiddenstack"]
    assert (c["remat"], c["remat_policy"], c["residual"], c["readout"]) == (True, "dots_saveable", "bfloat16", "hidden")
    assert c["temp_bytes"] > 0 and res["reference"].startswith("f32-einsum")
    assert abs(c["first_loss"] - res["reference_loss"]) <= c["loss_tol"] * max(1, res["reference_loss"])
    assert res["meta"]["command_buffers"] == "default"
