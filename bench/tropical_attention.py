"""Benchmark the tropical-attention critical loop: the max-plus product C = A ⊗ B (eq. 1) of square
n×n float32 matrices, against an ordinary BLAS matrix product of the same shape (how far from BLAS).

CPU: the NumPy reference, the Numba kernel, the torch path (broadcast + max in chunks) and ``A @ B``
(numpy/BLAS). CUDA: the torch path eager, the same under torch.compile, and ``A @ B`` (cuBLAS).
Throughput counts 2n³ operations (one add and one max per term, like a multiply-add).

    python bench/tropical_attention.py                  # CPU -> bench/results/tropical_attention_cpu.json
    python bench/tropical_attention.py --device cuda    # GPU -> bench/results/tropical_attention_cuda.json
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
from refimpl.attention.tropical_attention import _maxplus_torch, maxplus_matmul


def cpu_fns():
    return {
        "numpy": lambda ab: maxplus_matmul(*ab, backend="numpy"),
        "numba": lambda ab: maxplus_matmul(*ab, backend="numba"),
        "torch": lambda ab: maxplus_matmul(torch.from_numpy(ab[0]), torch.from_numpy(ab[1]), backend="torch"),
        "matmul (BLAS)": lambda ab: ab[0] @ ab[1],
    }


def cuda_fns():
    compiled = torch.compile(lambda a, b: (a[:, :, None] + b[None, :, :]).amax(dim=1))
    return {
        "torch": lambda ab: _maxplus_torch(*ab),
        "torch.compile": lambda ab: compiled(*ab),
        "matmul (cuBLAS)": lambda ab: ab[0] @ ab[1],
    }


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    if args.device == "cuda":
        sizes = [256, 512, 1024, 2048]
        fns = cuda_fns()
        make = lambda n: (torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda"))  # noqa: E731
        device_name = torch.cuda.get_device_name()
    else:
        sizes = [32, 64, 128, 256, 512]
        fns = cpu_fns()

        def make(n):
            rng = np.random.default_rng(n)
            return rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
                      f"{numba.get_num_threads()} numba threads"
    rows = compare_backends(fns, make, sizes, device="cuda" if args.device == "cuda" else None, repeat=3,
                            progress=True)
    for r in rows:
        r["numba_GOPs" if args.device == "cpu" else "torch.compile_GOPs"] = \
            2 * r["size"] ** 3 / r["numba_s" if args.device == "cpu" else "torch.compile_s"] / 1e9
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"tropical_attention_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "tropical_attention", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "dtype": "float32",
                               "shape": "n x n times n x n", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
