"""Reports over targets: the brittleness CDF (fraction of targets brittle to at most k), its
quantiles, and its CSV and plot; and the verified CDF of searched targets, estimated and
verified, per ranking method and mode (:func:`write_verified_cdf`).

``status`` arrays hold each target's estimate status by name (see
:data:`datamodels.brittleness.STATUS`); the denominator of every fraction is the targets the
full-set models classify correctly ("estimated" or "unreachable"), and unreachable targets
never count as brittle.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from datamodels.storage import save_figure, write_file

__all__ = ["cdf_table", "summarize", "write_cdf", "verified_cdf_table", "write_verified_cdf", "write_cdf_comparison"]

_COUNTED = ("estimated", "unreachable")


def show_image(ax, img, title: str, color: str = "black") -> None:
    """Draw one uint8 image tensor (C, H, W) on ``ax``: grey for one channel, RGB for three."""
    a = img.numpy()
    ax.imshow(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), cmap="gray" if a.shape[0] == 1 else None,
              interpolation="nearest")
    ax.set_title(title, fontsize=7, color=color)


def _eligible(status) -> np.ndarray:
    return np.isin(np.asarray(status), _COUNTED)


def cdf_table(k: np.ndarray, status, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of targets brittle to at most k, for k = 1..max found: (ks (L,), frac (L, C))."""
    keep = _eligible(status)
    kk = np.asarray(k)[keep]
    denom = max(1, int(keep.sum()))
    found = kk[kk > 0]
    top = int(found.max()) if found.size else 1
    ks = np.arange(1, top + 1)
    frac = np.stack([((kk[:, c][None] > 0) & (kk[:, c][None] <= ks[:, None])).sum(axis=1) / denom
                     for c in range(len(thresholds))], axis=1)
    return ks, frac


def summarize(k_remove: np.ndarray, k_flip: np.ndarray, status, thresholds: Sequence[float]) -> dict:
    """Counts and CDF quantiles: for each mode and threshold, the k below which 10/25/50% of the
    correctly classified targets are brittle (None where fewer targets are brittle at all), and
    the fraction brittle to at most 1, 10, 100 examples."""
    status = np.asarray(status)
    out = {"targets": int(len(status)),
           **{s: int((status == s).sum()) for s in ("estimated", "misclassified", "unreachable")}}
    keep = _eligible(status)
    for mode, k in (("remove", k_remove), ("flip", k_flip)):
        rows = {}
        for c, thr in enumerate(thresholds):
            kk = np.asarray(k)[keep, c].astype(np.float64)
            kk[kk < 0] = np.inf
            q = {f"q{int(p * 100)}": (None if not kk.size or not np.isfinite(np.quantile(kk, p, method="higher"))
                                      else int(np.quantile(kk, p, method="higher"))) for p in (0.1, 0.25, 0.5)}
            frac = {f"frac_le_{m}": (float((kk <= m).mean()) if kk.size else None) for m in (1, 10, 100)}
            rows[f"{thr:g}"] = {**q, **frac}
        out[mode] = rows
    return out


def write_cdf(k_remove: np.ndarray, k_flip: np.ndarray, status, thresholds: Sequence[float],
              base: str) -> dict:
    """Write ``base.csv`` (k, then remove/flip columns per threshold) and ``base.png``; ``base``
    is a local path or a URL without suffix. Returns {"csv": ..., "png": ...}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks_r, fr_r = cdf_table(k_remove, status, thresholds)
    ks_f, fr_f = cdf_table(k_flip, status, thresholds)
    top = max(int(ks_r[-1]), int(ks_f[-1]))
    ks = np.arange(1, top + 1)

    def pad(ks_m, fr):
        full = np.empty((top, fr.shape[1]))
        full[: len(ks_m)] = fr
        full[len(ks_m):] = fr[-1]
        return full

    table = np.hstack([ks[:, None], pad(ks_r, fr_r), pad(ks_f, fr_f)])
    header = ",".join(["k"] + [f"remove_C={t:g}" for t in thresholds] + [f"flip_C={t:g}" for t in thresholds])
    text = io.StringIO()
    np.savetxt(text, table, delimiter=",", header=header, comments="",
               fmt=["%d"] + ["%.6f"] * (table.shape[1] - 1))
    csv = write_file(f"{base}.csv", text.getvalue().encode())

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, fr, title in ((axes[0], pad(ks_r, fr_r), "removal"), (axes[1], pad(ks_f, fr_f), "label flip")):
        for c, thr in enumerate(thresholds):
            ax.step(ks, fr[:, c], where="post", label=f"C = {thr:g}")
        ax.set_xscale("log")
        ax.set_xlabel(f"k (training examples {'removed' if title == 'removal' else 'flipped'})")
        ax.set_title(f"brittleness to {title} (estimated)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of targets brittle to <= k")
    axes[1].legend()
    fig.tight_layout()
    png = save_figure(fig, f"{base}.png")
    return {"csv": csv, "png": png}


# --------------------------------------------------------------------------- verified CDF


_SEARCHED = ("verified", "not verified", "unfinished")


def verified_cdf_table(results: list[dict]) -> tuple[np.ndarray, dict[tuple[str, str, str], np.ndarray]]:
    """CDFs over the searched targets of :func:`datamodels.verify.search` results.

    Returns (ks (L,) = 1..a little past the largest k found, {(mode, method, "verified" | "estimated"): fraction
    (L,) of the searched targets brittle to at most k}). Estimated curves exist for fits only;
    the denominator is the targets searched for that mode and method (the full-set models
    classify them correctly); an unverified (or unreachable) target never counts as brittle.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if r["status"] in _SEARCHED:
            groups.setdefault((r["mode"], r["method"]), []).append(r)
    found = [r[key] for rs in groups.values() for r in rs for key in ("verified_k", "estimated_k")
             if r[key] is not None]
    ks = np.arange(1, int(np.ceil(1.3 * max(found, default=1))) + 2)  # room to see the last step
    curves = {}
    for (mode, method), rs in groups.items():
        kinds = ("verified", "estimated") if any(r["fit"] for r in rs) else ("verified",)
        for kind in kinds:
            kk = np.asarray([r[f"{kind}_k"] if r[f"{kind}_k"] is not None else np.inf for r in rs])
            curves[(mode, method, kind)] = (kk[None] <= ks[:, None]).sum(axis=1) / len(rs)
    return ks, curves


def write_verified_cdf(results: list[dict], base: str, *, models: int, trained: int | None = None) -> dict:
    """Write the verified brittleness figure and its data next to a run.

    ``base.png``: one panel per mode (removal, label flip); per ranking method the fraction of
    searched targets brittle to at most k, verified by retraining (solid) and, for fits, as
    estimated by the datamodel (dashed, same colour). ``base.csv``: k, then one column per
    (mode, method, verified|estimated). ``base_targets.csv``: one row per target, mode and
    method (status, estimated k, verified k, largest failed k, checks, models). ``models`` is K
    (models per check); ``trained`` the models trained by the call that produced ``results``.
    Returns {"csv", "png", "targets_csv"}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, curves = verified_cdf_table(results)
    cols = sorted(curves, key=lambda c: (c[0] != "remove", c[0], c[1], c[2] != "verified"))
    table = np.hstack([ks[:, None]] + [curves[c][:, None] for c in cols]) if cols else ks[:, None]
    text = io.StringIO()
    np.savetxt(text, table, delimiter=",", header=",".join(["k"] + ["/".join(c) for c in cols]), comments="",
               fmt=["%d"] + ["%.6f"] * len(cols))
    csv = write_file(f"{base}.csv", text.getvalue().encode())

    rows = io.StringIO()
    rows.write("target,mode,method,status,estimated_k,verified_k,lower,checks,models\n")
    for r in results:
        vals = [r["target"], r["mode"], r["method"], r["status"], r["estimated_k"], r["verified_k"], r["lower"],
                len(r["checks"]), r["models"]]
        rows.write(",".join("" if v is None else str(v) for v in vals) + "\n")
    targets_csv = write_file(f"{base}_targets.csv", rows.getvalue().encode())

    modes = [m for m in ("remove", "flip") if any(c[0] == m for c in curves)] or ["remove"]
    methods = list(dict.fromkeys(r["method"] for r in results))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.3), sharey=True, squeeze=False)
    total = sum(r["models"] for r in results)
    for ax, mode in zip(axes[0], modes):
        searched = {r["target"] for r in results if r["mode"] == mode and r["status"] in _SEARCHED}
        for method in methods:
            rs = [r for r in results if r["mode"] == mode and r["method"] == method and r["status"] in _SEARCHED]
            if (mode, method, "verified") not in curves:
                continue
            ok = sum(r["status"] == "verified" for r in rs)
            lw = max(1.2, 3.0 - 0.5 * methods.index(method))  # curves that coincide stay visible
            ax.step(ks, curves[(mode, method, "verified")], where="post", color=colors[method], lw=lw, alpha=0.85,
                    label=f"{method}: verified ({ok}/{len(rs)})")
            if (mode, method, "estimated") in curves:
                ax.step(ks, curves[(mode, method, "estimated")], where="post", color=colors[method], lw=1.2,
                        ls="--", label=f"{method}: estimated")
        ax.set_xscale("log")
        ax.set_xlim(1, max(2, int(ks[-1])))
        ax.set_ylim(0, 1.02)
        what = "removed" if mode == "remove" else "relabelled"
        ax.set_xlabel(f"k (training examples {what})")
        ax.set_title(f"{'removal' if mode == 'remove' else 'label flip'}: {len(searched)} targets")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("fraction of targets brittle to <= k")
    cost = f"{total} models in checks of K={models}" + (f", {trained} trained now" if trained is not None else "")
    fig.suptitle(f"verified brittleness (mean margin of K fresh models < 0); {cost}", fontsize=9)
    fig.tight_layout()
    png = save_figure(fig, f"{base}.png")
    return {"csv": csv, "png": png, "targets_csv": targets_csv}


def write_cdf_comparison(runs: Sequence[dict], thresholds: Sequence[float], base: str) -> dict:
    """The brittleness CDFs of several runs over the same targets, side by side: ``base.csv``
    (k, then per run, mode and threshold a column ``<label>|<mode>_C=<c>``) and ``base.png``
    (removal and flip panels; one colour per run, one line style per threshold).

    ``runs``: dicts with ``label``, ``k_remove`` and ``k_flip`` (T, C_run), ``status`` (T,) and
    ``thresholds`` (C_run,); ``thresholds`` are the C values to draw (each must be one of every
    run's). Returns {"csv": ..., "png": ...}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}  # (run index, mode, threshold) -> (ks, frac)
    for r, run in enumerate(runs):
        have = [float(c) for c in run["thresholds"]]
        for thr in thresholds:
            c = have.index(float(thr))
            for mode in ("remove", "flip"):
                ks, fr = cdf_table(np.asarray(run[f"k_{mode}"])[:, [c]], run["status"], [thr])
                curves[(r, mode, float(thr))] = (ks, fr[:, 0])
    top = max(int(ks[-1]) for ks, _ in curves.values())
    ks = np.arange(1, top + 1)

    def full(key):
        k_m, fr = curves[key]
        out = np.empty(top)
        out[: len(k_m)] = fr
        out[len(k_m):] = fr[-1]
        return out

    order = [(r, mode, float(t)) for r in range(len(runs)) for mode in ("remove", "flip") for t in thresholds]
    table = np.column_stack([ks] + [full(key) for key in order])
    names = [f"{runs[r]['label']}|{mode}_C={t:g}".replace(",", ";") for r, mode, t in order]
    text = io.StringIO()
    np.savetxt(text, table, delimiter=",", header=",".join(["k"] + names), comments="",
               fmt=["%d"] + ["%.6f"] * len(order))
    csv = write_file(f"{base}.csv", text.getvalue().encode())

    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode, title in ((axes[0], "remove", "removal"), (axes[1], "flip", "label flip")):
        for r, run in enumerate(runs):
            eligible = int(_eligible(run["status"]).sum())
            for j, thr in enumerate(thresholds):
                label = f"{run['label']} ({eligible} targets)" + (f", C = {thr:g}" if len(thresholds) > 1 else "")
                ax.step(ks, full((r, mode, float(thr))), where="post", color=f"C{r}", ls=styles[j % len(styles)],
                        label=label)
        ax.set_xscale("log")
        ax.set_xlabel(f"k (training examples {'removed' if mode == 'remove' else 'flipped'})")
        ax.set_title(f"brittleness to {title} (estimated)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of correct targets brittle to <= k")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    png = save_figure(fig, f"{base}.png")
    return {"csv": csv, "png": png}
