"""Peak memory and wall time of every stage at N = 5,000 / 20,000 / 60,000 training examples and
T = 1,000 / 10,000 targets, on synthetic run stores.

Each store is written through the product's own writer (``RunStore.create`` and the model
tables' ``write``): masks from the real spec rule (:func:`datamodels.collect.collect_spec`),
margins from a planted sparse linear model (10 effects per target) plus noise, 50 x 2
evaluation models and 2 full-set models written the same way (nothing is trained). Then each
stage runs in a fresh subprocess, whose peak resident memory is read from the kernel
(``os.wait4``'s ru_maxrss) and whose stage call is timed:

- ``fit``         ``fit_run`` with a short lambda path (``--lambdas``, ``--eps``) on all T targets;
- ``path``        the default lambda path (40 lambdas, eps 1e-3, patience 5) on ``--path-targets``
                  targets, streamed by ``fit_lasso``: the solve time per target of a full fit;
- ``predict``     ``evaluate_run``: the datamodels' predictions on the evaluation masks and the LDS;
- ``brittleness`` ``brittleness``: removal and flip estimates for every target;
- ``query``       ``query`` of one target;
- ``check``       ``check_run``: every chunk of the store read and its checksum verified.

``import`` is the floor: a subprocess that only imports the package.

    python benchmarks/scale.py                                   # the whole grid (N=60,000 needs 20 GiB free)
    python benchmarks/scale.py --sizes 5000x1000,20000x1000 --stages fit,predict
    python benchmarks/scale.py --sizes 5000x1000 --models 1000,2000   # growth with M

The extrapolated full fit (all T targets, the default path, M = 50,000) adds the statistics
pass, measured per model and scaled linearly in M (it costs M N^2), to the path's solve time
per target times T. No GPU is used: GPU timing is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, matmul_rate  # noqa: E402

STAGES = ("fit", "path", "predict", "brittleness", "query", "check")
EVAL_MASKS, EVAL_REPEATS, FULL_MODELS, EFFECTS = 50, 2, 2, 10
GB = 1e9


# ----------------------------------------------------------------------------- the store


def dataset(n: int, t: int):
    """A Dataset with N/T tiny blank images and seeded labels: the stages here read labels and
    the fingerprint only, so images cost nothing."""
    import torch

    from datamodels.data import Dataset

    g = np.random.default_rng(12345)
    return Dataset(name="scale", train_x=torch.zeros(n, 1, 2, 2, dtype=torch.uint8),
                   train_y=torch.from_numpy(g.integers(0, 10, n)), test_x=torch.zeros(t, 1, 2, 2, dtype=torch.uint8),
                   test_y=torch.from_numpy(g.integers(0, 10, t)), classes=tuple(str(i) for i in range(10)),
                   mean=(0.5,), std=(0.25,), flippable=False, split={"source": "benchmarks/scale.py"})


def config(m: int):
    from datamodels.config import load_config

    return load_config(None, ["name=scale", f"collect.models={m}", "collect.block_size=64", "collect.logit_models=0",
                              "model.widths=[4, 8, 8, 8]", f"brittleness.full_models={FULL_MODELS}",
                              f"eval.masks={EVAL_MASKS}", f"eval.repeats={EVAL_REPEATS}",
                              "resources.executor=local"])


class Planted:
    """margin_t(mask) = b_t + sum_j w[j, t] mask[j] over EFFECTS training examples j per target."""

    def __init__(self, n: int, t: int):
        g = np.random.default_rng(7)
        self.idx = np.stack([g.choice(n, EFFECTS, replace=False) for _ in range(t)])  # (T, k)
        self.val = (g.standard_t(3, size=(t, EFFECTS)) * 0.5).astype(np.float32)
        self.bias = g.normal(1.0, 0.5, t).astype(np.float32)
        self.g = np.random.default_rng(8)

    def margins(self, masks: np.ndarray, noise: float = 0.5) -> np.ndarray:
        rows = []
        for a in range(0, len(masks), 128):
            x = masks[a: a + 128][:, self.idx]  # (b, T, k)
            rows.append(self.bias + (x * self.val).sum(-1))
        y = np.concatenate(rows) if rows else np.zeros((0, len(self.bias)), np.float32)
        return (y + noise * self.g.normal(size=y.shape)).astype(np.float32)


def build(path: Path, n: int, t: int, m: int) -> dict:
    """Write the synthetic store at ``path`` through the product's writer; return sizes."""
    from datamodels.claim import DriverClaim
    from datamodels.collect import collect_spec
    from datamodels.evaluate import eval_spec
    from datamodels.fullset import FULL_OUTPUTS, full_spec
    from datamodels.storage import Location
    from datamodels.store import RunStore

    cfg, ds, plant = config(m), dataset(n, t), Planted(n, t)
    loc = Location(str(path))
    with DriverClaim(loc) as claim:
        store = RunStore.create(loc, cfg, ds, claim=claim)
        table = store.models_table()
        specs = [collect_spec(cfg, i) for i in range(m)]
        table.plan(specs)
        b = table.rows_per_chunk
        for a in range(0, m, b):
            ss = specs[a: a + b]
            masks = np.stack([s.subset.mask(n) for s in ss])
            y = plant.margins(masks)
            zero = np.zeros(n, np.float32)
            table.write(list(range(a, a + len(ss))), [{"mask": mk, "test_margins": yy, "train_margins": zero,
                                                        "seconds": 0.0} for mk, yy in zip(masks, y)], ss)
        ev = store.table("eval/models", key_names=["e", "r"], outputs=["test_margins"], rows_per_chunk=b)
        especs = [eval_spec(cfg, e, r) for e in range(EVAL_MASKS) for r in range(EVAL_REPEATS)]
        rows = ev.plan(especs)
        for a in range(0, len(rows), b):
            ss = especs[a: a + b]
            masks = np.stack([s.subset.mask(n) for s in ss])
            y = plant.margins(masks)
            ev.write(rows[a: a + b], [{"mask": mk, "test_margins": yy, "seconds": 0.0} for mk, yy in zip(masks, y)], ss)
        # the planted datamodel as the run's fit, so the stages after the fit run without one
        from datamodels.fit import save_datamodels

        store.claim = claim
        w = np.zeros((n, t), np.float32)
        w[plant.idx, np.arange(t)[:, None]] = plant.val
        save_datamodels(store, w, plant.bias.astype(np.float64), attrs={"targets": "test", "created": "planted"},
                        name="lasso")
        del w
        full = store.table("full/models", key_names=["f"], outputs=FULL_OUTPUTS, rows_per_chunk=1)
        fspecs = [full_spec(cfg, f) for f in range(FULL_MODELS)]
        rows = full.plan(fspecs)
        k, d = store.dims["K"], store.dims["D"]
        for r, s in zip(rows, fspecs):
            y = plant.margins(np.ones((1, n), bool))[0]
            logits = np.zeros((t, k), np.float32)
            logits[np.arange(t), np.asarray(ds.test_y)] = y
            full.write([r], [{"mask": np.ones(n, bool), "test_margins": y, "test_logits": logits,
                              "test_features": np.zeros((t, d), np.float16),
                              "train_features": np.zeros((n, d), np.float16), "seconds": 0.0}], [s])
    return {"n": n, "t": t, "m": m}


# ----------------------------------------------------------------------------- stages (in a child)


class Columns:
    """Rows ``rows`` and columns ``cols`` of a zarr array, sliceable by rows like an array."""

    def __init__(self, arr, rows, cols):
        self.arr, self.rows, self.cols = arr, np.asarray(rows), np.asarray(cols)
        self.shape, self.dtype = (len(self.rows), len(self.cols)), np.dtype(arr.dtype)

    def __getitem__(self, key):
        return np.asarray(self.arr.get_orthogonal_selection((self.rows[key], self.cols)))


def stage(name: str, path: Path, a) -> dict:
    from datamodels.config import FitConfig

    n, t = a.n, a.t
    out: dict = {}
    t0 = time.perf_counter()
    if name == "import":
        import datamodels.fit  # noqa: F401
    elif name == "fit":
        from datamodels.fit import fit_run

        cfg = FitConfig(n_lambdas=a.lambdas, eps=a.eps, patience=None, device="cpu")
        s = fit_run(str(path), cfg)
        out = {"mean_nnz": s["mean_nnz"], **{f"seconds_{k}": v for k, v in s.get("solver_seconds", {}).items()}}
    elif name == "path":
        from datamodels.fit import RowView, usable_rows
        from datamodels.solver import fit_lasso
        from datamodels.store import RunStore

        store = RunStore.open(str(path))
        rows, _ = usable_rows(store)
        g = store.models_table().group
        cols = np.linspace(0, t - 1, min(t, a.path_targets)).astype(np.int64)
        X, Y = RowView([g["masks"]], rows), Columns(g["test_margins"], rows, cols)
        d = FitConfig()
        f = fit_lasso(X, Y, n_lambdas=d.n_lambdas, eps=d.eps, val_fraction=d.val_fraction, patience=d.patience,
                      block_rows=d.block_rows, tol=d.tol)
        out = {"targets": len(cols), "mean_nnz": float(f.nnz.mean()),
               "lambdas_solved": float(np.isfinite(f.val_mse_path).sum(0).mean()),
               **{f"seconds_{k}": v for k, v in getattr(f, "seconds", {}).items()}}
    elif name == "predict":
        from datamodels.evaluate import evaluate_run

        r = evaluate_run(str(path), dataset=dataset(n, t), progress=False)
        out = {"lds": r["lds"]}
    elif name == "brittleness":
        from datamodels.brittleness import brittleness

        r = brittleness(str(path), dataset=dataset(n, t), progress=False, cdf_path=str(path) + "_cdf")
        out = {"estimated": int(sum(s == "estimated" for s in r["status"]))}
    elif name == "query":
        from datamodels.query import query

        r = query(str(path), t // 2)
        out = {"nnz": r["datamodel"]["nnz"]}
    elif name == "check":
        from datamodels.check import check_run

        r = check_run(str(path))
        out = {"ok": r.ok, "chunks": r.chunks}
    else:
        raise SystemExit(f"unknown stage {name!r}")
    out["seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- the parent


def available_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 2**30
    return 0.0


def run_child(args: list[str]) -> tuple[dict | None, float, float, str]:
    """Popen + wait4: the kernel's peak RSS of exactly this child."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # read pipes in full before reaping, so a chatty child cannot block on a full pipe
    out, err = p.stdout.read(), p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    try:
        res = json.loads(out.decode().strip().splitlines()[-1]) if p.returncode == 0 else None
    except (IndexError, json.JSONDecodeError):
        res = None
    tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-2:])
    return res, ru.ru_maxrss * 1024 / GB, wall, tail


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, _, t = part.strip().partition("x")
        out.append((int(n), int(t)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000x1000,5000x10000,20000x1000,20000x10000,60000x1000,60000x10000",
                    help="NxT cases, comma-separated")
    ap.add_argument("--models", default="1000", help="M per case; several (comma-separated) measure growth with M")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"some of {','.join(STAGES)}")
    ap.add_argument("--lambdas", type=int, default=3, help="fit stage: lambdas on the path")
    ap.add_argument("--eps", type=float, default=0.9, help="fit stage: the path ends at lam_max * eps")
    ap.add_argument("--path-targets", type=int, default=8, help="path stage: targets fitted on the default path")
    ap.add_argument("--dir", default="/tmp/datamodels-scale", help="where the synthetic stores go")
    ap.add_argument("--keep", action="store_true", help="keep the stores (reused by a later run)")
    ap.add_argument("--min-free-gib", type=float, default=20.0,
                    help="run a case with N >= 60,000 only when this much memory is available")
    # child mode
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--t", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        res = build(Path(a.store), a.n, a.t, a.m) if a.stage == "build" else stage(a.stage, Path(a.store), a)
        print(json.dumps(res))
        return

    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"--stages: unknown {bad}; expected some of {list(STAGES)}")
    print(header())
    import torch
    import zarr

    print(f"zarr {zarr.__version__}; float32 matmul rate, {os.cpu_count()} threads: "
          f"{matmul_rate(threads=os.cpu_count() or 1, n=2048) / 1e9:.0f} GFLOP/s; GPU timing: not measured")
    print(f"memory: {available_gib():.1f} GiB available at start (shared machine: other jobs may run); "
          f"peak = the child's maximum resident set (ru_maxrss), GB = 1e9 bytes")
    print(f"stores: masks by the spec rule, margins = planted sparse model ({EFFECTS} effects per target) + noise; "
          f"{EVAL_MASKS}x{EVAL_REPEATS} eval models, {FULL_MODELS} full-set models")
    print(f"fit: {a.lambdas} lambdas down to lam_max*{a.eps}, all targets; path: default path on "
          f"{a.path_targets} targets")
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    _, floor_gb, _, _ = run_child(["--stage", "import", "--store", "-", "--n", "1", "--t", "1", "--m", "1"])
    print(f"import floor: {floor_gb:.2f} GB peak (a child that only imports the package)\n")
    print(f"{'N':>6} {'T':>6} {'M':>5} {'stage':<12} {'peak GB':>8} {'stage s':>9} {'child s':>8}  notes")
    results = []
    for m in [int(v) for v in a.models.split(",")]:
        for n, t in parse_sizes(a.sizes):
            if n >= 60000 and available_gib() < a.min_free_gib:
                print(f"{n:>6} {t:>6} {m:>5} {'(skipped)':<12} only {available_gib():.1f} GiB available, "
                      f"--min-free-gib {a.min_free_gib:g}")
                continue
            path = root / f"n{n}_t{t}_m{m}.zarr"
            common = ["--store", str(path), "--n", str(n), "--t", str(t), "--m", str(m)]
            if not (path / "zarr.json").exists():
                res, peak, wall, err = run_child(["--stage", "build", *common])
                if res is None:
                    print(f"{n:>6} {t:>6} {m:>5} {'build':<12} FAILED: {err}")
                    continue
                print(f"{n:>6} {t:>6} {m:>5} {'build':<12} {peak:>8.2f} {wall:>9.1f} {wall:>8.1f}")
            for s in stages:
                if n >= 60000 and available_gib() < a.min_free_gib:
                    print(f"{n:>6} {t:>6} {m:>5} {s:<12} skipped: only {available_gib():.1f} GiB available")
                    continue
                extra = ["--lambdas", str(a.lambdas), "--eps", str(a.eps), "--path-targets", str(a.path_targets)]
                res, peak, wall, err = run_child(["--stage", s, *common, *extra])
                if res is None:
                    print(f"{n:>6} {t:>6} {m:>5} {s:<12} {peak:>8.2f} {'FAILED':>9} {wall:>8.1f}  {err}")
                    continue
                notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in res.items() if k != "seconds")
                print(f"{n:>6} {t:>6} {m:>5} {s:<12} {peak:>8.2f} {res['seconds']:>9.1f} {wall:>8.1f}  {notes}",
                      flush=True)
                results.append({"n": n, "t": t, "m": m, "stage": s, "peak": peak, **res})
            if not a.keep:
                shutil.rmtree(path, ignore_errors=True)
                for p in root.glob(path.name + "_cdf*"):
                    p.unlink()
    growth(results)
    extrapolate(results)
    (root / "results.json").write_text(json.dumps(results, indent=1))


def _ratio(results, stage, key, fixed, vary):
    rows = sorted((r for r in results if r["stage"] == stage and all(r[k] == v for k, v in fixed.items())),
                  key=lambda r: r[vary])
    return [(r[vary], r[key]) for r in rows]


def growth(results: list[dict]) -> None:
    if not results:
        return
    print("\ngrowth (peak GB / stage seconds, each measured above):")
    stages = list(dict.fromkeys(r["stage"] for r in results))
    for vary, others in (("n", ("t", "m")), ("t", ("n", "m")), ("m", ("n", "t"))):
        combos = sorted({tuple(r[k] for k in others) for r in results})
        for combo in combos:
            fixed = dict(zip(others, combo))
            for s in stages:
                pk = _ratio(results, s, "peak", fixed, vary)
                sec = _ratio(results, s, "seconds", fixed, vary)
                if len(pk) < 2:
                    continue
                label = ", ".join(f"{k.upper()}={v}" for k, v in fixed.items())
                xs = " -> ".join(f"{v:g}" for v, _ in pk)
                peaks = " -> ".join(f"{p:.2f}" for _, p in pk)
                secs = " -> ".join(f"{q:.1f}" for _, q in sec)
                print(f"  {vary.upper()} {xs} ({label}), {s}: peak {peaks} GB; {secs} s")


def extrapolate(results: list[dict]) -> None:
    """Full fit (all T targets, the default path) at M = 50,000: the fit stage's passes over the
    data (measured over all T at M models) scaled linearly in M, plus the path stage's solve
    time per target times T."""
    fits = {(r["n"], r["t"], r["m"]): r for r in results if r["stage"] == "fit" and "seconds_stats" in r}
    paths = [r for r in results if r["stage"] == "path" and "seconds_solve" in r]
    rows = [(fits[(p["n"], p["t"], p["m"])], p) for p in paths if (p["n"], p["t"], p["m"]) in fits]
    if not rows:
        return
    print("\nextrapolated full fit at M=50,000 on this CPU (all T targets, default path; GPU not measured):")
    print("  statistics: the fit stage's passes over the data scaled linearly in M (they cost ~M N^2);")
    print("  solve: the path stage's seconds per target times T (assumes the per-target cost does not grow with M)")
    for f, p in rows:
        stats = f["seconds_stats"] * 50000 / f["m"]
        per = p["seconds_solve"] / p["targets"]
        solve = per * p["t"]
        print(f"  N={p['n']}, T={p['t']}: statistics {stats / 3600:.2f} h ({f['seconds_stats']:.1f} s at M={f['m']}) "
              f"+ solve {solve / 3600:.1f} h ({per:.2f} s/target at M={p['m']}) = {(stats + solve) / 3600:.1f} h")


if __name__ == "__main__":
    main()
