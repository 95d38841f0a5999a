"""Benchmark the AdaQuant critical loop: per-output-channel fake quantization of a weight (eqs. 2-3 of
the chapter) with learnable range / zero point, on an (N, 1024) float32 matrix at 4 bits.

CPU: the NumPy reference, the Numba kernel, the eager torch path (the one AdaQuant differentiates) and
torch's fused ``torch.fake_quantize_per_channel_affine`` (same quantizer, its own op order).
CUDA: the eager torch path, the same under torch.compile, and the fused torch kernel.

    python bench/adaquant_calibtip.py                  # CPU -> bench/results/adaquant_calibtip_cpu.json
    python bench/adaquant_calibtip.py --device cuda    # GPU -> bench/results/adaquant_calibtip_cuda.json
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
from refimpl.quant.adaquant_calibtip import _fq_torch, fake_quant

H, BITS = 1024, 4
QMAX = 2 ** BITS - 1


def make(n, device=None):
    g = np.random.default_rng(n)
    w = g.standard_normal((n, H), dtype=np.float32)
    lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
    r, m = (hi - lo).astype(np.float32), lo.astype(np.float32)
    if device is None:
        return w, r, m
    return tuple(torch.from_numpy(a).to(device) for a in (w, r, m))


def fused(a):
    w, r, m = a
    wt, rt, mt = (torch.as_tensor(t) for t in (w, r, m))
    s = (rt / QMAX).reshape(-1)
    z = torch.clamp(torch.round(-mt.reshape(-1) / s), 0, QMAX).to(torch.int32)
    return torch.fake_quantize_per_channel_affine(wt, s, z, 0, 0, QMAX)


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    if args.device == "cuda":
        compiled = torch.compile(lambda w, r, m: _fq_torch(w, r, m, float(QMAX)))
        fns = {"torch": lambda a: fake_quant(*a, BITS, backend="torch"),
               "torch.compile": lambda a: compiled(*a), "torch fused": fused}
        sizes = [1024, 4096, 16384, 65536]
        mk = lambda n: make(n, "cuda")  # noqa: E731
        device_name = torch.cuda.get_device_name()
    else:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        fns = {"numpy": lambda a: fake_quant(*a, BITS, backend="numpy"),
               "numba": lambda a: fake_quant(*a, BITS, backend="numba"),
               "torch": lambda a: fake_quant(*(torch.from_numpy(t) for t in a), BITS, backend="torch"),
               "torch fused": fused}
        sizes = [16, 128, 1024, 4096, 16384]
        mk = make
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    rows = compare_backends(fns, mk, sizes, bytes_moved=lambda n: 8 * n * H,
                            device="cuda" if args.device == "cuda" else None, progress=True)
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"adaquant_calibtip_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "adaquant_calibtip", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "H": H, "bits": BITS,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
