"""Benchmark the fused causal LSSA / LSSAR attention (eqs. 8-9 of the chapter) over sequence lengths.

Input: q, k, v of shape (1, 4, L, 64) float32 (one sequence, four heads of size 64), causal mask.
CPU: the numpy reference (one query row at a time), the numba kernel (rows in parallel), the torch
path (blocks of 128 query rows), the unfused ``mha.attention(..., weight_fn=lssa_weight_fn(64))`` that
builds the whole L x L weight matrix, and ``F.scaled_dot_product_attention`` (softmax, torch's own
fused kernel) as the speed reference. ``--p 15`` times LSSAR instead of LSSA.
CUDA: the torch path eager and under torch.compile, the unfused path, and scaled_dot_product_attention.

    python bench/softplus_attention.py                  # CPU -> bench/results/softplus_attention_cpu.json
    python bench/softplus_attention.py --device cuda    # GPU -> bench/results/softplus_attention_cuda.json
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
from refimpl._common.bench import bench_parser, parse_bench_args
from refimpl.attention.mha import attention
from refimpl.attention.softplus_attention import _fused_torch, cosine_scores, fused_lssa_attention, lssa_weight_fn

HEADS, D = 4, 64


def make_input(L: int, device: str = "cpu"):
    g = np.random.default_rng(L)
    arrs = [g.standard_normal((1, HEADS, L, D), dtype=np.float32) for _ in range(3)]
    if device == "cpu":
        return arrs
    return [torch.from_numpy(a).to(device) for a in arrs]


def cpu_fns(p):
    wf = lssa_weight_fn(D, p)

    def unfused(x):
        q, k, v = (torch.from_numpy(a) for a in x)
        return attention(q, k, v, causal=True, score_fn=cosine_scores, weight_fn=wf)[0]

    return {
        "numpy": lambda x: fused_lssa_attention(*x, p=p, backend="numpy"),
        "numba": lambda x: fused_lssa_attention(*x, p=p, backend="numba"),
        "torch": lambda x: fused_lssa_attention(*(torch.from_numpy(a) for a in x), p=p, backend="torch"),
        "torch_unfused": unfused,
        "sdpa_softmax": lambda x: F.scaled_dot_product_attention(*(torch.from_numpy(a) for a in x), is_causal=True),
    }


def cuda_fns(p):
    wf = lssa_weight_fn(D, p)
    compiled = torch.compile(lambda q, k, v: _fused_torch(q, k, v, True, p, 3, 1024))
    return {
        "torch": lambda x: fused_lssa_attention(*x, p=p, backend="torch", block=1024),
        "torch.compile": lambda x: compiled(*x),
        "torch_unfused": lambda x: attention(*x, causal=True, score_fn=cosine_scores, weight_fn=wf)[0],
        "sdpa_softmax": lambda x: F.scaled_dot_product_attention(*x, is_causal=True),
    }


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--p", type=float, default=None, help="re-weighting power (LSSAR); default: plain LSSA")
    ap.add_argument("--threads", type=int, default=2, help="numba and torch threads (CPU)")
    ap.add_argument("--max-len", type=int, default=2048)
    args = parse_bench_args(ap, argv)
    if args.device == "cuda":
        sizes = [2 ** k for k in range(8, max(args.max_len, 8192).bit_length())]
        fns, make = cuda_fns(args.p), (lambda L: make_input(L, "cuda"))
        device_name, reference = torch.cuda.get_device_name(), "sdpa_softmax"
    else:
        sizes = [2 ** k for k in range(7, args.max_len.bit_length())]
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(args.threads)
        fns, make = cpu_fns(args.p), make_input
        fused_lssa_attention(*make_input(64), p=args.p, backend="numba")      # compile before timing
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        reference = "numpy"
    rows = compare_backends(fns, make, sizes, repeat=5, device="cuda" if args.device == "cuda" else None,
                            progress=True)
    print(timing_table(rows, reference=reference))
    out = args.out or Path(__file__).parent / "results" / f"softplus_attention_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "softplus_attention", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__,
                               "numba_threads": numba.get_num_threads() if args.device == "cpu" else None,
                               "shape": [1, HEADS, "L", D], "dtype": "float32", "causal": True, "p": args.p,
                               "size": "sequence length L", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
