"""Benchmark the AdamP critical loop: one functional step (moment update, per-row cosine test,
projection, decoupled weight decay, update) over a model-like parameter group of L = 8 layers,
each a (d, d) weight and a (d,) bias, float32.

CPU: the NumPy reference, the Numba kernels and the torch path of ``adamp_step``; the official
package's ``adamp.AdamP.step`` (a Python loop over tensors) and ``torch.optim.Adam(foreach=True)``
(plain Adam, no projection: the fused multi-tensor kernel torch ships, as an anchor).
CUDA: the torch path eager and under torch.compile, the official AdamP, and torch's fused Adam.

    python bench/adamp.py                  # CPU -> bench/results/adamp_cpu.json
    python bench/adamp.py --device cuda    # GPU -> bench/results/adamp_cuda.json
    python bench/adamp.py --threads 1      # one CPU thread for every backend
"""
from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

# this file is named adamp.py: keep its folder off the path so that `import adamp` finds the package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import adamp as official  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from refimpl._common import compare_backends, timing_table  # noqa: E402
from refimpl.optim.adamp import ProjectionLayout, adamp_step  # noqa: E402
from refimpl._common.bench import bench_parser, parse_bench_args

LAYERS = 8
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, delta=0.1, wd_ratio=0.1)


def make_problem(d: int, device: str = "cpu"):
    shapes = [s for _ in range(LAYERS) for s in ((d, d), (d,))]
    layout = ProjectionLayout(shapes)
    rng = np.random.default_rng(d)
    n = layout.segments.numel
    arrays = {"w": rng.standard_normal(n, dtype=np.float32), "g": rng.standard_normal(n, dtype=np.float32),
              "m": np.zeros(n, np.float32), "v": np.zeros(n, np.float32)}
    tensors = {k: torch.from_numpy(a.copy()).to(device) for k, a in arrays.items()}
    params = [torch.nn.Parameter(t.clone()) for t in layout.segments.unflatten(tensors["w"])]
    for p, g in zip(params, layout.segments.unflatten(tensors["g"])):
        p.grad = g.clone()
    return {"layout": layout, "np": arrays, "pt": tensors, "params": params,
            "official": official.AdamP(params, **HP),
            "adam": torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params],
                                     lr=1e-3, weight_decay=1e-2, foreach=True)}


def functional(backend: str, key: str):
    def run(prob):
        a = prob[key]
        return adamp_step(a["w"], a["g"], a["m"], a["v"], prob["layout"], step=10, backend=backend, **HP)
    return run


def _adam_step(prob):
    opt = prob["adam"]
    if opt.param_groups[0]["params"][0].grad is None:
        for p, q in zip(opt.param_groups[0]["params"], prob["params"]):
            p.grad = q.grad.clone()
    opt.step()


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and Numba (default: all; 1 is steadier on a busy machine)")
    args = parse_bench_args(ap, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    if args.device == "cuda":
        sizes = [256, 1024, 2048, 4096]
        step = lambda p: adamp_step(p["pt"]["w"], p["pt"]["g"], p["pt"]["m"], p["pt"]["v"],  # noqa: E731
                                    p["layout"], step=10, backend="torch", **HP)
        fns = {"torch": step, "torch.compile": torch.compile(step),
               "official": lambda p: p["official"].step(), "torch Adam (foreach)": _adam_step}
        device_name = torch.cuda.get_device_name()
        make = lambda d: make_problem(d, "cuda")  # noqa: E731
    else:
        sizes = [64, 128, 256, 512, 1024]
        fns = {"numpy": functional("numpy", "np"), "numba": functional("numba", "np"),
               "torch": functional("torch", "pt"), "official": lambda p: p["official"].step(),
               "torch Adam (foreach)": _adam_step}
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        make = make_problem
    # bytes: read w, g, m, v and write w, m, v once (7 x 4 bytes per element) for the ideal fused step
    rows = compare_backends(fns, make, sizes, bytes_moved=lambda d: 28 * LAYERS * (d * d + d),
                            device="cuda" if args.device == "cuda" else None, progress=True)
    for r in rows:
        r["elements"] = LAYERS * (r["size"] ** 2 + r["size"])
    print(f"size = d; the group holds {LAYERS} (d, d) weights and {LAYERS} (d,) biases, float32")
    print(timing_table(rows, reference="numpy" if args.device == "cpu" else "torch"))
    out = args.out or Path(__file__).parent / "results" / f"adamp_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_id": "adamp", "device": device_name, "date": str(date.today()),
                               "torch": torch.__version__, "numba": numba.__version__, "layers": LAYERS,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
