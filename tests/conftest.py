"""Shared test settings and fixtures."""

import pytest
import torch

import transformer.model.attention as attention_module

# The tests use tiny tensors, for which a second OpenMP thread costs more than it gives, and CI
# machines are shared: one thread keeps timings stable.
torch.set_num_threads(1)


@pytest.fixture(params=["written-out", "fused"])
def attention_kernel(request, monkeypatch):
    """Run a test on both CPU attention paths: short attention is written out, long goes to SDPA."""
    if request.param == "fused":
        monkeypatch.setattr(attention_module, "CPU_WRITTEN_OUT_MAX_KEYS", 0)
    return request.param
