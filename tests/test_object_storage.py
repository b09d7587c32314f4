"""A run on object storage: every stage against an S3 API server started on 127.0.0.1 (moto),
from the command line, with nothing written to a local folder."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from datamodels.cli import main
from datamodels.claim import read_claim
from datamodels.fit import load_datamodels
from datamodels.storage import Location
from datamodels.store import RunStore
from datamodels.table import ModelTable

pytestmark = pytest.mark.usefixtures("ray_local")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bucket")
    yield boto3.client("s3")
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def sets(*extra):
    out = []
    for s in list(TINY) + list(extra):
        out += ["--set", s]
    return out


def test_every_stage_runs_on_s3_and_writes_nothing_locally(s3, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    run = "s3://bucket/runs/tiny"
    assert main(["train", str(ROOT / "pipelines" / "digits.yaml"), "--out", run, "--no-progress",
                 *sets("collect.models=24", "train.epochs=3")]) == 0
    assert main(["fit", run, "--no-progress", "--set", "fit.n_lambdas=5"]) == 0
    assert main(["evaluate", run, "--masks", "3", "--repeats", "2", "--no-progress"]) == 0
    assert main(["brittleness", run, "--no-progress", "--set", "brittleness.full_models=2"]) == 0
    capsys.readouterr()
    assert main(["verify", run, "--sample", "1", "--models", "1", "--rounds", "1", "--no-progress", "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert main(["query", run, "0", "--json", "--plot", "s3://bucket/reports/t0.png"]) == 0
    q = json.loads(capsys.readouterr().out)
    arms = "['model.widths=[4, 8, 8, 8]', 'model.widths=[8, 8, 8, 8]']"
    assert main(["label-issues", run, "--json", "--top", "2", "--plot", "s3://bucket/reports/issues.png", "--benchmark",
                 "--set", "label_issues.bench_models=1", "--set", f"label_issues.bench_arms={arms}",
                 "--no-progress"]) == 0
    issues = json.loads(capsys.readouterr().out)
    assert main(["status", run, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)

    # Results read back from the bucket.
    store = RunStore.open(run)
    assert status["completed"] == 24 and store.complete_mask().all() and not store.loc.local
    weight, bias, _ = load_datamodels(store)
    assert weight.shape == (120, store.dims["T"]) and np.isfinite(weight).all()
    assert store.group["eval"].attrs["report"]["E"] == 3
    assert q["target"] == 0 and q["models"] == 24
    assert verified["summary"]["checked"] + verified["summary"]["skipped"] == 1
    assert issues["splits"]["test"]["models"] == 24 and issues["splits"]["train"]["models"] == 24
    assert issues["plot"] == "s3://bucket/reports/issues.png" and len(issues["benchmark"]["arms"]) == 2
    assert ModelTable(store.group["label_issues/bench/models"]).complete_mask().tolist() == [True, True]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="bucket")["Contents"]}
    assert "runs/tiny/zarr.json" in keys and "runs/tiny_brittleness_cdf.png" in keys and "reports/t0.png" in keys
    assert "reports/issues.png" in keys and "runs/tiny_label_issues_benchmark.png" in keys
    assert read_claim(Location(run)) is None  # every command released its claim
    # ... and nothing at all on the local disk.
    assert list(work.iterdir()) == []
    assert not any(p.name.startswith("s3") for p in tmp_path.rglob("*"))
