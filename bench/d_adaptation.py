"""Benchmark the D-Adaptation critical loop: one functional step on flat float32 buffers of n
parameters (the fused accumulate pass — element-wise state updates with the global reductions —
followed by the parameter update), for D-Adapted Adam (eqs. 7-11) and D-Adapted SGD (eqs. 1-6).

CPU: the NumPy reference, the Numba kernels and the torch path; for scale, torch's own fused CPU
Adam step (``torch.optim.Adam(fused=True)``), which does the same element-wise work minus the two
reductions. CUDA: the torch path, the same under torch.compile, and the fused torch Adam.

    python bench/d_adaptation.py                  # CPU -> bench/results/d_adaptation_cpu.json
    python bench/d_adaptation.py --device cuda    # GPU -> bench/results/d_adaptation_cuda.json
    python bench/d_adaptation.py --threads 1      # one CPU thread for every backend
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
from refimpl.optim.d_adaptation import dadapt_adam_step, dadapt_sgd_step
from refimpl._common.bench import bench_parser, parse_bench_args


def make_buffers(n: int, device: str = "cpu"):
    """x, g, s, m, v, x0 as float32 (numpy arrays on CPU, tensors on CUDA) and a fused-Adam baseline."""
    rng = np.random.default_rng(n)
    arrs = [rng.standard_normal(n, dtype=np.float32) for _ in range(2)]
    arrs += [np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32), arrs[0].copy()]
    p = torch.nn.Parameter(torch.from_numpy(arrs[0].copy()).to(device))
    p.grad = torch.from_numpy(arrs[1].copy()).to(device)
    adam = torch.optim.Adam([p], lr=1e-3, fused=True)
    if device == "cpu":
        return dict(np=arrs, t=[torch.from_numpy(a.copy()) for a in arrs], adam=adam)
    return dict(t=[torch.from_numpy(a).to(device) for a in arrs], adam=adam)


def adam_step(bufs, backend):
    x, g, s, _, v, _ = bufs
    m = bufs[3]
    return dadapt_adam_step(x, g, s, m, v, 1e-3, 1e-4, weight_decay=0.0, backend=backend)


def sgd_step(bufs, backend):
    x, g, s, _, _, x0 = bufs
    return dadapt_sgd_step(x, g, s, x0, 1e-3, 1e-4, 1.0, momentum=0.9, backend=backend)


def compiled_fns():
    """torch.compile of the torch path's element-wise math (reductions included), for CUDA."""
    @torch.compile
    def adam_core(x, g, s, m, v, dlr: float, b1: float, b2: float, eps: float):
        sb2 = b2 ** 0.5
        num = torch.dot(g, s / (v.sqrt() + eps))
        m.mul_(b1).add_(g, alpha=dlr * (1 - b1))
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        s.mul_(sb2).add_(g, alpha=dlr * (1 - sb2))
        l1 = s.abs().sum()
        x.addcdiv_(m, v.sqrt() + eps, value=-1)
        return num, l1

    return lambda b: adam_core(b[0], b[1], b[2], b[3], b[4], 1e-3, 0.9, 0.999, 1e-8)


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and numba (default: all); 1 is robust on a busy machine")
    args = parse_bench_args(ap, argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    if args.device == "cuda":
        sizes = [1 << 16, 1 << 20, 1 << 22, 1 << 24]
        core = compiled_fns()
        adam_fns = {"torch": lambda b: adam_step(b["t"], "torch"), "torch.compile": lambda b: core(b["t"]),
                    "torch Adam fused (no D)": lambda b: b["adam"].step()}
        sgd_fns = {"torch": lambda b: sgd_step(b["t"], "torch")}
        make = lambda n: make_buffers(n, "cuda")  # noqa: E731
        device_name = torch.cuda.get_device_name()
        ref = "torch"
    else:
        sizes = [1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22]
        adam_fns = {"numpy": lambda b: adam_step(b["np"], "numpy"), "numba": lambda b: adam_step(b["np"], "numba"),
                    "torch": lambda b: adam_step(b["t"], "torch"),
                    "torch Adam fused (no D)": lambda b: b["adam"].step()}
        sgd_fns = {"numpy": lambda b: sgd_step(b["np"], "numpy"), "numba": lambda b: sgd_step(b["np"], "numba"),
                   "torch": lambda b: sgd_step(b["t"], "torch")}
        make = make_buffers
        device_name = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch / "
                       f"{numba.get_num_threads()} numba threads")
        ref = "numpy"
    dev = "cuda" if args.device == "cuda" else None
    rows = compare_backends(adam_fns, make, sizes, bytes_moved=lambda n: 4 * 9 * n, device=dev, repeat=9, progress=True)
    print("D-Adapted Adam step (float32, n parameters)")
    print(timing_table(rows, reference=ref))
    rows_sgd = compare_backends(sgd_fns, make, sizes, bytes_moved=lambda n: 4 * 7 * n, device=dev, repeat=9, progress=True)
    print("\nD-Adapted SGD step (float32, n parameters)")
    print(timing_table(rows_sgd, reference=ref))
    out = args.out or Path(__file__).parent / "results" / f"d_adaptation_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "d_adaptation", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "dtype": "float32",
                               "rows": rows, "rows_sgd": rows_sgd}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
