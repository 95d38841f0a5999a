"""Benchmark the DMC append-or-merge cache update (eqs. D1-D4) over B·H heads and T steps.

Size = the number of head-steps ``B·H·T`` (``B·H = 64`` heads of ``d_head = 64``, ``T`` growing). CPU: the NumPy
reference (a Python loop over steps, all heads vectorised), the Numba kernel (heads in parallel, steps and
features compiled), the torch path (loop over steps, heads vectorised). CUDA: the torch path eager and under
torch.compile (the step loop unrolled by the tracer is too long, so the compiled unit is one step).

    python bench/dynamic_memory_compression.py                  # CPU -> bench/results/dynamic_memory_compression_cpu.json
    python bench/dynamic_memory_compression.py --device cuda    # GPU -> bench/results/dynamic_memory_compression_cuda.json
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
from refimpl.kvcache.dynamic_memory_compression import BF16_EPS, _compress_torch, _torch_step, dmc_compress

BH, D = 64, 64


def make(n: int, device: str = "cpu"):
    T = max(1, n // BH)
    rng = np.random.default_rng(T)
    q = rng.standard_normal((1, BH, T)).astype(np.float32)
    k = rng.standard_normal((1, BH, T, D)).astype(np.float32)
    v = rng.standard_normal((1, BH, T, D)).astype(np.float32)
    k[..., -1] = np.where(rng.random((1, BH, T)) < 0.75, 6.0, 4.0)  # CR ≈ 4
    if device == "cuda":
        return tuple(torch.from_numpy(x).cuda() for x in (q, k, v))
    return q, k, v


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    if args.device == "cuda":
        step = torch.compile(_torch_step, dynamic=False)
        flat = lambda x: (x[0].reshape(BH, -1), x[1].reshape(BH, -1, D), x[2].reshape(BH, -1, D))  # noqa: E731
        fns = {"torch": lambda x: dmc_compress(*x, backend="torch"),
               "torch.compile": lambda x: _compress_torch(*flat(x), 12, 5.0, BF16_EPS, True, step=step)}
        sizes = [BH * t for t in (64, 256, 1024)]
        device_name = torch.cuda.get_device_name()
        mk = lambda n: make(n, "cuda")  # noqa: E731
    else:
        tt = lambda x: tuple(torch.from_numpy(a) for a in x)  # noqa: E731
        fns = {"numpy": lambda x: dmc_compress(*x, backend="numpy"),
               "numba": lambda x: dmc_compress(*x, backend="numba"),
               "torch": lambda x: dmc_compress(*tt(x), backend="torch")}
        sizes = [BH * t for t in (16, 64, 256, 1024)]
        device_name = f"{platform.processor() or platform.machine()}, torch {torch.get_num_threads()} threads, numba {numba.get_num_threads()} threads"
        mk = make
    dmc_compress(*make(BH * 4), backend="numba")  # compile (cached) before timing
    rows = compare_backends(fns, mk, sizes, device="cuda" if args.device == "cuda" else None, progress=True, repeat=3)
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"dynamic_memory_compression_{args.device}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "dynamic_memory_compression", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "heads": BH, "d_head": D,
                               "size": "head-steps B*H*T", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
