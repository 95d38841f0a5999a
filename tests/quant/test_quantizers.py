"""The shared quantization toolbox (refimpl.quant.quantizers).

Tolerances: the three backends must give *identical* codes, scales and zero points (the same
IEEE operations in the same order per element; exact equality is the point of a shared toolbox,
since a code off by one is a different quantizer). Round-trip errors are checked against the
analytic bound |x - x̂| <= s/2 for values inside the clipping range.
"""
import numpy as np
import pytest
import torch

from refimpl.quant.quantizers import (MODES, dequantize_groups, fake_quantize, fake_quantize_ste, mxint, pack_bits,
                                      qrange, quantize_groups, round_ste, rtn, to_groups, unpack_bits)

GROUPINGS = [("tensor", {}), ("channel", {"axis": 0}), ("channel", {"axis": -1}), ("block", {"block_size": 16})]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gran,kw", GROUPINGS)
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_backends_identical(rng, dtype, mode, gran, kw, bits):
    x = (rng.standard_normal((24, 64)) * rng.uniform(0.1, 10, (24, 1))).astype(dtype)
    x[3] = 0.0  # an all-zero group must not divide by zero
    ref = quantize_groups(x, bits, mode=mode, granularity=gran, backend="numpy", **kw)
    for backend, inp in (("numba", x), ("torch", torch.from_numpy(x))):
        out = quantize_groups(inp, bits, mode=mode, granularity=gran, backend=backend, **kw)
        for a, b in zip(ref, out):
            assert type(b) is type(inp)
            np.testing.assert_array_equal(a, np.asarray(b))


def test_hand_example_symmetric_and_asymmetric():
    x = np.array([[-1.0, -0.25, 0.0, 0.3, 0.5]])
    q, s, z = quantize_groups(x, 3, mode="symmetric")  # s = 1/3, codes in [-3, 3]
    np.testing.assert_allclose(s, [[1 / 3]])
    np.testing.assert_array_equal(q, [[-3, -1, 0, 1, 2]])  # -0.75 -> -1, 0.9 -> 1, 1.5 -> 2 (half to even)
    q, s, z = quantize_groups(x, 2, mode="asymmetric")  # s = 1.5/3 = 0.5, z = round(2) = 2
    np.testing.assert_allclose(s, [[0.5]])
    np.testing.assert_array_equal(z, [[2]])
    np.testing.assert_array_equal(q, [[0, 2, 2, 3, 3]])  # round(-0.5)=0 -> 2, round(0.6)=1 -> 3, 1+2 clipped to 3
    np.testing.assert_allclose(dequantize_groups(q, s, z), [[-1.0, 0.0, 0.0, 0.5, 0.5]])


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_roundtrip_error_bound(rng, mode):
    x = rng.standard_normal((16, 32))
    q, s, z = quantize_groups(x, 4, mode=mode, granularity="channel", axis=0)
    xh = dequantize_groups(q, s, z, granularity="channel", axis=0)
    assert np.all(np.abs(xh - x) <= s / 2 + 1e-12)
    lo, hi = qrange(4, mode == "symmetric")
    assert q.min() >= lo and q.max() <= hi


def test_mxint_power_of_two_and_clipping(rng):
    x = rng.standard_normal((8, 64)).astype(np.float32)
    q, s, z = quantize_groups(x, 4, mode="mxint", granularity="block", block_size=16)
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)  # shared exponents are powers of two
    amax = np.abs(x.reshape(-1, 16)).max(axis=1, keepdims=True)
    assert np.all(s * 8 >= amax) and np.all(s * 4 < amax)  # 2^(e-1) < max|x| <= 2^e, s = 2^(e-3)
    np.testing.assert_array_equal(mxint(x, 4, 16), dequantize_groups(q, s, z, granularity="block", block_size=16))
    assert np.abs(mxint(x, 4, 16)).max() <= 7 / 8 * (s * 8).max()


def test_channel_axis_groups():
    x = np.arange(24.0).reshape(2, 3, 4)
    g, restore = to_groups(x, "channel", axis=1)
    assert g.shape == (3, 8)
    np.testing.assert_array_equal(restore(g), x)
    # per-channel along axis 1: every channel (of 8 values) is reproduced to its own half-scale bound
    xh = rtn(x, 8, granularity="channel", axis=1)
    s = np.abs(g).max(axis=1) / 127
    assert np.all(np.abs(to_groups(xh - x, "channel", axis=1)[0]) <= s[:, None] / 2 + 1e-12)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_pack_roundtrip(rng, bits, n):
    c = rng.integers(0, 2 ** bits, n).astype(np.uint8)
    p = pack_bits(c, bits)
    assert p.dtype == np.uint8 and p.size == -(-n * bits // 8)
    np.testing.assert_array_equal(unpack_bits(p, bits, n), c)
    pt = pack_bits(torch.from_numpy(c), bits)
    np.testing.assert_array_equal(pt.numpy(), p)
    assert torch.equal(unpack_bits(pt, bits, n), torch.from_numpy(c))
    if 8 % bits == 0:  # the plain layout: 8 / bits codes per byte, the first in the lowest bits
        per = 8 // bits
        pad = np.concatenate([c, np.zeros((-n) % per, np.uint8)]).reshape(-1, per).astype(np.int64)
        np.testing.assert_array_equal(p, (pad << (np.arange(per) * bits)).sum(1))


def test_pack_3_bits_by_hand():
    # codes 1..8 mod 8 at 3 bits: bits little-endian 100 010 110 001 101 011 111 000 -> bytes 0xd1 0x58 0x1f
    np.testing.assert_array_equal(pack_bits(np.arange(1, 9, dtype=np.uint8) % 8, 3), [0xD1, 0x58, 0x1F])


def test_ste_gradients():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = fake_quantize_ste(x, 3, granularity="block", block_size=4)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), 3, granularity="block", block_size=4))
    (y * torch.arange(32.0, dtype=torch.float64).reshape(4, 8)).sum().backward()
    assert torch.equal(x.grad, torch.arange(32.0, dtype=torch.float64).reshape(4, 8))
    t = torch.tensor([0.4, 1.6], requires_grad=True)
    r = round_ste(t)
    r.sum().backward()
    assert torch.equal(r.detach(), torch.tensor([0.0, 2.0])) and torch.equal(t.grad, torch.ones(2))


def test_bad_inputs():
    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize_groups(x, 4, mode="log")
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize_groups(x, 4, granularity="row")
    with pytest.raises(ValueError, match="block_size=3 must divide"):
        quantize_groups(x, 4, granularity="block", block_size=3)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        quantize_groups(x, 4, granularity="block")
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        quantize_groups(x, 4, granularity="channel", axis=2)
    with pytest.raises(ValueError, match="bits must be in"):
        quantize_groups(x, 1, mode="symmetric")
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize_groups(x, 4.0)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        quantize_groups(np.ones(4, np.int64), 4)
    with pytest.raises(ValueError, match="x must be finite|x contains"):
        quantize_groups(np.array([1.0, np.nan]), 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_groups(x, 4, backend="cuda")
    with pytest.raises(ValueError, match="codes must be < 2"):
        pack_bits(np.array([4], np.uint8), 2)
    with pytest.raises(TypeError, match="codes must be uint8"):
        pack_bits(np.array([1], np.int64), 2)
    with pytest.raises(ValueError, match=r"bits must be an int in \[1, 8\]"):
        pack_bits(np.array([1], np.uint8), 9)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fake_quantize_ste(x, 4)


@pytest.mark.gpu
def test_cuda_matches_cpu(rng):
    x = rng.standard_normal((64, 256)).astype(np.float32)
    for mode in MODES:
        ref = quantize_groups(x, 4, mode=mode, granularity="block", block_size=32, backend="numpy")
        out = quantize_groups(torch.from_numpy(x).cuda(), 4, mode=mode, granularity="block", block_size=32)
        for a, b in zip(ref, out):
            np.testing.assert_array_equal(a, b.cpu().numpy())
