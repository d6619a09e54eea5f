"""Khisti et al. canonical decomposition: exact marginal, LP optimum for two drafts, truncated alphabet."""

from __future__ import annotations

import pytest
import torch

from hf_globalres import rates, verifiers
from tests.verifiers import fitted_cases as cases

NAME = "khisti"


def test_registered() -> None:
    assert NAME in verifiers.available()
    assert verifiers.get(NAME).draft_scheme == "iid"


def test_two_identical_drafts_reach_the_lp_optimum() -> None:
    gaps = [cases.check_exact_and_optimal(NAME, q, p, 2, tau=1e-10) for q, p, _ in cases.small_cases(seed=21, count=14)]
    assert max(gaps) <= cases.LP_TOL


def test_random_small_cases_exact_and_optimal() -> None:
    # Beyond two drafts the fitted selection still reaches the optimum on the full alphabet.
    gaps = [cases.check_exact_and_optimal(NAME, q, p, n, tau=1e-10) for q, p, n in cases.small_cases(seed=22, count=12)]
    assert max(gaps) <= cases.LP_TOL


@pytest.mark.parametrize(("label", "q", "p"), cases.degenerate_cases(), ids=[c[0] for c in cases.degenerate_cases()])
@pytest.mark.parametrize("num_drafts", [1, 2, 3])
def test_degenerate_cases(label: str, q: torch.Tensor, p: torch.Tensor, num_drafts: int) -> None:
    assert cases.check_exact_and_optimal(NAME, q, p, num_drafts, tau=1e-10) <= cases.LP_TOL


@pytest.mark.parametrize("num_drafts", [2, 4])
def test_truncated_alphabet_stays_exact(num_drafts: int) -> None:
    p = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.3], dtype=torch.float64)
    rule = verifiers.get(NAME, tau=1e-10, max_support=2)
    marginal, acceptance = cases.exact_law(rule, q, p, num_drafts)
    assert rule.last_stats.mean_support == 2 and rule.last_stats.missing_mass > 0
    assert rule.last_stats.failures == 0  # the alphabet is truncated, never abandoned
    assert float((marginal - q).abs().max()) <= cases.MARGINAL_TOL
    single = float(rates.single_acceptance(q[None], p[None])[0])
    optimum = float(rates.optimal_acceptance(q[None], p[None], num_drafts)[0])
    assert single - 1e-12 <= acceptance <= optimum + 1e-12


def test_unconverged_fit_stays_exact_and_is_counted() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    rule = verifiers.get(NAME, tau=1e-12, max_iters=1)
    marginal, _ = cases.exact_law(rule, q, p, 3)
    assert rule.last_stats.unconverged > 0 and rule.last_stats.failures == 0
    assert float((marginal - q).abs().max()) <= cases.MARGINAL_TOL


def test_mixed_numbers_of_drafts_in_one_batch() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    cases.check_mixed_draft_counts(NAME, q, p, [[0, 1, 2, 3], [-1, 0, -1, 4], [2], [], [1, 1, -1, 0]])


def test_verify_follows_q_and_conditional() -> None:
    q = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    cases.check_verify_statistics(NAME, q, p, 2)


def test_bad_input_raises() -> None:
    cases.check_bad_input(NAME)


def test_full_vocabulary_truncates() -> None:
    vocab = 151_936
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(1, vocab, generator=generator, dtype=torch.float64) * 3
    q = torch.softmax(logits, -1)
    p = torch.softmax(logits + torch.randn(1, vocab, generator=generator, dtype=torch.float64), -1)
    x = torch.multinomial(p, 2, replacement=True, generator=generator)
    rule = verifiers.get(NAME, max_support=50)
    law = rule.conditional(q, p, x)
    assert torch.allclose(law.sum(-1), torch.ones(1, dtype=torch.float64)) and bool((law >= 0).all())
    stats = rule.last_stats
    assert stats.failures == 0 and stats.mean_support == 50
    accepted = float(stats.acceptance[0])
    assert float(rates.single_acceptance(q, p)[0]) - 1e-9 <= accepted <= float(rates.optimal_acceptance(q, p, 2)[0])


def test_more_drafts_than_it_can_enumerate_are_refused():
    """Its multisets grow factorially in n: n = 8 at V = 152k is refused, naming the rules that take it."""
    q = torch.full((1, 151_936), 1 / 151_936, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"at most 6 draft.*optimal, spectr and rrs take any number"):
        verifiers.get("khisti").verify(q, q, torch.arange(8)[None])
