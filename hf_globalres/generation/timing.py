"""Wall-clock accounting of one generate call, by phase."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
        """Seconds for "target_forward", "draft_forward", "verifier" and "total" (since construction)."""
        self._sync()
        out = {key: float(self.seconds.get(key, 0.0)) for key in ("target_forward", "draft_forward", "verifier")}
        out["total"] = time.perf_counter() - self._start
        return out
