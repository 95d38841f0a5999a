"""The KV-cache part's comparison: every method of the part on the same model, tasks and budgets.

    python scripts/compare_kvcache.py      # writes bench/results/kvcache_comparison.json and book/parts/kvcache_compare.png

Model: the book's trained TinyLM (refimpl/models). Tasks: key–value recall and needle in a haystack, 256-token
prompts (the longest context the model retrieves at), 50 seeded prompts each (seed 1234, the checkpoint's
evaluation prompts). Budget: cached tokens kept per layer and head (on average over layers for the methods that
allocate unevenly), out of 256. Metric: exact-match accuracy of greedy decoding. CPU, one thread, a few minutes.
Prints the Markdown table of book/parts/kvcache.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from refimpl.kvcache.d2o_kv_eviction import D2OPolicy  # noqa: E402
from refimpl.kvcache.dynamic_memory_compression import DMCTinyLM, evaluate_dmc  # noqa: E402
from refimpl.kvcache.dynamickv import DynamicKVPolicy, PyramidKVPolicy, SnapKVPolicy  # noqa: E402
from refimpl.kvcache.eviction import H2O, FullCache, SlidingWindow  # noqa: E402
from refimpl.kvcache.q_filters import QFilterPolicy  # noqa: E402
from refimpl.kvcache.scope_kv_decoding import SCOPEPolicy  # noqa: E402
from refimpl.models import load_tiny_lm  # noqa: E402
from refimpl.models.corpus import evaluate  # noqa: E402

TASKS = ("kv_recall", "needle")
BUDGETS = (16, 32, 64, 128)


def methods(model: torch.nn.Module) -> dict[str, Callable[[int], object]]:
    """Method name → ``budget ↦ policy`` (built fresh per budget; Q-Filters calibrated once on the model)."""
    filters = QFilterPolicy.calibrate(model, BUDGETS[0]).filters
    return {
        "StreamingLLM": lambda b: SlidingWindow(b, n_sink=4),
        "H2O": lambda b: H2O(b),
        "SnapKV": lambda b: SnapKVPolicy(b),
        "PyramidKV": lambda b: PyramidKVPolicy(b),
        "Q-Filters": lambda b: QFilterPolicy(filters, b),
        "DynamicKV": lambda b: DynamicKVPolicy(b),
        "D2O": lambda b: D2OPolicy(b),
        "SCOPE": lambda b: SCOPEPolicy(b),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50, help="prompts per task")
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "kvcache_comparison.json"))
    p.add_argument("--figure", default=os.path.join(ROOT, "book", "parts", "kvcache_compare.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_tiny_lm()
    t0 = time.time()
    full = {t: evaluate(model, t, n=args.n, context_len=args.context_len, seed=args.seed, policy=FullCache())
            for t in TASKS}
    rows = []
    for name, make in methods(model).items():
        for b in tqdm(BUDGETS, desc=name):
            acc = {t: evaluate(model, t, n=args.n, context_len=args.context_len, seed=args.seed, policy=make(b))
                   for t in TASKS}
            rows.append({"method": name, "budget": b, **acc})
    dmc = DMCTinyLM.load()  # the retrofitted model: its own cache size, learned per head
    dmc_res = {t: evaluate_dmc(dmc, t, n=args.n, context_len=args.context_len, seed=args.seed) for t in TASKS}
    dmc_row = {"method": "DMC (retrofit, CR≈2)", **{t: a for t, (a, _) in dmc_res.items()},
               "compression": {t: cr for t, (_, cr) in dmc_res.items()}}
    res = {"model": "refimpl/models/weights/tiny_lm.safetensors", "context_len": args.context_len, "n": args.n,
           "seed": args.seed, "tasks": list(TASKS), "budgets": list(BUDGETS), "full_cache": full, "rows": rows, "dmc": dmc_row,
           "torch": torch.__version__, "wall_time_s": round(time.time() - t0, 1)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    plot(res, args.figure)
    print(markdown_table(res))
    return res


def markdown_table(res: dict) -> str:
    head = "| method | " + " | ".join(f"{t} @ {b}" for t in res["tasks"] for b in res["budgets"]) + " |"
    lines = [head, "|---" * (1 + len(res["tasks"]) * len(res["budgets"])) + "|",
             "| full cache (256) | " + " | ".join(f"{res['full_cache'][t]:.0%}" for t in res["tasks"]
                                               for _ in res["budgets"]) + " |"]
    names = list(dict.fromkeys(r["method"] for r in res["rows"]))
    for name in names:
        by_b = {r["budget"]: r for r in res["rows"] if r["method"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{by_b[b][t]:.0%}" if b in by_b else "—"
                                                 for t in res["tasks"] for b in res["budgets"]) + " |")
    d = res.get("dmc")
    if d:
        sizes = ", ".join(f"{t} {res['context_len'] / d['compression'][t]:.0f}" for t in res["tasks"])
        accs = " | ".join(f"{t} {d[t]:.0%}" for t in res["tasks"])
        lines.append(f"\n{d['method']}: its own cache, ≈ {sizes} slots per layer and head (context / compression "
                     f"ratio) — accuracy {accs}")
    return "\n".join(lines).replace("%", " %")


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res["tasks"]), figsize=(5 * len(res["tasks"]), 3.6), sharey=True)
    names = list(dict.fromkeys(r["method"] for r in res["rows"]))
    for ax, task in zip(np.atleast_1d(axes), res["tasks"]):
        for name in names:
            rr = sorted((r for r in res["rows"] if r["method"] == name), key=lambda r: r["budget"])
            ax.plot([r["budget"] for r in rr], [r[task] for r in rr], "o-", label=name)
        d = res.get("dmc")
        if d:
            ax.plot([res["context_len"] / d["compression"][task]], [d[task]], "k*", ms=12, label=d["method"])
        ax.axhline(res["full_cache"][task], color="k", ls="--", lw=1, label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["budgets"], [str(b) for b in res["budgets"]])
        ax.set_xlabel(f"cache budget (tokens per layer and head, of {res['context_len']})")
        ax.set_title(task)
    np.atleast_1d(axes)[0].set_ylabel("exact-match accuracy")
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
