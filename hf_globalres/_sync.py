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


#: On an accelerator, iterative solvers read their convergence back every this many iterations
#: (a converged row only idles until the next read).
CHECK_EVERY = 4


def check_now(tensor: torch.Tensor, iteration: int) -> bool:
    """An iterative solver reads its convergence back before iteration ``iteration`` (0-based).

    Before every iteration on a CPU; elsewhere after every ``CHECK_EVERY`` iterations.
    """
    return reads_are_cheap(tensor) or (iteration > 0 and iteration % CHECK_EVERY == 0)
