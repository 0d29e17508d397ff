"""Shared test settings and fixtures."""

import pytest
import torch

import transformer.model.attention as attention_module

# The tests use tiny tensors, for which a second OpenMP thread costs more than it gives, and CI
# machines are shared: one thread keeps timings stable.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models, whatever an earlier test (a training run with
    `train.threads`) left set; the previous count is restored after it. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["written-out", "fused"])
def attention_kernel(request, monkeypatch):
    """Run a test on both CPU attention paths: short attention is written out, long goes to SDPA."""
    if request.param == "fused":
        monkeypatch.setattr(attention_module, "CPU_WRITTEN_OUT_MAX_KEYS", 0)
    return request.param
