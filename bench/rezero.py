"""Benchmark of ReZero's critical loop: the residual update y = x + alpha*F (eq. 1) followed by its
backward dF = alpha*g, dalpha = <g, F> (eqs. 5-6), timed as one call per backend over a range of
sizes (number of elements of x).

    python bench/rezero.py --device cpu            # numpy / numba / torch (eager)
    python bench/rezero.py --device cuda           # torch eager / torch.compile on the GPU

Writes bench/results/rezero_<device>.json: {"paper_id", "device", "torch", "numba", "rows"}.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numba
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refimpl._common import compare_backends, timing_table  # noqa: E402
from refimpl.norm.rezero import rezero_update, rezero_update_backward  # noqa: E402
from refimpl._common.bench import bench_parser, parse_bench_args

ALPHA = 0.3


def _step(backend):
    def run(inp):
        x, fx, g = inp
        y = rezero_update(x, fx, ALPHA, backend=backend)
        _, dfx, dalpha = rezero_update_backward(g, fx, ALPHA, backend=backend)
        return y, dfx, dalpha
    return run


def _torch_fused(inp):
    """torch's own fused CPU kernels: add with a scalar multiplier, mul, and a BLAS dot."""
    x, fx, g = inp
    return torch.add(x, fx, alpha=ALPHA), torch.mul(g, ALPHA), torch.dot(g.reshape(-1), fx.reshape(-1))


def main(argv=None) -> list[dict]:
    ap = bench_parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="*", default=[2**k for k in range(12, 25, 2)])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for numba and torch (default: leave their defaults); on a shared "
                         "machine, 1 gives figures that other processes disturb least")
    args = parse_bench_args(ap, argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    out = args.out or ROOT / "bench" / "results" / f"rezero_{args.device}.json"
    rng = np.random.default_rng(0)

    if args.device == "cpu":
        def make(n):
            return tuple(rng.standard_normal(n).astype(np.float32) for _ in range(3))

        tensors: dict[int, tuple] = {}

        def as_tensors(inp):
            """The same data as tensors (zero-copy views), made once per input."""
            key = id(inp[0])
            if key not in tensors:
                tensors[key] = tuple(torch.from_numpy(a) for a in inp)
            return tensors[key]

        fns = {"numpy": _step("numpy"), "numba": _step("numba"),
               "torch": lambda inp: _step("torch")(as_tensors(inp)),
               "torch_fused": lambda inp: _torch_fused(as_tensors(inp))}
        rows = compare_backends(fns, make, args.sizes, bytes_moved=lambda n: 6 * 4 * n,
                                repeat=args.repeat, progress=True)
    else:
        dev = torch.device("cuda")

        def make(n):
            return tuple(torch.randn(n, device=dev) for _ in range(3))

        compiled = torch.compile(_torch_fused)
        fns = {"torch": _step("torch"), "torch_fused": _torch_fused, "torch_compile": compiled}
        rows = compare_backends(fns, make, args.sizes, bytes_moved=lambda n: 6 * 4 * n,
                                repeat=args.repeat, device=dev, progress=True)
    ref = "numpy" if args.device == "cpu" else "torch"
    print(timing_table(rows, reference=ref))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "rezero", "device": args.device,
                               "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                                               else f"cpu x{numba.get_num_threads()} threads"),
                               "torch": torch.__version__, "numba": numba.__version__,
                               "dtype": "float32", "alpha": ALPHA, "threads": torch.get_num_threads(),
                               "load_average_1min": os.getloadavg()[0], "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
