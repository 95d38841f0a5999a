"""Tiny datasets that need no download: scikit-learn's bundled digits, standardised and split."""
from __future__ import annotations

import numpy as np
import torch


def digits_split(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 8x8 digits (1797 images, 10 classes) as float32 tensors, standardised with the
    training set's statistics. Returns ``(x_train, y_train, x_test, y_test)``; x is (N, 64)."""
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    x = ((x - mu) / sd).astype(np.float32)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(x[train]), t(y[train]).long(), t(x[test]), t(y[test]).long()
