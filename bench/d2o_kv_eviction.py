"""Benchmark D2O's critical loop: the cosine nearest-retained-key search (eq. D5) plus the scatter merge of the
recalled tokens into keys and values (eq. D7), for N = 32 rows (batch 8 × 4 heads), d_head = 32, float32.

Two regimes over the retained cache size K = 64 … 2048 ("size" in the tables):
* ``prefill``: compression right after a prompt of 2K tokens, E = K evicted tokens searched and merged at once;
* ``decode``: one decoding step, E = 1 evicted token against K retained ones.

CPU: numpy (reference), numba, torch (eager). CUDA: torch eager and the same function under torch.compile.

    python bench/d2o_kv_eviction.py                  # CPU -> bench/results/d2o_kv_eviction_cpu.json
    python bench/d2o_kv_eviction.py --device cuda    # GPU -> bench/results/d2o_kv_eviction_cuda.json
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
from refimpl.kvcache.d2o_kv_eviction import _merge_torch, _nearest_torch, nearest_retained_key, scatter_merge

N, D = 32, 32


def nearest_and_merge(kk, vk, ke, ve, backend: str):
    """D5 + D6-style selection (mean similarity as threshold) + D7 on keys and values."""
    u, c = nearest_retained_key(ke, kk, backend=backend)
    sel = u >= u.mean()
    return (scatter_merge(kk, ke, c, u, sel, backend=backend), scatter_merge(vk, ve, c, u, sel, backend=backend))


def _torch_loop(kk, vk, ke, ve):
    u, c = _nearest_torch(ke, kk)
    sel = u >= u.mean()
    return _merge_torch(kk, ke, c, u, sel, "official"), _merge_torch(vk, ve, c, u, sel, "official")


def make_input(k: int, e: int, device: str = "cpu"):
    rng = np.random.default_rng(k + e)
    arrs = [rng.standard_normal(s, dtype=np.float32) for s in ((N, k, D), (N, k, D), (N, e, D), (N, e, D))]
    if device == "cuda":
        return [torch.from_numpy(a).cuda() for a in arrs]
    return arrs


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--threads", type=int, default=2, help="numba threads (CPU)")
    ap.add_argument("--max-k", type=int, default=2048)
    args = parse_bench_args(ap, argv)
    sizes = [k for k in (64, 128, 256, 512, 1024, 2048, 4096) if k <= args.max_k]
    if args.device == "cuda":
        compiled = torch.compile(_torch_loop)
        fns = {"torch": lambda a: _torch_loop(*a), "torch.compile": lambda a: compiled(*a)}
        reference, device_name, dev = "torch", torch.cuda.get_device_name(), "cuda"
    else:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        fns = {"numpy": lambda a: nearest_and_merge(*a, backend="numpy"),
               "numba": lambda a: nearest_and_merge(*a, backend="numba"),
               "torch": lambda a: _torch_loop(*(torch.from_numpy(x) for x in a))}
        reference, dev = "numpy", "cpu"
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
        nearest_and_merge(*make_input(8, 8), backend="numba")  # compile / load the cache before timing
    all_rows = []
    for regime, e_of in (("prefill", lambda k: k), ("decode", lambda k: 1)):
        rows = compare_backends(fns, lambda k: make_input(k, e_of(k), dev), sizes,
                                device="cuda" if dev == "cuda" else None, progress=True)
        for r in rows:
            r["regime"], r["evicted"] = regime, e_of(r["size"])
        print(f"\n{regime}: N={N} rows, d={D}, E={'K' if regime == 'prefill' else 1}")
        print(timing_table(rows, reference=reference))
        all_rows += rows
    out = args.out or Path(__file__).parent / "results" / f"d2o_kv_eviction_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "d2o_kv_eviction", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__,
                               "numba_threads": numba.get_num_threads() if dev == "cpu" else None,
                               "rows_per_call": N, "d_head": D, "rows": all_rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
