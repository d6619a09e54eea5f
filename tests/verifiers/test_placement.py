"""Every tensor a rule creates follows its inputs' device: with ``meta`` as the default device, CPU inputs stay on CPU.

A factory call without ``device=`` (``torch.full``, ``arange``, ``tensor``...) lands on the default
device; under ``torch.device("meta")`` that tensor is on ``meta`` and the first operation mixing it with
the CPU inputs fails, so this catches on a CPU what would break on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from hf_globalres import rates, reference, verifiers
from hf_globalres.verifiers.optimal import Optimal

from .cases import random_batch


@pytest.mark.parametrize("vocab", [12, 5000])  # 5000: optimal's wide tiers on groups of tokens
@pytest.mark.parametrize("name", verifiers.available())
def test_verify_and_conditional_create_tensors_on_the_inputs_device(name, vocab):
    rule = verifiers.get(name)
    n = 1 if rule.max_drafts == 1 else 3
    q, p = random_batch(3, vocab, 1)
    generator = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(p, n, replacement=rule.draft_scheme == "iid", generator=generator)
    with torch.device("meta"):
        result = rule.verify(q, p, drafts, generator)
        law = rule.conditional(q, p, drafts)
    assert result.token.device.type == law.device.type == "cpu"


def test_the_tilted_race_creates_tensors_on_the_inputs_device():
    rule = verifiers.get("optimal_block", tilt=30.0)
    q, p = random_batch(3, 12, 1)
    drafts = torch.multinomial(p, 4, replacement=True, generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        plan = rule.plan(q, p, drafts)
        residual = plan.residual
    assert plan.draft_emit.device.type == residual.device.type == "cpu"


@pytest.mark.parametrize("name", verifiers.available())
def test_enumeration_reference_follows_the_row(name):
    rule = verifiers.get(name)
    q, p = random_batch(1, 5, 2)
    with torch.device("meta"):
        marginal, _, _ = reference.enumerate_law(rule, q[0], p[0], 1 if rule.max_drafts == 1 else 2)
    assert marginal.device.type == "cpu"


def test_rates_and_acceptance_follow_the_inputs():
    q, p = random_batch(3, 12, 3)
    with torch.device("meta"):
        values = [
            Optimal().acceptance(q, p, 3)[0],
            rates.optimal_acceptance(q, p, 3),
            rates.optimal_acceptance(q, p, 3, "without_replacement"),
            rates.rrs_acceptance(q, p, 3),
        ]
    assert all(value.device.type == "cpu" for value in values)
