"""Benchmark the two critical loops of S4D (float32 / complex64, as the model trains):

- the Vandermonde kernel K_l = 2 Re sum_n w_n Abar_n^l (convolutional mode), H = 16 channels, N/2 = 32 modes,
  against the kernel length L;
- the recurrent scan x_k = Abar x_{k-1} + Bbar u_k, y_k = 2 Re C x_k, batch 4, H = 16, N/2 = 32, against L.

CPU: the NumPy reference, the Numba kernels and the torch path (for the kernel, the official code's own
"naive" torch Vandermonde product; for the scan, a loop over time of vectorised torch ops, like the official
``step``). CUDA: the torch kernel eager and under torch.compile.

    python bench/s4d_diagonal_ssm.py                  # CPU -> bench/results/s4d_diagonal_ssm_cpu.json
    python bench/s4d_diagonal_ssm.py --device cuda    # GPU -> bench/results/s4d_diagonal_ssm_cuda.json
"""
from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import numba
import numpy as np
import torch

from refimpl._common import compare_backends, timing_table
from refimpl._common.bench import bench_parser, parse_bench_args
from refimpl.attention.s4d_diagonal_ssm import _vandermonde_torch, discretize, s4d_init, ssm_scan, vandermonde_kernel

H, N2, BATCH = 16, 32, 4


def _params(rng, lib="numpy", device="cpu"):
    A, B = s4d_init("inv", 2 * N2, H)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (H, 1)))
    C = rng.standard_normal((H, N2)) + 1j * rng.standard_normal((H, N2))
    dA, dB = discretize(dt, A, B, "zoh")
    arrs = [a.astype(np.complex64) for a in (C * dB, dt * A, dA, dB, C)]
    if lib == "torch":
        arrs = [torch.from_numpy(a).to(device) for a in arrs]
    return arrs


def kernel_fns(device):
    if device == "cuda":
        compiled = torch.compile(_vandermonde_torch)
        return {"torch": lambda a: _vandermonde_torch(a[0], a[1], a[2]),
                "torch.compile": lambda a: compiled(a[0], a[1], a[2])}
    return {b: (lambda a, b=b: vandermonde_kernel(a[0], a[1], a[2], backend=b)) for b in ("numpy", "numba", "torch")}


def scan_fns():
    return {b: (lambda a, b=b: ssm_scan(a[0], a[1], a[2], a[3], backend=b)) for b in ("numpy", "numba", "torch")}


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    rng = np.random.default_rng(0)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
        w, x, *_ = _params(rng, "torch", "cuda")
        rows_k = compare_backends(kernel_fns("cuda"), lambda L: (w, x, L), [1024, 4096, 16384, 65536],
                                  device="cuda", progress=True)
        rows_s = []
        print(timing_table(rows_k, reference="torch"))
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        w, x, dA, dB, C = _params(rng)
        # warm up (compile / load the numba caches) before timing
        vandermonde_kernel(w, x, 64, backend="numba")
        ssm_scan(np.zeros((BATCH, H, 8), np.float32), dA, dB, C, backend="numba")
        rows_k = compare_backends(kernel_fns("cpu"), lambda L: (w, x, L), [256, 1024, 4096, 16384], progress=True)
        print("Vandermonde kernel (H=16, N/2=32), size = L\n" + timing_table(rows_k))
        make_u = lambda L: (rng.standard_normal((BATCH, H, L)).astype(np.float32), dA, dB, C)  # noqa: E731
        rows_s = compare_backends(scan_fns(), make_u, [64, 256, 1024, 4096], repeat=3, progress=True)
        print("Recurrent scan (batch 4, H=16, N/2=32), size = L\n" + timing_table(rows_s))
    out = args.out or Path(__file__).parent / "results" / f"s4d_diagonal_ssm_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "s4d_diagonal_ssm", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "H": H, "N_half": N2,
                               "batch": BATCH, "rows": rows_k, "kernel_rows": rows_k, "scan_rows": rows_s},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
