"""Wall-clock accounting of one generate call, by phase.

On CUDA a phase is timed by two events recorded on the current stream, read
once when the summary is asked for: synchronising around every phase would
stall the device twice per phase, and the block loop has about ten per block.
An event pair measures from when the device reaches the phase's start to when
it finishes the phase's last kernel, which is the phase's wall time whenever
the device keeps up with the host. Elsewhere phases are timed on the host clock.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: Phases every summary reports, even when they took no time.
PHASES = ("target_forward", "draft_forward", "verifier")

#: Unread event pairs kept before the finished ones are folded into the totals (``Event.query`` does not wait).
FOLD_EVERY = 256


class PhaseTimer:
    """Accumulates seconds per phase; on CUDA with events, read back once in :meth:`summary` (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()
        self._events = device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase ``name`` (seconds add up over calls)."""
        if self._events:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.device)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._pending.append((name, start, end))
                if len(self._pending) >= FOLD_EVERY:
                    self._fold(wait=False)
            return
        start_time = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start_time

    def _fold(self, wait: bool) -> None:
        """Add the finished event pairs to ``seconds``: all of them after a synchronisation when ``wait``."""
        if wait:
            torch.cuda.synchronize(self.device)
            done = len(self._pending)
        else:
            done = next((i for i, (_, _, end) in enumerate(self._pending) if not end.query()), len(self._pending))
        for name, start, end in self._pending[:done]:
            self.seconds[name] += start.elapsed_time(end) / 1000.0
        del self._pending[:done]

    def summary(self) -> dict[str, float]:
        """Seconds per phase (always "target_forward", "draft_forward", "verifier") and "total" since construction.

        The loop's other phases: "draft_sampling" (draft logits to p, drawing the drafts),
        "target_probs" (target logits to q), "stopping" (stopping criteria) and "cache"
        (keeping the accepted path); what no phase covers (masks, trees, bookkeeping) is
        "total" minus their sum. On CUDA this is the one synchronisation of the timer.
        """
        if self._events:
            self._fold(wait=True)
        out = {key: float(self.seconds.get(key, 0.0)) for key in PHASES}
        out.update((key, float(value)) for key, value in self.seconds.items() if key not in out)
        out["total"] = time.perf_counter() - self._start
        return out
