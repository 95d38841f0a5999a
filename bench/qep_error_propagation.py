"""Benchmark the QEP chapter's critical loop: GPTQ's column sweep (eqs. 8-9, ``gptq_sweep``) on an (n × n)
float32 weight with a Hessian from 2n random inputs of unequal scales, 3 bits, blocksize 128. The preparation
(grid, damped Cholesky inverse: LAPACK, the same for every backend) is done once, outside the timing.

CPU: the NumPy reference (the official lazy-batch structure), the Numba kernel (tiles of rows in parallel), and
the torch path (lazy batches, eager). QEP's correction itself (eq. 5) is two matrix products and one Cholesky
inverse, i.e. BLAS-bound, and is not the loop timed here.
CUDA: the torch path, and the same with the per-column step (quantize, error, rank-1 update of the block)
under ``torch.compile``.

    python bench/qep_error_propagation.py                  # CPU -> bench/results/qep_error_propagation_cpu.json
    python bench/qep_error_propagation.py --device cuda    # GPU -> bench/results/qep_error_propagation_cuda.json
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
from refimpl.quant.qep_error_propagation import _damped_cholesky_inverse, gptq_minmax_params, gptq_sweep

BITS, BLOCK = 3, 128


def make_problem(n: int, seed: int = 0):
    """(W, U, scale, zero) float32: the prepared sweep of an (n × n) layer."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2 * n, n)).astype(np.float32) * np.linspace(0.3, 2.0, n, dtype=np.float32)
    W = (rng.standard_normal((n, n)) * 0.05).astype(np.float32)
    H = (2 / (2 * n) * X.T @ X).astype(np.float32)
    Hinv, _ = _damped_cholesky_inverse(H, 0.01)
    scale, zero = gptq_minmax_params(W, BITS, backend="numpy")
    return W, np.linalg.cholesky(Hinv).T.copy(), scale, zero


def _compiled_gptq():
    """The torch path with the column step compiled: U is upper-triangular, so the rank-1 update of the whole
    block (W1 -= err ⊗ U1[i]) equals the official update of W1[:, i:], and every call has the same shapes."""
    @torch.compile(dynamic=False)
    def step(W1, w, u, d, scale, zero, maxq: int):
        q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
        err = (w - q) / d
        return q, err, W1 - err[:, None] * u[None, :]

    def run(W, U, scale, zero):
        s, z = scale[:, 0], zero[:, 0]
        W = W.clone()
        n = W.shape[1]
        Q = torch.zeros_like(W)
        for i1 in range(0, n, BLOCK):
            i2 = min(i1 + BLOCK, n)
            W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                Q[:, i1 + i], Err1[:, i], W1 = step(W1, W1[:, i], U1[i], U1[i, i], s, z, 2 ** BITS - 1)
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        return Q
    return run


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--threads", type=int, default=2, help="numba threads (CPU)")
    args = parse_bench_args(ap, argv)
    sizes = [128, 256, 512, 1024]
    if args.device == "cuda":
        compiled = _compiled_gptq()
        fns = {"torch": lambda p: gptq_sweep(*p, BITS, backend="torch"),
               "torch.compile": lambda p: compiled(*p)}
        make = lambda n: tuple(torch.from_numpy(a).cuda() for a in make_problem(n))  # noqa: E731
        device_name = torch.cuda.get_device_name()
        # the compiled sweep reproduces the eager one
        p = make(256)
        assert (compiled(*p) != gptq_sweep(*p, BITS, backend="torch")).float().mean() < 1e-3
    else:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        fns = {"numpy": lambda p: gptq_sweep(*p[:4], BITS, backend="numpy"),
               "numba": lambda p: gptq_sweep(*p[:4], BITS, backend="numba"),
               "torch": lambda p: gptq_sweep(*p[4:], BITS, backend="torch")}
        make = lambda n: (p := make_problem(n)) + tuple(torch.from_numpy(a) for a in p)  # noqa: E731
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
                      f"{numba.get_num_threads()} numba threads"
    rows = compare_backends(fns, make, sizes, device="cuda" if args.device == "cuda" else None, progress=True,
                            repeat=3)
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"qep_error_propagation_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "qep_error_propagation", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "bits": BITS,
                               "blocksize": BLOCK, "size": "n x n weight, n columns", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
