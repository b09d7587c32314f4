"""Label errors found by confident learning on a run's own out-of-sample predictions, explained
by its datamodels, and what they do to a benchmark (Northcutt, Athalye, Mueller: "Pervasive label
errors in test sets destabilize machine learning benchmarks").

1. :func:`oos_probabilities` -- from the collect models that record logits (the first
   ``collect.logit_models``, docs/label_issues.md): for every training example the softmax
   probabilities averaged over the models whose mask did NOT contain it, for every test example
   over all of them. Streams the table one row chunk at a time.
2. :func:`find_issues` -- ``cleanlab.filter.find_label_issues`` and
   ``cleanlab.rank.get_label_quality_scores`` (self-confidence) on them; the suggested label is
   the most probable class other than the given one.
3. :func:`explain` -- from the run's current fit (weight (N, T') in raw-mask units, prediction
   = bias + mask @ weight of the margin against the GIVEN label): the training examples that
   push the margin toward the given label (largest positive weights) and toward the suggested
   label (most negative weights among training examples labelled with the suggested class:
   including them lowers the given label's margin, and they carry the suggested class).
4. :func:`label_issues` -- the report (both splits, precision and recall against the errors
   ``data.label_noise`` planted); :func:`plot_issues` the picture.
5. :func:`benchmark` -- full-set models of two or more configurations
   (``label_issues.bench_arms``), each a spec in the table ``label_issues/bench/models`` (key
   (arm, f), seed (run seed, BENCH_DOMAIN, f), resumable): test accuracy on the given labels,
   with the flagged test examples removed, and with them relabelled to the suggested label.

Nothing here imports Ray; the CLI (datamodels.cli_labels) is a thin shell.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodels.config import LabelIssuesConfig, RunConfig, apply_overrides, config_from_dict
from datamodels.domains import BENCH_DOMAIN
from datamodels.errors import ConfigError, StoreError
from datamodels.label_noise import planted_label_noise
from datamodels.reports import show_image
from datamodels.storage import Location, save_figure
from datamodels.store import RunStore

__all__ = ["OOSProbabilities", "oos_probabilities", "probability_sums", "find_issues", "explain", "SplitScores",
           "split_scores", "describe", "label_issues", "plot_issues",
           "precision_recall", "bench_arms", "bench_spec", "benchmark", "BENCH_DOMAIN", "BENCH_TABLE"]

log = logging.getLogger(__name__)

SPLITS = ("test", "train")
BENCH_TABLE = "label_issues/bench/models"
CLEANLAB_INSTALL = "pip install 'datamodels[labels]' (or: pip install cleanlab)"


# --------------------------------------------------------------------------- probabilities


@dataclass(frozen=True)
class OOSProbabilities:
    """Out-of-sample class probabilities of one split.

    probs   (n, K) float64: mean softmax over the models that did not train on the example
            (training split) or over all models (test split); NaN rows where there is none
    models  (n,) int: how many models each row averages
    rows    (M',) int: the collect rows used (complete, holding finite logits)
    left_out  rows holding logits that are not finite (diverged training), left out
    """

    split: str
    probs: np.ndarray
    models: np.ndarray
    rows: np.ndarray
    left_out: int

    @property
    def valid(self) -> np.ndarray:
        """(n,) bool: examples with at least one out-of-sample model."""
        return self.models > 0


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probability_sums(logits: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sums (n, K), counts (n,)) of the softmax of ``logits`` (M, n, K) over the models, counting
    model m for example j only where ``out[m, j]`` (M, n) bool is True (all models when None).
    ``sums / counts`` is the out-of-sample average."""
    p = _softmax(np.asarray(logits, dtype=np.float64))
    if out is None:
        return p.sum(axis=0), np.full(p.shape[1], p.shape[0], dtype=np.int64)
    out = np.asarray(out, dtype=bool)
    return np.einsum("mn,mnk->nk", out.astype(np.float64), p), out.sum(axis=0).astype(np.int64)


def no_logits_error(store: RunStore) -> StoreError:
    """The one line when a run holds no logits, with the command that adds them."""
    m = store.requested
    return StoreError(
        f"{store.loc}: no collect model records logits (the run was made before collect.logit_models existed, or "
        f"with collect.logit_models=0); add them by training only those models again (their margins are kept): "
        f"datamodels train CONFIG --out {store.loc} --models {m} --set collect.logit_models={min(m, 100)}")


def oos_probabilities(store: RunStore, split: str) -> OOSProbabilities:
    """Out-of-sample probabilities of ``split`` ("train": N examples, "test": T) from every
    complete collect row that holds logits. StoreError (with the fix) when none does."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    table = store.models_table()
    name = f"{split}_logits"
    rows = np.flatnonzero(table.holds(name))
    if not len(rows):
        raise no_logits_error(store)
    n, k = table.dims["N" if split == "train" else "T"], table.dims["K"]
    sums = np.zeros((n, k), dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    used: list[int] = []
    for block in table.chunks_of([int(r) for r in rows]):
        block = np.asarray(block, dtype=np.int64)
        logits = table.read(name, block).astype(np.float64)  # (b, n, K)
        finite = np.isfinite(logits).all(axis=(1, 2))
        if not finite.any():
            continue
        block = block[finite]
        out = ~table.read("masks", block) if split == "train" else None  # (b, N): did not train on it
        s, c = probability_sums(logits[finite], out)
        sums += s
        counts += c
        used += block.tolist()
    left_out = len(rows) - len(used)
    if left_out:
        log.warning("%s: %d of %d models with logits have non-finite ones (diverged) and are left out", store.loc,
                    left_out, len(rows))
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = sums / counts[:, None]
    probs[counts == 0] = np.nan
    return OOSProbabilities(split, probs, counts, np.asarray(used, dtype=np.int64), left_out)


# --------------------------------------------------------------------------- confident learning


def _cleanlab():
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError as e:
        raise ConfigError(f"label-issues needs the cleanlab package ({e}); install it: {CLEANLAB_INSTALL}") from None
    return cleanlab


def find_issues(probs: np.ndarray, labels: np.ndarray, *, filter_by: str = "prune_by_noise_rate") -> dict:
    """Confident learning on ``probs`` (n, K) and given ``labels`` (n,) (every row valid).

    Returns {"flagged": (f,) indices ranked by label quality (lowest first), "quality": (n,)
    self-confidence, "suggested": (n,) most probable class other than the given one}.
    """
    cl = _cleanlab()
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # exact rows sums for cleanlab's checks
    flags = cl.filter.find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)
    quality = cl.rank.get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = np.flatnonzero(flags)
    flagged = flagged[np.argsort(quality[flagged], kind="stable")]
    other = probs.copy()
    other[np.arange(len(labels)), labels] = -1.0
    return {"flagged": flagged, "quality": np.asarray(quality, dtype=np.float64), "suggested": other.argmax(axis=1)}


def precision_recall(flagged: np.ndarray, planted: np.ndarray) -> dict:
    """Precision and recall of the ``flagged`` indices against the ``planted`` ones."""
    f, p = set(int(i) for i in flagged), set(int(i) for i in planted)
    hit = len(f & p)
    return {"flagged": len(f), "planted": len(p), "true_positives": hit,
            "precision": hit / len(f) if f else None, "recall": hit / len(p) if p else None}


# --------------------------------------------------------------------------- datamodel explanations


def _fit_columns(store: RunStore, split: str, indices: np.ndarray, fit: str | None):
    """(weight (N, len(indices)) of the fit's columns for ``indices`` of ``split``, fit name) or
    (None, reason) when the fit has no datamodel for that split."""
    from datamodels.fit import fit_group

    g = fit_group(store, fit)
    t, n = store.dims["T"], store.dims["N"]
    cols = int(g["weight"].shape[1])
    if split == "train":
        if cols < t + n:
            return None, (f"no datamodels for training examples (fit {g.attrs.get('name')!r} has test targets only; "
                          f"`datamodels fit {store.loc} --targets test+train` adds them)")
        indices = np.asarray(indices, dtype=np.int64) + t
    if not len(indices):
        return np.zeros((n, 0), dtype=np.float32), g.attrs.get("name")
    w = np.asarray(g["weight"].get_orthogonal_selection((slice(None), np.asarray(indices, dtype=np.int64))))
    return w.astype(np.float32), g.attrs.get("name")


def explain(store: RunStore, split: str, indices, suggested, *, top: int = 5, fit: str | None = None) -> dict:
    """Datamodel explanations of examples ``indices`` of ``split`` with ``suggested`` labels.

    Returns {"fit": name, "note": None or why there is none, "explanations": [{"index",
    "toward_given": [{index, label, weight}] (largest positive weights), "toward_suggested":
    [...] (most negative weights among training examples labelled ``suggested``), "self_weight"
    (training examples: its own weight, left out of both lists)}]}.
    """
    indices = np.asarray(indices, dtype=np.int64)
    suggested = np.asarray(suggested, dtype=np.int64)
    weight, name = _fit_columns(store, split, indices, fit)
    if weight is None:
        return {"fit": None, "note": name, "explanations": []}
    train_y = store.read("train_labels")
    out = []
    for j, (i, s) in enumerate(zip(indices, suggested)):
        w = weight[:, j].astype(np.float64)
        keep = np.ones(len(w), dtype=bool)
        if split == "train":
            keep[i] = False  # its own weight (memorisation) is reported apart
        pos = np.flatnonzero(keep & (w > 0))
        pos = pos[np.argsort(-w[pos], kind="stable")][:top]
        neg = np.flatnonzero(keep & (w < 0) & (train_y == s))
        neg = neg[np.argsort(w[neg], kind="stable")][:top]

        def ex(r):
            return {"index": int(r), "label": int(train_y[r]), "weight": float(w[r])}

        e = {"index": int(i), "toward_given": [ex(r) for r in pos], "toward_suggested": [ex(r) for r in neg]}
        if split == "train":
            e["self_weight"] = float(w[i])
        out.append(e)
    return {"fit": name, "note": None, "explanations": out}


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class SplitScores:
    """Confident learning on one split: ``oos`` probabilities, given ``labels`` (n,), ``flagged``
    (f,) ranked, ``quality`` (n,) and ``suggested`` (n,) (NaN / -1 where never out of sample),
    ``planted`` {index: true label} and ``noisy`` (whether data.label_noise planted errors in this
    split)."""

    split: str
    oos: OOSProbabilities
    labels: np.ndarray
    flagged: np.ndarray
    quality: np.ndarray
    suggested: np.ndarray
    planted: dict
    noisy: bool


def split_scores(store: RunStore, split: str, *, filter_by: str = "prune_by_noise_rate") -> SplitScores:
    """:func:`oos_probabilities` then :func:`find_issues` on the examples that have them."""
    oos = oos_probabilities(store, split)
    labels = store.read(f"{split}_labels").astype(np.int64)
    valid = np.flatnonzero(oos.valid)
    res = find_issues(oos.probs[valid], labels[valid], filter_by=filter_by)
    quality = np.full(len(labels), np.nan)
    quality[valid] = res["quality"]
    suggested = np.full(len(labels), -1, dtype=np.int64)
    suggested[valid] = res["suggested"]
    planted = planted_label_noise(dict(store.group.attrs["dataset"]))
    idx, true = planted.get(split, ((), ()))
    return SplitScores(split, oos, labels, valid[res["flagged"]], quality, suggested,
                       dict(zip(np.asarray(idx).tolist(), np.asarray(true).tolist())), split in planted)


def describe(store: RunStore, scores: SplitScores, indices, *, supporters: int = 5, fit: str | None = None,
             explained: bool = True) -> tuple[list[dict], str | None, str | None]:
    """(issues, explanations note, fit name) for examples ``indices`` of ``scores.split``, flagged
    or not: index, flagged, given, suggested, quality, given_prob, suggested_prob, models, planted
    (None without planted noise on this split), true, and (``explained``) the datamodel explanation."""
    s, oos, labels, sug = scores.split, scores.oos, scores.labels, scores.suggested
    indices = np.asarray(indices, dtype=np.int64)
    flagged = set(scores.flagged.tolist())
    issues = []
    for i in indices:
        ok = oos.models[i] > 0
        issues.append({"index": int(i), "flagged": int(i) in flagged, "given": int(labels[i]), "suggested": int(sug[i]) if ok else None,
                       "quality": float(scores.quality[i]) if ok else None,
                       "given_prob": float(oos.probs[i, labels[i]]) if ok else None,
                       "suggested_prob": float(oos.probs[i, sug[i]]) if ok else None, "models": int(oos.models[i]),
                       "planted": (int(i) in scores.planted) if scores.noisy else None,
                       "true": scores.planted.get(int(i))})
    note, name = None, None
    ok = np.asarray([i["suggested"] is not None for i in issues], dtype=bool)
    if explained and ok.any():
        try:
            ex = explain(store, s, indices[ok], sug[indices[ok]], top=supporters, fit=fit)
        except StoreError as e:
            ex = {"fit": None, "note": f"no explanations: {e}", "explanations": []}
        note, name = ex["note"], ex["fit"]
        for issue, e in zip([i for i, o in zip(issues, ok) if o], ex["explanations"]):
            issue["explanation"] = {k: v for k, v in e.items() if k != "index"}
    return issues, note, name


def label_issues(run: str | Path | RunStore, *, split: str = "both", top: int = 10,
                 cfg: LabelIssuesConfig | None = None, fit: str | None = None, explain_top: bool = True) -> dict:
    """Confident learning on the run's out-of-sample probabilities (a JSON-ready dict).

    Per split ("test", "train"): examples, with_probabilities, never_out_of_sample (left out),
    note, models (M' used), flagged (count), flagged_rate, flagged_indices (ranked),
    suggested_labels, issues (the ``top`` first, see :func:`describe`; when fewer are flagged, the
    unflagged examples of lowest label quality follow, with ``flagged`` false), explanations_note,
    planted (precision/recall against ``data.label_noise``'s planted errors, None without),
    suggested_is_true (share of the caught planted errors whose suggested label is the true one).
    Needs a fit only for the explanations.
    """
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    cfg = cfg or store.config.label_issues
    splits = SPLITS if split == "both" else (split,)
    if any(s not in SPLITS for s in splits):
        raise ConfigError(f"--split: expected train, test or both, got {split!r}")
    classes = list(store.group.attrs["dataset"]["classes"])
    out: dict = {"run": str(store.loc), "classes": classes, "filter_by": cfg.filter_by, "fit": None, "splits": {}}
    for s in splits:
        sc = split_scores(store, s, filter_by=cfg.filter_by)
        valid = np.flatnonzero(sc.oos.valid)
        never = int(len(sc.labels) - len(valid))
        note = None
        if never:
            note = (f"{never} {s} examples are in the mask of every model with logits (never out of sample): left "
                    f"out; raise collect.logit_models for them")
            log.warning("%s: %s", store.loc, note)
        shown = sc.flagged[:top]
        if len(shown) < top:  # the ranking goes on past the flagged set: the least likely given labels
            rest = valid[~np.isin(valid, sc.flagged)]
            shown = np.concatenate([shown, rest[np.argsort(sc.quality[rest], kind="stable")][: top - len(shown)]])
        issues, expl_note, name = describe(store, sc, shown, supporters=cfg.supporters, fit=fit,
                                           explained=explain_top)
        out["fit"] = out["fit"] or name
        report = {
            "examples": int(len(sc.labels)), "with_probabilities": int(len(valid)), "never_out_of_sample": never,
            "note": note, "models": int(len(sc.oos.rows)), "models_left_out": sc.oos.left_out,
            "mean_models_per_example": float(sc.oos.models[valid].mean()) if len(valid) else 0.0,
            "flagged": int(len(sc.flagged)), "flagged_rate": float(len(sc.flagged) / max(1, len(valid))),
            "flagged_indices": sc.flagged.tolist(), "suggested_labels": sc.suggested[sc.flagged].tolist(),
            "issues": issues, "explanations_note": expl_note, "planted": None, "suggested_is_true": None,
        }
        if sc.noisy:
            p_idx = np.asarray(sorted(sc.planted), dtype=np.int64)
            in_sample = np.isin(p_idx, valid)
            pr = precision_recall(sc.flagged, p_idx[in_sample])
            pr["never_out_of_sample"] = int((~in_sample).sum())
            report["planted"] = pr
            caught = [int(i) for i in sc.flagged if int(i) in sc.planted]
            report["suggested_is_true"] = (float(np.mean([sc.suggested[i] == sc.planted[i] for i in caught]))
                                           if caught else None)
        out["splits"][s] = report
    return out


def plot_issues(result: dict, path: str | Path, *, run: str | Path | RunStore | None = None,
                dataset=None) -> str:
    """One row per listed issue of :func:`label_issues` (test split first): the flagged image
    (given -> suggested label, quality, planted/true when known), then its training examples
    toward the given label (green) and toward the suggested label (blue). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if dataset is None:
        store = run if isinstance(run, RunStore) else RunStore.open(run)
        dataset = store.dataset()
    classes = dataset.classes
    rows = [(s, i) for s in SPLITS if s in result["splits"] for i in result["splits"][s]["issues"]]
    k = max([len(i.get("explanation", {}).get(side, [])) for _, i in rows
              for side in ("toward_given", "toward_suggested")] + [1])
    cols = 2 + 2 * k  # the flagged image, k toward given, a gap, k toward suggested
    fig, axes = plt.subplots(max(1, len(rows)), cols, figsize=(1.3 * cols, 1.9 * max(1, len(rows)) + 0.6),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")

    for r, (s, issue) in enumerate(rows):
        x = (dataset.test_x if s == "test" else dataset.train_x)[issue["index"]]
        known = "" if issue["planted"] is None else ("\nplanted, true " + classes[issue["true"]]
                                                     if issue["planted"] else "\nnot planted")
        said = (f"given {classes[issue['given']]} -> {classes[issue['suggested']]}\nq={issue['quality']:.3f}"
                + ("" if issue.get("flagged", True) else " (not flagged)")
                if issue["suggested"] is not None else f"given {classes[issue['given']]}\n(never out of sample)")
        show_image(axes[r, 0], x, f"{s} #{issue['index']}\n{said}{known}", "tab:red" if issue["planted"] else "black")
        e = issue.get("explanation")
        if e is not None and not (e["toward_given"] or e["toward_suggested"]):
            e, note = None, "the datamodel has no non-zero weight on a training example pushing either way"
        elif e is None:
            note = result["splits"][s].get("explanations_note") or "no datamodel"
        if e is None:
            axes[r, 1].text(0, 0.5, "\n".join(_wrap(note, 60)), fontsize=6, va="center", transform=axes[r, 1].transAxes,
                            in_layout=False)  # the note spans the empty columns
            continue
        for c, ex in enumerate(e["toward_given"]):
            show_image(axes[r, 1 + c], dataset.train_x[ex["index"]],
                       f"#{ex['index']} {classes[ex['label']]}\nw={ex['weight']:+.3f}", "tab:green")
        for c, ex in enumerate(e["toward_suggested"]):
            show_image(axes[r, 2 + k + c], dataset.train_x[ex["index"]],
                       f"#{ex['index']} {classes[ex['label']]}\nw={ex['weight']:+.3f}", "tab:blue")
    fig.suptitle("\n".join(_wrap("label issues and the training examples that push the prediction toward the "
                                 "given label (green: largest datamodel weights) and toward the suggested label "
                                 "(blue: most negative weights among examples of that class)",
                                 int(16 * cols))), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


# --------------------------------------------------------------------------- benchmark destabilisation


def bench_arms(cfg: RunConfig) -> list[tuple[str, tuple]]:
    """(name, spec options) per ``label_issues.bench_arms`` entry: 'KEY=VALUE; KEY=VALUE' of model.*
    and train.* keys, each checked against the run's config (ConfigError naming the entry)."""
    arms = []
    for a, text in enumerate(cfg.label_issues.bench_arms):
        where = f"label_issues.bench_arms[{a}] {text!r}"
        items = [p.strip() for p in text.split(";") if p.strip()]
        if not items:
            raise ConfigError(f"{where}: expected 'KEY=VALUE' of model.* or train.* keys, e.g. "
                              "'model.widths=[8, 16, 32, 64]'")
        options = []
        for item in items:
            key = item.split("=", 1)[0].strip()
            if "=" not in item or not key.startswith(("model.", "train.")):
                raise ConfigError(f"{where}: expected 'KEY=VALUE' of a model.* or train.* key, got {item!r}")
            raw = apply_overrides({}, [item])
            value = raw
            for part in key.split("."):
                value = value[part]
            options.append((key, value))
        config_from_dict(RunConfig, apply_overrides(cfg.to_dict(), items), source=where)  # valid values
        arms.append((text, tuple(options)))
    if len(arms) < 2:
        raise ConfigError(f"label_issues.bench_arms: expected two or more configurations to compare, got {len(arms)}")
    return arms


def bench_spec(cfg: RunConfig, arm: int, f: int, options: tuple):
    """Full-set model ``f`` of configuration ``arm``: every training example, seed (run seed,
    BENCH_DOMAIN, f) -- the same for every arm, so arms differ only by their options."""
    from datamodels.specs import ModelSpec, Subset
    from datamodels.train import training_seed

    return ModelSpec(key=(int(arm), int(f)), seed=training_seed(cfg.seed, int(f), domain=(BENCH_DOMAIN,)),
                     subset=Subset.all_but(), outputs=("test_logits",), options=tuple(options))


def _summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None, "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "values": [float(x) for x in v]}


def benchmark(run: str | Path | Location, cfg: RunConfig | None = None, *, issues: dict | None = None,
              figure: str | None = None, address: str | None = None, progress: bool = True,
              takeover: bool = False, dataset=None) -> dict:
    """Train (or resume) ``label_issues.bench_models`` full-set models per configuration of
    ``label_issues.bench_arms`` and score them on the test set: on the given labels ("original"),
    with the test examples confident learning flags removed ("removed"), with them relabelled to
    the suggested label ("relabelled"), and -- when ``data.label_noise`` planted test errors --
    on the true labels ("true"). Returns {arms, variants, accuracy {arm: {variant: summary}},
    ranking {variant: [arm, ...]}, ranking_changes, flagged, figure}."""
    from datamodels.runner import run_specs

    store = RunStore.open(run)
    cfg = cfg or store.config
    arms = bench_arms(cfg)
    issues = issues or label_issues(store, split="test", cfg=cfg.label_issues, explain_top=False)
    test = issues["splits"]["test"]
    flagged = np.asarray(test["flagged_indices"], dtype=np.int64)
    suggested = np.asarray(test["suggested_labels"], dtype=np.int64)
    given = store.read("test_labels").astype(np.int64)
    specs = [bench_spec(cfg, a, f, options) for a, (_, options) in enumerate(arms)
             for f in range(cfg.label_issues.bench_models)]
    with store.writing(takeover=takeover):
        table = store.table(BENCH_TABLE, key_names=["arm", "f"], outputs=("test_logits",), rows_per_chunk=1)
        run_specs(store, table, specs, cfg=cfg, dataset=store.dataset(dataset), address=address, progress=progress,
                  desc="benchmark models")
    relabelled = given.copy()
    relabelled[flagged] = suggested
    keep = np.ones(len(given), dtype=bool)
    keep[flagged] = False
    variants = {"original": (given, slice(None)), "removed": (given, keep), "relabelled": (relabelled, slice(None))}
    planted = planted_label_noise(dict(store.group.attrs["dataset"])).get("test")
    if planted is not None:
        true = given.copy()
        true[planted[0]] = planted[1]
        variants["true"] = (true, slice(None))
    done = table.complete_mask()
    accuracy: dict = {}
    for a, (name, _) in enumerate(arms):
        rows = table.rows_of([s.key for s in specs if s.key[0] == a])
        rows = rows[done[rows]]
        logits = table.read("test_logits", rows) if len(rows) else np.zeros((0, len(given), 1))
        logits = logits[np.isfinite(logits).all(axis=(1, 2))]
        pred = logits.argmax(axis=2)
        accuracy[name] = {v: _summary([(p[sel] == y[sel]).mean() for p in pred]) for v, (y, sel) in variants.items()}
    ranking = {v: sorted(accuracy, key=lambda n: -(accuracy[n][v]["mean"] or 0.0)) for v in variants}
    out = {"arms": [n for n, _ in arms], "variants": list(variants), "models_per_arm": cfg.label_issues.bench_models,
           "flagged": int(len(flagged)), "accuracy": accuracy, "ranking": ranking,
           "ranking_changes": {v: ranking[v] != ranking["original"] for v in variants if v != "original"}}
    loc = store.loc
    out["figure"] = _bench_png(out, figure or loc.sibling(f"{loc.name}_label_issues_benchmark.png").url)
    return out


def _bench_png(res: dict, where: str) -> str:
    """Accuracy per variant (x) and configuration (bars, models as dots), on a zoomed axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"original": "given labels", "removed": "flagged removed", "relabelled": "flagged relabelled",
             "true": "true labels (planted errors undone)"}
    variants, arms = res["variants"], res["arms"]
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(variants) + 1), 4.2))
    width = 0.8 / len(arms)
    lo = 1.0
    for a, arm in enumerate(arms):
        xs = np.arange(len(variants)) + (a - (len(arms) - 1) / 2) * width
        means = [res["accuracy"][arm][v]["mean"] for v in variants]
        ax.bar(xs, [np.nan if m is None else m for m in means], width, label=arm, alpha=0.8)
        for x, v in zip(xs, variants):
            vals = res["accuracy"][arm][v]["values"]
            ax.plot([x] * len(vals), vals, "k.", ms=4)
            lo = min([lo, *vals])
    ax.set_xticks(np.arange(len(variants)), [names.get(v, v) for v in variants], fontsize=8)
    bottom = max(0.0, lo - 0.25 * (1 - lo) - 0.005)
    ax.set_ylim(bottom, 1.0 + 0.12 * (1 - bottom))  # headroom for the legend above the bars
    ax.set_ylabel("test accuracy")
    changed = [v for v, c in res["ranking_changes"].items() if c]
    ax.set_title(f"{res['flagged']} flagged test labels; ranking "
                 + (f"changes ({', '.join(changed)})" if changed else "unchanged"), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=len(arms), frameon=False)
    fig.tight_layout()
    return save_figure(fig, where)
