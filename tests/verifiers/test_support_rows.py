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


def sparse(p: torch.Tensor, extra: int, seed: int) -> base.SparseRows:
    """p on its nonzero tokens plus ``extra`` zero-probability ones per row, shuffled (widest row first)."""
    g = torch.Generator().manual_seed(seed)
    width = int((p > 0).sum(-1).max()) + extra
    keys = (p > 0).double() + torch.rand(p.shape, generator=g, dtype=torch.float64) / 2  # nonzeros rank first
    tokens = keys.topk(width, dim=-1).indices[:, torch.randperm(width, generator=g)]
    return base.SparseRows(tokens, p.gather(1, tokens), p.shape[1])


@pytest.mark.parametrize("name", ALL)
def test_sparse_rows_give_every_rule_its_law(name: str) -> None:
    """p handed on its support (with extra zero-probability tokens, in any order): every rule keeps its law."""
    verifier = verifiers.get(name)
    q, p = sparse_rows([3, 7, 5, 6], seed=5)
    for n in drafts_for(name):
        x = draw_drafts(p, n, verifier.draft_scheme, torch.Generator().manual_seed(n))
        whole = verifier.conditional(q, p, x)
        for extra in (0, 3, VOCAB - 7):  # the last is wider than SUPPORT_SHARE · V: made dense
            held = sparse(p, extra, seed=n)
            assert torch.equal(held.dense(), p)
            known = verifier.conditional(q, held, x)
            assert torch.allclose(known, whole, rtol=0, atol=1e-12), (name, n, extra)


@pytest.mark.parametrize("name", ["spectr", "optimal"])
def test_verify_on_sparse_rows_draws_the_same_tokens(name: str) -> None:
    verifier = verifiers.get(name)
    q, p = sparse_rows([3, 7, 5, 6], seed=6)
    x = draw_drafts(p, 4, verifier.draft_scheme, torch.Generator().manual_seed(7))
    found = verifier.verify(q, p, x, torch.Generator().manual_seed(8))
    held = verifier.verify(q, sparse(p, 0, seed=9), x, torch.Generator().manual_seed(8))
    assert torch.equal(found.token, held.token) and torch.equal(found.draft_index, held.draft_index)


def test_malformed_sparse_rows_are_refused() -> None:
    verifier = verifiers.get("optimal")
    q, p = sparse_rows([3, 5], seed=10)
    x = draw_drafts(p, 2, "iid", torch.Generator().manual_seed(11))
    held = sparse(p, 1, seed=12)
    cases = [
        (base.SparseRows(held.tokens.flip(-1)[:, :1].expand(-1, held.tokens.shape[1]), held.values, VOCAB), "repeats"),
        (base.SparseRows(held.tokens + VOCAB, held.values, VOCAB), r"lie in \[0, 40\)"),
        (base.SparseRows(held.tokens, held.values * 2, VOCAB), "sum to 1"),
        (base.SparseRows(held.tokens[:, :2], held.values, VOCAB), "LongTensor shaped like"),
        (base.SparseRows(held.tokens, held.values, VOCAB + 1), "differ in shape"),
    ]
    for rows, message in cases:
        with pytest.raises(ValueError, match=message):
            verifier.verify(q, rows, x)
    moved = (held.values == 0).double() / (held.values == 0).sum(-1, keepdim=True)  # p's mass moved off the drafts
    off = base.SparseRows(held.tokens, moved, VOCAB)
    with pytest.raises(ValueError, match="zero draft probability"):  # the drafts are where p was, not where it is
        verifier.verify(q, off, x)
