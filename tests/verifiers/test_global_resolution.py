"""Global Resolution: exact marginal by enumeration, LP-optimal acceptance, τ bounds, failures, statistics."""

from __future__ import annotations

import pytest
import torch

from hf_globalres import rates, verifiers
from hf_globalres.verifiers.spectr import SpecTr
from tests.verifiers import fitted_cases as cases

NAME = "global_resolution"


def test_registered() -> None:
    assert NAME in verifiers.available()
    assert verifiers.get(NAME).draft_scheme == "iid"


def test_random_small_cases_exact_and_optimal() -> None:
    gaps = [cases.check_exact_and_optimal(NAME, q, p, n, tau=1e-10) for q, p, n in cases.small_cases(seed=11, count=16)]
    assert max(gaps) <= cases.LP_TOL


@pytest.mark.parametrize(("label", "q", "p"), cases.degenerate_cases(), ids=[c[0] for c in cases.degenerate_cases()])
@pytest.mark.parametrize("num_drafts", [1, 3])
def test_degenerate_cases(label: str, q: torch.Tensor, p: torch.Tensor, num_drafts: int) -> None:
    assert cases.check_exact_and_optimal(NAME, q, p, num_drafts, tau=1e-10) <= cases.LP_TOL


def test_truncation_stays_exact_within_tau_bounds() -> None:
    # A long draft tail: with tau = 0.1, T = the 4 most probable drafts (missing mass 0.0975).
    p = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.03, 0.02], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.25, 0.15, 0.1, 0.2], dtype=torch.float64)
    tau = 0.1
    rule = verifiers.get(NAME, tau=tau)
    marginal, acceptance = cases.exact_law(rule, q, p, 2)
    stats = rule.last_stats
    assert 0 < stats.missing_mass <= tau and stats.mean_support < 6, stats
    assert float((marginal - q).abs().max()) <= cases.MARGINAL_TOL  # exact, not only |·|₁ ≤ 15τ
    optimum = float(rates.optimal_acceptance(q[None], p[None], 2)[0])
    # The paper's bound is 10τ; truncation + solver tolerance cost at most 2τ here.
    assert optimum - 2 * tau <= acceptance <= optimum + 1e-12


def test_too_large_support_falls_back_to_spectr_and_is_counted() -> None:
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    x = torch.tensor([[0, 3, 1], [0, 0, 2]])
    rule = verifiers.get(NAME, tau=1e-9, max_support=2)
    law = rule.conditional(q, p, x)
    assert rule.last_stats.failures == 2 and rule.last_stats.failure_rate == 1.0
    assert torch.allclose(law, SpecTr().conditional(q, p, x), atol=1e-14, rtol=0)
    assert torch.allclose(rule.last_stats.acceptance, rates.spectr_acceptance(q, p, 3), atol=1e-14, rtol=0)


def test_iteration_limit_is_a_counted_failure_and_stays_exact() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    rule = verifiers.get(NAME, tau=1e-12, max_iters=1)
    marginal, acceptance = cases.exact_law(rule, q, p, 3)
    assert rule.last_stats.unconverged > 0 and rule.last_stats.failures == rule.last_stats.rows
    assert float((marginal - q).abs().max()) <= cases.MARGINAL_TOL
    assert acceptance == pytest.approx(float(rates.spectr_acceptance(q[None], p[None], 3)[0]), abs=1e-12)


def test_mixed_numbers_of_drafts_in_one_batch() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    cases.check_mixed_draft_counts(NAME, q, p, [[0, 1, 2, 3], [-1, 0, -1, 4], [2], [], [1, 1, -1, 0], [3, -1, -1, -1]])


def test_verify_follows_q_and_conditional() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    cases.check_verify_statistics(NAME, q, p, 3)


def test_bad_input_raises() -> None:
    cases.check_bad_input(NAME)


def test_float32_input_keeps_dtype() -> None:
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    law = verifiers.get(NAME).conditional(q, p, torch.tensor([[0, 1]]))
    assert law.dtype == torch.float32 and float(law.sum()) == pytest.approx(1, abs=1e-6)


def test_full_vocabulary() -> None:
    vocab = 151_936
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, vocab, generator=generator, dtype=torch.float64) * 3
    q = torch.softmax(logits, -1)
    draft_logits = logits + torch.randn(2, vocab, generator=generator, dtype=torch.float64)
    top = draft_logits.topk(20, -1).values[:, -1:]
    draft_logits[1] = torch.where(draft_logits[1] >= top[1], draft_logits[1], -torch.inf)  # row 1: top-20 drafts
    p = torch.softmax(draft_logits, -1)
    x = torch.multinomial(p, 4, replacement=True, generator=generator)
    rule = verifiers.get(NAME)
    law = rule.conditional(q, p, x)
    assert torch.allclose(law.sum(-1), torch.ones(2, dtype=torch.float64)) and bool((law >= 0).all())
    stats = rule.last_stats
    # Row 0 drafts from the full vocabulary: T would exceed max_support, so it falls back.
    assert stats.failures == 1
    optimum = rates.optimal_acceptance(q, p, 4)
    assert float(stats.acceptance[0]) == pytest.approx(float(rates.spectr_acceptance(q, p, 4)[0]), abs=1e-12)
    assert float(optimum[1]) - 2e-3 <= float(stats.acceptance[1]) <= float(optimum[1]) + 1e-12
