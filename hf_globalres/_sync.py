"""Host reads of tensor values: free on a CPU, a stall on an accelerator.

Reading a value back on the host (``.item()``, ``bool(t)``, ``int(t)``,
``.tolist()``, ``nonzero``, boolean-mask indexing, ``unique``, the error check
of ``torch.linalg.solve``) waits on an accelerator until every queued kernel
has run, and leaves it idle while the host launches the next ones. On a CPU
nothing is queued, so the verifiers read values there to size their work to
the data (fewer operations). Elsewhere they take forms whose shapes are known
in advance and read a few values per call, whatever the batch, vocabulary or
data; tests/verifiers/test_sync_budget.py counts those reads.
"""

from __future__ import annotations

import torch


def reads_are_cheap(tensor: torch.Tensor) -> bool:
    """Reading ``tensor``'s values on the host costs no stall (it lives on a CPU).

    Code that branches on this calls it through the module (``_sync.reads_are_cheap``), so that
    tests can take the accelerator path on CPU tensors.
    """
    return tensor.device.type == "cpu"
