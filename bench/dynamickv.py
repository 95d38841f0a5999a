"""Benchmark DynamicKV's critical loop: windowed scoring + pooling (eqs. 1-3) of every layer, the global
top-k allocation (eqs. 4-6) and the gather of the kept keys and values (eq. 7), over prompt lengths T.

Problem: L = 8 layers, B = 1, H = 8 heads of d = 64, window w = 8, kernel 7 (avgpool),
max_capacity_prompt = 128, float32.
CPU: the NumPy reference, the Numba kernels and the torch path.
CUDA: the scoring (eqs. 1-3, the part that grows with T·w·d) in eager torch and under torch.compile.

    python bench/dynamickv.py                  # CPU -> bench/results/dynamickv_cpu.json
    python bench/dynamickv.py --device cuda    # GPU -> bench/results/dynamickv_cuda.json
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
from refimpl.kvcache.dynamickv import _scores_torch, dynamickv_select, window_scores

L, B, H, D, W, KS, MCP = 8, 1, 8, 64, 8, 7, 128


def compress(q, k, v, backend):
    """Scores of all layers, the DynamicKV selection, and the gather of each layer's kept keys/values."""
    scores = [window_scores(q[l], k[l], W, KS, "avgpool", backend=backend) for l in range(L)]
    sel = dynamickv_select(scores, W, MCP, backend=backend)
    out = []
    for l, idx in enumerate(sel.kept):
        if backend == "torch":
            i = torch.from_numpy(idx)[..., None].expand(-1, -1, -1, D)
            out.append((k[l].gather(2, i), v[l].gather(2, i)))
        else:
            i = idx[..., None]
            out.append((np.take_along_axis(k[l], i, 2), np.take_along_axis(v[l], i, 2)))
    return out


def make_cpu(t):
    g = np.random.default_rng(t)
    return tuple(g.standard_normal((L, B, H, t, D), dtype=np.float32) for _ in range(3))


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    if args.device == "cuda":
        sizes = [1024, 4096, 16384, 65536]
        compiled = torch.compile(lambda q, k: _scores_torch(q, k, W, KS, "avgpool"))
        fns = {"torch": lambda x: [window_scores(x[0][l], x[1][l], W, KS, "avgpool", backend="torch") for l in range(L)],
               "torch.compile": lambda x: [compiled(x[0][l], x[1][l]) for l in range(L)]}
        make = lambda t: tuple(torch.randn(L, B, H, t, D, device="cuda") for _ in range(2))  # noqa: E731
        device_name = torch.cuda.get_device_name()
        ref = "torch"
    else:
        sizes = [256, 1024, 4096, 16384]
        fns = {be: (lambda x, be=be: compress(*(x if be != "torch" else [torch.from_numpy(a) for a in x]), be))
               for be in ("numpy", "numba", "torch")}
        make = make_cpu
        compress(*make_cpu(64), "numba")  # compile / load the kernels before timing
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
                      f"{numba.get_num_threads()} numba threads"
        ref = "numpy"
    rows = compare_backends(fns, make, sizes, device="cuda" if args.device == "cuda" else None, progress=True,
                            repeat=5)
    print(timing_table(rows, reference=ref))
    out = args.out or Path(__file__).parent / "results" / f"dynamickv_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "dynamickv", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__,
                               "problem": dict(L=L, B=B, H=H, d=D, window=W, kernel_size=KS,
                                               max_capacity_prompt=MCP, size="prompt length T"),
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
