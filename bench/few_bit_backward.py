"""Benchmark of the few-bit backward chapter's two critical loops: the DP over grid borders (eq. 7, K = 16 pieces)
and the forward pass's bucketize + pack (eq. 2, 3 bits), NumPy reference vs Numba vs torch (and torch.compile on
CUDA).

    python bench/few_bit_backward.py --device cpu      # writes bench/results/few_bit_backward_cpu.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numba
import numpy as np
import torch

from refimpl._common import compare_backends, timing_table
from refimpl.quant.few_bit_backward import builtin_table, encode, prefix_integrals, stepwise_dp

DP_SIZES = [200, 400, 800, 1600]
ENC_SIZES = [1 << 12, 1 << 15, 1 << 18, 1 << 20, 1 << 22]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device")
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    out = args.out or Path(__file__).parent / "results" / f"few_bit_backward_{args.device}.json"
    rows = []

    # --- DP (7): grid of N points + the two end points, 4-bit table (K = 16)
    def dp_input(n):
        w, f1, f2 = prefix_integrals("gelu", np.r_[-100.0, np.linspace(-6, 6, n), 100.0], "normal")
        return (w, f1, f2), tuple(torch.from_numpy(a).to(dev) for a in (w, f1, f2))

    dp_fns = {"numpy": lambda a: stepwise_dp(*a[0], 16, backend="numpy"),
              "numba": lambda a: stepwise_dp(*a[0], 16, backend="numba"),
              "torch": lambda a: stepwise_dp(*a[1], 16, backend="torch")}
    dp_rows = compare_backends(dp_fns, dp_input, DP_SIZES, repeat=3, device=dev if dev.type == "cuda" else None,
                               progress=True)
    print("DP (eq. 7), K = 16, N grid points\n" + timing_table(dp_rows))
    rows += [{"loop": "dp", **r} for r in dp_rows]

    # --- encode (2): bucketize + pack, 3 bits, float32
    borders = builtin_table("gelu", 3).interior.astype(np.float32)
    bt = torch.from_numpy(borders).to(dev)

    def enc_input(n):
        x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        return x, torch.from_numpy(x).to(dev)

    enc_fns = {"numpy": lambda a: encode(a[0], borders, backend="numpy"),
               "numba": lambda a: encode(a[0], borders, backend="numba"),
               "torch": lambda a: encode(a[1], bt, backend="torch")}
    if dev.type == "cuda":
        from refimpl.quant.few_bit_backward import pack_codes

        @torch.compile
        def enc_compiled(x, b):
            return pack_codes(torch.bucketize(x, b).to(torch.uint8), 3)

        enc_fns["torch_compile"] = lambda a: enc_compiled(a[1], bt)
    enc_rows = compare_backends(enc_fns, enc_input, ENC_SIZES, repeat=5, device=dev if dev.type == "cuda" else None,
                                bytes_moved=lambda n: n * 4 + n * 3 / 8, progress=True)
    print("\nbucketize + pack (eq. 2), 3 bits, n float32 values\n" + timing_table(enc_rows))
    rows += [{"loop": "encode", **r} for r in enc_rows]

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "few_bit_backward", "device": torch.cuda.get_device_name(dev)
                               if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                               "numba": numba.__version__, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
