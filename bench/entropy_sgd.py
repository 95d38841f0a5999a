"""Benchmark the Entropy-SGD critical loop: one inner SGLD iteration (eq. 8 of the chapter) on flat
float32 buffers of n elements (Nesterov momentum, weight decay, thermal noise).

CPU: the NumPy reference, the fused Numba kernel (serial below 2^23 elements, parallel from there) and the eager torch path (torch has no fused kernel
for this update). CUDA: the eager torch path, the same under torch.compile, and a copy of one buffer
(the bandwidth limit). Effective bandwidth counts 6 buffers read and 3 written.

    python bench/entropy_sgd.py                  # CPU -> bench/results/entropy_sgd_cpu.json
    python bench/entropy_sgd.py --device cuda    # GPU -> bench/results/entropy_sgd_cuda.json
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
from refimpl.optim.entropy_sgd import _NESTEROV, _inner_torch, sgld_inner_step
from refimpl._common.bench import bench_parser, parse_bench_args

HP = dict(gamma=1.0, sgld_lr=0.1, eps=1e-4, mu_decay=0.75, momentum=0.9, dampening=0.0, weight_decay=1e-4)


def _step(backend):
    return lambda b: sgld_inner_step(*b, **HP, nesterov=True, backend=backend)


def cpu_fns():
    return {"numpy": _step("numpy"), "numba": _step("numba"),
            "torch": lambda b: sgld_inner_step(*b["t"], **HP, nesterov=True, backend="torch")}


def cuda_fns():
    args = (HP["gamma"], HP["sgld_lr"], HP["eps"], HP["mu_decay"], HP["momentum"], HP["dampening"],
            HP["weight_decay"], _NESTEROV)
    compiled = torch.compile(lambda b: _inner_torch(*b, *args))
    return {"copy": lambda b: b[0].clone(), "torch": _step("torch"), "torch.compile": compiled}


class _Bufs(list):
    """Six flat buffers (x', grad, anchor, mu, buf, noise); ``["t"]``: tensor views of the same memory."""

    def __getitem__(self, k):
        if k == "t":
            return [torch.from_numpy(a) for a in self]
        return super().__getitem__(k)


def make_cpu(n):
    rng = np.random.default_rng(n)
    return _Bufs(rng.standard_normal(n, dtype=np.float32) for _ in range(6))


def make_cuda(n):
    g = torch.Generator(device="cuda").manual_seed(n)
    return [torch.randn(n, device="cuda", generator=g) for _ in range(6)]


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    if args.device == "cuda":
        sizes = [1 << 16, 1 << 20, 1 << 24, 1 << 26]
        fns, make = cuda_fns(), make_cuda
        device_name = torch.cuda.get_device_name()
    else:
        sizes = [1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22, 1 << 23]
        fns, make = cpu_fns(), make_cpu
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    rows = compare_backends(fns, make, sizes, bytes_moved=lambda n: 9 * 4 * n,
                            device="cuda" if args.device == "cuda" else None, progress=True)
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"entropy_sgd_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "entropy_sgd", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "dtype": "float32",
                               "hyper_parameters": HP, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
