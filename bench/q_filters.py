"""Benchmark the Q-Filters critical loop: the score of every cached key, eq. (4) ``s = −⟨k, f_h⟩``, alone and
followed by the top-k selection (eq. 5, ``select_keep``), over cache sizes ``T`` for three head layouts
``(H, d_head)`` in float32, batch 1.

CPU: the NumPy reference, the Numba kernel, the torch path, and kvpress' own torch expression
(``-(f[None, :, None] * k).sum(-1)``, QFilterPress.score; written out here, kvpress is not a dependency), plus
numba and torch scoring + top-k. CUDA: torch eager, the same under torch.compile, the kvpress expression, and
torch scoring + top-k. Effective bandwidth counts one read of the keys.

    python bench/q_filters.py                  # CPU -> bench/results/q_filters_cpu.json
    python bench/q_filters.py --device cuda    # GPU -> bench/results/q_filters_cuda.json
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
from refimpl.kvcache.q_filters import _scores_torch, qfilter_scores, qfilter_select

LAYOUTS = [(4, 32), (8, 64), (32, 128)]  # (H, d_head)
MAX_ELEMS = 1 << 24                          # at most 64 MiB of float32 keys per input


def sizes_for(h: int, d: int, device: str) -> list[int]:
    top = MAX_ELEMS * (4 if device == "cuda" else 1)
    return [t for t in (256, 1024, 4096, 16384, 65536) if h * t * d <= top]


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--threads", type=int, default=2, help="numba and torch CPU threads (default 2)")
    args = parse_bench_args(ap, argv)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(args.threads)
    dev = args.device
    all_rows = []
    for h, d in LAYOUTS:
        budget = lambda t: max(1, t // 8)  # noqa: E731  (×8 compression)
        if dev == "cuda":
            compiled = torch.compile(_scores_torch)
            fns = {
                "torch": lambda a: qfilter_scores(a[0], a[1], backend="torch"),
                "torch.compile": lambda a: compiled(a[0], a[1]),
                "kvpress expr": lambda a: -(a[1][None, :, None] * a[0]).sum(-1),
                "torch+topk": lambda a: qfilter_select(a[0], a[1], budget(a[0].shape[2]), backend="torch"),
            }
            make = lambda t: (torch.randn(1, h, t, d, device="cuda"), torch.randn(h, d, device="cuda"))  # noqa: E731
        else:
            fns = {
                "numpy": lambda a: qfilter_scores(a[0], a[1], backend="numpy"),
                "numba": lambda a: qfilter_scores(a[0], a[1], backend="numba"),
                "torch": lambda a: qfilter_scores(a[2], a[3], backend="torch"),
                "kvpress expr": lambda a: -(a[3][None, :, None] * a[2]).sum(-1),
                "numba+topk": lambda a: qfilter_select(a[2], a[3], budget(a[2].shape[2]), backend="numba"),
                "torch+topk": lambda a: qfilter_select(a[2], a[3], budget(a[2].shape[2]), backend="torch"),
            }

            def make(t, h=h, d=d):
                rng = np.random.default_rng(t)
                k = rng.standard_normal((1, h, t, d), dtype=np.float32)
                f = rng.standard_normal((h, d), dtype=np.float32)
                return k, f, torch.from_numpy(k), torch.from_numpy(f)
            fns["numba"](make(256))  # load the cached kernels before timing
        rows = compare_backends(fns, make, sizes_for(h, d, dev), bytes_moved=lambda t, h=h, d=d: 4 * h * t * d,
                                device="cuda" if dev == "cuda" else None, progress=True, repeat=5)
        for r in rows:
            r.update({"H": h, "d_head": d, "T": r["size"]})
        print(f"\nH={h}, d_head={d} (size = cached tokens T)")
        print(timing_table(rows, reference="numpy" if dev == "cpu" else "torch"))
        all_rows += rows
    device_name = (torch.cuda.get_device_name() if dev == "cuda"
                   else f"{platform.processor() or platform.machine()}, {numba.get_num_threads()} numba threads, "
                        f"{torch.get_num_threads()} torch threads")
    out = args.out or Path(__file__).parent / "results" / f"q_filters_{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "q_filters", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__,
                               "layouts": LAYOUTS, "rows": all_rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
