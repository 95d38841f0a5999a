"""Benchmark SCOPE's critical loop: the per-step heavy-hitter top-k over the decoding part of the cache (eq. 5).

Per layer and step, for each of B x H = 1 x 32 rows (a Llama-8B layer's heads), select the k = (T - P - r) / 2
highest current-step attention scores among the decoding part [P, T - r) of a cache of T entries, with the prefill
part P = T / 4 and r = T / 16 recent entries (the paper's proportions: 2048 prompt, 256 recent).

CPU: the NumPy reference (stable arg-sort), the Numba kernel (partition-based selection), the torch path
(``torch.topk`` plus the exact tie rule) and torch's fused ``torch.topk`` alone (no tie rule, unsorted output).
CUDA: the torch path eager and under ``torch.compile``, and ``torch.topk`` alone.

    python bench/scope_kv_decoding.py                  # CPU -> bench/results/scope_kv_decoding_cpu.json
    python bench/scope_kv_decoding.py --device cuda    # GPU -> bench/results/scope_kv_decoding_cuda.json
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
from refimpl.kvcache.scope_kv_decoding import _topk_torch, heavy_hitter_topk

ROWS = 32  # B x H


def geometry(t: int) -> tuple[int, int, int]:
    """(start, stop, k) of the decoding-part selection for a cache of t entries."""
    p, r = t // 4, t // 16
    return p, t - r, (t - p - r) // 2


def make_scores(t: int, device: str = "cpu"):
    s = np.random.default_rng(t).random((1, ROWS, t), dtype=np.float32)
    s /= s.sum(-1, keepdims=True)  # attention weights
    return s if device == "cpu" else torch.from_numpy(s).to(device)


def fns(device: str) -> dict:
    def call(backend):
        return lambda s: heavy_hitter_topk(s, *geometry(s.shape[-1]), backend=backend)

    def raw_topk(s):
        a, b, k = geometry(s.shape[-1])
        s = s if isinstance(s, torch.Tensor) else torch.from_numpy(s)
        return s[..., a:b].topk(k, dim=-1, sorted=False).indices

    if device == "cpu":
        return {"numpy": call("numpy"), "numba": call("numba"), "torch": call("torch"), "torch.topk": raw_topk}
    compiled = torch.compile(lambda s, a, b, k: _topk_torch(s, a, b, k), dynamic=True)
    return {"torch": call("torch"),
            "torch.compile": lambda s: compiled(s, *geometry(s.shape[-1])),
            "torch.topk": raw_topk}


def main(argv=None):
    ap = bench_parser(__doc__)
    args = parse_bench_args(ap, argv)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    sizes = [256, 1024, 4096, 16384, 65536]
    f = fns(args.device)
    for fn in f.values():  # compile / warm up
        fn(make_scores(512, args.device))
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    rows = compare_backends(f, lambda t: make_scores(t, args.device), sizes,
                            device="cuda" if args.device == "cuda" else None, progress=True)
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"scope_kv_decoding_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "scope_kv_decoding", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "rows_per_call": ROWS,
                               "geometry": "P = T/4, r = T/16, k = (T - P - r) / 2", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
