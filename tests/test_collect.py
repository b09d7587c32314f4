"""The collect stage through real Ray actors (one local Ray for the module)."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import tiny_config
from datamodels import cluster
from datamodels.collect import collect
from datamodels.data import load_dataset
from datamodels.errors import DataError, StoreError
from datamodels.store import RunStore
from datamodels.train import subset_mask, train_model

pytestmark = pytest.mark.usefixtures("ray_local")


def test_collect_trains_all_then_nothing_then_extends(tmp_path):
    out = tmp_path / "run"
    s = collect(tiny_config(), out, progress=False)
    assert s["completed"] == s["requested"] == 8 and s["trained"] == list(range(8))
    assert 0 < s["mean_test_accuracy"] <= 1 and sum(s["by_node"].values()) == 8
    again = collect(tiny_config(), out, progress=False)
    assert again["trained"] == [] and again["completed"] == 8
    more = collect(tiny_config("collect.models=11"), out, progress=False)
    assert more["trained"] == [8, 9, 10] and more["completed"] == 11


def test_ray_rows_equal_a_local_retrain(tmp_path):
    cfg = tiny_config("collect.models=4")
    collect(cfg, tmp_path / "run", progress=False)
    store = RunStore.open(tmp_path / "run")
    local = train_model(load_dataset(cfg.data), cfg, 2)
    assert np.array_equal(store.read("test_margins")[2], local.test_margins)
    assert np.array_equal(store.read("train_margins")[2], local.train_margins)


def test_killing_a_worker_mid_run_loses_nothing_and_duplicates_nothing(tmp_path):
    cfg = tiny_config("collect.models=32", "collect.block_size=4", "train.epochs=4")
    out = tmp_path / "run"
    killed = {}

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pool = cluster._POOL.get("pool")
            done = 0
            try:
                done = int(RunStore.open(out).complete_mask().sum())
            except Exception:
                pass
            live = [a for a in (pool.actors if pool else []) if a.live and a.busy]
            if done >= 4 and live:
                os.kill(live[0].pid, signal.SIGKILL)
                killed["pid"] = live[0].pid
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    s = collect(cfg, out, progress=False)
    t.join()
    assert killed, "no worker was killed"
    store = RunStore.open(out)
    assert s["completed"] == s["requested"] == 32 and store.complete_mask().all()
    assert sorted(s["trained"]) == list(range(32)) and len(s["trained"]) == 32  # none lost, none twice
    assert s["retried"] >= 1
    masks = store.read("masks")
    for i in range(32):
        assert np.array_equal(masks[i], subset_mask(cfg.seed, i, masks.shape[1], cfg.collect.alpha))


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(DataError):
        collect(tiny_config("data.dataset=cifar10", f"data.root={tmp_path / 'missing'}"), tmp_path / "a",
                progress=False)
    assert not (tmp_path / "a").exists()
    collect(tiny_config("collect.models=2"), tmp_path / "b", progress=False)
    with pytest.raises(StoreError, match="train.epochs"):
        collect(tiny_config("train.epochs=5"), tmp_path / "b", progress=False)
    assert RunStore.open(tmp_path / "b").requested == 2
