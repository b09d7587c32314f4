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


EXPERIMENTS = {  # notebook -> what its output must show
    "learn_from_errors.ipynb": ["wrong-label set:", "every new label differs from the true one", "image/png"],
    "noisy_kd.ipynb": ["all combined", "robustness curves for teacher", "image/png"],
}


def _execute(name: str, tmp_path) -> str:
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = []
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            text.append(o.get("text", ""))
            text.extend(o.get("data", {}))  # mime types of displayed figures
    return "\n".join(text)


def test_every_notebook_is_tested():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(["explore_run.ipynb", *EXPERIMENTS,
                                                                                    "label_issues.ipynb"])


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_notebook_executes(tmp_path, monkeypatch, name):
    """Each experiment's notebook on tiny settings: one seed, in-process training, its figures."""
    import shlex

    from conftest import TINY

    monkeypatch.setenv("DATAMODELS_SETS", shlex.join(TINY + ["resources.executor=local"]))
    monkeypatch.setenv("DATAMODELS_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("DATAMODELS_SEEDS", "1")
    monkeypatch.setenv("DATAMODELS_EPS", "0 0.1")
    monkeypatch.setenv("DATAMODELS_PGD_STEPS", "2")
    out = _execute(name, tmp_path)
    for want in EXPERIMENTS[name]:
        assert want in out, (want, out[-2000:])


@pytest.mark.usefixtures("ray_local")
def test_notebook_executes(tmp_path, monkeypatch):
    name = "explore_run.ipynb"
    run = tmp_path / "run"
    collect(tiny_config("collect.models=24"), run, progress=False)
    fit_run(run, FitConfig(n_lambdas=5, min_models=20, device="cpu"))
    monkeypatch.setenv("DATAMODELS_RUN", str(run))
    outputs = _execute(name, tmp_path)
    assert "24 models" in outputs and "top supporters" in outputs


def test_label_issues_notebook_executes(tmp_path, monkeypatch):
    """Two tiny runs in-process (5% planted test-label noise, and none): precision and recall,
    the planted errors' explanations and the top flagged examples as pictures."""
    import shlex

    from conftest import TINY

    sets = TINY + ["resources.executor=local", "collect.models=20", "collect.logit_models=12", "fit.n_lambdas=4"]
    monkeypatch.setenv("DATAMODELS_SETS", shlex.join(sets))
    monkeypatch.setenv("DATAMODELS_OUT", str(tmp_path / "runs"))
    out = _execute("label_issues.ipynb", tmp_path)
    for want in ("precision", "planted errors explained:", "top flagged examples:", "image/png"):
        assert want in out, (want, out[-2000:])
    assert (tmp_path / "runs" / "planted.png").exists() and (tmp_path / "runs" / "clean.png").exists()
