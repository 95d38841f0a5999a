"""Benchmark softmax algorithms from in-cache to out-of-cache sizes (total 2^12 ... 2^24 float32).

Each input is (rows, n) with n = min(total, 16384): one row for small totals, many rows (and so
row parallelism) for large ones. Effective bandwidth counts the compulsory traffic: one read of x and
one write of y, 8 bytes per element, the same for every algorithm (the two-pass algorithm moves
12 B/element, three-pass recompute 16, reload 20: eq. 7 of the chapter). "copy" (np.copyto /
Tensor.copy_ on the same size) measures the machine's copy bandwidth, the limit for any softmax.

CPU: numpy three-pass (reference), numba two-pass (parallel over rows and single-thread), numba
three-pass recompute and reload, torch.softmax (fused kernel), the eager torch two-pass, and copy.
CUDA: torch.softmax, the eager torch two-pass, the same under torch.compile, and copy.

    python bench/two_pass_softmax.py                  # CPU -> bench/results/two_pass_softmax_cpu.json
    python bench/two_pass_softmax.py --device cuda    # GPU -> bench/results/two_pass_softmax_cuda.json
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
from refimpl.attention.two_pass_softmax import _two_pass_torch, softmax_three_pass, softmax_two_pass

ROW = 16384


def shape_of(total: int) -> tuple[int, int]:
    n = min(total, ROW)
    return total // n, n


def cpu_fns():
    return {
        "numpy": lambda x: softmax_three_pass(x, "recompute", backend="numpy"),
        "numba_2pass": lambda x: softmax_two_pass(x, backend="numba"),
        "numba_2pass_1thread": lambda x: softmax_two_pass(x, backend="numba", parallel=False),
        "numba_3pass_recompute": lambda x: softmax_three_pass(x, "recompute", backend="numba"),
        "numba_3pass_reload": lambda x: softmax_three_pass(x, "reload", backend="numba"),
        "torch.softmax": lambda x: torch.softmax(torch.from_numpy(x), dim=-1),
        "torch_2pass": lambda x: softmax_two_pass(torch.from_numpy(x), backend="torch"),
        "copy": lambda x: np.copyto(np.empty_like(x), x),
    }


def cuda_fns():
    compiled = torch.compile(_two_pass_torch)
    return {
        "torch.softmax": lambda x: torch.softmax(x, dim=-1),
        "torch_2pass": lambda x: softmax_two_pass(x, backend="torch"),
        "torch_2pass.compile": compiled,
        "copy": lambda x: torch.empty_like(x).copy_(x),
    }


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--max-log2", type=int, default=24, help="largest total size is 2^max_log2 floats")
    ap.add_argument("--threads", type=int, default=2, help="numba threads (CPU)")
    args = parse_bench_args(ap, argv)
    sizes = [2 ** k for k in range(12, args.max_log2 + 1, 2)]
    if args.device == "cuda":
        sizes = [2 ** k for k in range(12, max(args.max_log2, 28) + 1, 2)]
        fns = cuda_fns()
        make = lambda t: torch.randn(*shape_of(t), device="cuda") * 5  # noqa: E731
        device_name = torch.cuda.get_device_name()
        reference = "torch.softmax"
    else:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        fns = cpu_fns()
        make = lambda t: (np.random.default_rng(t).standard_normal(shape_of(t), dtype=np.float32) * 5)  # noqa: E731
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        reference = "numpy"
    rows = compare_backends(fns, make, sizes, bytes_moved=lambda t: 8 * t,
                            device="cuda" if args.device == "cuda" else None, progress=True)
    for r in rows:
        r["shape"] = list(shape_of(r["size"]))
    print(timing_table(rows, reference=reference))
    out = args.out or Path(__file__).parent / "results" / f"two_pass_softmax_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "two_pass_softmax", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__,
                               "numba_threads": numba.get_num_threads() if args.device == "cpu" else None,
                               "row_length": ROW, "bytes_per_element": 8, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
