"""Benchmark the layer-norm critical loop (forward over N rows of H features).

CPU: the NumPy reference, the Numba kernel, the eager torch path and torch's fused F.layer_norm.
CUDA: the eager torch path, the same under torch.compile, F.layer_norm, and a copy (the bandwidth
limit); effective bandwidth counts one read of x and one write of y.

    python bench/layer_norm.py                  # CPU -> bench/results/layer_norm_cpu.json
    python bench/layer_norm.py --device cuda    # GPU -> bench/results/layer_norm_cuda.json
"""
from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from refimpl._common import compare_backends, timing_table
from refimpl.norm.layer_norm import _forward_torch, layer_norm
from refimpl._common.bench import bench_parser, parse_bench_args

H = 1024


def cpu_fns():
    return {
        "numpy": lambda x: layer_norm(x, H, backend="numpy"),
        "numba": lambda x: layer_norm(x, H, backend="numba"),
        "torch": lambda x: layer_norm(x, H, backend="torch"),
        "F.layer_norm": lambda x: F.layer_norm(torch.from_numpy(x), (H,)),
    }


def cuda_fns():
    compiled = torch.compile(lambda x: _forward_torch(x, 1e-5)[0])
    return {
        "copy": lambda x: x.clone(),
        "torch": lambda x: layer_norm(x, H, backend="torch"),
        "torch.compile": compiled,
        "F.layer_norm": lambda x: F.layer_norm(x, (H,)),
    }


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    if args.device == "cuda":
        sizes = [1024, 4096, 16384, 65536]
        fns = cuda_fns()
        make = lambda n: torch.randn(n, H, device="cuda")  # noqa: E731
        device_name = torch.cuda.get_device_name()
    else:
        sizes = [16, 128, 1024, 4096, 16384]
        fns = cpu_fns()
        make = lambda n: np.random.default_rng(n).standard_normal((n, H), dtype=np.float32)  # noqa: E731
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    rows = compare_backends(fns, make, sizes, bytes_moved=lambda n: 8 * n * H,
                            device="cuda" if args.device == "cuda" else None, progress=True)
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"layer_norm_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "layer_norm", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "H": H,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
