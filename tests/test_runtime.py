"""Process settings: the oneDNN kernel caches stay bounded under ever-new matmul shapes."""

import os
import subprocess
import sys

from transformer import runtime

# 400 bf16 matmuls (forward + backward), each with a new number of rows, as token-bucketed batches
# give; prints RSS (MiB) after the first 100 and after all of them.
SCRIPT = """
import random, torch
from transformer.runtime import bound_onednn_caches
bound_onednn_caches()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
random.seed(0)
w = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)
for i in range(400):
    x = torch.randn(random.randint(64, 1024), 64, dtype=torch.bfloat16, requires_grad=True)
    (x @ w.t()).sum().backward()
    if i == 99:
        after_100 = rss()
print(after_100, rss())
"""


def test_bf16_matmuls_of_new_shapes_do_not_grow_memory():
    """Without the caps, RSS grows with every new shape on a CPU with native bf16 (a kernel per shape)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True).stdout
    after_100, after_400 = map(int, out.split())
    assert after_400 - after_100 < 40, f"RSS grew from {after_100} to {after_400} MiB over 300 new shapes"


def test_user_settings_win(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    runtime.bound_onednn_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(runtime.ONEDNN_CACHE_CAPACITY)
