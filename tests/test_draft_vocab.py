"""The draft's LM head over part of the vocabulary (hf_globalres/draft_vocab.py)."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("tied", [False, True])
def test_prompt_tokens_are_scored_while_the_prompt_vocabulary_is_open(tied):
    model = tiny_llama(3, layers=1, tie_word_embeddings=tied)
    ids = torch.tensor([[1, 5, 7, 3, 9]])
    full = model(ids).logits
    draft_vocab.restrict_vocabulary(model, [9, 4], size=2)
    head = model.get_output_embeddings()
    assert (head.rows is model.get_input_embeddings()) == tied  # tied: the embedding's rows, no copy
    with draft_vocab.prompt_vocabulary(model, torch.tensor([[0, 7, 5], [0, 0, 9]])):
        assert torch.equal(head.prompt_ids[head.prompt_mask], torch.tensor([0, 5, 7]))  # 9 is kept already
        assert len(head.prompt_ids) == 6  # one column per prompt position: a shape the host knows
        inside = model(ids).logits
    scored = torch.tensor([0, EOS, 4, 5, 7, 9])
    torch.testing.assert_close(inside[..., scored], full[..., scored], rtol=0, atol=1e-5)
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[scored] = False
    assert torch.isneginf(inside[..., others]).all()
    assert head.prompt_ids is None and torch.isneginf(model(ids).logits[..., [0, 5, 7]]).all()  # closed again


def test_generate_drafts_from_the_kept_tokens_and_the_prompt():
    restricted = tiny_llama(1, layers=1)
    draft_vocab.restrict_vocabulary(restricted, [9, 4], size=2)
    supports = []
    prompts = torch.tensor([[1, 5, 7, 3], [0, 1, 11, 3]])
    hf_globalres.generate(
        tiny_llama(0), prompts, attention_mask=(prompts > 0).long(), assistant_model=restricted, num_drafts=2,
        do_sample=True, max_new_tokens=6, block_callback=lambda tree: supports.append(tree.draft_probs[0] > 0),
    )  # fmt: skip
    seen = torch.stack([s.any(dim=(0, 1)) for s in supports]).any(0).nonzero()[:, 0].tolist()
    assert seen == sorted({4, 9, EOS} | {0, 1, 3, 5, 7, 11})  # S and both prompts' tokens (0 pads), no other
    assert restricted.get_output_embeddings().prompt_ids is None


def test_lossless_with_a_restricted_draft_head():
    """Drafts that can never propose most tokens (and, at batch > 1, rows whose target wants them): the law holds.

    S is {3, 5, 7, 9, 12, EOS} and each call adds its prompt's tokens (1, 4, 6, 11 among them)."""
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


def test_load_ranking_reads_files_and_names_the_shipped_rankings(tmp_path):
    ranking = tmp_path / "ranking.txt"
    ranking.write_text('# {"draft": "x"}\n7\n3\n\n9\n')
    assert draft_vocab.load_ranking(ranking).tolist() == [7, 3, 9]
    with pytest.raises(ValueError, match=r"no draft vocabulary ranking for 'my-draft'.*qwen2.5-coder-0.5b-instruct"):
        draft_vocab.load_ranking("my-draft")


def test_the_shipped_ranking_is_a_ranking_of_the_draft_vocabulary():
    path = draft_vocab.builtin_ranking_path("qwen2.5-coder-0.5b-instruct")
    header = json.loads(path.read_text().splitlines()[0].removeprefix("# "))
    ranked = draft_vocab.load_ranking("qwen2.5-coder-0.5b-instruct")
    assert len(ranked) == draft_vocab.BUILTIN_RANKING_SIZE == len(ranked.unique())
    assert 0 <= int(ranked.min()) and int(ranked.max()) < header["vocab_size"] == 151_936
    assert header["calibration_tokens"] >= 40_000 and header["script"] == "eval/calibrate_draft_vocab.py"
