"""Shared pytest set-up: the `gpu` marker skips without CUDA; fixtures for seeded generators."""
import numpy as np
import pytest
import torch

from refimpl.models import TinyLM, TinyLMConfig
from refimpl.models.corpus import TOKENIZER

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make gpu-test` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _random_tiny_lm(seed=0, dtype=torch.float64, **kw):
    """A randomly initialised 2-layer TinyLM with weights larger than the init, so attention is far from uniform."""
    torch.manual_seed(seed)
    cfg = TinyLMConfig(**{"vocab_size": len(TOKENIZER), "d_model": 128, "n_layers": 2, "n_heads": 4,
                          "d_ff": 256, **kw})
    m = TinyLM(cfg).to(dtype).eval()
    with torch.no_grad():  # larger weights than the init, so attention is far from uniform
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            else:
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture
def random_tiny_lm():
    """Factory ``random_tiny_lm(seed=0, dtype=torch.float64, **config)`` of small random TinyLMs for tests."""
    return _random_tiny_lm


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch intra-op thread (tiny tensors: a thread pool only costs time, and a
    busy 2-core machine makes two threads much slower); the previous count is restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
