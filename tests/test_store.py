"""The run store, its model tables and the driver's claim, on local files (no Ray)."""

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from conftest import new_store, tiny_config, tree_digest
from datamodels.claim import DriverClaim, read_claim
from datamodels.collect import collect, collect_spec
from datamodels.data import load_dataset
from datamodels.errors import StoreError
from datamodels.specs import ModelSpec, Subset
from datamodels.storage import Location
from datamodels.store import RunStore
from datamodels.train import subset_mask


def local(*overrides):
    return tiny_config("resources.executor=local", *overrides)


def test_layout_chunks_align_with_blocks(tmp_path):
    cfg = local()
    ds = load_dataset(cfg.data)
    store = new_store(tmp_path / "run", cfg, ds)
    table = store.models_table()
    assert table.group["masks"].chunks == (4, ds.num_train) and table.group["test_margins"].chunks == (4, ds.num_test)
    assert table.group["complete"].chunks == (4,) and len(table) == 0
    assert table.chunks_of([0, 1, 5, 6, 7, 2]) == [[0, 1, 2], [5, 6, 7]]
    assert store.group.attrs["dataset"]["fingerprint"] == ds.fingerprint()
    assert store.group.attrs["dataset"]["split"]["train_indices"] == ds.split["train_indices"]
    assert store.missing() == list(range(8))
    assert not (tmp_path / "run" / "claim").exists()  # released


def test_collect_locally_then_rows_are_the_prescribed_models(tmp_path):
    cfg = local("collect.models=6")
    s = collect(cfg, tmp_path / "run", progress=False)
    assert s["trained"] == list(range(6)) and s["by_node"] == {"local": 6}
    store = RunStore.open(tmp_path / "run")
    t = store.models_table()
    assert t.keys()[:, 0].tolist() == list(range(6))  # row i is model i
    for i in range(6):
        assert np.array_equal(t.read("masks", [i])[0], subset_mask(cfg.seed, i, t.dims["N"], 0.5))
        assert t.read("digests", [i])[0] == collect_spec(cfg, i).digest()
    assert collect(cfg, tmp_path / "run", progress=False)["trained"] == []


def _crash_in_second_unit(path, cfg):
    from datamodels.table import ModelTable

    original = ModelTable._put
    seen = {"n": 0}

    def put(self, name, sel, values):
        original(self, name, sel, values)
        if name == "test_margins":
            seen["n"] += 1
            if seen["n"] == 2:  # the second unit's arrays are half written: die before `complete`
                os._exit(17)

    ModelTable._put = put
    collect(cfg, path, progress=False)


def test_crash_between_two_array_writes_leaves_the_row_incomplete(tmp_path):
    cfg = local()
    path = str(tmp_path / "run")
    proc = mp.get_context("fork").Process(target=_crash_in_second_unit, args=(path, cfg))
    proc.start()
    proc.join()
    assert proc.exitcode == 17
    store = RunStore.open(path)
    t = store.models_table()
    # unit 0 (rows 0-3) complete; unit 1 (rows 4-7) has masks and margins but is NOT complete
    assert t.complete_mask().tolist() == [True] * 4 + [False] * 4
    assert t.read("masks", [5])[0].sum() > 0 and np.isfinite(t.read("test_margins", [5])[0]).all()
    # the killed driver's claim is recognised as stale (same machine, dead pid): the retry runs
    assert read_claim(Location(path)) is not None
    s = collect(cfg, path, progress=False)
    assert s["trained"] == [4, 5, 6, 7] and RunStore.open(path).complete_mask().all()


def test_incompatible_config_is_refused_naming_keys_and_store_untouched(tmp_path):
    cfg = local("collect.models=2")
    collect(cfg, tmp_path / "run", progress=False)
    before = tree_digest(tmp_path / "run")
    with pytest.raises(StoreError) as e:
        collect(local("train.epochs=3", "collect.alpha=0.25"), tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "train.epochs: store has 2, config has 3" in msg and "collect.alpha" in msg
    assert tree_digest(tmp_path / "run") == before


def test_more_models_with_the_same_config_extends_the_run(tmp_path):
    collect(local("collect.models=4"), tmp_path / "run", progress=False)
    kept = RunStore.open(tmp_path / "run").read("test_margins").copy()
    s = collect(local("collect.models=10", "resources.workers=1"), tmp_path / "run", progress=False)
    store = RunStore.open(tmp_path / "run")
    assert s["trained"] == list(range(4, 10)) and store.requested == 10 and store.config.collect.models == 10
    assert np.array_equal(store.read("test_margins")[:4], kept)


def test_unwritable_or_foreign_output_paths(tmp_path):
    cfg = local()
    ds = load_dataset(cfg.data)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        RunStore.prepare(f / "run", cfg, ds)
    with pytest.raises(StoreError, match="a file of that name exists"):
        RunStore.prepare(f, cfg, ds)
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "keep.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a run store"):
        RunStore.prepare(tmp_path / "notastore", cfg, ds)
    assert (tmp_path / "notastore" / "keep.txt").read_text() == "precious"
    with pytest.raises(StoreError, match="no run store"):
        RunStore.open(tmp_path / "nothing")


def test_relative_out_is_the_drivers_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = Location.for_output("runs/x")
    assert loc.local and loc.url == str(tmp_path / "runs" / "x")
    assert Location("file://" + str(tmp_path / "y")).url == str(tmp_path / "y")
    job = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    with pytest.raises(StoreError, match="temporary copy of --working-dir"):
        Location.for_output("runs/x")
    assert Location.for_output(str(tmp_path / "abs")).url == str(tmp_path / "abs")


def test_urls_go_to_their_storage_and_unknown_protocols_are_refused(tmp_path):
    with pytest.raises(StoreError, match="unknown storage protocol 'nope'"):
        Location("nope://bucket/run")
    cfg = local("collect.models=2")
    s = collect(cfg, "memory://runs/m", progress=False)
    assert s["completed"] == 2 and not (tmp_path / "memory:").exists() and not os.path.exists("memory:")
    store = RunStore.open("memory://runs/m")
    assert store.complete_mask().all() and not store.loc.local


def test_other_data_same_config_is_refused(tmp_path):
    cfg = local()
    store = new_store(tmp_path / "run", cfg, load_dataset(cfg.data))
    other = load_dataset(tiny_config("data.split_seed=5").data)
    with pytest.raises(StoreError, match="split_seed"):
        RunStore.prepare(store.loc, tiny_config("data.split_seed=5"), other)


def test_one_driver_per_run_and_stale_claims(tmp_path):
    loc = Location(tmp_path / "run")
    cfg = local()
    new_store(loc, cfg, load_dataset(cfg.data))
    with DriverClaim(loc):
        with pytest.raises(StoreError, match="being written by pid .* --takeover"):
            DriverClaim(loc).acquire()
        assert read_claim(loc)["pid"] == os.getpid()
    assert read_claim(loc) is None  # released
    # a claim whose heartbeat is older than its ttl does not block
    old = DriverClaim(loc, ttl=0.5).acquire()
    old._stop.set()  # the driver "hangs": no more heartbeats
    with pytest.raises(StoreError, match="being written"):
        DriverClaim(loc).acquire()
    time.sleep(0.7)
    new = DriverClaim(loc).acquire()
    assert read_claim(loc)["owner"] == new.owner
    # the old driver notices before its next write, and --takeover takes a live claim
    old.lost = read_claim(loc)
    with pytest.raises(StoreError, match="taken over"):
        old.check()
    third = DriverClaim(loc, takeover=True).acquire()
    assert read_claim(loc)["owner"] == third.owner
    third.release()
    new._stop.set()


def test_a_stale_row_is_retrained_when_its_spec_changes(tmp_path):
    cfg = local()
    store = new_store(tmp_path / "run", cfg, load_dataset(cfg.data))
    table = store.table("x/models", key_names=["t"], outputs=["test_margins"], rows_per_chunk=2)
    a = ModelSpec(key=(0,), seed=1, subset=Subset.all_but([3, 4]))
    b = ModelSpec(key=(0,), seed=1, subset=Subset.all_but([3, 5]))
    assert table.plan([a]) == [0]
    n, t = table.dims["N"], table.dims["T"]
    table.write([0], [{"mask": a.subset.mask(n), "test_margins": np.zeros(t), "seconds": 1.0}], [a])
    assert table.plan([a]) == [] and table.plan([b]) == [0] and not table.complete_mask()[0]
    with pytest.raises(StoreError, match="made for other specs"):
        store.table("x/models", key_names=["t"], outputs=["test_logits"], rows_per_chunk=2)
