"""Every registered verifier is lossless: enumerated over all draft tuples, the output law is q."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_globalres import rates, verifiers
from hf_globalres.reference import draft_tuples, enumerate_law

from .cases import CASE_KINDS, make_case, rule, rule_ids

ALL = rule_ids()
EXACT = 1e-10


def draft_counts(name: str) -> list[int]:
    limit = rule(name).max_drafts or 4
    return [n for n in (1, 2, 3, 4) if n <= limit]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", CASE_KINDS)
def test_marginal_is_target(name: str, kind: str) -> None:
    verifier = rule(name)
    for vocab, seed in ((3, 0), (5, 1)):
        q, p = make_case(kind, vocab, seed)
        for n in draft_counts(name):
            if vocab**n > 1300:
                continue
            marginal, acceptance, _ = enumerate_law(verifier, q, p, n)
            assert torch.allclose(marginal, q, rtol=0, atol=EXACT), (name, kind, vocab, n)
            optimum = float(rates.optimal_acceptance(q[None], p[None], n, scheme=verifier.draft_scheme)[0])
            assert float(acceptance) <= optimum + EXACT, (name, kind, n, float(acceptance), optimum)


@pytest.mark.parametrize(
    ("name", "rate"),
    [
        ("single", lambda q, p, n: rates.single_acceptance(q, p)),
        ("rrs", rates.rrs_acceptance),
        ("spectr", rates.spectr_acceptance),
    ],
)
@pytest.mark.parametrize("kind", CASE_KINDS)
def test_acceptance_matches_analytic_rate(name: str, rate, kind: str) -> None:
    verifier = verifiers.get(name)
    q, p = make_case(kind, 5, 7)
    for n in draft_counts(name):
        _, _, emitted = enumerate_law(verifier, q, p, n)
        assert float(emitted) == pytest.approx(float(rate(q[None], p[None], n)[0]), abs=EXACT)


def test_baselines_are_ordered() -> None:
    """RRS ≤ K-SEQ ≤ optimal, and RRS without replacement ≤ its own optimum (NOTES §4)."""
    for seed in range(6):
        q, p = make_case("random", 5, 100 + seed)
        for n in (2, 3):
            rrs = enumerate_law(verifiers.get("rrs"), q, p, n)[1]
            spectr = enumerate_law(verifiers.get("spectr"), q, p, n)[2]
            wor = enumerate_law(verifiers.get("rrs_without_replacement"), q, p, n)[1]
            assert float(rrs) <= float(spectr) + EXACT
            assert float(spectr) <= float(rates.optimal_acceptance(q[None], p[None], n)[0]) + EXACT
            assert float(wor) <= float(rates.optimal_acceptance(q[None], p[None], n, "without_replacement")[0]) + EXACT


@pytest.mark.parametrize("name", ALL)
def test_absent_drafts_anywhere(name: str) -> None:
    """Rows carry different numbers of drafts; −1 columns may sit anywhere and change nothing."""
    verifier = rule(name)
    q, p = make_case("random", 4, 3)
    width = min(verifier.max_drafts or 3, 3)
    for k in range(0, width + 1):
        if k == 0:
            tuples, weights = torch.empty(1, 0, dtype=torch.long), torch.ones(1, dtype=torch.float64)
        else:
            tuples, weights = draft_tuples(p, k, verifier.draft_scheme)
        # Spread the k drafts over `width` columns, −1 elsewhere, differently per tuple.
        padded = torch.full((tuples.shape[0], width), -1, dtype=torch.long)
        g = torch.Generator().manual_seed(k)
        for row in range(tuples.shape[0]):
            columns = torch.randperm(width, generator=g)[:k].sort().values
            padded[row, columns] = tuples[row]
        law = verifier.conditional(q.expand(len(padded), -1), p.expand(len(padded), -1), padded)
        marginal = (weights[:, None] * law).sum(0)
        assert torch.allclose(marginal, q, rtol=0, atol=EXACT), (name, k)
        if k == 0:
            assert torch.allclose(law[0], q, rtol=0, atol=EXACT)


@pytest.mark.parametrize("name", ALL)
def test_batched_rows_match_single_rows(name: str) -> None:
    """A batch of different rows gives each row the law it gets alone (no cross-row leakage)."""
    verifier = rule(name)
    n = min(verifier.max_drafts or 3, 3)
    cases = [make_case(kind, 6, i) for i, kind in enumerate(CASE_KINDS)]
    q = torch.stack([c[0] for c in cases])
    p = torch.stack([c[1] for c in cases])
    g = torch.Generator().manual_seed(0)
    drafts = torch.stack(
        [torch.multinomial(row, n, replacement=verifier.draft_scheme == "iid", generator=g) for row in p]
    )
    if verifier.draft_scheme == "without_replacement":
        support = (p > 0).sum(-1, keepdim=True)
        drafts = torch.where(torch.arange(n)[None] < support, drafts, -1)
    batched = verifier.conditional(q, p, drafts)
    for row in range(len(cases)):
        alone = verifier.conditional(q[row : row + 1], p[row : row + 1], drafts[row : row + 1])
        assert torch.allclose(batched[row], alone[0], rtol=0, atol=1e-12)
        assert float(batched[row].sum()) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    vocab=st.integers(2, 5),
    num_drafts=st.integers(1, 3),
    zeros=st.lists(st.booleans(), min_size=10, max_size=10),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_every_verifier_is_lossless(vocab: int, num_drafts: int, zeros: list[bool], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(vocab, generator=g, dtype=torch.float64)
    p = torch.rand(vocab, generator=g, dtype=torch.float64)
    q[torch.tensor(zeros[:vocab])] = 0
    p[torch.tensor(zeros[5 : 5 + vocab])] = 0
    q[seed % vocab] += 0.5
    p[(seed // 7) % vocab] += 0.5
    q, p = q / q.sum(), p / p.sum()
    for name in ALL:
        verifier = rule(name)
        n = min(num_drafts, verifier.max_drafts or num_drafts)
        marginal, acceptance, _ = enumerate_law(verifier, q, p, n)
        assert torch.allclose(marginal, q, rtol=0, atol=EXACT), name
        optimum = rates.optimal_acceptance(q[None], p[None], n, scheme=verifier.draft_scheme)[0]
        assert float(acceptance) <= float(optimum) + EXACT, name


@pytest.mark.parametrize("name", ALL)
def test_repeated_rows_share_one_plan_and_keep_their_law(name: str) -> None:
    verifier = rule(name)
    q, p = make_case("random", 6, 21)
    n = min(verifier.max_drafts or 2, 2)
    tuples, _ = draft_tuples(p, n, verifier.draft_scheme)
    drafts = tuples[:3].repeat_interleave(4, dim=0)  # 3 distinct tuples, each 4 times
    rows = drafts.shape[0]
    law = verifier.conditional(q.expand(rows, -1), p.expand(rows, -1), drafts)
    for row in range(rows):
        alone = verifier.conditional(q[None], p[None], drafts[row : row + 1])[0]
        assert torch.allclose(law[row], alone, rtol=0, atol=1e-12)
