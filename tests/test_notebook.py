"""The quickstart notebook: committed with outputs cleared, and executed headless end to end (no network).

The kernel is launched from a kernel spec written to a temp dir whose argv is this interpreter (`sys.executable`),
so it sees the same installed eejax as pytest, whatever `python3` kernels the machine has registered.
"""
import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install -e '.[dev]')")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "eejax-test-python"


def test_quickstart_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"code cells {dirty} of {NOTEBOOK.name} have outputs; clear them before committing"


def _kernel_manager(tmp_path):
    """A kernel manager whose only kernel spec runs ipykernel on this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager  # a dependency of nbclient
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"eejax tests ({sys.executable})", "language": "python"}))
    return KernelManager(kernel_name=KERNEL_NAME,
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]))


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type in ("display_data", "execute_result"):
        return "".join(str(v) for k, v in output.data.items() if k.startswith("text/"))
    return ""


def test_quickstart_executes(tmp_path):
    nbclient = pytest.importorskip("nbclient", reason="needs nbclient (pip install -e '.[dev]')")
    pytest.importorskip("ipykernel", reason="needs ipykernel (pip install -e '.[dev]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A user's environment: one CPU device (conftest's 8 fake devices are for the sharding tests), the compile
    # cache kept, numpy rank promotion raising as in the rest of the suite, progress bars off in the log, and the
    # notebook's tempfile.mkdtemp() workdir under tmp_path so pytest cleans it up.
    # MPLBACKEND is dropped so ipykernel picks its inline backend and the plot becomes an image/png output.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND")}
    env.update(JAX_PLATFORMS="cpu", JAX_NUMPY_RANK_PROMOTION="raise", EEJAX_NO_PROGRESS="1",
               TMPDIR=str(tmp_path))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)  # raises CellExecutionError, with the traceback, on the first failing cell

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "\n".join(_text(o) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "eejax from" in text  # the install cell imported eejax
    header = "| exit | after layer | head | static MFLOPs | val acc (%) | test acc (%) |"
    tables = [o.data["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if header in o.get("data", {}).get("text/markdown", "")]
    assert len(tables) == 1, "the per-exit accuracy table is not displayed as markdown"
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "dynamic exits == the scan path's threshold policy: True" in text
    assert "dynamic logits == scan logits at each sample's exit: True" in text
    assert "layers_run:" in text
    # The trained model is well above chance at the last exit (10 classes), i.e. training happened.
    last_exit = tables[0].strip().splitlines()[-1]
    assert float(last_exit.strip("| ").split("|")[-1]) > 60, tables[0]
