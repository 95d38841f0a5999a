"""Benchmark of BHyT's critical loop: the fused row-wise RMS + tanh + gain forward (eqs. 1-3) and
its backward (eqs. 8-9), on (N, 1024) float32 inputs for a range of row counts N.

CPU: the NumPy reference, the Numba kernel, the torch path, and torch's own fused
``F.rms_norm`` (forward) as the anchor. CUDA: torch eager, a ``torch.compile``d torch path, and
``F.rms_norm``.

    python bench/bhyt.py --device cpu [--threads 1] [--out bench/results/bhyt_cpu.json]
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from refimpl._common import compare_backends, timing_table
from refimpl.norm.bhyt import BHyTFunction, bhyt, bhyt_backward
from refimpl._common.bench import bench_parser, parse_bench_args

H = 1024
LAM, KAPPA, EPS = 2.0, 10.0, 1e-6


def _best_of(rounds: int, fns: dict, make, sizes: list[int], passes: int, **kw) -> list[dict]:
    """``compare_backends`` run ``rounds`` times, keeping each entry's fastest median: on a shared
    machine, other processes only ever make a timing slower."""
    runs = [compare_backends(fns, make, sizes, bytes_moved=lambda n: passes * n * H * 4, progress=True, **kw)
            for _ in range(rounds)]
    best = []
    for rows in zip(*runs):
        row = {"size": rows[0]["size"]}
        for name in fns:
            t = min(r[f"{name}_s"] for r in rows)
            row[f"{name}_s"] = t
            row[f"{name}_GBps"] = passes * row["size"] * H * 4 / t / 1e9
        best.append(row)
    return best


def _cpu(sizes: list[int], repeat: int, rounds: int) -> list[dict]:
    w = np.random.default_rng(1).standard_normal(H).astype(np.float32)
    wt = torch.from_numpy(w)

    def make(n):
        rng = np.random.default_rng(n)
        x = (rng.standard_normal((n, H)) * 2).astype(np.float32)
        g = rng.standard_normal((n, H)).astype(np.float32)
        return x, g, torch.from_numpy(x), torch.from_numpy(g)

    fwd = {
        "numpy": lambda a: bhyt(a[0], w, LAM, KAPPA, EPS, backend="numpy"),
        "numba": lambda a: bhyt(a[0], w, LAM, KAPPA, EPS, backend="numba"),
        "torch": lambda a: bhyt(a[2], wt, LAM, KAPPA, EPS, backend="torch"),
        "torch_rms_norm": lambda a: F.rms_norm(a[2], (H,), wt, EPS),
    }
    bwd = {
        "numpy": lambda a: bhyt_backward(a[1], a[0], w, LAM, KAPPA, EPS, backend="numpy"),
        "numba": lambda a: bhyt_backward(a[1], a[0], w, LAM, KAPPA, EPS, backend="numba"),
        "torch": lambda a: bhyt_backward(a[3], a[2], wt, LAM, KAPPA, EPS, backend="torch"),
    }
    warm = make(8)
    for fns in (fwd, bwd):                      # compile / load the numba kernels before timing
        for fn in fns.values():
            fn(warm)
    rows = []
    for op, fns, passes in (("forward", fwd, 2), ("backward", bwd, 3)):
        for r in _best_of(rounds, fns, make, sizes, passes, repeat=repeat):
            rows.append({"op": op, **r})
    return rows


def _cuda(sizes: list[int], repeat: int, rounds: int) -> list[dict]:
    dev = torch.device("cuda")
    w = torch.randn(H, device=dev)
    lam = torch.tensor([LAM], device=dev)

    def eager(x):
        s = x.square().mean(-1, keepdim=True)
        return w * torch.tanh(lam * torch.rsqrt(s + EPS) * (1.0 / KAPPA) * x)

    compiled = torch.compile(eager)

    def make(n):
        g = torch.Generator(device=dev).manual_seed(n)
        x = torch.randn(n, H, device=dev, generator=g)
        return x, torch.randn(n, H, device=dev, generator=g)

    def fwd_bwd(fn):
        def run(a):
            x = a[0].requires_grad_()
            y = fn(x)
            y.backward(a[1])
        return run

    fwd = {"torch": lambda a: BHyTFunction.apply(a[0], w, lam, KAPPA, EPS)[0],
           "torch_eager_ops": lambda a: eager(a[0]), "torch_compile": lambda a: compiled(a[0]),
           "torch_rms_norm": lambda a: F.rms_norm(a[0], (H,), w, EPS)}
    bwd = {"torch": fwd_bwd(lambda x: BHyTFunction.apply(x, w, lam, KAPPA, EPS)[0]),
           "torch_compile": fwd_bwd(compiled),
           "torch_rms_norm": fwd_bwd(lambda x: F.rms_norm(x, (H,), w, EPS))}
    rows = []
    for op, fns, passes in (("forward", fwd, 2), ("forward+backward", bwd, 5)):
        for r in _best_of(rounds, fns, make, sizes, passes, repeat=repeat, device=dev):
            rows.append({"op": op, **r})
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3, help="repeat the whole table, keep each entry's best")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for numba and torch (default: their own defaults, all cores)")
    args = parse_bench_args(p)
    if args.threads is not None:
        numba.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        sizes = [256, 1024, 4096, 16384, 65536]
        rows = _cuda(sizes, args.repeat, args.rounds)
        device_name = torch.cuda.get_device_name()
    else:
        sizes = [64, 256, 1024, 4096, 16384]
        rows = _cpu(sizes, args.repeat, args.rounds)
        device_name = _cpu_name()
    for op in dict.fromkeys(r["op"] for r in rows):
        print(f"\n{op}, (N, {H}) float32, {device_name}\n")
        ref = "numpy" if args.device == "cpu" else "torch"
        print(timing_table([{k: v for k, v in r.items() if k != "op"} for r in rows if r["op"] == op], reference=ref))
    out = args.out or Path(__file__).resolve().parent / "results" / f"bhyt_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "bhyt", "device": device_name, "hidden": H,
                               "torch": torch.__version__, "numba": numba.__version__,
                               "threads": {"numba": numba.get_num_threads(), "torch": torch.get_num_threads()},
                               "method": f"best of {args.rounds} rounds of compare_backends (median of {args.repeat})",
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
