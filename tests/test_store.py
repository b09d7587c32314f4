import hashlib
import multiprocessing as mp
import os

import numpy as np
import pytest

from conftest import tiny_config
from datamodels.collect import train_block
from datamodels.data import load_dataset
from datamodels.errors import StoreError
from datamodels.store import RunStore
from datamodels.train import subset_mask


def tree_digest(path):
    """Hash of every file's name and bytes under ``path``: proves a store was left untouched."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def make_store(tmp_path, *overrides):
    cfg = tiny_config(*overrides)
    ds = load_dataset(cfg.data)
    return cfg, ds, RunStore.create(tmp_path / "run", cfg, ds)


def test_layout_chunks_align_with_blocks(tmp_path):
    cfg, ds, store = make_store(tmp_path)
    g = store.group
    assert g["masks"].shape == (8, ds.num_train) and g["masks"].chunks == (4, ds.num_train)
    assert g["test_margins"].shape == (8, ds.num_test) and g["test_margins"].chunks == (4, ds.num_test)
    assert g["complete"].chunks == (4,)
    assert store.blocks([0, 1, 5, 6, 7]) == [[0, 1], [5, 6, 7]]
    assert g.attrs["dataset"]["fingerprint"] == ds.fingerprint()
    assert g.attrs["dataset"]["split"]["train_indices"] == ds.split["train_indices"]
    assert store.missing() == list(range(8))


def _crash_after_masks(store_path, cfg, crash_at):
    ds = load_dataset(cfg.data)
    state = {"model": None}

    def hook(name):
        # train_block writes rows in order; the third row's masks are written, then we die
        state["n"] = state.get("n", 0) + (name == "masks")
        if name == "masks" and state["n"] == crash_at:
            os._exit(17)

    train_block(ds, cfg, store_path, [0, 1, 2, 3], after_array=hook)


def test_crash_between_two_array_writes_leaves_the_row_incomplete(tmp_path):
    cfg, ds, store = make_store(tmp_path)
    proc = mp.get_context("fork").Process(target=_crash_after_masks, args=(str(store.path), cfg, 3))
    proc.start()
    proc.join()
    assert proc.exitcode == 17
    store = RunStore.open(store.path)
    # rows 0 and 1 complete; row 2 has its mask written but is NOT complete
    assert store.complete_mask()[:4].tolist() == [True, True, False, False]
    assert store.read("masks")[2].sum() > 0 and np.isnan(store.read("test_margins")[2]).all()
    # the retry trains exactly the incomplete rows and reproduces the prescribed masks
    trained = train_block(ds, cfg, str(store.path), [0, 1, 2, 3])
    assert [t["model"] for t in trained] == [2, 3]
    assert store.complete_mask()[:4].all()
    for i in range(4):
        assert np.array_equal(store.read("masks")[i], subset_mask(cfg.seed, i, ds.num_train, 0.5))


def test_incompatible_config_is_refused_naming_keys_and_store_untouched(tmp_path):
    cfg, ds, store = make_store(tmp_path)
    train_block(ds, cfg, str(store.path), [0, 1])
    before = tree_digest(store.path)
    other = tiny_config("train.epochs=3", "collect.alpha=0.25")
    with pytest.raises(StoreError) as e:
        RunStore.create(store.path, other, ds)
    msg = str(e.value)
    assert "train.epochs: store has 2, config has 3" in msg and "collect.alpha" in msg
    assert tree_digest(store.path) == before


def test_more_models_with_the_same_config_extends_the_run(tmp_path):
    cfg, ds, store = make_store(tmp_path)
    train_block(ds, cfg, str(store.path), [0, 1, 2, 3])
    kept = store.read("test_margins")[:4].copy()
    bigger = tiny_config("collect.models=12", "resources.workers=1")
    store = RunStore.create(store.path, bigger, ds)
    assert store.requested == 12 and store.group["masks"].shape[0] == 12
    assert store.missing() == list(range(4, 12))
    assert np.array_equal(store.read("test_margins")[:4], kept)
    assert store.config.collect.models == 12


def test_unwritable_or_foreign_output_paths(tmp_path):
    cfg = tiny_config()
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


def test_other_data_same_config_is_refused(tmp_path):
    cfg, ds, store = make_store(tmp_path)
    other = load_dataset(tiny_config("data.split_seed=5").data)
    with pytest.raises(StoreError, match="split_seed"):
        RunStore.prepare(store.path, tiny_config("data.split_seed=5"), other)


def test_a_second_driver_is_locked_out(tmp_path):
    cfg, ds, store = make_store(tmp_path)
    with store.lock():
        with pytest.raises(StoreError, match="being written by pid"):
            with RunStore.open(store.path).lock():
                pass
    with store.lock():  # released again
        pass
