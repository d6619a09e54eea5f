"""`verify` samples from `conditional`, and the checks that would catch a lossy rule do catch one."""

from __future__ import annotations

import pytest
import torch

from hf_globalres import verifiers
from hf_globalres.reference import enumerate_law
from hf_globalres.verifiers.base import EmissionPlan, Verifier, first_match, sample_categorical

from .cases import chi_square_pvalue, draw_drafts, make_case

SAMPLES = 120_000
#: Chi-square p-value below which the sampled law is declared different (fixed seeds).
LEVEL = 1e-4


@pytest.mark.parametrize("name", verifiers.available())
def test_verify_samples_the_conditional_law(name: str) -> None:
    """Per fixed draft tuple, verify's tokens follow conditional (chi-square, level 1e-4)."""
    verifier = verifiers.get(name)
    q, p = make_case("random", 8, 11)
    n = min(verifier.max_drafts or 3, 3)
    g = torch.Generator().manual_seed(5)
    tuples = draw_drafts(p.expand(4, -1).contiguous(), n, verifier.draft_scheme, g)
    for drafts in tuples:
        rows = drafts.expand(SAMPLES // 4, -1)
        result = verifier.verify(q.expand(len(rows), -1), p.expand(len(rows), -1), rows, generator=g)
        law = verifier.conditional(q[None], p[None], drafts[None])[0]
        assert chi_square_pvalue(result.token, law) > LEVEL, (name, drafts.tolist())
        expected_index = first_match(result.token, rows)
        assert torch.equal(result.draft_index, expected_index)
        assert torch.equal(result.accepted, expected_index >= 0)


@pytest.mark.parametrize("name", verifiers.available())
def test_verify_end_to_end_marginal_is_target(name: str) -> None:
    """Fresh drafts per row, then verify: the token frequencies match q."""
    verifier = verifiers.get(name)
    q, p = make_case("sparse", 10, 2)
    n = min(verifier.max_drafts or 4, 4)
    g = torch.Generator().manual_seed(9)
    qs, ps = q.expand(SAMPLES, -1), p.expand(SAMPLES, -1)
    drafts = draw_drafts(ps.contiguous(), n, verifier.draft_scheme, g)
    result = verifier.verify(qs, ps, drafts, generator=g)
    assert chi_square_pvalue(result.token, q) > LEVEL


class AlwaysAcceptFirst(Verifier):
    """A deliberately lossy rule: output the first draft."""

    name = "always_accept_first"

    def plan(self, target_probs, draft_probs, draft_tokens) -> EmissionPlan:
        emit = torch.zeros(draft_tokens.shape, dtype=target_probs.dtype)
        emit[:, 0] = 1
        return EmissionPlan(draft_emit=emit, residual=target_probs)


def test_checks_detect_a_lossy_rule() -> None:
    q, p = make_case("random", 6, 4)
    marginal, _, _ = enumerate_law(AlwaysAcceptFirst(), q, p, 2)
    assert not torch.allclose(marginal, q, atol=1e-3)
    g = torch.Generator().manual_seed(0)
    drafts = draw_drafts(p.expand(SAMPLES, -1).contiguous(), 2, "iid", g)
    tokens = AlwaysAcceptFirst().verify(q.expand(SAMPLES, -1), p.expand(SAMPLES, -1), drafts, generator=g).token
    assert chi_square_pvalue(tokens, q) < LEVEL


def test_chi_square_detects_a_small_perturbation() -> None:
    q, _ = make_case("random", 8, 1)
    wrong = q.clone()
    wrong[0] += 0.02
    wrong /= wrong.sum()
    tokens = sample_categorical(wrong.expand(SAMPLES, -1), torch.Generator().manual_seed(3))
    assert chi_square_pvalue(tokens, q) < LEVEL
    assert chi_square_pvalue(tokens, wrong) > LEVEL


def test_sample_categorical_never_returns_impossible_tokens() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        tokens = sample_categorical(probs, g)
        assert bool((probs.gather(1, tokens[:, None]) > 0).all())


def test_sample_categorical_draws_equal_draws_from_copies() -> None:
    """``draws`` draws from a row are bit for bit the single draws from that many copies of it (same seed)."""
    probs = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    many = sample_categorical(probs, torch.Generator().manual_seed(2), draws=4)
    copies = sample_categorical(probs.repeat_interleave(4, 0), torch.Generator().manual_seed(2)).view(3, 4)
    assert many.shape == (3, 4)
    assert torch.equal(many, copies)
    assert len(set(many.flatten().tolist())) > 3  # the draws differ, so the comparison could fail


def test_first_match_returns_first_column_or_minus_one() -> None:
    drafts = torch.tensor([[3, 1, 3], [2, 2, -1], [-1, 0, 0]])
    token = torch.tensor([3, 5, 0])
    assert first_match(token, drafts).tolist() == [0, -1, 1]
