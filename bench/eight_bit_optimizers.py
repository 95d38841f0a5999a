"""Benchmark block-wise 8-bit dynamic quantization (the critical loop of 8-bit optimizers).

Quantize + dequantize of n float32 values in blocks of 256 (bitsandbytes' optimizer block size) with the
signed dynamic map. Effective bandwidth counts what the two passes must move: quantize reads 4 B and writes
1 B per value, dequantize reads 1 B and writes 4 B, so 10 B per value for the round trip; the JSON also
keeps quantize alone (5 B per value).

CPU: the NumPy reference, the Numba kernel, the torch path and bitsandbytes' CPU kernel (a 65536-bin lookup
table; not exactly nearest). CUDA: the torch path eager and under torch.compile, and bitsandbytes' CUDA kernels.

    python bench/eight_bit_optimizers.py                  # CPU -> bench/results/eight_bit_optimizers_cpu.json
    python bench/eight_bit_optimizers.py --device cuda    # GPU -> bench/results/eight_bit_optimizers_cuda.json
"""
from __future__ import annotations

import json
import logging
import platform
from datetime import date
from pathlib import Path

import numba
import numpy as np
import torch

from refimpl._common import compare_backends, timing_table
from refimpl._common.bench import bench_parser, parse_bench_args
from refimpl.quant.eight_bit_optimizers import (_dequantize_torch, _quantize_torch, create_dynamic_map,
                                                dequantize_blockwise, quantize_blockwise)

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
BLOCK = 256


def _bnb():
    try:
        import bitsandbytes.functional as BF
    except Exception:  # noqa: BLE001 - the official package is optional here
        return None
    return BF


def roundtrip(backend):
    def fn(x):
        q, absmax = quantize_blockwise(x, None, BLOCK, backend=backend)
        return dequantize_blockwise(q, absmax, None, BLOCK, backend=backend)
    return fn


def quant_only(backend):
    return lambda x: quantize_blockwise(x, None, BLOCK, backend=backend)


def bnb_fns(BF, code):
    def rt(x):
        q, st = BF.quantize_blockwise(x, code=code, blocksize=BLOCK)
        return BF.dequantize_blockwise(q, st)
    return rt, (lambda x: BF.quantize_blockwise(x, code=code, blocksize=BLOCK))


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--threads", type=int, default=2, help="numba threads on the CPU (default 2)")
    args = parse_bench_args(ap, argv)
    BF = _bnb()
    if args.device == "cuda":
        sizes = [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28]
        code = create_dynamic_map(True).cuda()

        def eager_rt(x):
            q, a = _quantize_torch(x, code, BLOCK, "nearest")
            return _dequantize_torch(q, a, code, BLOCK)

        compiled_rt = torch.compile(eager_rt)
        compiled_q = torch.compile(lambda x: _quantize_torch(x, code, BLOCK, "nearest"))
        fns = {"torch": eager_rt, "torch.compile": compiled_rt}
        qfns = {"torch": lambda x: _quantize_torch(x, code, BLOCK, "nearest"), "torch.compile": compiled_q}
        if BF is not None:
            fns["bitsandbytes"], qfns["bitsandbytes"] = bnb_fns(BF, code)
        fns["copy"] = lambda x: x.clone()
        make = lambda n: torch.randn(n, device="cuda")  # noqa: E731
        device_name = torch.cuda.get_device_name()
        reference = "torch"
    else:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        sizes = [1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24]
        code = create_dynamic_map(True)
        fns = {"numpy": roundtrip("numpy"), "numba": roundtrip("numba")}
        qfns = {"numpy": quant_only("numpy"), "numba": quant_only("numba")}
        fns["torch"] = lambda x: roundtrip("torch")(torch.from_numpy(x))
        qfns["torch"] = lambda x: quant_only("torch")(torch.from_numpy(x))
        if BF is not None:
            rt, qo = bnb_fns(BF, code)
            fns["bitsandbytes"] = lambda x: rt(torch.from_numpy(x))
            qfns["bitsandbytes"] = lambda x: qo(torch.from_numpy(x))
        make = lambda n: np.random.default_rng(n).standard_normal(n, dtype=np.float32)  # noqa: E731
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
                      f"{numba.get_num_threads()} numba threads"
        reference = "numpy"
    dev = "cuda" if args.device == "cuda" else None
    rows = compare_backends(fns, make, sizes, bytes_moved=lambda n: 10 * n, device=dev, repeat=5, progress=True)
    qrows = compare_backends(qfns, make, sizes, bytes_moved=lambda n: 5 * n, device=dev, repeat=5, progress=True)
    print("quantize + dequantize, blocks of 256, GB/s = 10 B per value / time")
    print(timing_table(rows, reference=reference))
    print("quantize only, GB/s = 5 B per value / time")
    print(timing_table(qrows, reference=reference))
    out = args.out or Path(__file__).parent / "results" / f"eight_bit_optimizers_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "eight_bit_optimizers", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "blocksize": BLOCK,
                               "rows": rows, "quantize_rows": qrows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
