"""refimpl._common: the helpers every chapter relies on must themselves be right."""
import numpy as np
import pytest
import torch

import refimpl
from refimpl._common import (assert_close, check_betas, check_finite, check_floating, check_positive, compare_backends,
                             load_golden, max_errors, resolve_backend, save_golden, time_call, timing_table)
from refimpl._common.backend import like_input, to_numpy
from refimpl._common.data import digits_split


def test_seed_everything_is_deterministic():
    g1 = refimpl.seed_everything(3)
    a = (np.random.rand(3), torch.rand(3), g1.random(3))
    g2 = refimpl.seed_everything(3)
    b = (np.random.rand(3), torch.rand(3), g2.random(3))
    for u, v in zip(a, b):
        assert np.array_equal(to_numpy(u), to_numpy(v))
    with pytest.raises(ValueError, match="non-negative integer"):
        refimpl.seed_everything(-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        refimpl.seed_everything(1.5)


def test_resolve_backend():
    assert resolve_backend("auto", torch.zeros(1)) == "torch"
    assert resolve_backend("auto", np.zeros(1)) == "numba"
    assert resolve_backend("numpy", torch.zeros(1)) == "numpy"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("jax", np.zeros(1))
    with pytest.raises(TypeError, match="backend must be a string"):
        resolve_backend(None, np.zeros(1))


def test_like_input_follows_the_input_type():
    assert isinstance(like_input(np.ones(2), torch.zeros(2)), torch.Tensor)
    assert isinstance(like_input(torch.ones(2), np.zeros(2)), np.ndarray)


def test_validation_messages():
    with pytest.raises(TypeError, match="x must have a floating-point dtype, got int32"):
        check_floating(torch.zeros(2, dtype=torch.int32), "x")
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        check_floating([1.0], "x")
    with pytest.raises(ValueError, match="w contains NaN"):
        check_finite(np.array([1.0, np.nan]), "w")
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        check_positive(0, "lr")
    with pytest.raises(TypeError, match="lr must be a real number"):
        check_positive("1", "lr")
    assert check_positive(2, "lr") == 2.0
    assert check_betas((0.9, np.float32(0.5))) == (0.9, 0.5)
    with pytest.raises(TypeError, match=r"betas must be a pair \(beta1, beta2\)"):
        check_betas(0.9)
    with pytest.raises(TypeError, match=r"betas\[1\] must be a real number"):
        check_betas((0.9, "0.99"))
    with pytest.raises(ValueError, match=r"betas\[1\] must lie in \[0, 1\), got 1.0"):
        check_betas([0.9, 1.0])


def test_assert_close_reports_errors():
    assert max_errors([1.0, 2.0], [1.0, 2.5]) == (0.5, 0.2)
    assert_close(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]))
    with pytest.raises(AssertionError, match=r"1/2 elements differ.*max abs err 5.000e-01.*worst at \(1,\)"):
        assert_close([1.0, 2.0], [1.0, 2.5], name="v")
    with pytest.raises(AssertionError, match="NaNs in different places"):
        assert_close([np.nan, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="shapes differ"):
        max_errors(np.zeros(2), np.zeros(3))


def test_golden_roundtrip(tmp_path):
    path = save_golden(tmp_path / "g" / "case.npz", x=torch.arange(3.0), y=np.eye(2))
    with pytest.raises(FileNotFoundError, match="PROVENANCE.md"):
        load_golden(path)
    (path.parent / "PROVENANCE.md").write_text("test")
    data = load_golden(path)
    assert np.array_equal(data["x"], [0.0, 1.0, 2.0]) and np.array_equal(data["y"], np.eye(2))
    with pytest.raises(ValueError, match=".npz"):
        save_golden(tmp_path / "g.txt", x=np.zeros(1))


def test_timing_helpers():
    assert time_call(lambda: sum(range(100)), repeat=3) > 0
    rows = compare_backends({"a": lambda n: np.ones(n), "b": lambda n: np.zeros(n)}, lambda n: n, [10, 100],
                            bytes_moved=lambda n: 8 * n, repeat=2)
    assert [r["size"] for r in rows] == [10, 100] and {"a_s", "b_s", "a_GBps"} <= set(rows[0])
    table = timing_table(rows, reference="a")
    assert table.splitlines()[0] == "| size | a (ms) | b (ms) | b speed-up |"
    with pytest.raises(ValueError, match="repeat"):
        time_call(lambda: None, repeat=0)


def test_digits_split_is_standardised_and_seeded():
    xtr, ytr, xte, yte = digits_split(seed=1)
    assert xtr.shape[1] == 64 and len(xtr) + len(xte) == 1797 and xtr.dtype == torch.float32
    assert abs(float(xtr.mean())) < 1e-3
    assert torch.equal(digits_split(seed=1)[1], ytr)
    with pytest.raises(ValueError, match="test_fraction"):
        digits_split(test_fraction=1.5)


def test_check_flat_buffers():
    from refimpl._common import check_flat_buffers

    check_flat_buffers({"x": np.zeros(3), "g": np.ones(3)})
    with pytest.raises(ValueError, match="g must be a flat 1-D buffer"):
        check_flat_buffers({"x": np.zeros(3), "g": np.ones((3, 1))})
    with pytest.raises(TypeError, match="g must have the type and dtype of x"):
        check_flat_buffers({"x": np.zeros(3), "g": np.ones(3, np.float32)})
    with pytest.raises(TypeError, match="g must have the type and dtype of x"):
        check_flat_buffers({"x": np.zeros(3), "g": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="g must have 3 elements like x"):
        check_flat_buffers({"x": np.zeros(3), "g": np.ones(4)})


def test_bench_command_line(tmp_path):
    from refimpl._common.bench import bench_parser, parse_bench_args

    ap = bench_parser("doc")
    ap.add_argument("--threads", type=int, default=None)
    args = parse_bench_args(ap, ["--out", str(tmp_path / "r.json"), "--threads", "1"])
    assert args.device == "cpu" and args.out == tmp_path / "r.json" and args.threads == 1
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_bench_args(ap, ["--device", "cuda"])


def test_check_int():
    from refimpl._common import check_int
    assert check_int(np.int64(3), "n", 1) == 3 and type(check_int(np.int64(3), "n", 1)) is int
    assert check_int(5, "n") == 5 and check_int(8, "bits", 1, 8) == 8
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int(True, "n", 0)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        check_int(2.0, "n", 0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n", 1)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\], got 9"):
        check_int(9, "bits", 1, 8)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\], got 0"):
        check_int(0, "bits", 1, 8)
