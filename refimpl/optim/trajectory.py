"""A seeded benchmark model and the trajectory of an optimizer on it: what every optimizer chapter
compares against the official implementation, step by step.

``ScaleInvariantNet`` has parameters of several shapes (2-D weights, biases, a normalization gain)
and one scale-invariant layer: ``first`` (no bias) feeds a LayerNorm, so the loss does not change when
``first.weight`` is multiplied by any c > 0 — the case AdamP, LARS and LAMB treat specially.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["ScaleInvariantNet", "regression_batch", "run_trajectory"]


class ScaleInvariantNet(torch.nn.Module):
    """x (B, d_in) -> (B, d_out): Linear(no bias) -> LayerNorm -> ReLU -> Linear -> ReLU -> Linear."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.first = torch.nn.Linear(d_in, hidden, bias=False)
        self.norm = torch.nn.LayerNorm(hidden, eps=1e-9)  # tiny eps: scale invariance holds to ~1e-9
        self.mid = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, d_out)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim > 1 else 0.1))
            self.norm.weight.add_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.first(x)))
        return self.out(torch.relu(self.mid(h)))


def regression_batch(step: int, batch: int = 32, d_in: int = 8, d_out: int = 4, seed: int = 0):
    """The (x, y) batch of a given step: a fixed random linear-tanh teacher plus noise, seeded by
    (seed, step) so that two optimizers see the same data stream."""
    teacher = torch.randn(d_in, d_out, generator=torch.Generator().manual_seed(seed + 10_000))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch, d_in, generator=gen)
    y = torch.tanh(x @ teacher) + 0.1 * torch.randn(batch, d_out, generator=gen)
    return x, y


def run_trajectory(make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                   steps: int = 50, seed: int = 0, dtype: torch.dtype = torch.float64,
                   use_closure: bool = False) -> np.ndarray:
    """Train a fresh ``ScaleInvariantNet(seed=seed)`` for ``steps`` steps with the optimizer that
    ``make_optimizer(parameters)`` returns, on ``regression_batch`` data with an MSE loss.

    Returns the parameters after every step as one array of shape (steps + 1, n_params) (row 0: the
    initialisation), flattened in ``model.parameters()`` order. ``use_closure``: call
    ``optimizer.step(closure)`` (optimizers that re-evaluate the loss need it).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = ScaleInvariantNet(seed=seed).to(dtype)
    params = list(model.parameters())
    opt = make_optimizer(params)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in params]).cpu().numpy().copy()  # noqa: E731
    out = [flat()]
    for step in range(steps):
        x, y = (t.to(dtype) for t in regression_batch(step, seed=seed))

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if use_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
        out.append(flat())
    return np.stack(out)
