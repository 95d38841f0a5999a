"""Benchmark the LARS critical loop: one functional step (per-tensor norms of w and g, trust ratios,
fused momentum update) on a flat float32 buffer of n elements split into 32 tensors (16 weight
matrices holding 99% of the elements, 16 small bias-like vectors).

CPU: the NumPy reference, the Numba kernels, the torch backend, and torch's own multi-tensor
``torch.optim.SGD(foreach=True)`` momentum step on the same tensors (less work: no norms, no
rescaling; torch has no fused LARS). CUDA: the torch backend, the same under torch.compile, and the
foreach SGD step. Effective bandwidth counts the minimum traffic of a fused step: one read of w,
g, v and one write of w, v (20 bytes per element).

    python bench/lars.py                  # CPU -> bench/results/lars_cpu.json
    python bench/lars.py --device cuda    # GPU -> bench/results/lars_cuda.json
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
from refimpl.optim.lars import lars_step
from refimpl.optim.multi_tensor import SegmentLayout
from refimpl._common.bench import bench_parser, parse_bench_args

K = 32
HYPER = dict(lr=0.01, momentum=0.9, weight_decay=1e-4, trust_coeff=1e-3)


def make_layout(n: int) -> SegmentLayout:
    big, small = max(1, int(0.99 * n) // (K // 2)), max(1, int(0.01 * n) // (K // 2))
    return SegmentLayout([(big,)] * (K // 2) + [(small,)] * (K // 2))


def make_input(n: int, device: str = "cpu"):
    layout = make_layout(n)
    rng = np.random.default_rng(n)
    w, g, v = (rng.standard_normal(layout.numel, dtype=np.float32) for _ in range(3))
    if device != "cpu":
        w, g, v = (torch.from_numpy(a).to(device) for a in (w, g, v))
    params = [torch.nn.Parameter(t.clone()) for t in layout.unflatten(torch.as_tensor(w).cpu())]
    if device != "cpu":
        params = [torch.nn.Parameter(p.detach().to(device)) for p in params]
    for p, gk in zip(params, layout.unflatten(torch.as_tensor(g))):
        p.grad = gk.to(p.device).clone()
    sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)
    sgd.step()  # create the momentum buffers
    return {"layout": layout, "w": w, "g": g, "v": v, "wt": torch.as_tensor(w), "gt": torch.as_tensor(g),
            "vt": torch.as_tensor(v), "sgd": sgd}


def step(backend):
    def fn(d):
        if backend == "torch":
            return lars_step(d["wt"], d["gt"], d["vt"], d["layout"], backend="torch", **HYPER)
        return lars_step(d["w"], d["g"], d["v"], d["layout"], backend=backend, **HYPER)
    return fn


def cpu_fns():
    # numba last: after a parallel region its OpenMP workers spin-wait for a while, which would slow
    # whatever torch call came next on a small machine
    return {"numpy": step("numpy"), "torch": step("torch"), "SGD foreach": lambda d: d["sgd"].step(),
            "numba": step("numba")}


def cuda_fns():
    from refimpl.optim.lars import _check_hyper, _step_torch
    h = _check_hyper(HYPER["lr"], HYPER["momentum"], 0.0, HYPER["weight_decay"], False, HYPER["trust_coeff"],
                     1e-8, False)
    compiled = torch.compile(lambda w, g, v, layout: _step_torch(w, g, v, layout, h, True,
                                                                 np.zeros(len(layout), bool), False))
    return {"torch": step("torch"),
            "torch.compile": lambda d: compiled(d["wt"], d["gt"], d["vt"], d["layout"]),
            "SGD foreach": lambda d: d["sgd"].step()}


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    if args.device == "cuda":
        sizes = [1 << 16, 1 << 20, 1 << 23, 1 << 25]
        fns = cuda_fns()
        device_name = torch.cuda.get_device_name()
    else:
        sizes = [1 << 12, 1 << 15, 1 << 18, 1 << 21, 1 << 23]
        fns = cpu_fns()
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    rows = compare_backends(fns, lambda n: make_input(n, args.device), sizes, bytes_moved=lambda n: 20 * n,
                            device="cuda" if args.device == "cuda" else None, progress=True)
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"lars_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "lars", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "tensors": K,
                               "dtype": "float32", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
