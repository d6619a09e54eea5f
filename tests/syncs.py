"""Counting host-device synchronisations on CPU tensors, and taking the accelerator code path there.

On an accelerator every host read of a tensor value stalls the device. No accelerator is needed to
count them: :class:`SyncCounter` counts the operators that read values back, as they run on a CPU.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_globalres import _sync

#: Operators that hand a value, or a shape computed from values, back to the host.
READ_OPS = {
    "aten::_local_scalar_dense": "item",  # .item(), bool(t), int(t), float(t)
    "aten::nonzero": "nonzero",  # also torch.where(cond) and index_put with a boolean mask
    "aten::masked_select": "masked_select",
    "aten::_linalg_check_errors": "linalg error check",  # torch.linalg.solve (not solve_ex), inv, cholesky
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
}


class SyncCounter(TorchDispatchMode):
    """Counts host reads by kind while active; :attr:`total` sums them.

    Besides :data:`READ_OPS` it counts ``repeat_interleave`` with a tensor of
    repeats, indexing with a boolean tensor (its result size is data), and
    ``Tensor.tolist`` (which does not pass through the dispatcher).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func._schema.name
        kind = READ_OPS.get(name)
        if name == "aten::repeat_interleave" and isinstance(args[0], torch.Tensor) and "repeats" not in (kwargs or {}):
            kind = "repeat_interleave" if len(args) < 2 or isinstance(args[1], torch.Tensor) else None
        elif name in ("aten::index.Tensor", "aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            kind = "boolean index"
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> SyncCounter:
        self._tolist = torch.Tensor.tolist
        counts = self.counts

        def tolist(tensor: torch.Tensor) -> Any:
            counts["tolist"] += 1
            return self._tolist(tensor)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """``with count_syncs() as syncs: ...``; then ``syncs.total`` and ``syncs.counts``."""
    with SyncCounter() as counter:
        yield counter


@contextlib.contextmanager
def accelerator_path() -> Iterator[None]:
    """Run the code path the package takes on an accelerator, on CPU tensors (see ``hf_globalres._sync``)."""
    cheap = _sync.reads_are_cheap
    _sync.reads_are_cheap = lambda tensor: False  # type: ignore[assignment]
    try:
        yield
    finally:
        _sync.reads_are_cheap = cheap  # type: ignore[assignment]
