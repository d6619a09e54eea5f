"""Small test cases and exactness checks shared by the fitted verifiers' tests."""

from __future__ import annotations

import torch

from hf_globalres import verifiers
from hf_globalres.reference import enumerate_law, transport_lp
from hf_globalres.verifiers.base import Verifier

from .cases import chi_square_pvalue

#: Enumerated marginals must equal q to this (float64).
MARGINAL_TOL = 1e-10
#: Fitted acceptance vs the transport LP at tau = 1e-10.
LP_TOL = 1e-7


def random_case(generator: torch.Generator, vocab: int, zeros: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, p) [V] float64 with heavy-tailed masses; with ``zeros`` some q and p entries are 0."""
    q = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 3
    p = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 3
    if zeros and vocab > 2:
        q[torch.randint(vocab, (1,), generator=generator)] = 0
        p[torch.randint(vocab, (1,), generator=generator)] = 0
    q[0] += 1e-3  # keep both rows non-zero
    p[1] += 1e-3
    return q / q.sum(), p / p.sum()


def degenerate_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Valid but degenerate rows: p = q, disjoint supports, one-hot p or q, q = 0 where p > 0."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return [
        ("p equals q", t(0.5, 0.3, 0.2, 0.0), t(0.5, 0.3, 0.2, 0.0)),
        ("disjoint supports", t(0.0, 0.0, 0.6, 0.4), t(0.7, 0.3, 0.0, 0.0)),
        ("one-hot p", t(0.1, 0.6, 0.3), t(0.0, 1.0, 0.0)),
        ("one-hot q", t(0.0, 0.0, 1.0), t(0.3, 0.3, 0.4)),
        ("q zero where p positive", t(0.0, 0.5, 0.5, 0.0), t(0.4, 0.2, 0.1, 0.3)),
        ("uniform", t(0.25, 0.25, 0.25, 0.25), t(0.25, 0.25, 0.25, 0.25)),
    ]


def drafts_for(verifier: Verifier, draft_probs: torch.Tensor, num_drafts: int) -> int:
    """Number of drafts a row can hold under the verifier's scheme (w/o replacement: ≤ |supp p|)."""
    if verifier.draft_scheme == "iid":
        return num_drafts
    return min(num_drafts, int((draft_probs > 0).sum()))


def exact_law(verifier: Verifier, q: torch.Tensor, p: torch.Tensor, num_drafts: int) -> tuple[torch.Tensor, float]:
    """(marginal [V], acceptance) of the verifier by enumerating every draft tuple."""
    marginal, _, emitted = enumerate_law(verifier, q, p, num_drafts)
    return marginal, float(emitted)


def batch_of(q: torch.Tensor, p: torch.Tensor, draft_rows: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """q, p repeated for each draft row, drafts padded with −1 to a common width."""
    width = max(len(row) for row in draft_rows)
    x = torch.tensor([row + [-1] * (width - len(row)) for row in draft_rows], dtype=torch.long)
    count = len(draft_rows)
    return q.expand(count, -1).clone(), p.expand(count, -1).clone(), x


def small_cases(seed: int, count: int, max_vocab: int = 6, max_drafts: int = 4):
    """``count`` random (q, p, n) with V ≤ max_vocab, n ≤ max_drafts; every other case has zeros."""
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        vocab = int(torch.randint(2, max_vocab + 1, (1,), generator=generator))
        drafts = int(torch.randint(1, max_drafts + 1, (1,), generator=generator))
        if vocab**drafts > 1300:  # keep the enumeration small
            drafts = 2
        q, p = random_case(generator, vocab, zeros=index % 2 == 0)
        yield q, p, drafts


def check_exact_and_optimal(name: str, q: torch.Tensor, p: torch.Tensor, num_drafts: int, **options) -> float:
    """Assert the enumerated marginal is q and the acceptance is the LP optimum; return the gap.

    Also checks that the acceptance the verifier reports (``last_stats.acceptance``)
    is the enumerated one, and that acceptance never exceeds the optimum.
    """
    rule = verifiers.get(name, **options)
    drafts = drafts_for(rule, p, num_drafts)
    marginal, acceptance = exact_law(rule, q, p, drafts)
    err = float((marginal - q).abs().max())
    assert err <= MARGINAL_TOL, f"{name}: marginal off q by {err:.3g} (V={q.numel()}, n={drafts})"
    reported = rule.last_stats.acceptance
    assert torch.allclose(reported, torch.full_like(reported, acceptance), atol=1e-12, rtol=0)
    optimum = transport_lp(q, p, drafts, rule.draft_scheme)
    assert acceptance <= optimum + 1e-9, f"{name}: acceptance {acceptance} above the LP optimum {optimum}"
    return optimum - acceptance


def check_mixed_draft_counts(name: str, q: torch.Tensor, p: torch.Tensor, draft_rows: list[list[int]]) -> None:
    """A batch mixing rows with different numbers (and positions) of drafts equals each row alone."""
    rule = verifiers.get(name, tau=1e-10)
    q_rows, p_rows, x = batch_of(q, p, draft_rows)
    together = rule.conditional(q_rows, p_rows, x)
    for index, row in enumerate(draft_rows):
        present = [token for token in row if token >= 0] or [-1]
        alone = rule.conditional(q[None], p[None], torch.tensor([present]))
        assert torch.allclose(together[index], alone[0], atol=1e-12, rtol=0), f"row {row} differs in a mixed batch"


def check_verify_statistics(name: str, q: torch.Tensor, p: torch.Tensor, num_drafts: int, rows: int = 4000) -> None:
    """Sampled outputs follow q (drafts drawn per row) and, for one fixed tuple, the conditional law.

    Pearson chi-square with fixed seeds; fails below p-value 1e-4. The
    acceptance frequency must lie within 5 standard errors of the exact one.
    """
    rule = verifiers.get(name, tau=1e-10)
    generator = torch.Generator().manual_seed(7)
    replacement = rule.draft_scheme == "iid"
    drafts = drafts_for(rule, p, num_drafts)
    x = torch.multinomial(p.expand(rows, -1), drafts, replacement=replacement, generator=generator)
    q_rows, p_rows = q.expand(rows, -1).clone(), p.expand(rows, -1).clone()
    result = rule.verify(q_rows, p_rows, x, generator=generator)
    assert chi_square_pvalue(result.token, q) > 1e-4, f"{name}: sampled marginal departs from q"
    exact = float(rule.last_stats.acceptance[0])
    # Σ a counts acceptance events; a recovered token equal to a draft is not one of them.
    rate = float((result.draft_index >= 0).double().mean())
    standard_error = (exact * (1 - exact) / rows) ** 0.5
    assert rate >= exact - 5 * standard_error - 1e-12, f"{name}: acceptance rate {rate} below exact {exact}"

    fixed = x[:1].expand(rows, -1)
    law = rule.conditional(q[None], p[None], fixed[:1])[0]
    tokens = rule.verify(q_rows, p_rows, fixed, generator=generator).token
    assert chi_square_pvalue(tokens, law) > 1e-4, f"{name}: verify departs from conditional for drafts {fixed[0]}"


def check_bad_input(name: str) -> None:
    """NaN / infinite values, rows not summing to 1, V mismatch and bad options raise ValueError."""
    import pytest

    rule = verifiers.get(name)
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    p = torch.tensor([[0.2, 0.2, 0.6]], dtype=torch.float64)
    x = torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        rule.verify(torch.tensor([[float("nan"), 0.5, 0.5]]), p, x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        rule.verify(q, torch.tensor([[float("inf"), 0.0, 0.0]], dtype=torch.float64), x)
    with pytest.raises(ValueError, match="sum to 1"):
        rule.verify(q * 2, p, x)
    with pytest.raises(ValueError, match="differ in shape"):
        rule.verify(q, torch.tensor([[0.5, 0.5]], dtype=torch.float64), x)
    with pytest.raises(ValueError, match="zero draft probability"):
        rule.verify(q, torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), x)
    with pytest.raises(ValueError, match="tau"):
        verifiers.get(name, tau=0.0)
    with pytest.raises(ValueError, match="max_support"):
        verifiers.get(name, max_support=0)
    with pytest.raises(ValueError, match="max_iters"):
        verifiers.get(name, max_iters=1.5)


__all__ = [
    "LP_TOL",
    "MARGINAL_TOL",
    "batch_of",
    "check_bad_input",
    "check_exact_and_optimal",
    "check_mixed_draft_counts",
    "check_verify_statistics",
    "degenerate_cases",
    "drafts_for",
    "exact_law",
    "random_case",
    "small_cases",
]
