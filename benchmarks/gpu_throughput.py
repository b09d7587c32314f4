"""CIFAR-10 ResNet-9 models per GPU-hour: our default recipe next to FFCV's ResNet-9 recipe,
measured side by side in one run on one GPU, against the floor set by that GPU's matmul rate.

Recipes (both in our code, on our ResNet-9):
  ours  pipelines/cifar10.yaml's train and model sections, unchanged.
  ffcv  the recipe of FFCV's examples/cifar (default_config.yaml + train_cifar.py): 24 epochs,
        batch 512, SGD lr 0.5 (triangular, peak at epoch 5 -> warmup 5/24), momentum 0.9,
        weight decay 5e-4, label smoothing 0.1, flip, translate 2, cutout 4, fp16 autocast with
        loss scaling, test-time width flip, full widths 64-128-256-512, logits x 0.2.
        Not reproduced (our code has no switch for them; listed in the output): FFCV's network
        variant (5x5 stride-2 conv, 256->128 head), plain (not Nesterov) momentum, weight decay on
        batch-norm parameters too, and mean (not zero) fill for translate/cutout.

For each recipe x loader x concurrency: C workers (processes, like fractional-GPU Ray actors,
or threads with one CUDA stream each) share the GPU; each trains --models models after one
untimed warm-up model (cuDNN autotuning, FFCV JIT). Reported: aggregate models/hour, the floor
models/hour = measured bf16 matmul FLOP/s / (FLOPs per model: 3 x forward x examples x epochs
+ forward x margin evaluations), mean GPU utilisation (nvidia-smi, else torch.cuda.utilization)
during the timed window, peak memory per worker (torch.cuda.max_memory_allocated), mean test
accuracy (meaningful only with --data cifar10).

    python benchmarks/gpu_throughput.py                       # synthetic CIFAR-shaped data
    python benchmarks/gpu_throughput.py --data cifar10 --root ~/data/cifar-10-batches-py
    python benchmarks/gpu_throughput.py --concurrent 1,2,4 --mode processes --loaders memory,ffcv
    python benchmarks/gpu_throughput.py --cpu-smoke           # no GPU: tiny CPU run of the code path

Without a CUDA device (and without --cpu-smoke) it prints what it would measure and exits 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, matmul_rate  # noqa: E402

from datamodels.config import load_config  # noqa: E402
from datamodels.data import load_dataset  # noqa: E402
from datamodels.model import build_model, count_flops  # noqa: E402
from datamodels.train import subset_size, train_model  # noqa: E402

CIFAR_YAML = ROOT / "pipelines" / "cifar10.yaml"

# FFCV's examples/cifar recipe, in our config keys (see the module docstring for what differs).
FFCV_RECIPE = [
    "train.epochs=24",
    "train.batch_size=512",
    "train.lr=0.5",
    f"train.warmup={5 / 24!r}",  # lr_peak_epoch 5 of 24
    "train.momentum=0.9",
    "train.weight_decay=0.0005",
    "train.label_smoothing=0.1",
    "train.flip=true",
    "train.translate=2",
    "train.cutout=4",
    "train.tta_flip=true",
    "train.precision=fp16",  # FFCV: torch.cuda.amp.autocast() + GradScaler
    "model.widths=[64, 128, 256, 512]",
    "model.scale_out=0.2",  # FFCV's Mul(0.2)
]
FFCV_NOT_REPRODUCED = (
    "network variant (64, 5x5/2 conv to 128, 256, head conv 256->128), plain momentum "
    "(ours: Nesterov), weight decay on BN parameters too (ours: conv/linear weights only), "
    "mean fill for translate/cutout (ours: zeros)"
)
RECIPES = {"ours": [], "ffcv": FFCV_RECIPE}

SMOKE = [  # tiny CPU run of the same code path: nothing it prints is a GPU number
    "data.synthetic_train=96",
    "data.synthetic_test=32",
    "train.epochs=1",
    "train.batch_size=16",
    "model.widths=[4, 8, 8, 8]",
    "train.device=cpu",
    "train.precision=float32",
    "train.threads=1",
]


def recipe_config(recipe: str, *, data: str, root: str | None, loader: str, beton: str | None,
                  smoke: bool):
    sets = ["data.dataset=synthetic"] if data == "synthetic" else ["data.dataset=cifar10"]
    if root:
        sets.append(f"data.root={root}")
    sets += RECIPES[recipe] + (SMOKE if smoke else [])
    sets += [f"train.loader={loader}"] + ([f"data.beton={beton}"] if beton else [])
    return load_config(CIFAR_YAML, sets)


def model_flops(cfg, ds) -> float:
    """Training (3 x forward per example seen) plus margin evaluation on all N + T examples."""
    f = count_flops(build_model(cfg.model, ds.train_x.shape[1], ds.num_classes), tuple(ds.train_x.shape[1:]))
    n_sub = subset_size(ds.num_train, cfg.collect.alpha)
    evals = (ds.num_train + ds.num_test) * (2 if cfg.train.tta_flip and ds.flippable else 1)
    return 3 * f * n_sub * cfg.train.epochs + f * evals


def describe(recipe: str, cfg) -> str:
    t, m = cfg.train, cfg.model
    return (f"{recipe}: epochs {t.epochs}, batch {t.batch_size}, lr {t.lr} (peak at {t.warmup:.3f}), "
            f"momentum {t.momentum}, wd {t.weight_decay}, smoothing {t.label_smoothing}, "
            f"translate {t.translate}, flip {t.flip}, cutout {t.cutout}, tta {t.tta_flip}, "
            f"{t.precision}, widths {tuple(m.widths)}, scale_out {m.scale_out}")


# --------------------------------------------------------------------------- workers


def _work(rank, cfg, device_name, indices, threads, barrier, out, dataset=None, stream=False):
    """Train ``indices`` after one untimed warm-up model; report times, accuracy, peak memory."""
    try:
        torch.set_num_threads(threads)
        device = torch.device(device_name)
        ds = dataset if dataset is not None else load_dataset(cfg.data)
        ctx = torch.cuda.stream(torch.cuda.Stream()) if stream and device.type == "cuda" else None
        if ctx is not None:
            ctx.__enter__()
        train_model(ds, cfg, 1_000_000 + rank, device=device)  # warm-up: cuDNN autotune, FFCV JIT
        if device.type == "cuda":
            torch.cuda.synchronize()
            if not stream:
                torch.cuda.reset_peak_memory_stats()
        barrier.wait()
        t0 = time.time()
        accs = [train_model(ds, cfg, i, device=device).test_accuracy for i in indices]  # .cpu() syncs
        t1 = time.time()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        out.put({"rank": rank, "t0": t0, "t1": t1, "accs": accs, "peak": peak})
    except BaseException:
        out.put({"rank": rank, "error": traceback.format_exc()})
        try:
            barrier.abort()
        except Exception:
            pass


class _UtilSampler(threading.Thread):
    """Samples GPU utilisation (%) twice a second until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop, self.source = [], threading.Event(), None
        self.query = None
        if shutil.which("nvidia-smi"):
            ident = None
            try:
                ident = f"GPU-{torch.cuda.get_device_properties(0).uuid}"
            except Exception:
                vis = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
                ident = vis or "0"
            self.query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                          "-i", ident]

    def sample(self):
        if self.query:
            try:
                r = subprocess.run(self.query, capture_output=True, text=True, timeout=5)
                if r.returncode == 0 and r.stdout.strip():
                    self.source = "nvidia-smi"
                    return float(r.stdout.strip().splitlines()[0])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self.query = None
        try:
            u = torch.cuda.utilization()
            self.source = "torch.cuda.utilization"
            return float(u)
        except Exception:
            return None

    def run(self):
        while not self.stop.is_set():
            u = self.sample()
            if u is None:
                return
            self.samples.append(u)
            self.stop.wait(0.5)

    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else None


def measure(cfg, *, concurrent: int, models: int, mode: str, device: str, threads: int,
            dataset=None) -> dict:
    """Aggregate models/hour of ``concurrent`` workers, each training ``models`` models."""
    indices = [list(range(w * models, (w + 1) * models)) for w in range(concurrent)]
    if mode == "processes":
        mpc = mp.get_context("spawn")
        barrier, out = mpc.Barrier(concurrent + 1), mpc.Queue()
        workers = [mpc.Process(target=_work, args=(w, cfg, device, indices[w], threads, barrier, out))
                   for w in range(concurrent)]
    else:
        barrier, out = threading.Barrier(concurrent + 1), queue_mod.Queue()
        workers = [threading.Thread(target=_work, daemon=True,
                                    args=(w, cfg, device, indices[w], threads, barrier, out, dataset, True))
                   for w in range(concurrent)]
    for p in workers:
        p.start()
    sampler = _UtilSampler() if device == "cuda" else None
    results = []

    def collect_until(done):
        """Gather worker reports until ``done()``; a worker that died silently (OOM-killed) fails."""
        while not done():
            try:
                results.append(out.get(timeout=2.0))
            except queue_mod.Empty:
                if not any(p.is_alive() for p in workers) and out.empty():
                    raise RuntimeError(f"{len(workers) - len(results)} worker(s) exited without a report")

    ready = threading.Event()

    def wait_barrier():
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        ready.set()

    threading.Thread(target=wait_barrier, daemon=True).start()
    collect_until(lambda: ready.is_set() or any("error" in r for r in results))
    if sampler:
        sampler.start()
    collect_until(lambda: len(results) == len(workers))
    if sampler:
        sampler.stop.set()
    for p in workers:
        p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError("a worker failed:\n" + errors[0])
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    accs = [a for r in results for a in r["accs"]]
    return {
        "concurrent": concurrent,
        "models": len(accs),
        "wall_s": wall,
        "s_per_model_per_worker": wall / models,
        "models_per_hour": 3600 * len(accs) / wall,
        "gpu_util_pct": sampler.mean() if sampler else None,
        "gpu_util_source": sampler.source if sampler else None,
        "peak_mem_gib_per_worker": max(r["peak"] for r in results) / 2**30,
        "mean_test_accuracy": sum(accs) / len(accs),
    }


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["synthetic", "cifar10"], default="synthetic",
                    help="synthetic CIFAR-shaped data (throughput only) or real CIFAR-10 (accuracy too)")
    ap.add_argument("--root", default=None, help="CIFAR-10 python batches (with --data cifar10)")
    ap.add_argument("--recipes", default="ours,ffcv", help="comma list of: ours, ffcv")
    ap.add_argument("--loaders", default="memory", help="comma list of: memory, ffcv (needs datamodels[ffcv])")
    ap.add_argument("--concurrent", default="1", help="workers sharing the GPU, comma list, e.g. 1,2,4")
    ap.add_argument("--mode", choices=["processes", "threads"], default=None,
                    help="processes (like fractional-GPU Ray actors; default on GPU) or threads with "
                         "one CUDA stream each (default with --cpu-smoke)")
    ap.add_argument("--models", type=int, default=4, help="timed models per worker")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny synthetic data, 1 epoch, narrow network, on CPU: exercises the code path only")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    recipes = [r for r in args.recipes.split(",") if r]
    loaders = [x for x in args.loaders.split(",") if x]
    concurrent = [int(c) for c in args.concurrent.split(",") if c]
    for r in recipes:
        if r not in RECIPES:
            ap.error(f"--recipes: expected names from {sorted(RECIPES)}, got {r!r}")
    for x in loaders:
        if x not in ("memory", "ffcv"):
            ap.error(f"--loaders: expected memory and/or ffcv, got {x!r}")
    if args.data == "cifar10" and not args.root:
        ap.error("--data cifar10 needs --root DIR (CIFAR-10's python batches)")

    smoke = args.cpu_smoke
    cuda = torch.cuda.is_available()
    print(header())
    if not cuda and not smoke:
        print("\nNo CUDA GPU here: nothing measured. On a GPU this script measures, side by side:")
        for r in recipes:
            cfg = recipe_config(r, data="synthetic", root=None, loader="memory", beton=None, smoke=False)
            ds_shape = (3, 32, 32)
            f = count_flops(build_model(cfg.model, 3, 10), ds_shape)
            print(f"  {describe(r, cfg)}")
            print(f"    forward {f / 1e6:.0f} MFLOP per 32x32 image; per model: 3 x forward x "
                  f"{subset_size(50000, cfg.collect.alpha)} examples x {cfg.train.epochs} epochs + margins")
        print("  loaders " + ",".join(loaders) + "; concurrency " + ",".join(map(str, concurrent))
              + " (processes or threads+CUDA streams)")
        print("  models/hour (aggregate), GPU utilisation, peak memory per worker, mean test accuracy,")
        print("  and the floor from the measured bf16 matmul rate (n=8192).")
        print("Run it on a GPU machine, or pass --cpu-smoke to exercise the code path on CPU.")
        return 0

    device = "cpu" if smoke else "cuda"
    mode = args.mode or ("threads" if smoke else "processes")
    threads = args.threads or (1 if smoke else max(1, (os.cpu_count() or 2) // max(concurrent)))
    if smoke:
        print("CPU SMOKE RUN: tiny synthetic data, 1 epoch, narrow network. Not a GPU measurement;")
        print("the floor below uses this CPU's float32 matmul rate (1 thread per worker).")
        rate = matmul_rate(threads=1, n=512, seconds=0.5)
        rate_name = "CPU float32 matmul, 1 thread, n=512"
    else:
        rate = matmul_rate(n=8192, dtype=torch.bfloat16, device="cuda", seconds=3.0)
        rate_name = f"{torch.cuda.get_device_name(0)} bf16 matmul, n=8192"
    print(f"matmul rate: {rate / 1e12:.3f} TFLOP/s ({rate_name})")
    print(f"data: {args.data}" + ("  (synthetic: accuracy says nothing about CIFAR-10)" if args.data == "synthetic" else ""))
    print(f"concurrency mode: {mode}; torch threads per worker: {threads}")

    tmp = tempfile.mkdtemp(prefix="gpu_throughput_")
    rows = []
    try:
        for recipe in recipes:
            cfg0 = recipe_config(recipe, data=args.data, root=args.root, loader="memory", beton=None, smoke=smoke)
            ds = load_dataset(cfg0.data)
            flops = model_flops(cfg0, ds)
            print(f"\n{describe(recipe, cfg0)}")
            if recipe == "ffcv":
                print(f"  not reproduced: {FFCV_NOT_REPRODUCED}")
            print(f"  FLOPs per model: {flops / 1e12:.3f} TFLOP (train 3x forward + margins on N+T)")
            for loader in loaders:
                if loader == "ffcv":
                    try:
                        import ffcv  # noqa: F401
                    except ImportError:
                        print("  loader ffcv: skipped, FFCV is not installed (pip install 'datamodels[ffcv]')")
                        continue
                beton = str(Path(tmp) / f"{args.data}.beton") if loader == "ffcv" else None
                cfg = recipe_config(recipe, data=args.data, root=args.root, loader=loader, beton=beton, smoke=smoke)
                if loader == "ffcv":  # write it once here rather than racing in the workers
                    from datamodels.ffcv_backend import write_beton

                    if not Path(beton).exists():
                        write_beton(ds, beton)
                for c in concurrent:
                    r = measure(cfg, concurrent=c, models=args.models, mode=mode, device=device,
                                threads=threads, dataset=ds)
                    # One GPU is one floor however many workers share it; in the CPU smoke run
                    # each worker has its own 1-thread matmul rate.
                    floor = 3600 * rate * (c if smoke else 1) / flops
                    r.update(recipe=recipe, loader=loader, mode=mode, floor_models_per_hour=floor,
                             of_floor=r["models_per_hour"] / floor, flops_per_model=flops)
                    rows.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"{'recipe':<7}{'loader':<8}{'C':>3}{'models':>7}{'wall s':>9}{'s/model':>9}{'models/h':>11}"
          f"{'floor/h':>11}{'of floor':>9}{'GPU %':>7}{'peak GiB':>9}{'acc':>7}")
    for r in rows:
        util = "n/a" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.0f}"
        print(f"{r['recipe']:<7}{r['loader']:<8}{r['concurrent']:>3}{r['models']:>7}{r['wall_s']:>9.2f}"
              f"{r['s_per_model_per_worker']:>9.2f}{r['models_per_hour']:>11.0f}{r['floor_models_per_hour']:>11.0f}"
              f"{r['of_floor']:>9.1%}{util:>7}{r['peak_mem_gib_per_worker']:>9.2f}{r['mean_test_accuracy']:>7.3f}")
    print("(C workers share the device; s/model is per worker; models/h is the aggregate; the timed "
          "window excludes one warm-up model per worker)")
    if smoke:
        print("CPU SMOKE RUN: these numbers are CPU numbers for a tiny problem, not GPU throughput.")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header(), "smoke": smoke, "data": args.data,
                                               "matmul_rate": rate, "rate_source": rate_name, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
