"""Benchmark the LAMB critical loop: one functional step (moments, Adam direction, per-tensor norms,
trust ratio, scaled update) over the parameter tensors of a 4-block transformer of width d.

CPU: the NumPy reference, the Numba kernel, the torch backend (all on flat float32 buffers), and the
official per-tensor ``torch_optimizer.Lamb.step`` on the same tensors (the Python loop over tensors
that the flat layout avoids). PyTorch has no fused LAMB kernel; ``torch.optim.Adam(foreach=True)``
is timed as the nearest fused multi-tensor optimizer step.
CUDA: the torch backend, the same under torch.compile, torch_optimizer.Lamb and fused Adam.
Bytes: read p, g, m, v; write p, m, v, u; read u, p, write p (about 11 float32 streams = 44 n bytes).

    python bench/lamb.py                  # CPU -> bench/results/lamb_cpu.json
    python bench/lamb.py --device cuda    # GPU -> bench/results/lamb_cuda.json
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
from refimpl.optim.lamb import lamb_step
from refimpl.optim.multi_tensor import SegmentLayout
from refimpl._common.bench import bench_parser, parse_bench_args

LR = 1e-4


def transformer_shapes(d: int, blocks: int = 4) -> list[tuple[int, ...]]:
    """Parameter shapes of ``blocks`` pre-LN transformer blocks of width d (about 12 d^2 each)."""
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return block * blocks


class Problem:
    """Flat float32 buffers (numpy and torch views of the same memory) plus per-tensor parameters
    with gradients for the per-tensor optimizers."""

    def __init__(self, d: int, device: str = "cpu"):
        rng = np.random.default_rng(d)
        self.layout = SegmentLayout(transformer_shapes(d))
        n = self.layout.numel
        self.np = [rng.standard_normal(n, dtype=np.float32) * 0.05 for _ in range(3)]
        self.np.insert(3, (rng.random(n, dtype=np.float32) * 1e-4))
        self.t = [torch.from_numpy(a.copy()).to(device) for a in self.np]
        self.params = [torch.nn.Parameter(t.clone()) for t in self.layout.unflatten(self.t[0])]
        for p, g in zip(self.params, self.layout.unflatten(self.t[1])):
            p.grad = g.clone()
        self.n = n


def _official():
    import torch_optimizer
    cache = {}

    def run(pb: Problem):
        if id(pb) not in cache:
            cache[id(pb)] = torch_optimizer.Lamb(pb.params, lr=LR, debias=True)
        cache[id(pb)].step()
    return run


def _adam_foreach():
    cache = {}

    def run(pb: Problem):
        if id(pb) not in cache:
            cache[id(pb)] = torch.optim.Adam(pb.params, lr=LR, foreach=True)
        cache[id(pb)].step()
    return run


def cpu_fns() -> dict:
    fns = {bk: (lambda pb, bk=bk: lamb_step(*(pb.np if bk != "torch" else pb.t), pb.layout, 5, lr=LR,
                                            bias_correction="lr", backend=bk))
           for bk in ("numpy", "numba", "torch")}
    fns["torch_optimizer.Lamb"] = _official()
    fns["Adam(foreach)"] = _adam_foreach()
    return fns


def cuda_fns() -> dict:
    def functional(p, g, m, v, layout):
        return lamb_step(p, g, m, v, layout, 5, lr=LR, bias_correction="lr", backend="torch")

    compiled = torch.compile(functional)
    return {
        "torch": lambda pb: functional(*pb.t, pb.layout),
        "torch.compile": lambda pb: compiled(*pb.t, pb.layout),
        "torch_optimizer.Lamb": _official(),
        "Adam(foreach)": _adam_foreach(),
    }


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    if args.device == "cuda":
        widths = [128, 256, 512, 1024]
        fns = cuda_fns()
        device_name = torch.cuda.get_device_name()
    else:
        widths = [16, 64, 128, 256]
        fns = cpu_fns()
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    problems = {}

    def make(n_params: int) -> Problem:
        return problems[n_params]

    for d in widths:
        pb = Problem(d, device=args.device)
        problems[pb.n] = pb
    rows = compare_backends(fns, make, sorted(problems), bytes_moved=lambda n: 44 * n,
                            device="cuda" if args.device == "cuda" else None, progress=True)
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"lamb_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "lamb", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__,
                               "size": "parameters (float32) of 4 transformer blocks of width d",
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
