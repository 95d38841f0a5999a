"""Benchmark of SeeDNorm's critical loop: the fused row-wise kernel (RMS + per-head dot(x, beta) +
tanh + rescale, eqs. 1-6) and its backward (eqs. 7-11), NumPy reference vs Numba vs torch, with
torch's own ``F.rms_norm`` as the fused-kernel yardstick (SeeDNorm does RMSNorm's work plus a dot
product per row).

    python bench/seednorm.py --device cpu            # writes bench/results/seednorm_cpu.json
    python bench/seednorm.py --device cuda           # torch eager vs torch.compile vs F.rms_norm
"""
from __future__ import annotations

import json
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from refimpl._common import compare_backends, timing_table
from refimpl._common.bench import bench_parser, parse_bench_args
from refimpl.norm.seednorm import (_backward_numba_host, _backward_numpy, _backward_torch,
                                   _forward_numba_host, _forward_numpy, _forward_torch)

DIM = 1024
HEADS = 1


def _cpu_inputs(n: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    a, b, g = (rng.standard_normal(DIM).astype(np.float32) * s for s in (1.0, 0.05, 1.0))
    dy = rng.standard_normal((n, DIM)).astype(np.float32)
    return x, a, b, g, dy


def _one_thread(fn):
    """The same Numba kernel pinned to one thread: on a shared machine a parallel kernel waits for
    its slowest thread, so both figures are recorded."""
    def wrapped(inp):
        n_threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return fn(inp)
        finally:
            numba.set_num_threads(n_threads)
    return wrapped


def bench_cpu(sizes):
    tt = lambda *v: tuple(torch.from_numpy(u) for u in v)  # noqa: E731

    def make(n):
        v = _cpu_inputs(n)
        return v, tt(*v)

    def torch_fwd(inp):
        x, a, b, g, _ = inp[1]
        with torch.no_grad():
            return _forward_torch(x, a, b, g, HEADS, 1e-6)[0]

    def torch_bwd(inp):
        x, a, b, g, dy = inp[1]
        with torch.no_grad():
            _, xhat, gain, rstd, t = _forward_torch(x, a, b, g, HEADS, 1e-6)
            return _backward_torch(dy, x, xhat, gain, rstd, t, a, b, HEADS)

    def rms_bwd(inp):
        x, _, _, g, dy = inp[1]
        xr = x.detach().requires_grad_()
        F.rms_norm(xr, (DIM,), g, 1e-6).backward(dy)
        return xr.grad

    fwd = {
        "numpy": lambda i: _forward_numpy(i[0][0], *i[0][1:4], HEADS, 1e-6),
        "numba": lambda i: _forward_numba_host(i[0][0], *i[0][1:4], HEADS, 1e-6),
        "torch": torch_fwd,
        "F.rms_norm": lambda i: F.rms_norm(i[1][0], (DIM,), i[1][3], 1e-6),
    }
    fwd["numba_1thread"] = _one_thread(fwd["numba"])
    bwd = {
        "numpy": lambda i: _backward_numpy(i[0][4], i[0][0], *i[0][1:4], HEADS, 1e-6),
        "numba": lambda i: _backward_numba_host(i[0][4], i[0][0], *i[0][1:4], HEADS, 1e-6),
        "torch": torch_bwd,
        "F.rms_norm": rms_bwd,
    }
    bwd["numba_1thread"] = _one_thread(bwd["numba"])
    return fwd, bwd, make, None


def bench_cuda(sizes):
    dev = torch.device("cuda")

    def make(n):
        torch.manual_seed(0)
        x = torch.randn(n, DIM, device=dev)
        a, b, g = (torch.randn(DIM, device=dev) * s for s in (1.0, 0.05, 1.0))
        return x, a, b, g, torch.randn(n, DIM, device=dev)

    def eager_fwd(x, a, b, g):
        return _forward_torch(x, a, b, g, HEADS, 1e-6)[0]

    def eager_bwd(x, a, b, g, dy):
        _, xhat, gain, rstd, t = _forward_torch(x, a, b, g, HEADS, 1e-6)
        return _backward_torch(dy, x, xhat, gain, rstd, t, a, b, HEADS)

    comp_fwd, comp_bwd = torch.compile(eager_fwd), torch.compile(eager_bwd)

    def rms_bwd(i):
        xr = i[0].detach().requires_grad_()
        F.rms_norm(xr, (DIM,), i[3], 1e-6).backward(i[4])
        return xr.grad

    fwd = {"torch": lambda i: eager_fwd(*i[:4]), "torch.compile": lambda i: comp_fwd(*i[:4]),
           "F.rms_norm": lambda i: F.rms_norm(i[0], (DIM,), i[3], 1e-6)}
    bwd = {"torch": lambda i: eager_bwd(*i), "torch.compile": lambda i: comp_bwd(*i),
           "F.rms_norm": rms_bwd}
    return fwd, bwd, make, dev


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of rows (D = 1024)")
    args = parse_bench_args(ap)
    sizes = args.sizes or ([256, 1024, 4096, 16384] if args.device == "cpu" else [1024, 4096, 16384, 65536])
    fwd, bwd, make, dev = (bench_cpu if args.device == "cpu" else bench_cuda)(sizes)
    ref = "numpy" if args.device == "cpu" else "torch"
    # bytes moved: forward reads x and writes y; backward reads x and dy, writes dx (fp32)
    rows = []
    for name, fns, nbytes in (("forward", fwd, 8), ("backward", bwd, 12)):
        res = compare_backends(fns, make, sizes, bytes_moved=lambda n, k=nbytes: k * n * DIM,
                               repeat=5, device=dev)
        print(f"\n### {name} (rows x {DIM} float32, {HEADS} head)\n")
        print(timing_table(res, reference=ref))
        rows += [dict(r, **{"pass": name, "dim": DIM, "heads": HEADS}) for r in res]
    out = args.out or Path(__file__).resolve().parent / "results" / f"seednorm_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({numba.get_num_threads()} threads)"
    out.write_text(json.dumps({"paper_id": "seednorm", "device": device_name, "torch": torch.__version__,
                               "numba": numba.__version__, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
