"""Reference solvers: the max-flow equals the transport LP and the subset-selection closed form; the tilted race."""

from __future__ import annotations

import pytest
import torch

from hf_globalres import verifiers
from hf_globalres.rates import optimal_acceptance
from hf_globalres.reference import (
    TiltedRace,
    TwoLevelTree,
    draft_tuples,
    enumerate_block_tokens,
    enumerate_law,
    node_limit_lp,
    transport_lp,
    transport_maxflow,
)
from tests.verifiers.fitted_cases import degenerate_cases, small_cases


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_maxflow_equals_lp_and_closed_form(scheme: str) -> None:
    cases = [*small_cases(seed=41, count=30), *((q, p, 3) for _, q, p in degenerate_cases())]
    for q, p, n in cases:
        drafts = n if scheme == "iid" else min(n, int((p > 0).sum()))
        flow = transport_maxflow(q, p, drafts, scheme)
        assert flow == pytest.approx(transport_lp(q, p, drafts, scheme), abs=1e-9)
        assert flow == pytest.approx(float(optimal_acceptance(q[None], p[None], drafts, scheme)[0]), abs=1e-12)


def test_maxflow_single_draft_is_one_minus_tv() -> None:
    q = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    p = torch.tensor([0.1, 0.1, 0.4, 0.4], dtype=torch.float64)
    assert transport_maxflow(q, p, 1) == pytest.approx(float(torch.minimum(p, q).sum()), abs=1e-15)


def _tilted_cases():
    yield from small_cases(seed=7, count=14, max_vocab=4, max_drafts=3)
    yield from ((q, p, 3) for _, q, p in degenerate_cases())


@pytest.mark.parametrize("shape", ["tree", "spine"])
def test_tilted_race_without_tilt_is_optimal_block(shape: str) -> None:
    block = verifiers.get("optimal_block", draft_shape=shape)
    for q, p, n in _tilted_cases():
        tuples, _ = draft_tuples(p, n)
        rows = (q.expand(tuples.shape[0], -1), p.expand(tuples.shape[0], -1), tuples)
        expected = block.conditional(*rows)
        assert torch.allclose(TiltedRace(1.0, shape).conditional(*rows), expected, atol=1e-7), (q, p, n)


@pytest.mark.parametrize("shape", ["tree", "spine"])
@pytest.mark.parametrize("tilt", [3.0, 1000.0])
def test_tilted_race_is_exact_and_keeps_the_optimal_acceptance(shape: str, tilt: float) -> None:
    for q, p, n in _tilted_cases():
        law, acceptance, _ = enumerate_law(TiltedRace(tilt, shape), q, p, n)
        assert torch.allclose(law, q / q.sum(), atol=1e-12), (q, p, n)
        assert float(acceptance) == pytest.approx(float(optimal_acceptance(q[None], p[None], n)[0]), abs=1e-7)


@pytest.mark.parametrize("shape", ["tree", "spine"])
def test_tilted_race_lengthens_blocks_towards_the_node_limit(shape: str) -> None:
    """On two-level trees: never below optimal_block, never above the best root coupling, and above on some."""
    g = torch.Generator().manual_seed(43)
    block, tilted = verifiers.get("optimal_block", draft_shape=shape), TiltedRace(1000.0, shape)
    gain = 0.0
    for _ in range(3):
        tree = TwoLevelTree.random(4, 1.5, g)
        base = enumerate_block_tokens(block, tree, 3, shape)
        value = enumerate_block_tokens(tilted, tree, 3, shape)
        assert base - 1e-7 <= value <= node_limit_lp(tree, 3, shape) + 1e-7
        gain += value - base
    assert gain > 1e-3


def test_tilted_race_refuses_what_it_cannot_enumerate() -> None:
    with pytest.raises(ValueError, match="tilt must be ≥ 1"):
        TiltedRace(0.5)
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="every row needs its n drafts"):
        TiltedRace(2.0).conditional(q, q, torch.tensor([[0, -1]]))
