"""Optimal verification of drafts drawn without replacement: exact marginal, LP optimum, fallback."""

from __future__ import annotations

import pytest
import torch

from hf_globalres import rates, verifiers
from hf_globalres.verifiers.rrs import RecursiveRejectionSamplingWithoutReplacement
from tests.verifiers import fitted_cases as cases

NAME = "optimal_without_replacement"


def test_registered() -> None:
    assert NAME in verifiers.available()
    assert verifiers.get(NAME).draft_scheme == "without_replacement"


def test_random_small_cases_exact_and_optimal() -> None:
    gaps = [cases.check_exact_and_optimal(NAME, q, p, n, tau=1e-10) for q, p, n in cases.small_cases(seed=31, count=16)]
    assert max(gaps) <= cases.LP_TOL


@pytest.mark.parametrize(("label", "q", "p"), cases.degenerate_cases(), ids=[c[0] for c in cases.degenerate_cases()])
@pytest.mark.parametrize("num_drafts", [1, 2, 3])
def test_degenerate_cases(label: str, q: torch.Tensor, p: torch.Tensor, num_drafts: int) -> None:
    assert cases.check_exact_and_optimal(NAME, q, p, num_drafts, tau=1e-10) <= cases.LP_TOL


def test_beats_recursive_rejection_without_replacement() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    _, optimal = cases.exact_law(verifiers.get(NAME, tau=1e-10), q, p, 3)
    _, baseline = cases.exact_law(RecursiveRejectionSamplingWithoutReplacement(), q, p, 3)
    assert optimal >= baseline - 1e-12
    optimum = float(rates.optimal_acceptance(q[None], p[None], 3, "without_replacement")[0])
    assert optimal == pytest.approx(optimum, abs=1e-7)


def test_truncation_stays_exact() -> None:
    p = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.03, 0.02], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.25, 0.15, 0.1, 0.2], dtype=torch.float64)
    tau = 0.2
    rule = verifiers.get(NAME, tau=tau)
    marginal, acceptance = cases.exact_law(rule, q, p, 2)
    assert 0 < rule.last_stats.missing_mass <= tau and rule.last_stats.mean_support < 6
    assert float((marginal - q).abs().max()) <= cases.MARGINAL_TOL
    optimum = float(rates.optimal_acceptance(q[None], p[None], 2, "without_replacement")[0])
    assert optimum - 2 * tau <= acceptance <= optimum + 1e-12


def test_failure_falls_back_to_rrs_without_replacement() -> None:
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    x = torch.tensor([[3, 0, 1]])
    rule = verifiers.get(NAME, tau=1e-9, max_support=2)
    law = rule.conditional(q, p, x)
    assert rule.last_stats.failures == 1 and bool(rule.last_stats.acceptance.isnan().all())
    expected = RecursiveRejectionSamplingWithoutReplacement().conditional(q, p, x)
    assert torch.allclose(law, expected, atol=1e-14, rtol=0)
    marginal, _ = cases.exact_law(rule, q[0], p[0], 3)
    assert float((marginal - q[0]).abs().max()) <= cases.MARGINAL_TOL


def test_repeated_drafts_are_rejected() -> None:
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    p = torch.tensor([[0.2, 0.2, 0.6]], dtype=torch.float64)
    with pytest.raises(ValueError, match="repeats a draft token"):
        verifiers.get(NAME).verify(q, p, torch.tensor([[2, 0, 2]]))


def test_mixed_numbers_of_drafts_in_one_batch() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    cases.check_mixed_draft_counts(NAME, q, p, [[0, 1, 2, 3], [-1, 0, -1, 4], [2], [], [3, -1, 1, -1]])


def test_verify_follows_q_and_conditional() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    cases.check_verify_statistics(NAME, q, p, 3)


def test_bad_input_raises() -> None:
    cases.check_bad_input(NAME)
