"""The evaluate stage through Ray on a tiny run."""

import numpy as np
import pytest
import zarr

from conftest import tiny_config
from datamodels.collect import collect
from datamodels.config import FitConfig
from datamodels.data import load_dataset
from datamodels.errors import StoreError
from datamodels.evaluate import EVAL_DOMAIN, eval_mask, evaluate_run, train_eval_models
from datamodels.fit import fit_run
from datamodels.train import subset_mask

pytestmark = pytest.mark.usefixtures("ray_local")


def test_evaluate_trains_held_out_models_once_and_reports_lds(tmp_path):
    cfg = tiny_config("collect.models=24", "train.epochs=3")
    out = tmp_path / "run"
    collect(cfg, out, progress=False)
    with pytest.raises(StoreError, match="datamodels fit"):
        evaluate_run(out, masks=3, repeats=2, progress=False)
    fit_run(out, FitConfig(n_lambdas=5, min_models=20, device="cpu"))
    report = evaluate_run(out, masks=3, repeats=2, progress=False)
    assert report["E"] == 3 and report["R"] == 2 and -1 <= report["lds"] <= 1
    g = zarr.open_group(str(out / "eval"))
    assert g["complete"][:].all() and g.attrs["report"]["lds"] == report["lds"]
    masks = g["masks"][:]
    n = masks.shape[1]
    for e in range(3):
        assert np.array_equal(masks[e], eval_mask(cfg, e, n))
        assert not any(np.array_equal(masks[e], subset_mask(cfg.seed, i, n, 0.5)) for i in range(24))
    # eval results equal a local retrain of the same (e, r)
    (e, r, m), = train_eval_models(load_dataset(cfg.data), cfg, [(1, 1)])
    assert np.array_equal(g["test_margins"][1, 1], m)
    # resuming trains nothing new and growing E keeps what exists
    before = g["test_margins"][:].copy()
    evaluate_run(out, masks=4, repeats=2, progress=False)
    g = zarr.open_group(str(out / "eval"))
    assert g["complete"].shape == (4, 2) and np.array_equal(g["test_margins"][:3], before)
    assert EVAL_DOMAIN == g.attrs["domain"]
