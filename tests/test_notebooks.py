"""The notebooks run top to bottom on a tiny real run."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import tiny_config
from datamodels.collect import collect
from datamodels.config import FitConfig
from datamodels.fit import fit_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebook_executes(tmp_path, monkeypatch, name):
    run = tmp_path / "run"
    collect(tiny_config("collect.models=24"), run, progress=False)
    fit_run(run, FitConfig(n_lambdas=5, min_models=20, device="cpu"))
    monkeypatch.setenv("DATAMODELS_RUN", str(run))
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "24 models" in outputs and "top supporters" in outputs
