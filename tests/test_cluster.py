"""Cluster runs on a real multi-node Ray cluster on 127.0.0.1 (ray.cluster_utils.Cluster):
nodes lost and added mid-run, requests nothing can satisfy, an unreachable address."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from conftest import completed, tiny_config
from datamodels import cluster as dm_cluster
from datamodels.collect import collect
from datamodels.errors import ClusterError
from datamodels.store import RunStore
from datamodels.train import subset_mask

# Fast failure detection, so a removed node is declared dead in seconds.
SYSTEM = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    dm_cluster.shutdown_pool()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": SYSTEM})
    yield c
    dm_cluster.shutdown_pool()
    ray.shutdown()
    c.shutdown()


def collect_until(cluster, out, cfg, rows: int):
    """Start ``collect`` on the cluster in a thread; return once ``rows`` models are written."""
    box = {}

    def target():
        try:
            box["result"] = collect(cfg, out, address=cluster.address, progress=False)
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    deadline = time.time() + 120
    while completed(out) < rows and time.time() < deadline:
        time.sleep(0.05)
    assert completed(out) < cfg.collect.models, "the run finished before the cluster could change"
    return t, box


def finish(t, box) -> dict:
    t.join(timeout=240)
    assert not t.is_alive() and "error" not in box, box.get("error")
    return box["result"]


def assert_rows_exactly_once(summary, out, cfg, m):
    store = RunStore.open(out)
    assert summary["completed"] == m and store.complete_mask().all()
    assert sorted(summary["trained"]) == list(range(m))  # every row written once: none lost, none twice
    masks = store.read("masks")
    for i in range(m):
        assert np.array_equal(masks[i], subset_mask(cfg.seed, i, masks.shape[1], cfg.collect.alpha))


def test_a_node_removed_mid_run_moves_its_work_to_live_nodes(cluster, tmp_path):
    keep = cluster.add_node(num_cpus=1)
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    cfg = tiny_config("collect.models=24", "collect.block_size=2", "train.epochs=6")
    out = tmp_path / "run"
    t, box = collect_until(cluster, out, cfg, 4)
    cluster.remove_node(doomed)
    s = finish(t, box)
    assert_rows_exactly_once(s, out, cfg, 24)
    assert s["retried"] >= 1  # the doomed node's blocks in flight were trained again elsewhere
    assert keep.node_id in s["by_node"]


def test_a_node_added_mid_run_is_used(cluster, tmp_path):
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    # A node takes seconds to join and start a worker (3-4 s on a quiet machine, more under load):
    # 40 epochs keep one worker busy ~15 s, so the late node joins with most of the work queued.
    cfg = tiny_config("collect.models=64", "collect.block_size=2", "train.epochs=40")
    out = tmp_path / "run"
    t, box = collect_until(cluster, out, cfg, 2)
    late = cluster.add_node(num_cpus=1)
    s = finish(t, box)
    assert_rows_exactly_once(s, out, cfg, 64)
    assert s["by_node"].get(late.node_id, 0) > 0, s["by_node"]


def test_a_request_nothing_can_satisfy_fails_in_one_line_within_the_timeout(cluster, tmp_path):
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    cfg = tiny_config("resources.gpus_per_worker=1", "resources.wait_timeout=3")
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as e:
        collect(cfg, tmp_path / "run", address=cluster.address, progress=False)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "\n" not in msg and "GPU" in msg and "resources.wait_timeout" in msg, msg
    assert RunStore.open(tmp_path / "run").complete_mask().sum() == 0  # nothing half-written


def test_an_unreachable_address_fails_before_anything_is_written(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        collect(tiny_config(), tmp_path / "run", address="127.0.0.1:1", progress=False)
    assert time.monotonic() - t0 < 10 and not (tmp_path / "run").exists()


ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--set", "data.train_size=120", "--set", "model.widths=[4, 8, 8, 8]", "--set", "train.epochs=2",
            "--set", "collect.block_size=4"]


def test_ray_job_submit_from_another_directory_puts_the_store_where_out_says(tmp_path):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1", "dashboard_port": port})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        out = tmp_path / "stores" / "run"
        submit = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", str(ROOT), "--"]
        r = subprocess.run(submit + ["datamodels", "run", "--out", str(out), "--no-progress", *TINY_RUN,
                                     "--set", "collect.models=24", "--set", "fit.n_lambdas=4", "--set", "eval.masks=3",
                                     "--set", "brittleness.full_models=1", "--set", "verify.targets=1",
                                     "--set", "verify.models=1", "--set", "verify.rounds=1"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert "succeeded" in r.stdout + r.stderr and "summary" in r.stdout
        store = RunStore.open(out)
        assert store.complete_mask().sum() == 24 and "brittleness" in store.group
        assert list(elsewhere.iterdir()) == []
        # A relative --out would land in Ray's temporary copy of the working dir: refused in one line.
        r = subprocess.run(submit + ["datamodels", "train", "pipelines/digits.yaml", "--out", "runs/x", *TINY_RUN],
                           cwd=elsewhere, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "temporary copy of --working-dir" in r.stdout + r.stderr
    finally:
        c.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_9_of_the_embedded_raylet_ends_the_command_and_a_rerun_finishes(tmp_path):
    import psutil

    out = tmp_path / "run"
    args = [sys.executable, "-m", "datamodels.cli", "train", str(ROOT / "pipelines" / "digits.yaml"), "--out",
            str(out), "--no-progress", *TINY_RUN, "--set", "collect.models=120", "--set", "train.epochs=4"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while completed(out) < 4 and time.time() < deadline:
        time.sleep(0.05)
    raylets = [k for k in psutil.Process(p.pid).children(recursive=True) if k.name() == "raylet"]
    assert len(raylets) == 1 and completed(out) < 120
    t0 = time.time()
    raylets[0].kill()
    _, err = p.communicate(timeout=180)
    assert p.returncode == 1 and time.time() - t0 < 120
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "raylet" in errors[0] and "re-run" in errors[0] and "Traceback" not in err
    before = completed(out)
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    store = RunStore.open(out)
    masks = store.read("masks")
    assert store.complete_mask().all() and len(masks) == 120 and before < 120
    for i in range(120):  # every row the one its index prescribes, each exactly once
        assert np.array_equal(masks[i], subset_mask(0, i, masks.shape[1], 0.5))
    assert store.models_table().keys()[:, 0].tolist() == list(range(120))


def test_fit_runs_as_a_ray_task_with_the_resources_asked_for(cluster, tmp_path):
    from dataclasses import replace

    from datamodels.config import FitConfig
    from datamodels.fit import fit_arrays, fit_run, load_datamodels, usable_rows

    cluster.add_node(num_cpus=1)  # the head offers no CPU: a fit task can only run on this node
    cluster.wait_for_nodes()
    cfg = tiny_config("collect.models=24", "resources.fit_on=cluster")
    out = tmp_path / "run"
    collect(cfg, out, address=cluster.address, progress=False)
    fc = FitConfig(n_lambdas=4, device="cpu")
    s = fit_run(out, fc, resources=cfg.resources, address=cluster.address)
    assert s["ran_on"] == "cluster" and s["models_used"] == 24
    weight, bias, _ = load_datamodels(out)
    here = fit_arrays(out, usable_rows(RunStore.open(out))[0], fc, cfg.seed)
    np.testing.assert_allclose(weight, here.weight, atol=1e-5)
    np.testing.assert_allclose(bias, here.bias, atol=1e-5)
    with pytest.raises(ClusterError, match="no fit task could start .*GPU"):
        fit_run(out, fc, resources=replace(cfg.resources, fit_gpus=1, wait_timeout=2), address=cluster.address)
    assert np.array_equal(load_datamodels(out)[0], weight)  # the failed fit left the stored one alone
