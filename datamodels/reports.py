"""Reports over targets: the brittleness CDF (fraction of targets brittle to at most k), its
quantiles, and its CSV and plot.

``status`` arrays hold each target's estimate status by name (see
:data:`datamodels.brittleness.STATUS`); the denominator of every fraction is the targets the
full-set models classify correctly ("estimated" or "unreachable"), and unreachable targets
never count as brittle.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from datamodels.storage import write_file

__all__ = ["cdf_table", "summarize", "write_cdf", "write_cdf_comparison"]

_COUNTED = ("estimated", "unreachable")


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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    png = write_file(f"{base}.png", buf.getvalue())
    return {"csv": csv, "png": png}


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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    png = write_file(f"{base}.png", buf.getvalue())
    return {"csv": csv, "png": png}
