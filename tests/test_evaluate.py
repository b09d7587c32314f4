"""The evaluate stage through Ray on a tiny run."""

import numpy as np
import pytest

from conftest import tiny_config
from datamodels.collect import collect
from datamodels.config import FitConfig
from datamodels.data import load_dataset
from datamodels.errors import StoreError
from datamodels.evaluate import eval_mask, eval_spec, evaluate_run
from datamodels.fit import fit_run
from datamodels.specs import train_spec
from datamodels.store import RunStore
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
    store = RunStore.open(out)
    table = store.table("eval/models", key_names=["e", "r"], outputs=["test_margins"], rows_per_chunk=4)
    assert table.complete_mask().all() and len(table) == 6
    assert store.group["eval"].attrs["report"]["lds"] == report["lds"]
    keys = [(e, r) for e in range(3) for r in range(2)]
    masks = table.read("masks", table.rows_of(keys))
    n = masks.shape[1]
    for (e, r), mask in zip(keys, masks):
        assert np.array_equal(mask, eval_mask(cfg, e, n))
        assert not any(np.array_equal(mask, subset_mask(cfg.seed, i, n, 0.5)) for i in range(24))
    # eval results equal a local retrain of the same (e, r)
    local = train_spec(load_dataset(cfg.data), cfg, eval_spec(cfg, 1, 1))
    assert np.array_equal(table.read("test_margins", table.rows_of([(1, 1)]))[0], local["test_margins"])
    # resuming trains nothing new and growing E keeps what exists
    before = table.read("test_margins").copy()
    evaluate_run(out, masks=4, repeats=2, progress=False)
    table = store.table("eval/models", key_names=["e", "r"], outputs=["test_margins"], rows_per_chunk=4)
    assert len(table) == 8 and table.complete_mask().all()
    assert np.array_equal(table.read("test_margins", slice(0, 6)), before)
