"""benchmarks/gated_kernel.py on CPU (interpret mode): every kernel row agrees with XLA's MLP; the JSON has the
documented rows and verdict; bad input is one line and exit status 2."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gated_kernel  # noqa: E402


def test_tiny_run_schema(tmp_path):
    out = tmp_path / "gk.json"
    assert gated_kernel.main(["--sizes", "tiny", "--widths", "48", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["all_agree"] is True and res["errors"] == {} and res["meta"]["timing_meaningful"] is False
    [w] = res["widths"]
    assert (w["d"], w["f"], w["block_d"], w["default_block_k"]) == (48, 192, 16, 64)
    assert set(w["paths"]) == {"xla_dense@100%", "xla_dense@40%", "xla_dense@40%_scattered", "xla_active_rows@40%",
                               "pallas_16_k64@100%", "pallas_16_k64@40%", "pallas_16_k64@40%_scattered"}
    assert all(r["agrees"] for k, r in w["paths"].items() if k.startswith("pallas"))
    assert w["verdict"]["kernel_wins"] in (True, False) and "needs >" in w["verdict"]["summary"]


def test_bad_widths_is_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gated_kernel.py"), "--widths", "40",
                           "--out", "/dev/null"], capture_output=True, text=True, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "multiple of 16" in proc.stderr and "Traceback" not in proc.stderr
