"""Fault injection: every bad input and fault answered in one line, nothing lost, nothing silently
wrong. Each test backs one or more rows of docs/errors.md (named there).

Stores are trained locally (``resources.executor=local``, no Ray) at the tiny size; disk full is
injected with a Zarr store wrapper that raises ENOSPC after a number of writes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from zarr.storage import WrapperStore

from conftest import TINY, one_line_error, put_rows, run_cli, tiny_config, tree_digest
from datamodels import cli
from datamodels.check import check_run
from datamodels.collect import collect
from datamodels.config import load_config
from datamodels.data import load_dataset
from datamodels.errors import ConfigError, DamagedStoreError, StorageError
from datamodels.storage import Location
from datamodels.store import RunStore
from datamodels.table import ModelTable

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "pipelines" / "digits.yaml")
LOCAL = TINY + ["resources.executor=local"]
SETS = [a for s in LOCAL for a in ("--set", s)]


def exactly_once(where, m: int) -> None:
    """Every model 0..m-1 is in the collect table exactly once, complete, and every array is m long."""
    store = RunStore.open(where)
    t = store.models_table()
    keys = t.keys()[:, 0]
    assert sorted(keys.tolist()) == list(range(m)) and len(t) == m
    assert t.complete_mask().all()
    for name in t.array_names():
        assert t.array(name).shape[0] == m, name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A whole tiny run of 8 models (copy it before changing it)."""
    where = tmp_path_factory.mktemp("faults") / "run"
    collect(tiny_config("resources.executor=local"), where, progress=False)
    return where


FIT_SETS = ["--set", "fit.min_models=4", "--set", "fit.val_fraction=0.25"]


@pytest.fixture(scope="module")
def fitted(trained, tmp_path_factory):
    """The tiny run, fitted (copy it before changing it)."""
    where = tmp_path_factory.mktemp("fitted") / "run"
    shutil.copytree(trained, where)
    assert cli.main(["fit", str(where), *FIT_SETS, "--no-progress"]) == 0
    return where


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def chunk_file(run: Path, array: str, chunk: int = 0) -> Path:
    base = run / array / "c" / str(chunk)
    return base if base.is_file() else next(p for p in sorted(base.rglob("*")) if p.is_file())


# --------------------------------------------------------------------------- config


def _write(tmp_path, text: str | bytes, name="cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


@pytest.mark.parametrize("text, expect", [
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "line 3: key 'lr' appears twice in one mapping (first on line 2)"),
    ("train:\n  lr: 0.1\ncollect:\n  models: 4\ntrain:\n  epochs: 2\n", "line 5: key 'train' appears twice"),
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("train: [1, 2\n", "not valid YAML: line 2"),
    ("train:\n  lr: .nan\n", "train.lr: expected a finite number, got nan"),
    ("train:\n  lr: .inf\n", "train.lr: expected a finite number, got inf"),
    ("collect:\n  alpha: -.inf\n", "collect.alpha: expected a finite number, got -inf"),
    ("trian:\n  lr: 0.1\n", "unknown key 'trian'"),
], ids=["dup-key", "dup-section", "empty", "comments-only", "list", "syntax", "nan", "inf", "neg-inf", "unknown"])
def test_bad_config_files_are_refused_naming_file_and_line(tmp_path, text, expect):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and expect in str(e.value) and "\n" not in str(e.value)


def test_yaml_12_floats_are_floats(tmp_path):
    assert load_config(_write(tmp_path, "train:\n  lr: 1e-3\n")).train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("kind, expect", [
    ("dir", "is a directory; expected a YAML pipeline file"),
    ("binary", "is not a UTF-8 text file (byte 0xff at offset 0)"),
    ("nul", "is not a text file (it holds NUL bytes"),
    ("proc", "cannot be read"),
    ("fifo", "is not a regular file"),
], ids=["dir", "binary", "nul", "proc", "fifo"])
def test_unreadable_config_paths_get_one_line_naming_the_file(tmp_path, kind, expect):
    if kind == "dir":
        p = tmp_path
    elif kind == "binary":
        p = _write(tmp_path, b"\xff\xfe\x00\x01binary")
    elif kind == "nul":
        p = _write(tmp_path, b"train:\n  lr: 0.1\x00\n")
    elif kind == "proc":
        p = Path("/proc/self/mem")
    else:
        p = tmp_path / "fifo"
        os.mkfifo(p)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and expect in str(e.value) and "[Errno" not in str(e.value)


def test_missing_config_file_exits_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert code == 2 and "config file not found" in one_line_error(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item, expect", [
    ("collect.alpha=.nan", "collect.alpha: expected a finite number, got nan"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("train.lr", "expected KEY=VALUE"),
    (".epochs=3", "expected KEY=VALUE with a dotted key"),
    ("train.epochs=[1", "not valid YAML"),
    ("train.epochs=two", "train.epochs: expected int, got str 'two'"),
    ("collect.alpha=1.5", "collect.alpha: expected a value in (0, 1], got 1.5"),
], ids=["alpha-nan", "lr-inf", "no-equals", "empty-key", "bad-yaml", "wrong-type", "out-of-range"])
def test_bad_overrides_create_nothing(tmp_path, capsys, item, expect):
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", tmp_path / "run", *SETS, "--set", item, "--no-progress")
    assert code == 2 and expect in one_line_error(err)
    assert not (tmp_path / "run").exists()  # validated before anything is written


# --------------------------------------------------------------------------- --out and store paths


@pytest.mark.parametrize("out, expect", [
    ("/sys/kernel/datamodels-run", "cannot create run store at /sys/kernel/datamodels-run: /sys/kernel is a kernel"),
    ("/proc/datamodels-run", "cannot create run store at /proc/datamodels-run: /proc is a kernel file system"),
], ids=["sys", "proc"])
def test_out_on_kernel_file_systems_is_refused(capsys, out, expect):
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", out, *SETS, "--no-progress")
    assert code == 2 and expect in one_line_error(err)


def test_out_that_is_a_file_is_refused_untouched(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", f, *SETS, "--no-progress")
    assert code == 2 and str(f) in one_line_error(err) and f.read_text() == "keep me"


@pytest.mark.parametrize("kind, expect", [
    ("missing", "no run store at"),
    ("file", "is a file, not a run store"),
    ("other", "exists and is not a run store"),
], ids=["missing", "file", "other"])
def test_status_and_train_on_things_that_are_not_stores(tmp_path, capsys, kind, expect):
    p = tmp_path / "x"
    if kind == "file":
        p.write_text("x")
    elif kind == "other":
        p.mkdir()
        (p / "notes.txt").write_text("x")
    cmd = ("train", DIGITS, "--out", p, *SETS, "--no-progress") if kind == "other" else ("status", p)
    code, _, err = run_cli(capsys, *cmd)
    assert code == 2 and expect in one_line_error(err)


def test_corrupt_root_metadata_is_named(run, capsys):
    (run / "zarr.json").write_text("{not json")
    before = tree_digest(run)
    for cmd in (("status", run), ("fit", run), ("train", DIGITS, "--out", run, *SETS, "--no-progress")):
        code, _, err = run_cli(capsys, *cmd)
        line = one_line_error(err)
        assert code == 2 and f"{run}/zarr.json" in line and "not valid JSON" in line, line
    assert tree_digest(run) == before


def test_corrupt_array_metadata_is_named(run, capsys):
    (run / "models" / "test_margins" / "zarr.json").write_bytes(b"\x00\x01garbage")
    code, _, err = run_cli(capsys, "status", run)
    line = one_line_error(err)
    assert code == 2 and "models/test_margins/zarr.json" in line and "metadata of models/test_margins" in line
    code, out, _ = run_cli(capsys, "check", run)
    assert code == 2 and "models/test_margins/zarr.json" in out


# --------------------------------------------------------------------------- damaged chunks


def test_truncated_masks_chunk_is_named_by_every_stage_and_repaired(run, capsys):
    f = chunk_file(run, "models/masks", 1)
    f.write_bytes(f.read_bytes()[:7])
    # every stage reading it refuses with the same named error: array, chunk, model rows, fix
    code, _, err = run_cli(capsys, "fit", run, *FIT_SETS, "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "models/masks: chunk c/1/0 (model rows 4-7) is damaged" in line
    assert "datamodels check" in line and "--repair" in line
    code, out, _ = run_cli(capsys, "check", run)
    assert code == 2 and "models/masks: chunk c/1/0 (model rows 4-7)" in out
    rep = check_run(run, repair=True)
    assert rep.repaired and rep.ok
    assert np.flatnonzero(~RunStore.open(run).complete_mask()).tolist() == [4, 5, 6, 7]
    code, out, _ = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--no-progress")
    assert code == 0 and "4 trained now" in out
    exactly_once(run, 8)
    assert check_run(run).ok and not check_run(run).damaged


def test_garbage_complete_chunk_is_named_then_repaired(run, capsys):
    chunk_file(run, "models/complete", 0).write_bytes(b"garbage!garbage!")
    before = tree_digest(run)
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "models/complete: chunk c/0 (model rows 0-3) is damaged" in line
    assert tree_digest(run) == before  # refused before claiming the run
    code, out, _ = run_cli(capsys, "check", run, "--repair")
    assert code == 0 and "repaired" in out
    code, out, _ = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--no-progress")
    assert code == 0 and "4 trained now" in out
    exactly_once(run, 8)


def test_deleted_complete_array_is_named(run, capsys):
    shutil.rmtree(run / "models" / "complete")
    code, _, err = run_cli(capsys, "status", run)
    line = one_line_error(err)
    assert code == 2 and "array 'complete' is missing" in line and "models" in line


def test_damaged_keys_chunk_cuts_the_table_and_train_restores_it(run, capsys):
    chunk_file(run, "models/keys", 1).write_bytes(b"xx")
    rep = check_run(run, repair=True)
    assert rep.ok and "cut back to its first 4 rows" in rep.damaged[0].repaired
    code, out, _ = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--no-progress")
    assert code == 0 and "4 trained now" in out
    exactly_once(run, 8)


def test_damaged_labels_are_rewritten_from_the_dataset(run):
    want = RunStore.open(run).read("train_labels")
    chunk_file(run, "train_labels", 0).write_bytes(b"\x00" * 9)
    with pytest.raises(DamagedStoreError, match="train_labels: chunk c/0"):
        RunStore.open(run).read("train_labels")
    assert check_run(run, repair=True).ok
    assert np.array_equal(RunStore.open(run).read("train_labels"), want)


@pytest.mark.parametrize("path", ["eval/models", "full/models", "verify/models"])
def test_check_covers_every_model_table(run, path):
    store = RunStore.open(run, mode="r+")
    with store.writing():
        table = store.table(path, key_names=["e", "r"], outputs=["test_margins"], rows_per_chunk=4)
        from datamodels.specs import ModelSpec, Subset

        specs = [ModelSpec(key=(e, 0), seed=e, subset=Subset.random((9, e), 0.5), outputs=("test_margins",))
                 for e in range(6)]
        table.plan(specs)
        n, t = store.dims["N"], store.dims["T"]
        res = [{"mask": s.subset.mask(n), "test_margins": np.ones(t, np.float32), "seconds": 0.0} for s in specs]
        res[5]["test_margins"][0] = np.nan  # a diverged model: reported, not "damaged"
        table.write(list(range(6)), res, specs)
    chunk_file(run, f"{path}/test_margins", 1).write_bytes(b"\x01\x02")
    rep = check_run(run)
    assert [d.array for d in rep.damaged] == [f"{path}/test_margins"] and rep.damaged[0].rows == (4, 5)
    assert rep.diverged.get(path) in (None, [])  # row 5 is in the damaged chunk
    assert check_run(run, repair=True).ok
    table = ModelTable(RunStore.open(run).group[path])  # its stage retrains rows 4-5 on its next run
    assert table.complete_mask().tolist() == [True] * 4 + [False, False]
    assert check_run(run).ok and not check_run(run).damaged


def test_diverged_rows_are_reported_by_check_and_status(tmp_path, capsys):
    cfg = tiny_config("collect.models=4")
    from conftest import new_store

    ds = load_dataset(cfg.data)
    store = new_store(tmp_path / "run", cfg, ds)
    n, t = ds.num_train, ds.num_test
    with store.writing():
        put_rows(store, cfg, {i: (np.full(t, np.nan if i == 2 else 1.0, np.float32), np.zeros(n, np.float32))
                              for i in range(4)})
    rep = check_run(tmp_path / "run")
    assert rep.ok and rep.diverged == {"models": [2]}
    code, out, _ = run_cli(capsys, "status", tmp_path / "run")
    assert code == 0 and "1 diverged" in out


def test_damaged_fit_is_named_by_query_and_removed_by_repair(tmp_path, capsys):
    from test_fit_stage import FAST, planted_store

    from datamodels.fit import fit_run

    store, _, _ = planted_store(tmp_path, m=60)
    fit_run(store.loc, FAST)
    run = tmp_path / "run"
    fit_dir = next(p for p in (run / "datamodels").iterdir() if p.is_dir())
    chunk_file(run, f"datamodels/{fit_dir.name}/weight", 0).write_bytes(b"bad")
    code, _, err = run_cli(capsys, "query", run, "0")
    line = one_line_error(err)
    assert code == 2 and f"datamodels/{fit_dir.name}/weight: chunk c/0/0" in line and "datamodels fit" in line
    rep = check_run(run, repair=True)
    assert rep.ok and "removed" in rep.damaged[0].repaired
    code, _, err = run_cli(capsys, "query", run, "0")
    assert code == 2 and "no fitted datamodels yet; run `datamodels fit" in one_line_error(err)


# --------------------------------------------------------------------------- disk full


class DiskFull(WrapperStore):
    """A Zarr store that raises ENOSPC once ``budget["writes"]`` writes have been made."""

    budget = {"writes": 10**9}

    def _with_store(self, store):
        return type(self)(store)

    async def set(self, key, value):
        if DiskFull.budget["writes"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        DiskFull.budget["writes"] -= 1
        await self._store.set(key, value)


@pytest.fixture
def disk_full(monkeypatch):
    raw = Location._raw_zarr_store

    def wrapped(self, *, read_only=False):
        return DiskFull(raw(self, read_only=read_only))

    monkeypatch.setattr(Location, "_raw_zarr_store", wrapped)
    DiskFull.budget["writes"] = 10**9
    return DiskFull.budget


@pytest.mark.parametrize("writes", [0, 1, 3, 6])
def test_disk_full_at_creation_then_train_again_finishes(tmp_path, capsys, disk_full, writes):
    run = tmp_path / "run"
    disk_full["writes"] = writes
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--no-progress")
    line = one_line_error(err)
    assert code == 1 and "no space left on the device while writing" in line and "re-run the same command" in line
    if (run / "zarr.json").exists():  # a half-created store says so, and what to do
        code, _, err = run_cli(capsys, "status", run)
        assert code == 2 and "half-created run store" in one_line_error(err) and "re-run" in err
    disk_full["writes"] = 10**9
    code, _, _ = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--no-progress")
    assert code == 0
    exactly_once(run, 8)


def test_a_full_disk_never_leaves_half_a_metadata_document(run, capsys, monkeypatch):
    import datamodels.storage as storage

    docs = [run / "zarr.json", run / "models" / "masks" / "zarr.json"]
    before = [d.read_bytes() for d in docs]

    def full(src, dst):  # the temporary file was written; the rename is where a full disk stops it
        raise OSError(errno.ENOSPC, "No space left on device")

    class FullDiskOs:  # the os module as the writer sees it, but for the rename
        replace = staticmethod(full)

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(storage, "os", FullDiskOs())
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--models", "12", "--no-progress")
    line = one_line_error(err)
    assert code == 1 and "no space left on the device while writing" in line and "zarr.json" in line
    assert [d.read_bytes() for d in docs] == before and not list(run.rglob("*.partial"))  # old, whole
    assert RunStore.open(run).requested == 8
    monkeypatch.undo()
    code, _, _ = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--models", "12", "--no-progress")
    assert code == 0
    exactly_once(run, 12)


def test_root_metadata_cut_short_before_any_model_is_half_created(tmp_path, capsys):
    from conftest import new_store

    cfg = tiny_config("resources.executor=local")
    new_store(tmp_path / "run", cfg, load_dataset(cfg.data))
    root = tmp_path / "run" / "zarr.json"
    root.write_bytes(root.read_bytes()[:40])  # a full disk cut the last write short
    code, _, err = run_cli(capsys, "status", tmp_path / "run")
    assert code == 2 and "half-created run store" in one_line_error(err)
    code, _, _ = run_cli(capsys, "train", DIGITS, "--out", tmp_path / "run", *SETS, "--no-progress")
    assert code == 0
    exactly_once(tmp_path / "run", 8)


@pytest.mark.parametrize("writes", [24, 30, 38])  # of about 40 for the whole run
def test_disk_full_mid_run_then_resume_trains_every_row_exactly_once(tmp_path, capsys, disk_full, writes):
    run = tmp_path / "run"
    disk_full["writes"] = writes
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--no-progress")
    assert code == 1 and "no space left on the device" in one_line_error(err)
    assert not (run / "claim").exists()  # the claim is released on the way out
    assert RunStore.open(run).status()["completed"] < 8  # stopped mid-run, the store whole
    disk_full["writes"] = 10**9
    code, _, _ = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--no-progress")
    assert code == 0
    exactly_once(run, 8)
    assert check_run(run).ok


# --------------------------------------------------------------------------- refused commands change nothing


def test_second_driver_with_more_models_changes_nothing(run, capsys):
    from datamodels.claim import DriverClaim

    with DriverClaim(Location(run)):
        before = tree_digest(run)
        code, _, err = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--models", "96", "--no-progress")
        assert code == 2 and "is being written by pid" in one_line_error(err)
        assert tree_digest(run) == before
    assert RunStore.open(run).requested == 8


def test_train_with_another_config_changes_nothing(run, capsys):
    before = tree_digest(run)
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--set", "train.epochs=3", "--no-progress")
    assert code == 2 and "train.epochs" in one_line_error(err)
    assert tree_digest(run) == before


def test_evaluate_zero_masks_is_refused_not_the_default(run, capsys):
    before = tree_digest(run)
    for flag in ("--masks", "--repeats"):
        code, _, err = run_cli(capsys, "evaluate", run, flag, "0", "--no-progress")
        assert code == 2 and f"eval.{flag[2:]}" in one_line_error(err)
    assert tree_digest(run) == before


def test_fit_on_a_read_only_store_fails_before_solving(run, capsys, monkeypatch):
    import datamodels.fit as fit_mod
    from datamodels.integrity import storage_error

    def read_only(self, key, data):  # what a read-only mount answers (root ignores chmod)
        raise storage_error(self.url, key, OSError(errno.EROFS, "Read-only file system"))

    monkeypatch.setattr(Location, "write_bytes", read_only)
    monkeypatch.setattr(fit_mod, "fit_arrays", lambda *a, **k: pytest.fail("solved on a read-only store"))
    before = tree_digest(run)
    code, _, err = run_cli(capsys, "fit", run, *FIT_SETS)
    line = one_line_error(err)
    assert code == 2 and "Read-only file system" in line and str(run) in line
    assert tree_digest(run) == before


def test_brittleness_cdf_into_a_missing_directory_is_refused_first(fitted, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    before = tree_digest(run)
    code, _, err = run_cli(capsys, "brittleness", run, "--cdf", tmp_path / "nodir" / "cdf", "--no-progress")
    assert code == 2 and "does not exist" in one_line_error(err)
    assert tree_digest(run) == before


def test_query_plot_into_a_directory_prints_the_file_it_wrote(tmp_path, capsys):
    from datamodels.cli_analysis import plot_path

    assert plot_path(str(tmp_path), 3) == str(tmp_path / "query-3.png")
    assert plot_path(str(tmp_path / "t12"), 3) == str(tmp_path / "t12.png")
    with pytest.raises(ConfigError, match="does not exist"):
        plot_path(str(tmp_path / "nodir" / "x.png"), 0)


def test_query_plot_dir_on_the_command_line(fitted, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "query", fitted, "3", "--plot", tmp_path)
    assert code == 0 and f"plot: {tmp_path / 'query-3.png'}" in out and (tmp_path / "query-3.png").stat().st_size
    code, _, err = run_cli(capsys, "query", fitted, "3", "--plot", tmp_path / "nodir" / "q.png")
    assert code == 2 and "does not exist" in one_line_error(err)


# --------------------------------------------------------------------------- divergence


def test_most_models_diverging_stops_the_run_naming_train_lr(tmp_path, capsys, monkeypatch):
    import datamodels.runner as runner

    real = runner.train_specs

    def diverging(dataset, cfg, specs):
        out = real(dataset, cfg, specs)
        for r in out:
            r["test_margins"] = np.full_like(r["test_margins"], np.nan)
        return out

    monkeypatch.setattr(runner, "train_specs", diverging)
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", tmp_path / "run", *SETS, "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "NaN or infinite outputs" in line and "train.lr=" in line
    store = RunStore.open(tmp_path / "run")
    assert store.status()["diverged"] == store.status()["completed"] > 0  # never counted silently


def test_a_real_too_high_learning_rate_stops_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", DIGITS, "--out", run, *SETS, "--set", "train.lr=1e6", "--no-progress")
    line = one_line_error(err)
    assert code == 2 and f"{run}/models:" in line and "train.lr=1e+06 (default 0.4)" in line
    status = RunStore.open(run).status()
    assert 2 * status["diverged"] > status["completed"] > 0  # most diverged; counted, not hidden


# --------------------------------------------------------------------------- exit codes and tracebacks


def test_runtime_failure_exits_1_one_line_and_traceback_only_with_v(run, capsys, monkeypatch):
    import datamodels.store as store_mod

    def boom(self):
        raise RuntimeError("worker retries exhausted for unit 3")

    monkeypatch.setattr(store_mod.RunStore, "status", boom)
    code, _, err = run_cli(capsys, "status", run)
    assert code == 1 and "RuntimeError: worker retries exhausted" in one_line_error(err) and "-v" in err
    code, _, err = run_cli(capsys, "-v", "status", run)
    assert code == 1 and "Traceback" in err


def test_storage_error_exits_1(run, capsys, monkeypatch):
    import datamodels.store as store_mod

    monkeypatch.setattr(store_mod.RunStore, "status",
                        lambda self: (_ for _ in ()).throw(StorageError("reading x failed: I/O error (EIO)")))
    code, _, err = run_cli(capsys, "status", run)
    assert code == 1 and "I/O error" in one_line_error(err)


def test_check_on_a_whole_store_says_ok(run, capsys):
    code, out, _ = run_cli(capsys, "check", run, "--json")
    rep = json.loads(out)
    assert code == 0 and rep["ok"] and not rep["damaged"] and rep["arrays"] >= 10


def test_cli_subprocess_one_line_without_traceback(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    r = subprocess.run([sys.executable, "-m", "datamodels.cli", "train", str(p), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "appears twice" in r.stderr


def test_errors_doc_has_40_rows_each_backed_by_a_test_here():
    import re

    table = (ROOT / "docs" / "errors.md").read_text().split("## The table", 1)[1]
    rows = [ln for ln in table.splitlines() if re.match(r"\| \d+[a-z]? \|", ln)]
    assert len(rows) >= 40
    here = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M))
    for row in rows:  # a test here, or `test_other.py::test_name` in another module
        named = set(re.findall(r"`(test_\w+)(?![\w.])", row))
        assert named or "::" in row, row
        assert named <= here, row
        for module, name in re.findall(r"`(test_\w+\.py)::(test_\w+)", row):
            assert re.search(rf"^def {name}\b", (ROOT / "tests" / module).read_text(), re.M), row

# --------------------------------------------------------------------------- sizes beyond a limit


def test_check_reads_a_fit_by_target_chunks_and_names_a_damaged_one(run, capsys, monkeypatch):
    import datamodels.fit as fit_mod

    monkeypatch.setattr(fit_mod, "_WEIGHT_CHUNK_BYTES", 4 * 120 * 500)  # 500 targets a chunk: 4 chunks
    assert cli.main(["fit", str(run), *FIT_SETS, "--no-progress"]) == 0
    g = fit_mod.fit_group(RunStore.open(run))
    assert g["weight"].chunks == (120, 500) and g["weight"].shape[1] > 1500
    monkeypatch.setattr(__import__("datamodels.check", fromlist=["x"]), "_READ_BYTES", 4 * 120 * 1000)
    assert check_run(run).ok
    path = f"datamodels/{g.basename}/weight"
    (run / path / "c" / "0" / "2").write_bytes(b"garbage")
    rep = check_run(run)
    assert [d.array for d in rep.damaged] == [path] and "c/0/2" in rep.damaged[0].message
    assert check_run(run, repair=True).ok
    code, _, err = run_cli(capsys, "query", run, "0")
    assert code == 2 and "datamodels fit" in one_line_error(err)


def test_ridge_beyond_its_gram_limit_is_refused_naming_the_lasso(run, capsys, monkeypatch):
    import datamodels.estimators as est

    monkeypatch.setattr(est, "GRAM_LIMIT", 100)  # the tiny run has N = 120
    before = tree_digest(run)
    code, _, err = run_cli(capsys, "fit", run, *FIT_SETS, "--estimator", "ridge", "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "fit.estimator=ridge: N=120 training examples" in line
    assert "limited to N <= 100" in line and "use fit.estimator=lasso" in line
    assert tree_digest(run) == before  # refused before anything was written


def test_more_than_2_24_models_in_float32_are_refused(run, capsys, monkeypatch):
    import datamodels.fit as fit_mod

    monkeypatch.setattr(fit_mod, "EXACT_ROWS", 4)  # as if the run had more than 2^24 models
    code, _, err = run_cli(capsys, "fit", run, *FIT_SETS, "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "8 usable models" in line and "exact up to 2^24" in line and "fit.dtype=float64" in line
    assert cli.main(["fit", str(run), *FIT_SETS, "--set", "fit.dtype=float64", "--no-progress"]) == 0
