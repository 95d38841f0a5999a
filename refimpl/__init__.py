"""refimpl — from-scratch, verified reference implementations for *Dynamic Deep Learning, Derived*.

Each paper of the book lives in ``refimpl.<part>.<paper_id>``; the helpers every chapter shares
live in :mod:`refimpl._common`.
"""
from refimpl._common.seed import seed_everything

__all__ = ["seed_everything"]
__version__ = "0.1.0"
