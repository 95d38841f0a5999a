"""Benchmark of the gradient-noise critical loop: one ``noisy_sgd_step`` (global-norm clipping over K
tensors, eq. 3-4; noise injection, eq. 5; heavy-ball momentum, eq. 6; update, eq. 7) on flat float32
buffers of n elements in K = 16 segments, for a range of n. The noise vector is an input (drawn
once), so the timing is of the update, not of the random number generator.

CPU: the NumPy reference, the Numba kernel, the torch path, and ``torch.optim.SGD(fused=True)``
(momentum, no clipping, no noise: less work) as torch's own fused CPU kernel. CUDA: torch eager,
a ``torch.compile``d torch path, and the fused SGD.

    python bench/gradient_noise.py --device cpu [--out bench/results/gradient_noise_cpu.json]
"""
from __future__ import annotations

import json
from pathlib import Path

import numba
import numpy as np
import torch

from refimpl._common import compare_backends, timing_table
from refimpl.optim.gradient_noise import noisy_sgd_step
from refimpl.optim.multi_tensor import SegmentLayout
from refimpl._common.bench import bench_parser, parse_bench_args

K = 16
KW = dict(lr=0.01, sigma=0.1, momentum=0.9, max_grad_norm=1.0)


def _inputs(n: int, device: str):
    rng = np.random.default_rng(n)
    layout = SegmentLayout([(n // K,)] * (K - 1) + [(n - (K - 1) * (n // K),)])
    arrs = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    ts = [torch.from_numpy(a.copy()).to(device) for a in arrs]
    p = torch.nn.Parameter(ts[0].clone())
    p.grad = ts[1].clone()
    fused = torch.optim.SGD([p], lr=0.01, momentum=0.9, fused=True)
    return layout, arrs, ts, fused


def _fns(device: str, compiled: bool) -> dict:
    def step(a, backend):
        layout, arrs, ts, _ = a
        x = arrs if backend != "torch" else ts
        return noisy_sgd_step(x[0], x[1], x[2], momentum_buffer=x[3], layout=layout, backend=backend, **KW)

    fns = {}
    if device == "cpu":
        fns["numpy"] = lambda a: step(a, "numpy")
        fns["numba"] = lambda a: step(a, "numba")
    fns["torch"] = lambda a: step(a, "torch")
    if compiled:
        cstep = torch.compile(lambda p, g, z, b: noisy_sgd_step(p, g, z, momentum_buffer=b, backend="torch", **KW))
        fns["torch_compile"] = lambda a: cstep(*a[2])
    fns["torch_fused_sgd"] = lambda a: a[3].step()
    return fns


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 4_000_000])
    args = parse_bench_args(ap)
    fns = _fns(args.device, compiled=args.device == "cuda")
    warm = _inputs(4096, args.device)
    for fn in fns.values():                      # compile / load the kernels before timing
        fn(warm)
    dev = args.device if args.device == "cuda" else None
    # bytes: read p, g, z, b (+ g again for the norm), write p, b: 7 passes of 4 bytes
    rows = compare_backends(fns, lambda n: _inputs(n, args.device), args.sizes,
                            bytes_moved=lambda n: 7 * 4 * n, repeat=5, device=dev, progress=True)
    ref = "numpy" if args.device == "cpu" else "torch"
    print(timing_table(rows, reference=ref))
    out = args.out or Path(__file__).parent / "results" / f"gradient_noise_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "gradient_noise", "device": args.device if args.device == "cpu" else
                               torch.cuda.get_device_name(), "torch": torch.__version__, "numba": numba.__version__,
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
