"""`HostReads`: a count of the operations that would make the host wait for a GPU, taken on the CPU.

Shared by tests/test_gpu_paths.py and the worker scripts that count inside `torchrun` ranks.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


class HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for a GPU, by kind.

    `item`: a scalar read (`.item()`, `bool(t)`, `float(t)`, `int(t)`); `tolist`: a tensor read
    into Python; `nonzero` and `masked_select`: outputs whose size depends on the data;
    `bool_index`: indexing or assignment with a boolean mask (a `nonzero` inside); `from_host`: a
    tensor made from Python data (`torch.tensor(...)`, a list used as an index), a copy from
    pageable host memory on a GPU (a 0-dim one, as in `t[i] = 0.0`, is a scalar and not counted). Scalar reads are caught at the Python methods as well as at
    aten._local_scalar_dense, since under `torch.inference_mode` they do not reach a dispatch mode.
    """

    READS = {"item": "item", "__bool__": "item", "__float__": "item", "__int__": "item", "tolist": "tolist"}

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._methods = {name: getattr(torch.Tensor, name) for name in self.READS}
        self._inside_read = 0

    def _counted(self, name: str):
        method, kind = self._methods[name], self.READS[name]

        def read(tensor, *args, **kwargs):
            if self._inside_read == 0:
                self.counts[kind] += 1
            self._inside_read += 1
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self._inside_read -= 1

        return read

    current: "HostReads | None" = None  # the count running now, which `uncounted` pauses

    def __enter__(self) -> "HostReads":
        HostReads.current = self
        for name in self.READS:
            setattr(torch.Tensor, name, self._counted(name))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        HostReads.current = None
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            if self._inside_read == 0:
                self.counts["item"] += 1
        elif name in ("nonzero", "masked_select", "nonzero_static"):
            self.counts[name] += 1
        elif name in ("index", "index_put_", "index_put"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.counts["bool_index"] += 1
        elif name == "lift_fresh" and args[0].dim() > 0:  # a 0-dim one is a scalar fill, no copy
            self.counts["from_host"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Host work on host tensors (building a batch, reducing host numbers) inside a count: nothing in
    it is counted."""
    reads = HostReads.current
    if reads is None:
        yield
        return
    reads._inside_read += 1
    try:
        with _disable_current_modes():
            yield
    finally:
        reads._inside_read -= 1
