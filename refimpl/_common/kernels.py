"""What every Numba kernel of the book shares.

``FASTMATH``: reassociation and contraction let LLVM vectorise reductions; ``nnan``/``ninf`` are left
out, so NaN and infinity still propagate to where the modules' input checks find them.

``row_blocks``: how many blocks of rows a parallel kernel splits its work into. Below a size
threshold the answer is 1 — waking the worker threads costs more than the work (measured on the
2-core CI machine: 10-20 us when idle, milliseconds when the cores are busy).
"""
from __future__ import annotations

import numba

FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
PARALLEL_MIN = 1 << 18  # elements: 1 MiB of float32


def row_blocks(n_rows: int, size: int, parallel_min: int = PARALLEL_MIN) -> int:
    """1 when ``size < parallel_min`` elements, else one block per thread (at most one per row)."""
    if size < parallel_min:
        return 1
    return max(1, min(numba.get_num_threads(), n_rows))
