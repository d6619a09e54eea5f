"""The largest tensor an operator returns, recorded on CPU tensors (a bound on a computation's temporaries)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    """While active, :attr:`bytes` is the largest storage behind any tensor an operator has returned,
    and :attr:`elements` the most elements of any such tensor.

    Storage, not shape: an expanded view costs only what it views, and a slice of a large
    tensor counts as the large tensor. An operator that builds a large tensor internally and
    returns a small one is missed (the recorded size is a lower bound on its peak).
    :attr:`from_host` is the most elements of a tensor made from host data (``torch.tensor``
    of a list): copied to an accelerator, more than one element waits for its queued work.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.elements = 0
        self.from_host = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.bytes = max(self.bytes, leaf.untyped_storage().nbytes())
                self.elements = max(self.elements, leaf.numel())
                if func._schema.name == "aten::lift_fresh":
                    self.from_host = max(self.from_host, leaf.numel())
        return out


@contextlib.contextmanager
def largest_tensor() -> Iterator[LargestTensor]:
    """``with largest_tensor() as largest: ...``; then ``largest.bytes``."""
    with LargestTensor() as recorder:
        yield recorder
