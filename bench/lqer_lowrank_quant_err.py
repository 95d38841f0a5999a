"""Benchmark LQER's critical loop and its inference overhead (float32).

1. ``mxint_quantize`` (eq. 2 of the chapter): MXINT4 quantization of a weight of R rows x 1024 inputs in
   blocks of 16, NumPy reference vs Numba vs torch. PyTorch has no fused MXINT kernel; the nearest fused
   CPU op, ``torch.fake_quantize_per_channel_affine`` on the (blocks, 16) view with precomputed per-block
   scales (it skips the exponent reduction), is timed as "fq_per_channel" for reference.
2. ``lowrank_vs_dense`` (eq. 4): for a 1024 x 1024 layer and 256 tokens, the dense product ``x W_qᵀ`` against
   the rank-k correction ``(x A_k) B_k`` for k = 8 ... 256 (the correction costs k (in + out) / (in · out)
   of the dense product in multiply-adds).
CUDA: the eager torch path and the same under ``torch.compile``.

    python bench/lqer_lowrank_quant_err.py                  # CPU -> bench/results/lqer_lowrank_quant_err_cpu.json
    python bench/lqer_lowrank_quant_err.py --device cuda    # GPU -> bench/results/lqer_lowrank_quant_err_cuda.json
"""
from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import numba
import numpy as np
import torch

from refimpl._common import compare_backends, timing_table
from refimpl._common.bench import bench_parser, parse_bench_args
from refimpl.quant.lqer_lowrank_quant_err import _blocks_torch, mxint_quantize

IN = 1024
OUT = 1024
TOKENS = 256
BLOCK = 16


def make_w(rows, device=None):
    rng = np.random.default_rng(rows)
    w = (rng.standard_normal((rows, IN)) * 0.02).astype(np.float32)
    return w if device is None else torch.from_numpy(w).to(device)


def fns_mxint(device):
    if device == "cpu":
        f = {b: (lambda w, b=b: mxint_quantize(w, 4, BLOCK, backend=b)) for b in ("numpy", "numba", "torch")}

        def fq(w, cache={}):
            key = w.shape
            if key not in cache:     # per-block power-of-two scales, computed once outside the timing
                t = torch.from_numpy(w).reshape(-1, BLOCK)
                e = torch.ceil(torch.log2(t.abs().amax(1)))
                cache.clear()
                cache[key] = (t, torch.exp2(e - 3), torch.zeros(t.shape[0], dtype=torch.int32))
            t, s, z = cache[key]
            return torch.fake_quantize_per_channel_affine(t, s, z, 0, -7, 7)
        f["fq_per_channel"] = fq
        return f
    comp = torch.compile(_blocks_torch)
    return {"torch": lambda w: _blocks_torch(w.reshape(-1, BLOCK), 4, -127, 128),
            "torch.compile": lambda w: comp(w.reshape(-1, BLOCK), 4, -127, 128)}


def make_lowrank(k, device=None):
    g = torch.Generator().manual_seed(k)
    t = [torch.randn(TOKENS, IN, generator=g), torch.randn(OUT, IN, generator=g),
         torch.randn(IN, k, generator=g), torch.randn(k, OUT, generator=g)]
    return [a.to(device) for a in t] if device else t


def fns_lowrank():
    return {"dense": lambda a: a[0] @ a[1].T,
            "lowrank": lambda a: (a[0] @ a[2]) @ a[3],
            "dense+lowrank": lambda a: a[0] @ a[1].T + (a[0] @ a[2]) @ a[3]}


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    if args.device == "cuda":
        rows_sizes, dev = [256, 1024, 4096, 16384], "cuda"
        device_name = torch.cuda.get_device_name()
    else:
        rows_sizes, dev = [16, 64, 256, 1024, 4096], None
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    ref = "numpy" if args.device == "cpu" else "torch"
    r = compare_backends(fns_mxint(args.device), lambda n: make_w(n, dev), rows_sizes,
                         bytes_moved=lambda n: 8 * n * IN, device=dev, progress=True)
    for row in r:
        row["elements"] = row["size"] * IN
    print(f"\nmxint_quantize (R rows x {IN}, MXINT4, blocks of {BLOCK}, float32)\n" + timing_table(r, reference=ref))
    rows = [{"loop": "mxint_quantize", **row} for row in r]
    r = compare_backends(fns_lowrank(), lambda k: make_lowrank(k, dev), [8, 16, 32, 64, 128, 256], device=dev,
                         progress=True)
    print(f"\nlowrank_vs_dense (size = rank k; {TOKENS} tokens, {IN} -> {OUT}, float32)\n"
          + timing_table(r, reference="dense"))
    rows += [{"loop": "lowrank_vs_dense", **row} for row in r]
    out = args.out or Path(__file__).parent / "results" / f"lqer_lowrank_quant_err_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "lqer_lowrank_quant_err", "device": device_name,
                               "date": str(date.today()), "torch": torch.__version__, "numba": numba.__version__,
                               "in_features": IN, "out_features": OUT, "tokens": TOKENS, "block_size": BLOCK,
                               "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
