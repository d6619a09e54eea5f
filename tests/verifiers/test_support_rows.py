"""Verifying on the support of p (verifiers.base.SupportRows, docs/design.md §5): same law, exact, any rule."""

from __future__ import annotations

import pytest
import torch

from hf_globalres import verifiers
from hf_globalres.reference import enumerate_law
from hf_globalres.verifiers import base

from .cases import chi_square_pvalue, draw_drafts

ALL = verifiers.available()
VOCAB = 40


def sparse_rows(supports: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, V] with full support, p [B, V] on ``supports[b]`` tokens each, overlapping q's likeliest)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(2 * torch.randn(len(supports), VOCAB, generator=g, dtype=torch.float64), -1)
    p = torch.zeros_like(q)
    for row, size in enumerate(supports):
        tokens = torch.randperm(VOCAB, generator=g)[:size]
        p[row, tokens] = torch.rand(size, generator=g, dtype=torch.float64) + 0.05
    return q, p / p.sum(-1, keepdim=True)


def drafts_for(name: str) -> list[int]:
    limit = verifiers.get(name).max_drafts or 4
    return [n for n in (1, 2, 4) if n <= limit]


@pytest.mark.parametrize("name", ALL)
def test_support_rows_give_every_rule_its_law(name: str, monkeypatch) -> None:
    """The law given the drafts is the same on the support columns as over the whole vocabulary."""
    verifier = verifiers.get(name)
    q, p = sparse_rows([3, 7, 5, 9], seed=1)
    assert base.SupportRows.of(q, p, torch.zeros(4, 1, dtype=torch.long)) is not None
    for n in drafts_for(name):
        x = draw_drafts(p, n, verifier.draft_scheme, torch.Generator().manual_seed(n))
        x[0, n - 1] = -1 if n > 1 else x[0, n - 1]  # an absent draft
        compact = verifier.conditional(q, p, x)
        monkeypatch.setattr(base, "SUPPORT_SHARE", -1.0)  # never restrict
        whole = verifier.conditional(q, p, x)
        monkeypatch.undo()
        assert torch.allclose(compact, whole, rtol=0, atol=1e-12), (name, n)
        assert torch.allclose(compact.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_support_rows_are_lossless_by_enumeration(name: str) -> None:
    verifier = verifiers.get(name)
    q, p = sparse_rows([4], seed=2)
    for n in drafts_for(name)[:2]:
        marginal, _, _ = enumerate_law(verifier, q[0], p[0], n)
        assert torch.allclose(marginal, q[0], rtol=0, atol=1e-10), (name, n)


@pytest.mark.parametrize("name", ["spectr", "optimal", "rrs"])
def test_verify_draws_off_the_support_from_q(name: str) -> None:
    """Rows whose target puts most of its mass off supp p: tokens there follow q, in the conditional law."""
    verifier = verifiers.get(name, validate=False)
    q, p = sparse_rows([3], seed=3)
    x = torch.tensor([[int(p[0].argmax())] * 2])
    law = verifier.conditional(q, p, x)[0]
    assert float(law[p[0] == 0].sum()) > 0.5
    samples = 20000
    result = verifier.verify(q.expand(samples, -1), p.expand(samples, -1), x.expand(samples, -1),
                             torch.Generator().manual_seed(4))  # fmt: skip
    assert chi_square_pvalue(result.token, law) > 1e-3
    assert bool((result.accepted == (result.token == x[0, 0])).all())
