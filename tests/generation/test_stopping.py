"""Stopping criteria over a block's tokens at once (generation/stopping.py) give the per-token calls' answers."""

from __future__ import annotations

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

import hf_globalres
from hf_globalres.generation import loop, stopping

from .conftest import EOS


def per_token_stops(criteria, emitted, lengths, count) -> torch.Tensor:
    """What calling ``criteria`` after each token of each row gives: the first stopping token, 0 for none."""
    stops = []
    for row in range(emitted.shape[0]):
        prefix = torch.zeros(1, int(lengths[row]), dtype=torch.long)
        first = 0
        for s in range(1, int(count[row]) + 1):
            prefix = torch.cat([prefix, emitted[row, s - 1].view(1, 1)], dim=1)
            if bool(criteria(prefix, None)[0]):
                first = s
                break
        stops.append(first)
    return torch.tensor(stops)


def test_first_stops_equal_the_per_token_calls(generator):
    emitted = torch.randint(0, 12, (40, 6), generator=generator)
    lengths = torch.randint(3, 12, (40,), generator=generator)
    count = torch.randint(0, 7, (40,), generator=generator)
    for criteria in (
        [EosTokenCriteria(3)],
        [EosTokenCriteria([3, 7])],
        [MaxLengthCriteria(12)],
        [MaxLengthCriteria(14), EosTokenCriteria(torch.tensor([5, 9]))],
    ):
        criteria = StoppingCriteriaList(criteria)
        assert stopping.token_wise(criteria)
        expected = per_token_stops(criteria, emitted, lengths, count)
        assert (expected > 0).any() and (expected == 0).any()
        assert torch.equal(stopping.first_stops(criteria, emitted, lengths, count), expected)


def test_other_criteria_are_called_token_by_token():
    class Custom(EosTokenCriteria):
        pass

    assert not stopping.token_wise(StoppingCriteriaList([EosTokenCriteria(3), Custom(3)]))


def test_generate_stops_alike_on_both_paths(target, draft, monkeypatch):
    """EOS inside accepted runs and the length cap, batch of 3: the same sequences with either evaluation."""
    prompts = torch.tensor([[1, 5, 7, 3], [1, 9, 2, 4], [1, 4, 4, 12]])
    options = dict(assistant_model=draft, num_drafts=3, do_sample=True, max_new_tokens=12, eos_token_id=EOS,
                   pad_token_id=0, num_assistant_tokens=4)  # fmt: skip

    def runs() -> list[torch.Tensor]:
        return [hf_globalres.generate(target, prompts, generator=torch.Generator().manual_seed(seed), **options)
                for seed in range(6)]  # fmt: skip

    fast = runs()
    monkeypatch.setattr(loop, "token_wise", lambda criteria: False)
    slow = runs()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert any(bool((run[:, prompts.shape[1] :] == EOS).any()) for run in fast)  # some run met EOS
