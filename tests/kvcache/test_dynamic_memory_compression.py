"""Dynamic Memory Compression: the append-or-merge loop (every backend) against the numpy reference and the
official Triton kernel (golden fixtures, tests/golden/dynamic_memory_compression); the training pooler
(partial accumulations, masks, compression loss) against the official pure-torch ``DynamicPooler``; the
paper's unbounded running mean (eq. D3) written out by hand; the DMC tiny model's append-or-merge inference
against its own parallel evaluation-mode forward; clear errors on bad input.

Tolerances: the official kernel ran in float32 (Triton interpreter = NumPy float32). Our numpy reference does
the same float32 operations in the same order (running sums, subtract-the-oldest, then divide) and agrees
bit-for-bit (measured 0.0); we still allow atol 1e-6 (values are O(1)). numba (fastmath: reassociation and
contraction) and torch differ from it by a few ulps: atol/rtol 1e-5 in float32 (measured <= 5e-7), 1e-12 in
float64. The training pooler computes eq. D6 by a loop over window offsets where the official code uses a
strided cumulative product, so sums run in another order: atol 1e-5 (measured <= 5e-7). Slot indices and
lengths are integers and must match exactly. The model-level check (sequential cache vs parallel forward,
float32 logits O(10), 4 layers) uses atol 1e-4 (measured ~1e-5).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden
from refimpl.kvcache.dynamic_memory_compression import (BF16_EPS, DMCTinyLM, dmc_attention, dmc_attention_bias,
                                                        dmc_compress, dmc_importance, dmc_loss, dmc_pool,
                                                        gumbel_sigmoid, poolsum, straight_through,
                                                        target_compression)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "dynamic_memory_compression" / "dmc_official.npz"
BACKENDS = ["numpy", "numba", "torch"]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


def _inputs(rng, B, H, T, D, p_merge, dtype):
    q = rng.standard_normal((B, H, T)).astype(dtype) * 2
    k = rng.standard_normal((B, H, T, D)).astype(dtype)
    v = rng.standard_normal((B, H, T, D)).astype(dtype)
    merge = rng.random((B, H, T)) < p_merge
    k[..., -1] = np.where(merge, 5.5, 4.5) + rng.random((B, H, T)).astype(dtype)
    return q, k, v


def _run(backend, q, k, v, **kw):
    if backend == "torch":
        q, k, v = (torch.from_numpy(x.copy()) for x in (q, k, v))
    return [np.asarray(x) for x in dmc_compress(q, k, v, backend=backend, **kw)]


# ------------------------------------------------------------------------------ the critical loop
@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("window", [12, 3, None])
@pytest.mark.parametrize("shape", [(2, 3, 50, 8), (1, 1, 1, 2), (2, 3, 40, 33)])
def test_backends_agree(backend, dtype, window, shape):
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, *shape, p_merge=0.8, dtype=dtype)
    ref = _run("numpy", q, k, v, window=window)
    out = _run(backend, q, k, v, window=window)
    for name, a, e in zip(("keys", "values", "lens", "k_out", "v_out", "slot"), out, ref):
        if name in ("lens", "slot"):
            np.testing.assert_array_equal(a, e)
        else:
            assert a.dtype == e.dtype == dtype
            assert_close(a, e, name=f"{backend}/{name}", **TOL[dtype])


@pytest.mark.parametrize("case,window", [("win12", 12), ("win12_b2", 12), ("nowin", None)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_official_triton_kernel(golden, case, window, backend):
    g = {k[len(f"kernel_{case}_"):]: v for k, v in golden.items() if k.startswith(f"kernel_{case}_")}
    keys, values, lens, ko, vo, slot = _run(backend, g["q"][..., -1], g["k"], g["v"], window=window)
    np.testing.assert_array_equal(slot, g["slot"])
    np.testing.assert_array_equal(lens, g["lens"])
    tol = dict(rtol=0, atol=1e-6) if backend == "numpy" else dict(rtol=1e-5, atol=1e-5)
    assert_close(ko, g["k_out"], name="k per step", **tol)
    assert_close(vo, g["v_out"], name="v per step", **tol)
    L = g["lens"]
    for b in range(L.shape[0]):
        for h in range(L.shape[1]):
            assert_close(keys[b, h, :L[b, h]], g["keys"][b, h, :L[b, h]], name="cache keys", **tol)
            assert_close(values[b, h, :L[b, h]], g["values"][b, h, :L[b, h]], name="cache values", **tol)


def test_golden_exercises_the_window(golden):
    # the fixtures must contain merge runs longer than the window (else the window test could not fail)
    assert golden["kernel_win12_run"].max() > 12 and golden["kernel_nowin_run"].max() > 12
    assert (golden["kernel_win12_slot"][..., 0] == 0).all()  # the first token is always appended


def test_unbounded_is_the_papers_running_mean():
    """window=None is eq. D3: k̄ ← (z k̄ + ω k)/(z + ω), z ← z + ω, written out by hand."""
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, 1, 2, 40, 6, p_merge=0.9, dtype=np.float64)
    keys, values, lens, *_ = _run("numpy", q, k, v, window=None, eps=BF16_EPS)
    for h in range(2):
        slots_k, slots_v, z = [], [], []
        for t in range(40):
            w = 1 / (1 + np.exp(-(q[0, h, t] + 5))) + BF16_EPS
            kt = k[0, h, t].copy()
            kt[-1] = 0
            if t == 0 or k[0, h, t, -1] - 5 <= 0:
                slots_k.append(kt); slots_v.append(v[0, h, t].copy()); z.append(w)
            else:
                slots_k[-1] = (z[-1] * slots_k[-1] + w * kt) / (z[-1] + w)
                slots_v[-1] = (z[-1] * slots_v[-1] + w * v[0, h, t]) / (z[-1] + w)
                z[-1] += w
        assert lens[0, h] == len(slots_k)
        assert_close(keys[0, h, :lens[0, h]], np.array(slots_k), rtol=1e-12, atol=1e-12)
        assert_close(values[0, h, :lens[0, h]], np.array(slots_v), rtol=1e-12, atol=1e-12)


def test_window_only_matters_for_long_runs():
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng, 1, 3, 60, 4, p_merge=0.5, dtype=np.float64)
    slot = _run("numpy", q, k, v, window=None)[5]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, slot[0, 0], 10**9])))
    a, b = _run("numpy", q, k, v, window=12), _run("numpy", q, k, v, window=None)
    if runs.max() <= 12:
        assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    q2, k2, v2 = _inputs(rng, 1, 1, 30, 4, p_merge=1.0, dtype=np.float64)  # one run of 30 tokens
    a, b = _run("numpy", q2, k2, v2, window=12), _run("numpy", q2, k2, v2, window=None)
    w = dmc_importance(q2[0, 0])
    kk = k2[0, 0].copy(); kk[:, -1] = 0
    exp_win = (w[-12:, None] * kk[-12:]).sum(0) / w[-12:].sum()  # eq. D4: last 12 tokens only
    assert_close(a[0][0, 0, 0], exp_win, rtol=1e-10, atol=1e-10)
    assert np.abs(a[0][0, 0, 0] - b[0][0, 0, 0]).max() > 1e-3


def test_attention_over_ragged_cache():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 8, dtype=torch.float64)
    keys, values = torch.randn(2, 3, 7, 8, dtype=torch.float64), torch.randn(2, 3, 7, 8, dtype=torch.float64)
    lens = torch.tensor([[7, 1, 4], [2, 5, 3]])
    out = dmc_attention(q, keys, values, lens)
    for b in range(2):
        for h in range(3):
            n = int(lens[b, h])
            p = torch.softmax(keys[b, h, :n] @ q[b, h] / 8 ** 0.5, 0)
            assert_close(out[b, h], p @ values[b, h, :n], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ training relaxation
@pytest.mark.parametrize("layout", ["tf", "bf"])
def test_poolsum_matches_official(golden, layout):
    x, b, w = (torch.from_numpy(golden[f"poolsum_{layout}_{s}"]) for s in "xbw")
    if layout == "bf":
        x, b, w = x.transpose(0, 1), b.T, w.T
    out = poolsum(x, b, w, 12)
    out_now = poolsum(x, b, None, 5)
    if layout == "bf":
        out, out_now = out.transpose(0, 1), out_now.transpose(0, 1)
    assert_close(out, golden[f"poolsum_{layout}_out"], rtol=1e-5, atol=1e-5, name="poolsum")
    assert_close(out_now, golden[f"poolsum_{layout}_out_now"], rtol=1e-5, atol=1e-5, name="poolsum (no w)")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_pooler_matches_official_downsample(golden, mode):
    tb = lambda a: torch.from_numpy(a).permute(1, 2, 0, 3)  # (L, B, H, D) -> (B, H, L, D)
    q, k, v = tb(golden["down_q_in"]), tb(golden["down_k_in"]), tb(golden["down_v_in"])
    eps = float(torch.finfo(torch.float32).eps)  # official training uses finfo(dtype).eps
    kp, vp, bias, probs = dmc_pool(q, k, v, mode, 0.1, eps=eps, noise=False)
    ok, ov = tb(golden[f"down_{mode}_k"]), tb(golden[f"down_{mode}_v"])
    ob = torch.from_numpy(golden[f"down_{mode}_bias"])
    if mode == "train":  # the official code embeds the mask in q[-1] = 1 (after scaling) and k[-1]
        ob = ob + ok[..., -1][:, :, None, :]
    assert_close(kp[..., :-1], ok[..., :-1], rtol=1e-5, atol=1e-5, name="pooled keys")
    assert_close(vp, ov, rtol=1e-5, atol=1e-5, name="pooled values")
    assert_close(bias, ob, rtol=1e-5, atol=1e-5, name="attention bias")
    if mode == "eval":
        dec = straight_through(probs).mean(dim=(1, 2))[None]
        assert_close(dec, golden["down_eval_decisions"], rtol=0, atol=1e-7)
        cr, prior = target_compression(30, 100, 4.0)
        loss, acr = dmc_loss(dec, prior)
        assert cr == pytest.approx(float(golden["loss_tgt_cr"]), rel=1e-6)
        assert_close(loss, golden["loss_eval"], rtol=1e-6, atol=1e-7, name="dmc loss")
        assert_close(acr, golden["loss_cr"], rtol=1e-6, atol=1e-6, name="achieved CR")


def test_training_mask_matches_official(golden):
    lg = torch.from_numpy(golden["mask_train_logits"]).permute(1, 2, 0)  # (B, H, L)
    bias = dmc_attention_bias(lg)
    m = torch.from_numpy(golden["mask_train"]).permute(1, 2, 0)  # official log(1 - σ(logit)) per token
    L = lg.shape[-1]
    assert_close(bias[..., L - 1, : L - 1], m[..., 1:], rtol=1e-6, atol=1e-6)  # key t masked by token t+1
    assert (bias.diagonal(dim1=-2, dim2=-1) == 0).all()


def test_poolsum_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 2, dtype=torch.float64, requires_grad=True)
    a = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, 2, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a, w: poolsum(x, a, w, 3), (x, a, w))


def test_gumbel_sigmoid_statistics():
    g = torch.Generator().manual_seed(0)
    z = gumbel_sigmoid(torch.zeros(200_000), 1.0, generator=g)
    # g1 - g2 is Logistic(0, 1): mean 0, variance π²/3, so P(σ(z) > ½) = ½
    assert abs(float(z.mean())) < 0.02 and abs(float(z.var()) - np.pi ** 2 / 3) < 0.05
    assert torch.equal(gumbel_sigmoid(torch.ones(3), 0.5, noise=False), torch.full((3,), 2.0))


# ------------------------------------------------------------------------------ the DMC tiny model
@pytest.fixture(scope="module")
def dmc_model():
    from refimpl.models import load_tiny_lm
    return DMCTinyLM(load_tiny_lm())


def _check_retrofit_matches_base_checkpoint():
    """The retrofit continues training the base checkpoint: fail clearly when it was made from another one."""
    import hashlib
    import json
    from refimpl.models.tiny_lm import WEIGHTS_DIR
    with open(Path(WEIGHTS_DIR) / "tiny_lm.safetensors", "rb") as f:
        base = hashlib.sha256(f.read()).hexdigest()
    with open(Path(WEIGHTS_DIR) / "tiny_lm_dmc_cr2.json") as f:
        made_from = json.load(f).get("base_checkpoint_sha256")
    assert made_from == base, (f"tiny_lm_dmc_cr2 was retrofitted from checkpoint {made_from}, but tiny_lm.safetensors "
                               f"is {base}; regenerate it: python scripts/retrofit_dmc.py --target-cr 2")


def test_retrofitted_checkpoint_compresses_raggedly():
    """The committed retrofit (scripts/retrofit_dmc.py): its append-or-merge cache equals its parallel pass and
    the heads hold different numbers of slots."""
    from refimpl.models.corpus import TOKENIZER, make_task
    _check_retrofit_matches_base_checkpoint()
    model = DMCTinyLM.load()
    ex = make_task("needle", 2, 128, 0)
    toks = torch.tensor([TOKENIZER.encode(e.prompt + e.answer) for e in ex])
    with torch.no_grad():
        ref, alpha = model(toks, mode="eval")
        L = toks.shape[1] - 2
        lp, cache = model.prefill(toks[:, :L])
        got = [lp] + [model.decode_step(toks[:, L + i], cache) for i in range(2)]
    assert_close(torch.stack(got, 1), ref[:, L - 1:], rtol=1e-4, atol=1e-4, name="logits")
    lens = cache.head_lengths()
    assert cache.compression_ratio() > 1.2 and lens.min() < lens.max()


@pytest.mark.parametrize("force", [None, 3])
def test_cache_inference_equals_parallel_eval_forward(dmc_model, force):
    from refimpl.models.corpus import TOKENIZER, make_task
    torch.set_num_threads(1)
    ex = make_task("kv_recall", 2, 96, 0)
    toks = torch.tensor([TOKENIZER.encode(e.prompt + e.answer) for e in ex])
    dmc_model.force_alpha = force
    try:
        with torch.no_grad():
            ref, alpha = dmc_model(toks, mode="eval")
            L = toks.shape[1] - 3
            lp, cache = dmc_model.prefill(toks[:, :L])
            got = [lp] + [dmc_model.decode_step(toks[:, L + i], cache) for i in range(3)]
        assert_close(torch.stack(got, 1), ref[:, L - 1:], rtol=1e-4, atol=1e-4, name="logits")
        if force == 3:
            assert np.isclose(cache.compression_ratio(), (L + 3) / np.ceil((L + 3) / 3), rtol=1e-6)
    finally:
        dmc_model.force_alpha = None


def test_bad_inputs():
    q, k, v = np.zeros((1, 2, 3)), np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match="window must be"):
        dmc_compress(q, k, v, window=0)
    with pytest.raises(ValueError, match="k must have shape"):
        dmc_compress(q, k[0], v)
    with pytest.raises(ValueError, match="q_logit must have shape"):
        dmc_compress(q[..., :2], k, v)
    with pytest.raises(TypeError, match="must share a dtype"):
        dmc_compress(q, k, v.astype(np.float32))
    with pytest.raises(TypeError, match="must be floating"):
        dmc_compress(q, k.astype(np.int64), v)
    with pytest.raises(ValueError, match="finite"):
        dmc_compress(q, k, np.full_like(v, np.nan))
    with pytest.raises(ValueError, match="backend must be"):
        dmc_compress(q, k, v, backend="cuda")
    with pytest.raises(TypeError, match="numpy.ndarray like k"):
        dmc_compress(torch.zeros(1, 2, 3), k, v)
    with pytest.raises(ValueError, match="target_cr must be"):
        target_compression(1, 10, 0.5)
    with pytest.raises(ValueError, match="temperature must be"):
        gumbel_sigmoid(torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="alpha must have shape"):
        poolsum(torch.zeros(5, 2, 3), torch.zeros(5, 2))
    with pytest.raises(TypeError, match="base must be a TinyLM"):
        DMCTinyLM(torch.nn.Linear(2, 2))


@pytest.mark.gpu
def test_cuda_torch_backend_matches_numpy():
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, 4, 8, 200, 64, p_merge=0.8, dtype=np.float32)
    ref = _run("numpy", q, k, v)
    out = dmc_compress(*(torch.from_numpy(x).cuda() for x in (q, k, v)), backend="torch")
    for a, e in zip(out, ref):
        assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5)
