"""Helpers shared by every chapter: seeding, backend dispatch, validation, comparison, fixtures,
timing and tiny datasets. Only what chapters use lives here."""
from refimpl._common.backend import BACKENDS, resolve_backend, to_numpy
from refimpl._common.golden import load_golden, save_golden
from refimpl._common.seed import seed_everything
from refimpl._common.testing import assert_close, max_errors
from refimpl._common.timing import compare_backends, loglog_plot, time_call, timing_table
from refimpl._common.validate import (check_betas, check_finite, check_flat_buffers, check_floating, check_int,
                                      check_positive)

__all__ = [
    "BACKENDS", "resolve_backend", "to_numpy", "load_golden", "save_golden", "seed_everything",
    "assert_close", "max_errors", "time_call", "compare_backends", "timing_table", "loglog_plot", "check_betas", "check_finite",
    "check_flat_buffers", "check_floating", "check_int", "check_positive",
]
