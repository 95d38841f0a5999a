"""The optim part's common benchmark: every optimizer of the part on one task, several seeds.

Task: scikit-learn's digits, an MLP 64 -> 128 (no bias) -> LayerNorm -> ReLU -> 128 -> ReLU -> 10 (the first
layer is scale-invariant), batch 32, 400 steps. Each optimizer gets a three-point learning-rate sweep around its
authors' default, chosen on a validation split (seed 0); then five seeds are run at the chosen rate and scored on
the test split. Writes bench/results/optim_compare.json and book/parts/optim_compare.png.

    python bench/optim_compare.py
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from refimpl._common.data import digits_split  # noqa: E402
from refimpl.optim.adamp import AdamP  # noqa: E402
from refimpl.optim.d_adaptation import DAdaptAdam, DAdaptSGD  # noqa: E402
from refimpl.optim.entropy_sgd import EntropySGD  # noqa: E402
from refimpl.optim.gradient_noise import NoisySGD  # noqa: E402
from refimpl.optim.lamb import Lamb  # noqa: E402
from refimpl.optim.lars import LARS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, SEEDS = 400, 32, range(5)

# name -> (constructor, default lr, needs a closure)
OPTIMIZERS = {
    "SGD (momentum 0.9)": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), 0.05, False),
    "Adam": (lambda p, lr: torch.optim.Adam(p, lr=lr), 1e-3, False),
    "AdamP": (lambda p, lr: AdamP(p, lr=lr), 1e-3, False),
    "LARS": (lambda p, lr: LARS(p, lr=lr, momentum=0.9, trust_coeff=1e-3, always_adapt=True), 10.0, False),
    "LAMB": (lambda p, lr: Lamb(p, lr=lr), 1e-3, False),
    "D-Adapt SGD": (lambda p, lr: DAdaptSGD(p, lr=lr, momentum=0.9), 1.0, False),
    "D-Adapt Adam": (lambda p, lr: DAdaptAdam(p, lr=lr), 1.0, False),
    "Entropy-SGD (L=5)": (lambda p, lr: EntropySGD(p, lr=lr, momentum=0.9, L=5, gamma=0.03,
                                                   generator=torch.Generator().manual_seed(0)), 0.05, True),
    "SGD + grad. noise": (lambda p, lr: NoisySGD(p, lr=lr, momentum=0.9, eta=0.01), 0.05, False),
}


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.LayerNorm(128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train(name: str, lr: float, seed: int, x, y, x_eval, y_eval) -> tuple[list[float], float]:
    make, _, closure_needed = OPTIMIZERS[name]
    model = make_model(seed)
    opt = make(model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(len(x), (BATCH,), generator=gen)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        loss = opt.step(closure) if closure_needed else (closure(), opt.step())[0]
        losses.append(float(loss.detach()))
    with torch.no_grad():
        acc = (model(x_eval).argmax(1) == y_eval).float().mean().item()
    return losses, acc


def main() -> None:
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = digits_split(seed=0)
    n_val = len(x_tr) // 5
    x_fit, y_fit, x_val, y_val = x_tr[n_val:], y_tr[n_val:], x_tr[:n_val], y_tr[:n_val]
    results = {}
    for name, (_, lr0, _) in tqdm(OPTIMIZERS.items(), desc="optimizers"):
        sweep = {lr: train(name, lr, 0, x_fit, y_fit, x_val, y_val)[1] for lr in (lr0 / 3, lr0, lr0 * 3)}
        lr = max(sweep, key=lambda k: (sweep[k], -abs(np.log(k / lr0))))
        runs = [train(name, lr, seed, x_tr, y_tr, x_te, y_te) for seed in SEEDS]
        results[name] = {"lr": lr, "sweep": {str(k): v for k, v in sweep.items()},
                         "test_acc": [a for _, a in runs], "loss": [l for l, _ in runs]}
    out = ROOT / "bench" / "results" / "optim_compare.json"
    out.write_text(json.dumps({"steps": STEPS, "batch": BATCH, "seeds": list(SEEDS),
                               "results": {k: {kk: vv for kk, vv in v.items() if kk != "loss"} for k, v in results.items()}},
                              indent=1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        L = np.array(r["loss"])
        smooth = np.array([np.convolve(l, np.ones(20) / 20, mode="valid") for l in L])
        t = np.arange(smooth.shape[1]) + 20
        ax1.plot(t, np.median(smooth, 0), label=name)
        ax1.fill_between(t, smooth.min(0), smooth.max(0), alpha=0.15)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (20-step mean)")
    names = list(results)
    for i, name in enumerate(names):
        accs = results[name]["test_acc"]
        ax2.scatter([i] * len(accs), accs, s=14, color=f"C{i}")
        ax2.hlines(np.median(accs), i - 0.3, i + 0.3, color=f"C{i}")
    ax2.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax2.set_ylabel("test accuracy (5 seeds)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "book" / "parts" / "optim_compare.png", dpi=110)
    for name, r in results.items():
        a = np.array(r["test_acc"])
        print(f"{name:22s} lr {r['lr']:<8.3g} test acc median {np.median(a):.3f} (min {a.min():.3f}, max {a.max():.3f})")


if __name__ == "__main__":
    main()
