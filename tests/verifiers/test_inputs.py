"""Bad input raises ValueError naming the problem; valid input in any float dtype works."""

from __future__ import annotations

import pytest
import torch

from hf_globalres import verifiers

from .cases import random_batch

ALL = verifiers.available()


def valid(batch: int = 2, vocab: int = 6, n: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, p = random_batch(batch, vocab, 0)
    drafts = torch.multinomial(p, n, replacement=True)
    return q, p, drafts


def bad_cases():
    q, p, x = valid()
    nan_q = q.clone()
    nan_q[0, 1] = float("nan")
    neg_p = p.clone()
    neg_p[1, 2] = -0.1
    neg_p[1, 3] += 0.1
    zero_p = p.clone()
    zero_p[0, x[0, 0]] = 0
    zero_p[0] /= zero_p[0].sum()
    return [
        ("shape", (q, p[:, :-1], x), "differ in shape"),
        ("batch", (q, p, x[:1]), "draft_tokens must have shape"),
        ("nan", (nan_q, p, x), "NaN or infinite"),
        ("inf", (q, p.masked_fill(p == p.max(), float("inf")), x), "NaN or infinite"),
        ("negative", (q, neg_p, x), "negative"),
        ("unnormalised", (q * 1.5, p, x), "sum to 1"),
        ("no columns", (q, p, x[:, :0]), "n = 0"),
        ("token range", (q, p, x.masked_fill(torch.ones_like(x, dtype=torch.bool), 6)), "must lie in"),
        ("token below -1", (q, p, x - 10), "must lie in"),
        ("zero draft prob", (q, zero_p, x), "zero draft probability"),
        ("float tokens", (q, p, x.double()), "integer tensor"),
        ("int probs", (q.long(), p, x), "floating-point"),
        ("1-d probs", (q[0], p[0], x), r"shape \[B, V\]"),
    ]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("label", "args", "message"), bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_input_raises(name: str, label: str, args, message: str) -> None:
    verifier = verifiers.get(name)
    for method in (verifier.verify, verifier.conditional):
        with pytest.raises(ValueError, match=message):
            method(*args)


def test_single_rejects_several_drafts() -> None:
    q, p, x = valid(n=2)
    with pytest.raises(ValueError, match="at most 1 draft"):
        verifiers.get("single").verify(q, p, x)


def test_without_replacement_rejects_repeated_drafts() -> None:
    q, p, _ = valid()
    repeated = torch.tensor([[2, 2], [1, 3]])
    with pytest.raises(ValueError, match="repeats a draft token"):
        verifiers.get("rrs_without_replacement").verify(q, p, repeated)
    assert verifiers.get("rrs").verify(q, p, repeated).token.shape == (2,)


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        verifiers.get("nope")
    instance = verifiers.get("spectr")
    assert verifiers.get(instance) is instance
    with pytest.raises(ValueError, match="options"):
        verifiers.get(instance, validate=False)


def test_registry_lists_the_baselines() -> None:
    assert {"single", "rrs", "rrs_without_replacement", "spectr"} <= set(ALL)
    for name in ALL:
        verifier = verifiers.get(name)
        assert verifier.name == name
        assert verifier.draft_scheme in ("iid", "without_replacement")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_and_result_shapes(name: str, dtype: torch.dtype) -> None:
    verifier = verifiers.get(name)
    q, p = random_batch(5, 300, 1)
    n = min(verifier.max_drafts or 4, 4)
    drafts = torch.multinomial(p, n, replacement=verifier.draft_scheme == "iid")
    drafts[1, 1:] = -1  # one row with a single draft
    q, p = q.to(dtype), p.to(dtype)
    result = verifier.verify(q, p, drafts, generator=torch.Generator().manual_seed(0))
    assert result.token.shape == (5,) and result.token.dtype == torch.long
    assert result.accepted.dtype == torch.bool and result.draft_index.shape == (5,)
    assert bool(((result.token >= 0) & (result.token < 300)).all())
    law = verifier.conditional(q, p, drafts)
    assert law.shape == (5, 300) and law.dtype in (torch.float32, torch.float64)
    assert torch.allclose(law.double().sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-5)


def test_validate_false_skips_checks() -> None:
    q, p, x = valid()
    fast = verifiers.get("spectr", validate=False)
    assert fast.verify(q, p, x).token.shape == (2,)


@pytest.mark.parametrize("name", ALL)
def test_empty_batch_gives_an_empty_result(name):
    q, p, x = valid(batch=2, vocab=6, n=2)
    rule = verifiers.get(name)
    n = 1 if rule.max_drafts == 1 else 2
    result = rule.verify(q[:0], p[:0], x[:0, :n])
    assert result.token.shape == result.accepted.shape == result.draft_index.shape == (0,)
    assert rule.conditional(q[:0], p[:0], x[:0, :n]).shape == (0, 6)


def test_unchecked_is_a_copy_that_skips_the_checks():
    rule = verifiers.get("optimal")
    unchecked = rule.unchecked()
    assert rule.validate and not unchecked.validate and type(unchecked) is type(rule)
    q = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    x = torch.tensor([[1, 2]])
    assert torch.allclose(unchecked.conditional(q, p, x), rule.conditional(q, p, x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="sum to 1"):
        rule.verify(q * 2, p, x)
