"""Property test of the input checks: any input verifies to a valid result or raises ValueError, nothing else."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_globalres import verifiers

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: One way to spoil an input, or none (listed thrice, so most cases are valid and reach the rule).
CORRUPTIONS = ["none", "none", "none", "nan", "inf", "negative", "zero draft mass", "unnormalised",
               "fewer columns", "flat", "integer dtype", "token range", "no columns"]  # fmt: skip


@st.composite
def cases(draw):
    batch, vocab, n = draw(st.integers(0, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.softmax(torch.randn(batch, vocab, generator=generator, dtype=torch.float64) * 2, -1)
    p = torch.softmax(torch.randn(batch, vocab, generator=generator, dtype=torch.float64) * 2, -1)
    drafts = torch.multinomial(p, n, replacement=True, generator=generator) if batch else torch.zeros(0, n).long()
    drafts[:, draw(st.integers(0, n - 1)) :] *= draw(st.sampled_from([1, 1, -1]))  # some absent (−1) columns
    drafts = torch.where(drafts < 0, -1, drafts)
    corruption = draw(st.sampled_from(CORRUPTIONS))
    row, column = draw(st.integers(0, max(batch - 1, 0))), draw(st.integers(0, vocab - 1))
    if batch and corruption in ("nan", "inf", "negative"):
        q[row, column] = {"nan": float("nan"), "inf": float("inf"), "negative": -0.25}[corruption]
    elif batch and corruption == "zero draft mass" and drafts[row, 0] >= 0:
        p[row, drafts[row, 0]] = 0
        p[row] /= p[row].sum()
    elif corruption == "unnormalised":
        p = p * 1.5
    elif corruption == "fewer columns" and vocab > 1:
        q = q[:, :-1]
    elif corruption == "flat":
        q = q.flatten()
    elif corruption == "integer dtype":
        q = q.long()
    elif corruption == "token range":
        drafts = drafts + vocab + 1
    elif corruption == "no columns":
        drafts = drafts[:, :0]
    dtype, device = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(DEVICES))
    cast = (lambda t: t.to(device)) if corruption == "integer dtype" else (lambda t: t.to(dtype).to(device))
    return cast(q), p.to(dtype).to(device), drafts.to(device)


@pytest.mark.parametrize("name", verifiers.available())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_any_input_verifies_or_raises_value_error(name, case):
    q, p, drafts = case
    rule = verifiers.get(name)
    try:
        result = rule.verify(q, p, drafts)
    except ValueError:
        event("refused")
        return
    event("verified")
    batch = drafts.shape[0]
    assert result.token.shape == result.accepted.shape == result.draft_index.shape == (batch,)
    assert ((result.token >= 0) & (result.token < q.shape[-1])).all()
    accepted = (drafts == result.token[:, None]).any(-1)
    assert torch.equal(result.accepted, accepted)
    law = rule.conditional(q, p, drafts).double()
    assert torch.isfinite(law).all() and (law >= 0).all()
    assert torch.allclose(law.sum(-1), torch.ones(batch, dtype=law.dtype), atol=1e-5)
