"""A small timing helper for performance sections: median wall time of repeated calls, with CUDA
synchronisation when the work runs on a GPU."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


def _sync(device: Any) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, repeat: int = 7, number: int | None = None,
              warmup: int = 2, device: Any = None, min_time: float = 0.02) -> float:
    """Median seconds per call of ``fn()`` over ``repeat`` timings of ``number`` calls each.

    ``number`` defaults to enough calls to last ``min_time`` seconds. ``device``: pass the CUDA
    device the work runs on so that every timing waits for the kernels to finish.
    """
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got {repeat}, {warmup}")
    for _ in range(warmup):
        fn()
    _sync(device)
    if number is None:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        one = max(time.perf_counter() - t0, 1e-7)
        number = max(1, int(min_time / one))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / number)
    times.sort()
    return times[len(times) // 2]
