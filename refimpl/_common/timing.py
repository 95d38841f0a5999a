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


def compare_backends(fns: dict[str, Callable[[Any], Any]], make_input: Callable[[int], Any],
                     sizes: list[int], *, bytes_moved: Callable[[int], float] | None = None,
                     repeat: int = 5, device: Any = None, progress: bool = False) -> list[dict]:
    """Time every ``fns[name](make_input(size))`` for each size. Returns one dict per size:
    ``{"size": n, "<name>_s": seconds, ..., "<name>_GBps": ...}`` (GB/s when ``bytes_moved`` is
    given). All figures of one table come from one run, so their ratios are meaningful."""
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in notebooks without ipywidgets

    rows = []
    for n in tqdm(sizes, desc="sizes", disable=not progress):
        inp = make_input(n)
        row: dict[str, float] = {"size": n}
        for name, fn in fns.items():
            t = time_call(lambda: fn(inp), repeat=repeat, device=device)
            row[f"{name}_s"] = t
            if bytes_moved is not None:
                row[f"{name}_GBps"] = bytes_moved(n) / t / 1e9
        rows.append(row)
    return rows


def timing_table(rows: list[dict], reference: str = "numpy") -> str:
    """A Markdown table of ``compare_backends`` rows: milliseconds per call and the speed-up of each
    backend over ``reference``."""
    names = [k[:-2] for k in rows[0] if k.endswith("_s")]
    head = "| size | " + " | ".join(f"{n} (ms)" for n in names) + " | " + \
        " | ".join(f"{n} speed-up" for n in names if n != reference) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names) - (reference in names))]
    for r in rows:
        ms = " | ".join(f"{r[n + '_s'] * 1e3:.3f}" for n in names)
        sp = " | ".join(f"{r[reference + '_s'] / r[n + '_s']:.1f}x" for n in names if n != reference)
        lines.append(f"| {r['size']} | {ms} | {sp} |")
    return "\n".join(lines)


def loglog_plot(rows: list[dict], ax=None, xlabel: str = "size", title: str | None = None):
    """Log-log plot of seconds per call against size, one line per backend. Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.6))
    sizes = [r["size"] for r in rows]
    for name in (k[:-2] for k in rows[0] if k.endswith("_s")):
        ax.loglog(sizes, [r[name + "_s"] for r in rows], "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds per call")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax
