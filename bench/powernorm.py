"""Benchmark the PowerNorm critical loops over N tokens of C = 512 channels (float32).

Two loops: the forward reduction ``quadratic_mean`` (eq. 1, per-channel mean of x^2 over the
non-pad tokens) and the backward correction ``power_norm_backward`` (eqs. 5, 6, 8: dx plus four
per-channel sums, one read of dy and xhat). PyTorch has no fused PowerNorm kernel; the nearest
fused CPU op for the reduction is ``torch.linalg.vector_norm(x, dim=0)`` (timed as
"vector_norm" for reference, it skips the pad mask).
CUDA: the eager torch path and the same under ``torch.compile``.

    python bench/powernorm.py                  # CPU -> bench/results/powernorm_cpu.json
    python bench/powernorm.py --device cuda    # GPU -> bench/results/powernorm_cuda.json
"""
from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import numba
import numpy as np
import torch

from refimpl._common import compare_backends, timing_table
from refimpl.norm.powernorm import _backward_torch, _qmean_torch, power_norm_backward, quadratic_mean
from refimpl._common.bench import bench_parser, parse_bench_args

C = 512


def make_cpu(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, C), dtype=np.float32)
    dy = rng.standard_normal((n, C), dtype=np.float32)
    valid = rng.random(n) < 0.9
    w, nu, r = (rng.standard_normal(C).astype(np.float32) for _ in range(3))
    return x, dy, valid, w, nu, r


def make_cuda(n):
    return tuple(torch.from_numpy(a).cuda() for a in make_cpu(n))


def fns_qmean(device):
    if device == "cpu":
        f = {b: (lambda a, b=b: quadratic_mean(a[0], a[2], backend=b)) for b in ("numpy", "numba", "torch")}
        f["vector_norm"] = lambda a: torch.linalg.vector_norm(torch.from_numpy(a[0]), dim=0)
        return f
    comp = torch.compile(_qmean_torch)
    return {"torch": lambda a: _qmean_torch(a[0], a[2]),
            "torch.compile": lambda a: comp(a[0], a[2]),
            "vector_norm": lambda a: torch.linalg.vector_norm(a[0], dim=0)}


def fns_backward(device):
    if device == "cpu":
        return {b: (lambda a, b=b: power_norm_backward(a[1], a[0], a[3], a[4], a[5], a[2], backend=b))
                for b in ("numpy", "numba", "torch")}
    comp = torch.compile(_backward_torch)
    return {"torch": lambda a: _backward_torch(a[1], a[0], a[3], a[4], a[5], a[2]),
            "torch.compile": lambda a: comp(a[1], a[0], a[3], a[4], a[5], a[2])}


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    if args.device == "cuda":
        sizes, make, dev = [4096, 16384, 65536, 262144], make_cuda, "cuda"
        device_name = torch.cuda.get_device_name()
    else:
        sizes, make, dev = [128, 1024, 4096, 16384, 32768], make_cpu, None
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    ref = "numpy" if args.device == "cpu" else "torch"
    rows = []
    for loop, fns, nbytes in [("quadratic_mean", fns_qmean(args.device), lambda n: 4 * n * C),
                              ("power_norm_backward", fns_backward(args.device), lambda n: 12 * n * C)]:
        r = compare_backends(fns, make, sizes, bytes_moved=nbytes, device=dev, progress=True)
        print(f"\n{loop} (N tokens x C={C}, float32)\n" + timing_table(r, reference=ref))
        rows += [{"loop": loop, **row} for row in r]
    out = args.out or Path(__file__).parent / "results" / f"powernorm_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "powernorm", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "C": C,
                               # a shared machine's load distorts the timings (torch's thread pool most)
                               "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
