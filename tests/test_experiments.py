"""Experiments on the spec machinery: learning from a teacher's wrong labels, noisy distillation,
label corruption, the model's flat state, and L-inf PGD (known answers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_config
from datamodels.attacks import adversarial_accuracy, pgd_linf
from datamodels.data import load_dataset
from datamodels.experiments import KD_ARMS, learn_from_errors, noisy_kd, wrong_label_set
from datamodels.model import build_model, flat_state, load_flat_state, state_size
from datamodels.specs import ModelSpec, Subset, train_spec
from datamodels.store import RunStore
from datamodels.table import ModelTable
from datamodels.train import corrupt_labels, eval_options, train_on

LOCAL = "resources.executor=local"


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 1 / 3, 0.999])
def test_corruption_rate_is_exact(fraction):
    y = torch.from_numpy(np.random.default_rng(0).integers(0, 10, size=1001))
    new = corrupt_labels(y, fraction, num_classes=10, seed=3)
    changed = (new != y).numpy()
    assert changed.sum() == int(np.floor(fraction * 1001 + 0.5))
    assert new.min() >= 0 and new.max() < 10
    assert torch.equal(new, corrupt_labels(y, fraction, num_classes=10, seed=3))  # a function of the seed
    if 0 < fraction < 0.9:
        other = corrupt_labels(y, fraction, num_classes=10, seed=4)
        assert not torch.equal(new, other) and int((other != y).sum()) == changed.sum()


def test_wrong_label_set_only_holds_changed_labels():
    rng = np.random.default_rng(1)
    logits, y = rng.normal(size=(500, 7)), rng.integers(0, 7, size=500)
    idx, new = wrong_label_set(logits, y)
    assert len(idx) > 0 and np.all(new != y[idx]) and np.all(new == logits[idx].argmax(1))
    rest = np.setdiff1d(np.arange(500), idx)
    assert np.all(logits[rest].argmax(1) == y[rest])


def test_flat_state_round_trip():
    cfg = tiny_config()
    ds = load_dataset(cfg.data)
    model = train_on(ds, torch.arange(60), cfg, seed=5)
    flat = flat_state(model)
    assert flat.shape == (state_size(cfg.model.widths, 1, 10),) and flat.dtype == np.float32
    copy = load_flat_state(build_model(cfg.model, 1, 10), flat).eval()
    kw = eval_options(ds, cfg, torch.device("cpu"))
    x = (ds.test_x[:50].float() / 255 - kw["mean"]) / kw["std"]
    with torch.no_grad():
        assert torch.equal(model(x), copy(x))
    with pytest.raises(ValueError, match="expected"):
        load_flat_state(build_model(cfg.model, 1, 10), flat[:-1])


def test_pgd_matches_the_analytic_attack_on_a_linear_model():
    """For logits W x, the worst L-inf perturbation of a 2-class margin is -eps sign(w_y - w_other):
    the margin drops by exactly eps ||w_y - w_other||_1 (pixels far from the box edges)."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 2, bias=False)
    model = nn.Sequential(nn.Flatten(), lin)
    x = 0.3 + 0.4 * torch.rand(16, 1, 3, 4)
    y = torch.randint(0, 2, (16,))
    mean, std = torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.25).view(1, 1, 1, 1)
    eps = 0.05
    adv = pgd_linf(model, x, y, eps=eps, mean=mean, std=std, steps=20)
    w = lin.weight.detach()
    d = (w[y] - w[1 - y]).view(16, 1, 3, 4)  # margin direction of each example
    assert torch.allclose(adv, x - eps * d.sign(), atol=1e-6)

    def margin(z):
        out = model((z - mean) / std)
        return out.gather(1, y[:, None])[:, 0] - out.gather(1, (1 - y)[:, None])[:, 0]

    drop = margin(x) - margin(adv)
    assert torch.allclose(drop, eps * d.view(16, -1).abs().sum(1) / 0.25, atol=1e-5)


def test_pgd_lowers_accuracy_and_keeps_its_promises():
    cfg = tiny_config("data.train_size=400", "model.widths=[8, 16, 16, 16]", "train.epochs=8")
    ds = load_dataset(cfg.data)
    model = train_on(ds, torch.arange(ds.num_train), cfg, seed=0)
    kw = eval_options(ds, cfg, torch.device("cpu"))
    x, y = ds.test_x[:300].float() / 255, ds.test_y[:300]
    acc = adversarial_accuracy(model, ds.test_x[:300], y, [0.0, 0.1], mean=kw["mean"], std=kw["std"])
    assert acc[0.0] > 0.5 and acc[0.1] < acc[0.0] - 0.1
    adv = pgd_linf(model, x, y, eps=0.05, mean=kw["mean"], std=kw["std"], random_start=True,
                   generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        ce = lambda z: nn.functional.cross_entropy(model((z - kw["mean"]) / kw["std"]), y, reduction="none")
        assert torch.all(ce(adv) >= ce(x))  # the loss it promises never falls below the clean loss
        assert (ce(adv) > ce(x) + 1e-3).float().mean() > 0.5


def test_corrupted_run_trains_on_corrupted_labels_but_scores_true_ones():
    cfg = tiny_config("train.label_corruption=0.999")
    ds = load_dataset(cfg.data)
    spec = ModelSpec(key=(0,), seed=1, subset=Subset.all_but(), outputs=("train_margins",))
    r = train_spec(ds, cfg, spec)
    clean = train_spec(ds, tiny_config(), spec)
    # every training label is wrong: the model fits them, so it gets its own training set wrong
    assert (r["train_margins"] > 0).mean() < (clean["train_margins"] > 0).mean()


def test_learn_from_errors_end_to_end_and_resume(tmp_path):
    cfg = tiny_config(LOCAL, "train.epochs=3")
    out = tmp_path / "lfe"
    r = learn_from_errors(cfg, out, seeds=2, teacher_epochs=1, progress=False)
    table = ModelTable(RunStore.open(out).group["experiments/learn-from-errors/models"])
    assert table.complete_mask().all() and len(table) == 6
    y = RunStore.open(out).read("train_labels")
    for s in range(2):
        teacher, student, truth = table.rows_of([(0, s), (1, s), (2, s)])
        pred = table.read("train_logits", [teacher])[0].argmax(1)
        wrong = np.flatnonzero(pred != y)
        labels = table.read("labels", [student])[0]
        assert np.array_equal(np.flatnonzero(labels >= 0), wrong)  # relabelled = exactly the wrong set
        assert np.all(labels[wrong] != y[wrong]) and np.all(labels[wrong] == pred[wrong])
        assert np.array_equal(np.flatnonzero(table.read("masks", [student])[0]), wrong)
        assert np.array_equal(table.read("masks", [truth])[0], table.read("masks", [student])[0])
        assert np.all(table.read("labels", [truth])[0] == -1)
        assert r["per_seed"][s]["wrong_set"] == len(wrong)
    assert r["chance"] == 0.1 and r["student_accuracy"]["mean"] is not None
    seconds = table.read("seconds")
    again = learn_from_errors(cfg, out, seeds=2, teacher_epochs=1, progress=False)  # resume: nothing retrains
    assert np.array_equal(table.read("seconds"), seconds)
    assert again["per_seed"] == r["per_seed"]


def test_noisy_kd_arms_end_to_end(tmp_path):
    cfg = tiny_config(LOCAL)
    out = tmp_path / "kd"
    r = noisy_kd(cfg, out, seeds=1, epsilons=(0.0, 0.1), pgd_steps=3, progress=False)
    assert list(r["arms"]) == ["teacher", *KD_ARMS]
    for arm in r["arms"].values():
        clean, attacked = arm["accuracy"]["0"]["mean"], arm["accuracy"]["0.1"]["mean"]
        assert 0 <= attacked <= clean <= 1
    table = ModelTable(RunStore.open(out).group["experiments/noisy-kd/models"])
    assert table.complete_mask().all() and len(table) == 1 + len(KD_ARMS)
    # clean accuracy from the stored margins agrees with the attack's eps = 0 on the stored params
    margins = table.read("test_margins", table.rows_of([(0, 0)]))[0]
    assert abs((margins > 0).mean() - r["arms"]["teacher"]["accuracy"]["0"]["mean"]) < 0.01
    # arms differ in what they train: distinct digests, and the teacher is part of a student's
    digests = table.read("digests")
    assert len(set(digests.tolist())) == len(digests)


def _brittle_run(where, *overrides):
    from datamodels.brittleness import brittleness
    from datamodels.collect import collect
    from test_brittleness import fit_least_squares

    cfg = tiny_config(LOCAL, "collect.models=12", "brittleness.full_models=2", "brittleness.thresholds=[0, -1]",
                      *overrides)
    collect(cfg, where, progress=False)
    fit_least_squares(RunStore.open(where, mode="r+"))
    brittleness(where, cfg=cfg, progress=False, cdf_path=f"{where}_cdf")
    return where


def test_brittleness_of_a_corrupted_run_next_to_the_clean_one(tmp_path):
    import subprocess
    import sys

    from datamodels.brittleness import compare_brittleness, read_brittleness
    from datamodels.errors import ConfigError
    from datamodels.reports import cdf_table

    clean = _brittle_run(tmp_path / "clean")
    noisy = _brittle_run(tmp_path / "noisy", "train.label_corruption=0.2")
    r = compare_brittleness([clean, noisy], out=tmp_path / "cmp")
    assert [x["label"] for x in r["runs"]] == ["clean: clean labels", "noisy: 20% labels corrupted"]
    assert [x["label_corruption"] for x in r["runs"]] == [0.0, 0.2] and r["thresholds"] == [0.0, -1.0]
    header = (tmp_path / "cmp.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["k", "clean: clean labels|remove_C=0", "clean: clean labels|remove_C=-1"]
    assert len(header) == 1 + 2 * 2 * 2
    table = np.loadtxt(tmp_path / "cmp.csv", delimiter=",", skiprows=1, ndmin=2)
    # every column is the run's own stored CDF (the single-run report's numbers), padded to the longest k
    for i, run in enumerate((clean, noisy)):
        e = read_brittleness(RunStore.open(run))
        for m, mode in enumerate(("remove", "flip")):
            ks, frac = cdf_table(e[f"k_{mode}"], e["status"], e["thresholds"])
            for c in range(2):
                col = table[:, 1 + 4 * i + 2 * m + c]
                assert np.allclose(col[: len(ks)], frac[:, c], atol=1e-6) and np.allclose(col[len(ks):], frac[-1, c], atol=1e-6)
    assert np.all(np.diff(table[:, 1:], axis=0) >= 0) and (tmp_path / "cmp.png").stat().st_size > 5000
    assert r["runs"][1]["summary"]["targets"] == RunStore.open(noisy).dims["T"]
    with pytest.raises(ConfigError, match="not \\[-3.0\\]"):
        compare_brittleness([clean, noisy], thresholds=[-3.0], out=tmp_path / "x")
    with pytest.raises(ConfigError, match="at least 2"):
        compare_brittleness([clean])
    # the command line, default output next to the first run
    p = subprocess.run([sys.executable, "-m", "datamodels.cli", "brittleness-compare", str(clean), str(noisy),
                        "--threshold", "0"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "20% labels corrupted" in p.stdout and "median k" in p.stdout
    assert (tmp_path / "clean_vs_noisy_brittleness_cdf.png").exists()
    p = subprocess.run([sys.executable, "-m", "datamodels.cli", "brittleness-compare", str(clean), str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
