"""Benchmark the critical loops of the selu_snn chapter: the elementwise SELU forward (eq. 1), its
backward (eq. 2) and the alpha-dropout apply with a given mask (eq. 8), float32, over a range of
sizes. Backends: numpy (reference), numba, torch (refimpl's torch path) and torch's own fused kernel
(``torch.selu`` / ``aten.elu_backward``; alpha-dropout has no fused kernel that takes a mask). On CUDA
also a ``torch.compile``'d torch path.

    python bench/selu_snn.py --device cpu            # writes bench/results/selu_snn_cpu.json
    python bench/selu_snn.py --device cuda --out bench/results/selu_snn_cuda.json
"""
from __future__ import annotations

import json
from pathlib import Path

import numba
import numpy as np
import torch

from refimpl._common import compare_backends, seed_everything, timing_table
from refimpl.norm.selu_snn import SELU_ALPHA, SELU_LAMBDA, alpha_dropout, selu, selu_backward
from refimpl._common.bench import bench_parser, parse_bench_args

P = 0.1


def _inputs(n: int, device: str):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m = rng.random(n) < 1 - P
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return {"x": x, "g": g, "m": m, "xt": t(x), "gt": t(g), "mt": t(m)}


# bytes read + written per element (float32 x, g, y; bool mask)
BYTES = {"selu_forward": 8, "selu_backward": 12, "alpha_dropout": 9}


def _ops() -> dict[str, dict]:
    elu_bwd = torch.ops.aten.elu_backward
    ops = {
        "selu_forward": {
            "numpy": lambda d: selu(d["x"], backend="numpy"),
            "numba": lambda d: selu(d["x"], backend="numba"),
            "torch": lambda d: selu(d["xt"], backend="torch"),
            "torch_fused": lambda d: torch.selu(d["xt"]),
        },
        "selu_backward": {
            "numpy": lambda d: selu_backward(d["g"], d["x"], backend="numpy"),
            "numba": lambda d: selu_backward(d["g"], d["x"], backend="numba"),
            "torch": lambda d: selu_backward(d["gt"], d["xt"], backend="torch"),
            "torch_fused": lambda d: elu_bwd(d["gt"], SELU_ALPHA, SELU_LAMBDA, 1.0, False, d["xt"]),
        },
        "alpha_dropout": {
            "numpy": lambda d: alpha_dropout(d["x"], P, mask=d["m"], backend="numpy"),
            "numba": lambda d: alpha_dropout(d["x"], P, mask=d["m"], backend="numba"),
            "torch": lambda d: alpha_dropout(d["xt"], P, mask=d["mt"], backend="torch"),
        },
    }
    return ops


def _best_of(rounds: int, run) -> list[dict]:
    """Run ``run()`` (a compare_backends table) ``rounds`` times; keep each entry's fastest time."""
    best = run()
    for _ in range(rounds - 1):
        for row, new in zip(best, run()):
            for k in row:
                if k.endswith("_s"):
                    row[k] = min(row[k], new[k])
                elif k.endswith("_GBps"):
                    row[k] = max(row[k], new[k])
    return best


def main(argv=None) -> list[dict]:
    ap = bench_parser(__doc__)
    ap.add_argument("--sizes", type=int, nargs="*", default=[2 ** k for k in range(12, 24, 2)])
    ap.add_argument("--rounds", type=int, default=3,
                    help="repeat the whole table and keep each entry's best median (a shared 2-core machine "
                         "deschedules threads now and then; one such hiccup costs a threaded kernel ~8 ms)")
    args = parse_bench_args(ap, argv)
    seed_everything(0)
    device = args.device
    ops = _ops_for(device)
    rows = []
    for op, fns in ops.items():
        op_rows = _best_of(args.rounds, lambda: compare_backends(
            fns, lambda n: _inputs(n, device), args.sizes, bytes_moved=lambda n, op=op: BYTES[op] * n,
            device=device if device == "cuda" else None))
        print(f"\n### {op} (float32, {device})\n")
        print(timing_table(op_rows, reference="numpy" if device == "cpu" else "torch"))
        rows += [{"op": op, **r} for r in op_rows]
    out = args.out or Path(__file__).resolve().parent / "results" / f"selu_snn_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"paper_id": "selu_snn", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "numba": numba.__version__,
            "threads": numba.get_num_threads(), "dtype": "float32", "p": P, "rounds": args.rounds,
            "rows": rows}
    out.write_text(json.dumps(meta, indent=1))
    print(f"\nwrote {out}")
    return rows


def _ops_for(device: str) -> dict[str, dict]:
    if device == "cpu":
        return _ops()
    # On the GPU the NumPy/Numba paths would time host code: torch paths, compiled and fused.
    elu_bwd = torch.ops.aten.elu_backward
    from refimpl.norm.selu_snn import ALPHA_PRIME, _selu_backward_torch, _selu_torch, alpha_dropout_affine
    a, b = alpha_dropout_affine(P)
    c = a * ALPHA_PRIME + b
    fwd_c = torch.compile(lambda x: _selu_torch(x, SELU_ALPHA, SELU_LAMBDA))
    bwd_c = torch.compile(lambda g, x: _selu_backward_torch(g, x, SELU_ALPHA, SELU_LAMBDA))
    ad_c = torch.compile(lambda x, m: torch.where(m, a * x + b, c))
    return {
        "selu_forward": {"torch": lambda d: selu(d["xt"], backend="torch"),
                         "torch_compiled": lambda d: fwd_c(d["xt"]),
                         "torch_fused": lambda d: torch.selu(d["xt"])},
        "selu_backward": {"torch": lambda d: selu_backward(d["gt"], d["xt"], backend="torch"),
                          "torch_compiled": lambda d: bwd_c(d["gt"], d["xt"]),
                          "torch_fused": lambda d: elu_bwd(d["gt"], SELU_ALPHA, SELU_LAMBDA, 1.0, False, d["xt"])},
        "alpha_dropout": {"torch": lambda d: alpha_dropout(d["xt"], P, mask=d["mt"], backend="torch"),
                          "torch_compiled": lambda d: ad_c(d["xt"], d["mt"])},
    }


if __name__ == "__main__":
    main()
