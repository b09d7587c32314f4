"""The console script, run as a user would (subprocesses)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, completed
from datamodels.fit import load_datamodels
from datamodels.store import RunStore

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=240, **kw):
    return subprocess.run([sys.executable, "-m", "datamodels.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)


def sets(*extra):
    out = []
    for s in list(TINY) + list(extra):
        out += ["--set", s]
    return out


def test_help_explains_the_subcommands():
    r = cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "status" in r.stdout and "--set" in r.stdout
    r = cli("train", "--help")
    assert "--models" in r.stdout and "--address" in r.stdout and "extends the run" in r.stdout


def test_train_then_status_json(tmp_path):
    out = tmp_path / "run"
    r = cli("train", "pipelines/digits.yaml", "--out", str(out), "--models", "4", "--no-progress", *sets())
    assert r.returncode == 0, r.stderr
    s = json.loads(cli("status", str(out), "--json").stdout)
    assert s["requested"] == 4 and s["completed"] == 4 and s["config_name"] == "tiny"
    assert 0 < s["mean_test_accuracy"] <= 1


@pytest.mark.parametrize("args,needle", [
    (["train", "pipelines/digits.yaml", "--out", "{tmp}/r", "--set", "collect.alpha=1.5"],
     "collect.alpha: expected a value in (0, 1], got 1.5"),
    (["train", "pipelines/digits.yaml", "--out", "{tmp}/r", "--set", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["train", "pipelines/digits.yaml", "--out", "{tmp}/r", "--models", "0"], "collect.models"),
    (["train", "pipelines/digits.yaml", "--out", "{tmp}/r", "--set", "data.dataset=cifar10",
      "--set", "data.root={tmp}/nocifar"], "no CIFAR-10 python batches"),
    (["train", "pipelines/digits.yaml", "--out", "{tmp}/file/r"], "is not a directory"),
    (["train", "{tmp}/nope.yaml", "--out", "{tmp}/r"], "config file not found"),
    (["status", "{tmp}/r"], "no run store"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, needle):
    (tmp_path / "file").write_text("x")
    r = cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_ctrl_c_leaves_a_consistent_store_and_rerun_finishes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "datamodels.cli", "train", "pipelines/digits.yaml", "--out", str(out),
            "--no-progress", *sets("collect.models=160", "train.epochs=10")]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN:
    # give the command the default disposition, as a terminal's Ctrl-C would find it.
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and completed(out) < 2:
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "re-run the same command" in err
    store = RunStore.open(out)
    done = store.complete_mask()
    assert 0 < done.sum() < 160
    # every complete row is whole; nothing else claims completeness
    assert not np.isnan(store.read("test_margins")[done]).any()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert RunStore.open(out).complete_mask().all()


def test_main_job_trains_fits_and_reports_lds(tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--out", str(out), "--no-progress",
            *sets("collect.models=24", "fit.n_lambdas=5", "eval.masks=3", "eval.repeats=2",
                  "brittleness.full_models=2", "verify.targets=1", "verify.models=1", "verify.rounds=1"),
            timeout=600)
    assert r.returncode == 0, r.stderr
    assert "24/24 complete" in r.stdout and "LDS" in r.stdout and "noise ceiling" in r.stdout
    s = json.loads(cli("status", str(out), "--json").stdout)
    assert s["completed"] == 24
    store = RunStore.open(out)
    assert load_datamodels(store)[0].shape == (120, store.dims["T"])
    assert store.group["eval"].attrs["report"]["E"] == 3
