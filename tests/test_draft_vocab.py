"""The draft's LM head over part of the vocabulary (hf_globalres/draft_vocab.py)."""

from __future__ import annotations

import pytest
import torch

import hf_globalres
from hf_globalres import devices, draft_vocab

from .generation.conftest import EOS, VOCAB, tiny_llama
from .generation.test_generate import batch
from .generation.test_lossless import LEVEL, PROMPTS, lossless_pvalue


def test_restricted_head_keeps_the_logits_of_kept_tokens_and_rules_out_the_rest():
    model = tiny_llama(3, layers=1)
    ids = torch.tensor([[1, 5, 7, 3, 9]])
    full = model(ids).logits
    assert draft_vocab.restrict_vocabulary(model, [9, 4, 11, 6, 12], size=3) == 4  # 9, 4, 11 and EOS
    restricted = model(ids).logits
    kept = torch.tensor([EOS, 4, 9, 11])
    assert torch.equal(model.get_output_embeddings().token_ids, kept)
    torch.testing.assert_close(restricted[..., kept], full[..., kept], rtol=0, atol=1e-6)
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[kept] = False
    assert torch.isneginf(restricted[..., others]).all()
    probs = torch.softmax(restricted, -1)
    assert torch.allclose(probs[..., kept], torch.softmax(full[..., kept], -1), atol=1e-6)


def test_restrict_vocabulary_refuses_bad_input():
    model = tiny_llama(3, layers=1)
    with pytest.raises(ValueError, match="integer ≥ 1"):
        draft_vocab.restrict_vocabulary(model, [1, 2], size=0)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        draft_vocab.restrict_vocabulary(model, [3, VOCAB], size=2)
    devices.quantize_int8(model)
    with pytest.raises(ValueError, match="before quantize_int8"):
        draft_vocab.restrict_vocabulary(model, [3, 4], size=2)


def test_quantizing_a_restricted_draft_quantizes_the_smaller_head():
    model = tiny_llama(3, layers=1)
    draft_vocab.restrict_vocabulary(model, list(range(VOCAB)), size=6)
    devices.quantize_int8(model)
    head = model.get_output_embeddings()
    assert isinstance(head.head, devices.Int8Linear) and head.head.out_features == 6  # ids 0–5, EOS among them
    assert torch.isneginf(model(torch.tensor([[1, 5]])).logits[..., 6:]).all()


def test_frequent_tokens_rank_by_summed_draft_probability():
    model = tiny_llama(3, layers=1)
    texts = [torch.tensor([1, 5, 7, 3, 9, 4]), torch.tensor([1, 12, 6])]
    ranked = draft_vocab.frequent_tokens(model, texts, chunk=4)
    with torch.no_grad():
        tally = sum(
            torch.softmax(model(ids[None, s : s + 4]).logits[0], -1, dtype=torch.float64).sum(0)
            for ids in texts
            for s in range(0, len(ids), 4)
        )
    assert sorted(ranked.tolist()) == list(range(VOCAB))
    assert (tally[ranked][:-1] >= tally[ranked][1:]).all() and tally[ranked[0]] == tally.max()
    with pytest.raises(ValueError, match="calibration text"):
        draft_vocab.frequent_tokens(model, [])


def test_lossless_with_a_restricted_draft_head():
    """Drafts that can never propose most tokens (and, at batch > 1, rows whose target wants them): the law holds."""
    restricted = tiny_llama(1, layers=1)
    draft_vocab.restrict_vocabulary(restricted, [5, 9, 3, 12, 7, 1], size=5)
    devices.quantize_int8(restricted)
    p = lossless_pvalue(
        tiny_llama(0), restricted, PROMPTS, {"temperature": 0.8}, verifier="optimal", num_drafts=4, assistant_top_k=6
    )
    assert p > LEVEL


def test_greedy_with_a_restricted_draft_head_equals_plain_generate():
    restricted = tiny_llama(1, layers=1)
    draft_vocab.restrict_vocabulary(restricted, [5, 9, 3, 12], size=4)
    target, inputs = tiny_llama(0), batch()
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=20)
    out = hf_globalres.generate(target, **inputs, assistant_model=restricted, num_drafts=3, do_sample=False,
                                max_new_tokens=20)  # fmt: skip
    assert torch.equal(out, expected)
