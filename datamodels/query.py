"""Per-example queries: everything the run knows about one target.

``query(run, target)`` gathers the target's label, its mean margin and accuracy over the run's
complete models, the brittleness estimates, the verified sizes, and the training examples
whose datamodel weights support (largest positive) and oppose (most negative) it.
``plot_query`` draws them as an image grid.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from datamodels.brittleness import STATUS, target_datamodels, parse_targets
from datamodels.data import Dataset
from datamodels.reports import show_image
from datamodels.storage import save_figure
from datamodels.store import RunStore
from datamodels.verify import MODES, read_checks, verified_k

__all__ = ["query", "plot_query"]

log = logging.getLogger(__name__)


def _brittleness_fields(store: RunStore, target: int) -> dict:
    if "brittleness" not in store.group or "k_remove" not in store.group["brittleness"]:
        return {"status": None, "full_set_margin": None, "estimated": None}
    g = store.group["brittleness"]
    codes = list(g.attrs.get("status_codes", STATUS))
    thresholds = [float(c) for c in g.attrs["thresholds"]]
    base = float(g["baseline"][target])
    est = {}
    for mode, name in (("remove", "k_remove"), ("flip", "k_flip")):
        row = np.asarray(g[name][target])
        est[mode] = {f"{c:g}": (int(k) if k > 0 else None) for c, k in zip(thresholds, row)}
    return {"status": codes[int(g["status"][target])], "full_set_margin": base if np.isfinite(base) else None,
            "estimated": est}


def query(run: str | Path | RunStore, target: int, *, top: int = 10) -> dict:
    """What the run knows about test example ``target`` (a JSON-ready dict).

    Keys: target, label, class, models, mean_margin, accuracy (over complete models),
    datamodel {bias, nnz}, brittleness {status, full_set_margin, estimated {remove, flip:
    {C: k or None}}}, verified {remove, flip: {method: {verified_k, checks: [{k, success,
    mean_margin, frac_misclassified}]}}}, supporters and opposers ([{index, label, weight}],
    ``top`` each). Raises StoreError when the run has no datamodels (run `datamodels fit`).
    """
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    t_total = store.dims["T"]
    target = int(parse_targets([target], t_total)[0])
    weight, bias = target_datamodels(store)
    test_y, train_y = store.read("test_labels"), store.read("train_labels")
    classes = store.group.attrs["dataset"]["classes"]
    rows = np.flatnonzero(store.complete_mask())
    col = (np.asarray(store.models_table().group["test_margins"].get_orthogonal_selection((rows, target)),
                      dtype=np.float64) if len(rows) else np.zeros(0))
    col = col[np.isfinite(col)]
    w = weight[:, target].astype(np.float64)
    order = np.argsort(-w, kind="stable")
    sup = [i for i in order[:top] if w[i] > 0]
    opp = [i for i in order[::-1][:top] if w[i] < 0]

    def ex(i):
        return {"index": int(i), "label": int(train_y[i]), "weight": float(w[i])}

    verified = {}
    for mode in MODES:
        checks = read_checks(store, target=target, mode=mode)
        by_method: dict[str, dict] = {}
        for c in checks:
            m = by_method.setdefault(c["method"], {"verified_k": None, "checks": []})
            keys = ("k", "done", "success", "mean_margin", "frac_misclassified", "models")
            m["checks"].append({k: c[k] for k in keys})
        for m, d in by_method.items():
            d["verified_k"] = verified_k([c for c in checks if c["method"] == m])
        verified[mode] = by_method
    label = int(test_y[target])
    return {
        "target": target,
        "label": label,
        "class": classes[label],
        "models": int(len(col)),
        "mean_margin": float(col.mean()) if len(col) else None,
        "accuracy": float((col > 0).mean()) if len(col) else None,
        "datamodel": {"bias": float(bias[target]), "nnz": int((w != 0).sum())},
        "brittleness": _brittleness_fields(store, target),
        "verified": verified,
        "supporters": [ex(i) for i in sup],
        "opposers": [ex(i) for i in opp],
    }


def plot_query(result: dict, path: str | Path, *, dataset: Dataset | None = None,
               run: str | Path | RunStore | None = None) -> str:
    """Image grid of a :func:`query` result: the target, then its top supporters and opposers,
    each titled with index, label and weight. ``dataset`` defaults to the run's configured data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if dataset is None:
        store = run if isinstance(run, RunStore) else RunStore.open(run)
        dataset = store.dataset()
    cols = max(1, len(result["supporters"]), len(result["opposers"]))
    fig, axes = plt.subplots(3, cols, figsize=(1.6 * cols + 0.4, 5.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")

    t = result["target"]
    margin = result["mean_margin"]
    show_image(axes[0, 0], dataset.test_x[t],
               f"target {t}\nlabel {dataset.classes[result['label']]}"
               + (f"\nmargin {margin:.2f}" if margin is not None else ""))
    for row, key, color in ((1, "supporters", "tab:green"), (2, "opposers", "tab:red")):
        for c, e in enumerate(result[key]):
            show_image(axes[row, c], dataset.train_x[e["index"]],
                       f"#{e['index']} {dataset.classes[e['label']]}\nw={e['weight']:+.3f}", color)
        axes[row, 0].text(-0.35, 0.5, key, transform=axes[row, 0].transAxes, rotation=90, va="center",
                          fontsize=8, color=color)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
