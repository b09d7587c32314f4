"""Shared bits of the benchmark scripts: hardware/version header and a matmul-rate probe."""

from __future__ import annotations

import os
import platform
import time


def header() -> str:
    import numpy
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"machine: {os.cpu_count()} cores, {cpu}; GPU: {gpu}\n"
            f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}")


def matmul_rate(threads: int = 1, n: int = 1024, dtype=None, device: str = "cpu", seconds: float = 2.0) -> float:
    """Measured FLOP/s of an n x n float32 (or ``dtype``) matrix product with ``threads`` threads."""
    import torch

    dtype = dtype or torch.float32
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        if device != "cpu":
            torch.cuda.synchronize()
        return 2 * n ** 3 * reps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
