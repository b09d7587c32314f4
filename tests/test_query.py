"""`datamodels query` and the analysis subcommands' CLI, on a tiny collected run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config
from datamodels.brittleness import brittleness, read_brittleness
from datamodels.cli import main
from datamodels.fit import load_datamodels
from datamodels.query import query
from datamodels.store import RunStore
from datamodels.verify import verify
from test_brittleness import fit_least_squares, write_datamodels

pytestmark = pytest.mark.usefixtures("ray_local")

FIELDS = {"target", "label", "class", "models", "mean_margin", "accuracy", "datamodel", "brittleness", "verified",
          "supporters", "opposers"}


# Learns digits a little (the conftest default is too short to classify anything).
LEARNS = ("train.epochs=15", "train.lr=0.1", "train.batch_size=16", "train.translate=0",
          "model.widths=[8, 16, 16, 16]")


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    from datamodels.collect import collect

    out = tmp_path_factory.mktemp("q") / "run"
    collect(tiny_config(*LEARNS), out, progress=False)
    return out


@pytest.fixture(scope="module")
def analysed(run):
    """Fitted, brittleness for targets 0-9, one correctly classified target verified (1 model,
    1 round). Its ridge weights are scaled up so that its k is reachable (8 models say little)."""
    store = RunStore.open(run, mode="r+")
    w, b = fit_least_squares(store)
    cfg = tiny_config(*LEARNS, "brittleness.full_models=2")
    brittleness(run, targets="0-9", cfg=cfg, progress=False)
    base = read_brittleness(RunStore.open(run))["baseline"]
    t = next(i for i in range(10) if base[i] > 0)
    w[:, t] *= 2 * base[t] / np.clip(w[:, t], 0, None).sum()
    write_datamodels(store, w, b)
    brittleness(run, targets="0-9", cfg=cfg, progress=False)
    assert read_brittleness(RunStore.open(run))["status"][t] == "estimated"
    verify(run, [t], "remove", models=1, rounds=1, cfg=cfg, progress=False)
    return run, t


def test_query_needs_a_fit_and_a_valid_target(run, capsys):
    if "datamodels" not in RunStore.open(run).group:
        assert main(["query", str(run), "0"]) == 2
        assert f"datamodels fit {run}" in capsys.readouterr().err
    t = RunStore.open(run).dims["T"]
    assert main(["query", str(run), str(t)]) == 2
    assert f"[0, {t})" in capsys.readouterr().err


def test_query_json_prints_every_field(analysed, capsys):
    run, _ = analysed
    assert main(["query", str(run), "0", "--json", "--top", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(out)
    store = RunStore.open(run)
    margins = store.read("test_margins")[:, 0]
    assert out["target"] == 0 and out["label"] == int(store.read("test_labels")[0])
    assert out["models"] == 8 and out["mean_margin"] == pytest.approx(float(margins.mean()), rel=1e-5)
    assert out["accuracy"] == pytest.approx(float((margins > 0).mean()))
    w = load_datamodels(store)[0][:, 0]
    sup, opp = out["supporters"], out["opposers"]
    assert [e["index"] for e in sup] == np.argsort(-w, kind="stable")[:5].tolist()
    assert all(e["weight"] > 0 for e in sup) and all(e["weight"] < 0 for e in opp) and len(opp) == 5
    assert [e["weight"] for e in opp] == sorted(e["weight"] for e in opp)
    assert all(e["label"] == int(store.read("train_labels")[e["index"]]) for e in sup + opp)
    est = read_brittleness(store)
    b = out["brittleness"]
    assert b["status"] == est["status"][0] and b["full_set_margin"] == pytest.approx(float(est["baseline"][0]))
    want = [None if k < 0 else int(k) for k in est["k_remove"][0]]
    assert list(b["estimated"]["remove"].values()) == want and set(b["estimated"]) == {"remove", "flip"}


def test_query_reports_verification_and_plots(analysed, tmp_path, capsys):
    run, t = analysed
    res = query(run, t)
    checks = res["verified"]["remove"]["lasso"]["checks"]  # the current fit's ranking, by its name
    assert len(checks) == 1 and checks[0]["done"] and checks[0]["models"] == 1
    k0 = int(read_brittleness(RunStore.open(run))["k_remove"][t, 0])
    assert checks[0]["k"] == k0
    assert res["verified"]["remove"]["lasso"]["verified_k"] == (k0 if checks[0]["success"] else None)
    png = tmp_path / "q.png"
    assert main(["query", str(run), str(t), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert f"target {t}:" in text and "supporters:" in text and "verified remove/lasso" in text
    assert png.stat().st_size > 2000


def test_brittleness_and_verify_commands(analysed, tmp_path, capsys):
    run, t = analysed
    # Full-set models exist and the check is recorded: neither command trains anything here.
    assert main(["brittleness", str(run), "--targets", "0-9", "--full-models", "2", "--cdf", str(tmp_path / "c"),
                 "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["targets"] == list(range(10)) and (tmp_path / "c.csv").is_file() and (tmp_path / "c.png").is_file()
    assert main(["brittleness", str(run), "--targets", "0-9", "--set", "brittleness.full_models=2",
                 "--cdf", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "k quantiles" in capsys.readouterr().out
    assert main(["verify", str(run), "--targets", str(t), "--models", "1", "--rounds", "1", "--no-progress",
                 "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["trained"] == 0 and v["results"][0]["target"] == t and v["summary"]["checked"] == 1
    assert main(["verify", str(run), "--targets", str(t), "--models", "1", "--rounds", "1", "--no-progress"]) == 0
    assert f"target {t} [remove/lasso]" in capsys.readouterr().out
    # Verified brittleness: searches along the fit and a baseline, then the figure.
    cdf = tmp_path / "c"
    assert main(["brittleness", str(run), "--targets", "0-9", "--set", "brittleness.full_models=2", "--cdf", str(cdf),
                 "--verify", "--verify-targets", str(t), "--methods", "lasso,random", "--modes", "remove",
                 "--models", "1", "--rounds", "2", "--no-progress", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)["verified"]
    assert v["targets"] == [t] and [r["method"] for r in v["results"]] == ["lasso", "random"]
    assert v["results"][0]["checks"][0]["k"] == v["results"][0]["estimated_k"]  # starts at the estimate
    assert all(1 <= len(r["checks"]) <= 2 for r in v["results"]) and v["used"] == sum(
        len(r["checks"]) for r in v["results"])
    assert v["trained"] <= v["used"] - 1  # the fixture's check is reused
    assert set(v["summary"]["remove"]) == {"lasso", "random"}
    png = tmp_path / "c_verified.png"
    assert v["figure"]["png"] == str(png) and png.stat().st_size > 2000
    assert (tmp_path / "c_verified.csv").read_text().startswith("k,remove/lasso/verified,remove/lasso/estimated")
    # Again, printed: nothing trains, a table per method.
    assert main(["brittleness", str(run), "--targets", "0-9", "--set", "brittleness.full_models=2", "--cdf", str(cdf),
                 "--verify", "--verify-targets", str(t), "--methods", "lasso,random", "--modes", "remove",
                 "--models", "1", "--rounds", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "(0 trained now)" in text and "random" in text and str(png) in text
    # Bad input: exit 2 with a message naming what is wrong.
    for argv, msg in ((["verify", str(run), "--no-progress"], "exactly one of"),
                      (["verify", str(run), "--targets", "0", "--models", "0"], "--models"),
                      (["brittleness", str(run), "--set", "train.epochs=3"], "only brittleness"),
                      (["verify", str(run), "--targets", "99999"], "[0, "),
                      (["brittleness", str(run), "--sample", "3"], "need --verify"),
                      (["brittleness", str(run), "--verify", "--sample", "0"], "--sample: expected >= 1"),
                      (["brittleness", str(run), "--verify", "--methods", "oracle", "--verify-targets", "0"],
                       "method 'oracle'"),
                      (["brittleness", str(run), "--verify", "--modes", "erase", "--verify-targets", "0"], "--mode")):
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", str(run), "--targets", "0", "--mode", "erase"])


def test_main_job_analysis(analysed, tmp_path, capsys):
    from datamodels.cli_analysis import main_job_analysis

    run, t = analysed
    cfg = tiny_config(*LEARNS, "brittleness.full_models=2", "verify.targets=1", "verify.models=1",
                      "verify.rounds=1")
    out = main_job_analysis(str(run), cfg, progress=False)
    text = capsys.readouterr().out
    assert "k quantiles" in text and "verified brittleness: 1 targets" in text
    s = out["brittleness"]["summary"]
    assert s["targets"] == RunStore.open(run).dims["T"]
    assert out["verify"]["remove"]["checked"] == 1 and set(out["verified"]["summary"]) == {"remove", "flip"}
    assert out["verified"]["used"] == sum(len(r["checks"]) for r in out["verified"]["results"])  # K = 1
    assert out["verified"]["figure"]["png"].endswith("run_verified_cdf.png")
