"""Benchmark SOFT's critical loop and its payoff.

1. ``newton_inverse``: 20 Newton-Raphson steps (eq. 4) on a batch of G = 16 landmark kernels of size m x m
   (float32), m = 16 ... 256 (size = m). CPU: the NumPy reference, the Numba kernel (parallel over the batch,
   BLAS products) and torch; ``torch.linalg.inv`` (LU, the exact alternative) for reference. CUDA: torch eager,
   the same under ``torch.compile``, and ``torch.linalg.inv``.
2. ``attention``: full Gaussian-kernel attention (eq. 1, quadratic) vs SOFT's Nystrom form (eq. 3, 49 landmarks)
   for one head of d = 32 over n tokens (size = n), torch float32.

    python bench/soft_softmax_free.py                  # CPU -> bench/results/soft_softmax_free_cpu.json
    python bench/soft_softmax_free.py --device cuda    # GPU -> bench/results/soft_softmax_free_cuda.json
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
from refimpl._common.bench import bench_parser, parse_bench_args
from refimpl.attention.soft_softmax_free import _newton_torch, gaussian_attention, newton_inverse, nystrom_attention

G, ITERS, D, M_LANDMARKS = 16, 20, 32, 49


def make_kernels(m, device="cpu"):
    rng = np.random.default_rng(m)
    z = (rng.standard_normal((G, m, D)) / D ** 0.25).astype(np.float32)
    s = np.exp(-((z[:, :, None] - z[:, None]) ** 2).sum(-1) / 2).astype(np.float32)
    return s if device == "cpu" else torch.from_numpy(s).to(device)


def fns_newton(device):
    if device == "cpu":
        f = {b: (lambda s, b=b: newton_inverse(s if b != "torch" else torch.from_numpy(s), ITERS, backend=b))
             for b in ("numpy", "numba", "torch")}
        f["linalg.inv"] = lambda s: torch.linalg.inv(torch.from_numpy(s))
        return f

    def start(s):
        p = s + 0.01 * torch.eye(s.shape[-1], device=s.device)
        return p, (0.9 * 2 / s.sum(-1).amax(-1) ** 2)[..., None, None] * p

    comp = torch.compile(_newton_torch)
    return {"torch": lambda s: newton_inverse(s, ITERS, backend="torch"),
            "torch.compile": lambda s: comp(*start(s), ITERS),
            "linalg.inv": lambda s: torch.linalg.inv(s)}


def make_tokens(n, device="cpu"):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, 1, n, D, generator=g) / D ** 0.25
    v = torch.randn(1, 1, n, D, generator=g)
    lm = q[:, :, torch.linspace(0, n - 1, M_LANDMARKS).long()]
    return tuple(t.to(device) for t in (q, v, lm))


def fns_attention():
    return {"full": lambda a: gaussian_attention(a[0], a[1]),
            "nystrom": lambda a: nystrom_attention(a[0], a[2], a[1], iters=ITERS)}


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    dev = args.device
    if dev == "cuda":
        device_name = torch.cuda.get_device_name()
        m_sizes, n_sizes = [16, 32, 64, 128, 256], [1024, 4096, 16384, 32768]
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        m_sizes, n_sizes = [16, 32, 64, 128, 256], [256, 1024, 4096]
    with torch.no_grad():
        r1 = compare_backends(fns_newton(dev), lambda m: make_kernels(m, dev), m_sizes,
                              device=dev if dev == "cuda" else None, progress=True)
        print(f"\nnewton_inverse ({G} matrices m x m, {ITERS} steps, float32)\n"
              + timing_table(r1, reference="numpy" if dev == "cpu" else "torch"))
        r2 = compare_backends(fns_attention(), lambda n: make_tokens(n, dev), n_sizes,
                              device=dev if dev == "cuda" else None, progress=True)
        print(f"\nattention (one head, d={D}, {M_LANDMARKS} landmarks, float32)\n" + timing_table(r2, reference="full"))
    rows = [{"loop": "newton_inverse", **r} for r in r1] + [{"loop": "attention", **r} for r in r2]
    out = args.out or Path(__file__).parent / "results" / f"soft_softmax_free_{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "soft_softmax_free", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "G": G, "iters": ITERS,
                               "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
