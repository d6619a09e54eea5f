"""Wall-clock accounting of one generate call, by phase."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Phases every summary reports, even when they took no time.
PHASES = ("target_forward", "draft_forward", "verifier")


class PhaseTimer:
    """Accumulates seconds per phase; synchronises CUDA so queued kernels land in the right phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        """Seconds per phase (always "target_forward", "draft_forward", "verifier") and "total" since construction.

        The loop's other phases: "draft_sampling" (draft logits to p, drawing the drafts),
        "target_probs" (target logits to q), "stopping" (stopping criteria) and "cache"
        (keeping the accepted path); what no phase covers (masks, trees, bookkeeping) is
        "total" minus their sum.
        """
        self._sync()
        out = {key: float(self.seconds.get(key, 0.0)) for key in PHASES}
        out.update((key, float(value)) for key, value in self.seconds.items() if key not in out)
        out["total"] = time.perf_counter() - self._start
        return out
