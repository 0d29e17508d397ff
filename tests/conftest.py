"""Shared test settings."""

import torch

# The tests use tiny tensors, for which a second OpenMP thread costs more than it gives, and CI
# machines are shared: one thread keeps timings stable.
torch.set_num_threads(1)
