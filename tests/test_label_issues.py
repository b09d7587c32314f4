"""Label issues: planted label noise, out-of-sample probabilities from the collect table's logits
(their resume), confident learning, datamodel explanations, the CLI and the benchmark table.

Runs are trained in-process (``resources.executor=local``) at the tiny size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from datamodels.cli import main
from datamodels.collect import collect
from datamodels.config import FitConfig, load_config
from datamodels.data import load_dataset
from datamodels.errors import ConfigError, StoreError
from datamodels.fit import fit_run
from datamodels.label_issues import (BENCH_TABLE, bench_arms, benchmark, find_issues, label_issues,
                                     oos_probabilities, precision_recall)
from datamodels.label_noise import draw_label_flips, planted_label_noise
from datamodels.store import RunStore
from datamodels.table import ModelTable
from datamodels.train import corrupt_labels

NOISE = ("data.label_noise=0.1", "data.label_noise_split=both")


def local(*overrides):
    return tiny_config("resources.executor=local", *overrides)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """24 tiny models (the first 16 with logits) on digits with 10% of both splits' labels
    flipped, and a lasso fit of test and training targets."""
    run = tmp_path_factory.mktemp("li") / "noisy"
    collect(local("collect.models=24", "collect.logit_models=16", *NOISE), run, progress=False)
    fit_run(run, FitConfig(n_lambdas=5, min_models=20, device="cpu", targets="test+train"))
    return run


# --------------------------------------------------------------------------- planted noise


@pytest.mark.parametrize("share,split", [(0.05, "test"), (0.2, "train"), (0.5, "both")])
def test_label_noise_rates_are_exact_and_never_the_original_class(share, split):
    clean = load_dataset(tiny_config().data)
    noisy = load_dataset(tiny_config(f"data.label_noise={share}", f"data.label_noise_split={split}").data)
    rec = noisy.split["label_noise"]
    planted = planted_label_noise(noisy.describe())
    for part in ("train", "test"):
        y0, y1 = getattr(clean, f"{part}_y").numpy(), getattr(noisy, f"{part}_y").numpy()
        changed = np.flatnonzero(y0 != y1)
        if split not in (part, "both"):
            assert len(changed) == 0 and part not in rec
            continue
        assert len(changed) == int(np.floor(share * len(y0) + 0.5))  # exact count, every one a new class
        idx, true = planted[part]
        assert idx.tolist() == changed.tolist() and true.tolist() == y0[changed].tolist()
        assert rec[part]["given"] == y1[changed].tolist() and (y1[changed] != y0[changed]).all()
    assert noisy.fingerprint() != clean.fingerprint()
    again = load_dataset(tiny_config(f"data.label_noise={share}", f"data.label_noise_split={split}").data)
    assert again.fingerprint() == noisy.fingerprint()  # seeded: the same draw every load
    assert noisy.train_x is clean.train_x or torch.equal(noisy.train_x, clean.train_x)


def test_flip_draw_is_uniform_over_other_classes_and_corruption_uses_it():
    y = np.arange(20000) % 5
    idx, new = draw_label_flips(y, 0.5, num_classes=5, entropy=[3, 7])
    assert len(idx) == 10000 == len(set(idx.tolist())) and (new != y[idx]).all()
    shift = (new - y[idx]) % 5
    assert np.allclose(np.bincount(shift, minlength=5)[1:] / len(idx), 0.25, atol=0.02)  # K - 1 classes alike
    # train.label_corruption is the same draw from (seed, CORRUPTION_DOMAIN): the recipe's corrupted labels
    yt = torch.from_numpy(y)
    from datamodels.train import CORRUPTION_DOMAIN

    i2, n2 = draw_label_flips(y, 0.2, num_classes=5, entropy=[4, CORRUPTION_DOMAIN])
    c = corrupt_labels(yt, 0.2, num_classes=5, seed=4).numpy()
    assert np.flatnonzero(c != y).tolist() == sorted(i2.tolist()) and (c[i2] == n2).all()


def test_a_changed_label_noise_is_refused_naming_the_key(tmp_path):
    run = tmp_path / "r"
    collect(local("collect.models=2", "collect.logit_models=1"), run, progress=False)
    with pytest.raises(StoreError, match=r"data.label_noise: store has 0.0, config has 0.05"):
        collect(local("collect.models=2", "data.label_noise=0.05"), run, progress=False)


# --------------------------------------------------------------------------- probabilities


def test_oos_probabilities_equal_a_brute_force_average(noisy_run):
    store = RunStore.open(noisy_run)
    t = store.models_table()
    assert t.holds("train_logits").tolist() == [True] * 16 + [False] * 8
    assert t.group["train_logits"].dtype == np.float16 and t.group["test_logits"].shape[1:] == (t.dims["T"], 10)
    masks = t.read("masks", np.arange(16))
    for split in ("train", "test"):
        logits = t.read(f"{split}_logits", np.arange(16)).astype(np.float64)
        oos = oos_probabilities(store, split)
        n = logits.shape[1]
        for j in range(n):
            use = [m for m in range(16) if split == "test" or not masks[m, j]]
            assert oos.models[j] == len(use)
            if not use:
                assert np.isnan(oos.probs[j]).all()
                continue
            p = [np.exp(logits[m, j] - logits[m, j].max()) / np.exp(logits[m, j] - logits[m, j].max()).sum()
                 for m in use]
            assert np.allclose(oos.probs[j], np.mean(p, axis=0), atol=1e-12)
        assert oos.rows.tolist() == list(range(16))


def test_examples_never_out_of_sample_are_counted_and_left_out(noisy_run, tmp_path):
    store = RunStore.open(noisy_run)
    oos = oos_probabilities(store, "train")
    r = label_issues(store, split="train", top=0, explain_top=False)["splits"]["train"]
    never = int((oos.models == 0).sum())
    assert r["never_out_of_sample"] == never and r["with_probabilities"] == 120 - never
    assert (r["note"] is None) == (never == 0) and set(r["flagged_indices"]) <= set(np.flatnonzero(oos.valid))


# --------------------------------------------------------------------------- confident learning


def test_precision_and_recall_on_a_planted_case():
    """Known answer: confident, correct probabilities; 5% of the labels flipped. Confident learning
    flags exactly the flipped labels and suggests their true class."""
    rng = np.random.default_rng(0)
    k, n = 10, 2000
    true = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k) * 0.3, n) * 0.2
    probs[np.arange(n), true] += 0.8
    idx, new = draw_label_flips(true, 0.05, num_classes=k, entropy=[1, 2])
    given = true.copy()
    given[idx] = new
    res = find_issues(probs, given)
    pr = precision_recall(res["flagged"], idx)
    assert pr == {"flagged": 100, "planted": 100, "true_positives": 100, "precision": 1.0, "recall": 1.0}
    assert (res["suggested"][idx] == true[idx]).all()
    q = res["quality"][res["flagged"]]
    assert (np.diff(q) >= 0).all()  # ranked: lowest label quality first
    assert precision_recall([1, 2, 3, 4], [3, 4, 5]) == {"flagged": 4, "planted": 3, "true_positives": 2,
                                                         "precision": 0.5, "recall": 2 / 3}


def test_report_precision_recall_and_explanations(noisy_run):
    store = RunStore.open(noisy_run)
    res = label_issues(store, top=4)
    planted = planted_label_noise(dict(store.group.attrs["dataset"]))
    train_y = store.read("train_labels")
    for split, r in res["splits"].items():
        idx, true = planted[split]
        oos = oos_probabilities(store, split)
        expect = precision_recall(r["flagged_indices"], idx[oos.valid[idx]])
        assert {k: r["planted"][k] for k in expect} == expect
        for issue in r["issues"]:
            assert issue["planted"] == (issue["index"] in idx.tolist()) and issue["suggested"] != issue["given"]
            e = issue["explanation"]
            w = [x["weight"] for x in e["toward_given"]]
            assert all(v > 0 for v in w) and w == sorted(w, reverse=True)
            for x in e["toward_suggested"]:
                assert x["weight"] < 0 and x["label"] == issue["suggested"] == train_y[x["index"]]
            if split == "train":
                assert issue["index"] not in [x["index"] for x in e["toward_given"] + e["toward_suggested"]]
                assert "self_weight" in e


def test_train_explanations_need_training_targets(tmp_path):
    run = tmp_path / "r"
    collect(local("collect.models=20", "collect.logit_models=8"), run, progress=False)
    fit_run(run, FitConfig(n_lambdas=3, min_models=20, device="cpu"))
    r = label_issues(run, split="train", top=2)["splits"]["train"]
    assert r["issues"] and all("explanation" not in i for i in r["issues"])
    assert "--targets test+train" in r["explanations_note"]


# --------------------------------------------------------------------------- the CLI


def test_cli_json_fields_and_plot(noisy_run, tmp_path, capsys):
    plot = tmp_path / "issues.png"
    assert main(["label-issues", str(noisy_run), "--json", "--top", "3", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"run", "classes", "filter_by", "splits", "plot", "fit"} and out["plot"] == str(plot)
    assert plot.stat().st_size > 1000 and out["fit"] == "lasso"
    for split in ("test", "train"):
        r = out["splits"][split]
        assert set(r) >= {"examples", "with_probabilities", "never_out_of_sample", "models", "flagged",
                          "flagged_rate", "flagged_indices", "suggested_labels", "issues", "planted",
                          "suggested_is_true"}
        assert r["models"] == 16 and len(r["issues"]) == min(3, r["with_probabilities"])
        assert set(r["planted"]) >= {"precision", "recall", "planted", "true_positives"}
        for i in r["issues"]:
            assert set(i) >= {"index", "flagged", "given", "suggested", "quality", "planted", "true", "explanation"}
        ranked = [i["index"] for i in r["issues"]]
        assert ranked == r["flagged_indices"][:len(ranked)] or not all(i["flagged"] for i in r["issues"])
    assert main(["label-issues", str(noisy_run), "--split", "test", "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "precision" in text and "toward given" in text and "train:" not in text


def test_a_run_without_logits_gets_one_line_with_the_fix_then_only_they_are_trained(tmp_path, capsys, monkeypatch):
    """A store made before collect.logit_models existed: label-issues names the fix; the fix
    trains only the first M' models again, keeps their margins, and writes just their logits;
    a crash before a row's logits count leaves them to the next call."""
    run = tmp_path / "old"
    cfg = local("collect.models=8", "collect.logit_models=0")
    collect(cfg, run, progress=False)
    store = RunStore.open(run, mode="r+")  # strip it back to the layout of a store made before logits
    g = store.group["models"]
    for name in ("test_logits", "train_logits", "has_test_logits", "has_train_logits"):
        del g[name]
    meta = dict(g.attrs["table"])
    meta.pop("partial"), meta.pop("dtypes")
    g.attrs["table"] = meta
    raw = dict(store.group.attrs["config"])
    raw["collect"] = {k: v for k, v in raw["collect"].items() if k != "logit_models"}
    store.group.attrs["config"] = raw
    before = {k: RunStore.open(run).read(k) for k in ("masks", "test_margins", "train_margins", "seconds")}

    assert main(["label-issues", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no collect model records logits" in err
    assert "--models 8 --set collect.logit_models=8" in err

    calls = {"n": 0}
    put = ModelTable._put

    def crash_once(self, name, sel, values):  # the driver dies between a block's logits and their flags
        if name == "has_test_logits" and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt
        return put(self, name, sel, values)

    monkeypatch.setattr(ModelTable, "_put", crash_once)
    with pytest.raises(KeyboardInterrupt):
        collect(local("collect.models=8", "collect.logit_models=6"), run, progress=False)
    monkeypatch.setattr(ModelTable, "_put", put)
    t = RunStore.open(run).models_table()
    assert t.complete_mask().all() and not t.holds("test_logits").any()
    s = collect(local("collect.models=8", "collect.logit_models=6"), run, progress=False)
    assert s["trained"] == [0, 1, 2, 3, 4, 5]
    assert collect(local("collect.models=8", "collect.logit_models=6"), run, progress=False)["trained"] == []
    store = RunStore.open(run)
    t = store.models_table()
    assert t.holds("test_logits").tolist() == [True] * 6 + [False] * 2
    for k, v in before.items():  # the margins (and everything else) of the old rows are kept
        assert np.array_equal(store.read(k), v, equal_nan=True)
    assert store.config.collect.logit_models == 6
    # the logits are the same models': their margins match the stored ones up to float16 rounding
    logits = t.read("test_logits", np.arange(6)).astype(np.float32)
    y = store.read("test_labels")
    from datamodels.train import margin_from_logits

    m = np.stack([margin_from_logits(torch.from_numpy(lg), torch.from_numpy(y)).numpy() for lg in logits])
    assert np.allclose(m, before["test_margins"][:6], atol=0.02)
    assert label_issues(run, split="test", top=0)["splits"]["test"]["models"] == 6


# --------------------------------------------------------------------------- benchmark


def test_benchmark_table_accuracies_resume_and_figure(noisy_run, tmp_path):
    sets = ["label_issues.bench_models=2",
            "label_issues.bench_arms=['model.widths=[4, 8, 8, 8]', 'model.widths=[8, 8, 8, 8]; train.epochs=3']"]
    cfg = RunStore.open(noisy_run).config.replace(label_issues=load_config(None, sets).label_issues)
    fig = str(tmp_path / "bench.png")
    res = benchmark(noisy_run, cfg, figure=fig, progress=False)
    store = RunStore.open(noisy_run)
    t = ModelTable(store.group[BENCH_TABLE])
    assert sorted(map(tuple, t.keys().tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)] and t.complete_mask().all()
    assert res["variants"] == ["original", "removed", "relabelled", "true"] and res["figure"] == fig
    issues = label_issues(store, split="test", explain_top=False)["splits"]["test"]
    flagged = np.asarray(issues["flagged_indices"])
    given = store.read("test_labels")
    relabelled = given.copy()
    relabelled[flagged] = issues["suggested_labels"]
    idx, true_l = planted_label_noise(dict(store.group.attrs["dataset"]))["test"]
    truth = given.copy()
    truth[idx] = true_l
    keep = np.setdiff1d(np.arange(len(given)), flagged)
    for a, arm in enumerate(res["arms"]):
        pred = t.read("test_logits", t.rows_of([(a, 0), (a, 1)])).argmax(axis=2)
        acc = res["accuracy"][arm]
        assert np.allclose(acc["original"]["values"], (pred == given).mean(axis=1))
        assert np.allclose(acc["removed"]["values"], (pred[:, keep] == given[keep]).mean(axis=1))
        assert np.allclose(acc["relabelled"]["values"], (pred == relabelled).mean(axis=1))
        assert np.allclose(acc["true"]["values"], (pred == truth).mean(axis=1))
    for v in ("removed", "relabelled", "true"):
        assert res["ranking_changes"][v] == (res["ranking"][v] != res["ranking"]["original"])
    assert (tmp_path / "bench.png").stat().st_size > 1000
    seeds = t.read("seeds", t.rows_of([(0, 1), (1, 1)]))
    assert seeds[0] == seeds[1]  # model f of every configuration starts from the same seed
    again = benchmark(noisy_run, cfg, figure=fig, progress=False)  # resumes: nothing retrained
    assert again["accuracy"] == res["accuracy"]
    assert np.array_equal(ModelTable(RunStore.open(noisy_run).group[BENCH_TABLE]).read("seconds"), t.read("seconds"))


@pytest.mark.parametrize("arms,match", [
    (["model.widths=[4, 8, 8, 8]"], "two or more"),
    (["data.label_noise=0.1", "model.widths=[4, 8, 8, 8]"], r"bench_arms\[0\].*model\.\* or train\.\*"),
    (["model.widths=[4, 8]", "train.epochs=3"], r"bench_arms\[0\].*model.widths"),
])
def test_bad_benchmark_configurations_are_refused_naming_the_entry(arms, match):
    cfg = local().replace(label_issues=load_config(None, [f"label_issues.bench_arms={arms!r}"]).label_issues)
    with pytest.raises(ConfigError, match=match):
        bench_arms(cfg)


def test_cli_benchmark_json(noisy_run, capsys):
    arms = "['model.widths=[4, 8, 8, 8]', 'model.widths=[8, 8, 8, 8]']"
    assert main(["label-issues", str(noisy_run), "--split", "test", "--top", "1", "--benchmark", "--json",
                 "--set", "label_issues.bench_models=1", "--set", f"label_issues.bench_arms={arms}",
                 "--set", "resources.executor=local", "--no-progress"]) == 0
    b = json.loads(capsys.readouterr().out)["benchmark"]
    assert b["arms"] == ["model.widths=[4, 8, 8, 8]", "model.widths=[8, 8, 8, 8]"] and b["models_per_arm"] == 1
    assert set(b["ranking_changes"]) == {"removed", "relabelled", "true"} and b["figure"].endswith(
        "noisy_label_issues_benchmark.png")
    assert main(["label-issues", str(noisy_run), "--set", "fit.n_lambdas=3"]) == 2
    assert "only label_issues.*, resources.* keys" in capsys.readouterr().err


def test_without_cleanlab_the_error_names_the_install_command(noisy_run, monkeypatch, capsys):
    import sys

    for name in [m for m in sys.modules if m == "cleanlab" or m.startswith("cleanlab.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # `import cleanlab` raises ImportError
    assert main(["label-issues", str(noisy_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'datamodels[labels]'" in err


def test_check_reads_logits_only_of_the_rows_that_hold_them(tmp_path):
    """Rows past collect.logit_models hold no logits (they read as NaN fill): not diverged; a row
    whose logits are not finite is."""
    from datamodels.check import check_run

    run = tmp_path / "r"
    collect(local("collect.models=4", "collect.logit_models=2"), run, progress=False)
    assert check_run(run).diverged == {}
    t = RunStore.open(run, mode="r+").models_table()
    bad = t.read("train_logits", [1])
    bad[0, 0, 0] = np.inf
    t.group["train_logits"][1] = bad[0]
    assert check_run(run).diverged == {"models": [1]}


def test_the_ranking_goes_on_past_the_flagged_set(noisy_run):
    """With fewer flagged than --top, the unflagged examples of lowest label quality follow."""
    store = RunStore.open(noisy_run)
    f = label_issues(store, split="test", top=0)["splits"]["test"]["flagged"]
    r = label_issues(store, split="test", top=f + 5, explain_top=False)["splits"]["test"]
    assert [i["flagged"] for i in r["issues"]] == [True] * f + [False] * 5
    assert [i["index"] for i in r["issues"][:f]] == r["flagged_indices"]
    oos = oos_probabilities(store, "test")
    quality = oos.probs[np.arange(len(oos.probs)), store.read("test_labels")]
    rest = np.setdiff1d(np.arange(len(quality)), r["flagged_indices"])
    lowest = rest[np.argsort(quality[rest], kind="stable")][:5]
    assert [i["index"] for i in r["issues"][f:]] == lowest.tolist()  # self-confidence: p(given label)
