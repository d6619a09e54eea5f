"""Shared fixtures. Real-model fixtures are session-scoped and live beside the tests that use them."""

from __future__ import annotations

import os

import pytest
import torch

# Two-core machines: oversubscribed intra-op threads make tiny forwards ~100× slower.
torch.set_num_threads(int(os.environ.get("HF_GLOBALRES_TEST_THREADS", "1")))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
