"""The example notebooks run end to end, headless, in this interpreter's kernel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "council_behaviour.ipynb"
NOTEBOOKS = [NOTEBOOK, ROOT / "examples" / "resume_after_crash.ipynb"]
KERNEL = "python3"


@pytest.fixture
def kernel_of_this_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A `python3` kernelspec that runs sys.executable, found before any other.

    JUPYTER_PATH comes first in Jupyter's search path, so a user-wide `python3` kernel from
    some other interpreter cannot shadow the one of the environment under test.
    """
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (test)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile or startup
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook asks for inline plots
    return KERNEL


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_council_notebook_runs_end_to_end(kernel_of_this_python: str) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name=kernel_of_this_python,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, f"only {len(images)} plots"
    printed = "".join(o.text for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert printed.strip() == sys.prefix, "the notebook ran in another interpreter"


def test_resume_after_crash_notebook_runs_end_to_end(kernel_of_this_python: str) -> None:
    nb = nbformat.read(NOTEBOOKS[1], as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name=kernel_of_this_python,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "kernel interrupted while the GPUs were held" in printed
    assert "after the interrupt: allocated next: ('monitor',)" in printed
    assert "resumed: released - released: lease-expired" in printed
    assert "fork: denied - denied by what-if" in printed
