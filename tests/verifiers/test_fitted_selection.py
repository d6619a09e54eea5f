"""The fitted selection rule's building blocks (verifiers/_selection.py): draft sets, memory bounds, solver paths."""

from __future__ import annotations

import math

import pytest
import torch

from hf_globalres.verifiers import _selection
from hf_globalres.verifiers._selection import draft_sets, tuple_count

from ..tensor_sizes import largest_tensor

CPU = torch.device("cpu")


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_draft_sets_are_torch_combinations(scheme: str) -> None:
    """Same rows in the same (lexicographic) order, including no slots and more drafts than slots."""
    for support in range(9):
        for drafts in range(1, 7):
            expected = torch.combinations(torch.arange(support), r=drafts, with_replacement=scheme == "iid")
            sets = draft_sets(support, drafts, scheme, CPU)
            assert torch.equal(sets, expected.reshape(-1, drafts)), (support, drafts)
            assert sets.shape[0] == tuple_count(support, drafts, scheme) // (
                1 if scheme == "iid" else math.factorial(drafts)
            )


@pytest.mark.parametrize(("scheme", "support", "drafts"), [("iid", 12, 7), ("without_replacement", 24, 6)])
def test_draft_sets_build_nothing_of_size_support_to_the_drafts(scheme: str, support: int, drafts: int) -> None:
    """D^k = 3.6e7 (1.9e8) grid cells for M = 31824 (134596) sets: every tensor stays within 2 · M · k int64."""
    with largest_tensor() as largest:
        sets = draft_sets(support, drafts, scheme, CPU)
    count, width = sets.shape
    assert support**drafts > 100 * count * width
    assert largest.bytes <= 2 * count * width * 8, largest.bytes


def test_draft_sets_reject_negative_sizes() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        _selection.draft_sets(-1, 2, "iid", CPU)
