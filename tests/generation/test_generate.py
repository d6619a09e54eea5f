"""Greedy equality, entry points, stopping, streaming, outputs and errors on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

import hf_globalres
from hf_globalres.custom_generate import REPOSITORY
from hf_globalres.generation import MultiDraftGenerationMixin

from .conftest import EOS, PAD, tiny_llama, tiny_qwen2
from .test_lossless import left_pad

PROMPTS = [[1, 5, 7, 3], [1, 9], [1, 4, 4, 12, 6]]


class ForceTokenAt(LogitsProcessor):
    """Forces ``token`` as the next token of every row whose prefix has ``length`` tokens."""

    def __init__(self, length: int, token: int) -> None:
        self.length, self.token = length, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != self.length:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token] = 0
        return forced


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def batch(prompts=PROMPTS):
    ids, mask = left_pad(prompts, 1)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    "options",
    [
        {"num_drafts": 1, "num_assistant_tokens": 1, "tree_attention": True},
        {"num_drafts": 2, "num_assistant_tokens": 3, "tree_attention": True},
        {"num_drafts": 4, "num_assistant_tokens": 4, "tree_attention": False},
        {"num_drafts": 3, "num_assistant_tokens": 2, "tree_attention": False},
        {"num_drafts": 1, "assistant_top_k": 3},
        {"num_drafts": 4, "assistant_top_k": 1},
        {"num_drafts": 4, "assistant_top_k": 5, "draft_shape": "spine"},
    ],
)
def test_greedy_equals_plain_generate(target, draft, options):
    inputs = batch()
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=20)
    out = hf_globalres.generate(target, **inputs, assistant_model=draft, do_sample=False, max_new_tokens=20, **options)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("n", "tree", "threshold"), [(1, True, 0.5), (2, False, 0.8), (3, True, 1.0)])
def test_greedy_with_confidence_stop_equals_plain_generate(target, draft, n, tree, threshold):
    inputs = batch()
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=20)
    out = hf_globalres.generate(
        target, **inputs, assistant_model=draft, num_drafts=n, num_assistant_tokens=6, tree_attention=tree,
        assistant_confidence_threshold=threshold, do_sample=False, max_new_tokens=20,
    )  # fmt: skip
    assert torch.equal(out, expected)


def test_greedy_equals_plain_generate_qwen2_with_processors(qwen_pair):
    target, draft = qwen_pair
    inputs = batch()
    options = {"do_sample": False, "max_new_tokens": 16, "repetition_penalty": 1.4, "min_new_tokens": 5}
    expected = target.generate(**inputs, **options)
    out = hf_globalres.generate(
        target, **inputs, assistant_model=draft, num_drafts=2, num_assistant_tokens=3, **options
    )
    assert torch.equal(out, expected)


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_perfect_draft_gives_l_plus_one_tokens_per_forward(target, depth):
    inputs = batch(PROMPTS[:1])
    suppress_eos = {"suppress_tokens": [EOS]}
    out = hf_globalres.generate(
        target, **inputs, assistant_model=target, num_drafts=2, num_assistant_tokens=depth, do_sample=True,
        max_new_tokens=13, return_dict_in_generate=True, assistant_confidence_threshold=None, **suppress_eos,
    )  # fmt: skip
    blocks = out.accepted_lengths[0]
    assert blocks[:-1] == [depth + 1] * (len(blocks) - 1)
    assert sum(blocks) == 13
    assert out.target_forwards.tolist() == [-(-13 // (depth + 1))]


@pytest.mark.parametrize(("n", "tree"), [(4, True), (3, False)])
def test_perfect_draft_with_confidence_stop_accepts_every_draft(target, n, tree):
    """The target as its own draft: every verified draft is accepted and each block ends with its bonus token,
    which also checks that the draft cache holds exactly the accepted path after shallow blocks."""
    results = []
    torch.manual_seed(0)
    out = hf_globalres.generate(
        target, **batch(PROMPTS[:2]), assistant_model=target, num_drafts=n, num_assistant_tokens=4, do_sample=True,
        assistant_confidence_threshold=0.09, tree_attention=tree, max_new_tokens=24, suppress_tokens=[EOS],
        return_dict_in_generate=True, verification_callback=lambda *args: results.append(args[-1].accepted),
    )  # fmt: skip
    assert torch.cat(results).all()
    lengths = [length for row in out.accepted_lengths for length in row[:-1]]
    assert min(lengths) < 5 and len(set(lengths)) > 1  # blocks of several depths, some short of L = 4 (+ bonus)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 7])
def test_max_new_tokens_exact(target, draft, max_new_tokens):
    inputs = batch()
    torch.manual_seed(0)
    out = hf_globalres.generate(
        target, **inputs, assistant_model=draft, num_drafts=3, num_assistant_tokens=3, do_sample=True,
        max_new_tokens=max_new_tokens, suppress_tokens=[EOS], return_dict_in_generate=True,
    )  # fmt: skip
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + max_new_tokens
    assert [sum(blocks) for blocks in out.accepted_lengths] == [max_new_tokens] * len(PROMPTS)


@pytest.mark.parametrize("tree", [True, False])
def test_eos_inside_an_accepted_run(target, tree):
    """EOS forced at one length is drafted and accepted mid-block; the row stops there and is padded."""
    inputs = batch()
    width = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([ForceTokenAt(width + 2, EOS)])
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=10, logits_processor=processors)
    out = hf_globalres.generate(
        target, **inputs, assistant_model=target, num_drafts=2, num_assistant_tokens=4, do_sample=False,
        max_new_tokens=10, logits_processor=processors, tree_attention=tree, return_dict_in_generate=True,
        assistant_confidence_threshold=None,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected)
    assert out.sequences.shape[1] == width + 3
    assert (out.sequences[:, width + 2] == EOS).all()
    assert out.accepted_lengths == [[3]] * len(PROMPTS)  # one block: 2 accepted + EOS accepted, truncated there


def test_rows_stop_at_different_blocks(target, draft):
    inputs = batch()
    width = inputs["input_ids"].shape[1]
    torch.manual_seed(3)
    out = hf_globalres.generate(
        target, **inputs, assistant_model=draft, num_drafts=2, num_assistant_tokens=2, do_sample=True,
        max_new_tokens=30, return_dict_in_generate=True,
    )  # fmt: skip
    new = out.sequences[:, width:]
    for row, blocks in enumerate(out.accepted_lengths):
        produced = sum(blocks)
        assert out.target_forwards[row] == len(blocks)
        assert (new[row, produced:] == PAD).all()
        if produced < 30:
            assert new[row, produced - 1] == EOS


def test_stopping_criteria_and_stop_strings(target, draft, tokenizer):
    inputs = batch()
    criteria = [StopAfterToken(7)]
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=25, stopping_criteria=criteria)
    out = hf_globalres.generate(
        target, **inputs, assistant_model=draft, num_drafts=2, do_sample=False, max_new_tokens=25,
        stopping_criteria=criteria,
    )  # fmt: skip
    assert torch.equal(out, expected)
    width = inputs["input_ids"].shape[1]
    greedy = target.generate(**inputs, do_sample=False, max_new_tokens=25)
    stop = tokenizer.decode(greedy[0, width + 2 : width + 4])
    options = {"do_sample": False, "max_new_tokens": 25, "stop_strings": [stop], "tokenizer": tokenizer}
    expected = target.generate(**inputs, **options)
    out = hf_globalres.generate(target, **inputs, assistant_model=draft, num_drafts=2, **options)
    assert torch.equal(out, expected)
    assert (expected[0, width + 4 :] == PAD).all()


def test_streamer_receives_tokens_as_accepted(target, draft):
    inputs = batch(PROMPTS[:1])
    streamer = Recorder()
    torch.manual_seed(0)
    out = hf_globalres.generate(
        target, **inputs, assistant_model=draft, num_drafts=2, num_assistant_tokens=3, do_sample=True,
        max_new_tokens=12, streamer=streamer, return_dict_in_generate=True,
    )  # fmt: skip
    assert streamer.ended
    assert torch.equal(streamer.chunks[0], inputs["input_ids"])
    assert [len(chunk) for chunk in streamer.chunks[1:]] == out.accepted_lengths[0]
    assert torch.equal(torch.cat([c.flatten() for c in streamer.chunks]), out.sequences[0])


def test_return_dict_fields(target, draft):
    inputs = batch()
    out = hf_globalres.generate(
        target, **inputs, assistant_model=draft, num_drafts=2, do_sample=True, max_new_tokens=6,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert isinstance(out, hf_globalres.generation.MultiDraftGenerateOutput)
    assert out.sequences.dtype == torch.long and out.sequences.shape[0] == len(PROMPTS)
    assert out.target_forwards.shape == (len(PROMPTS),) and (out.target_forwards >= 1).all()
    assert len(out.accepted_lengths) == len(PROMPTS) and all(min(b) >= 1 for b in out.accepted_lengths)
    assert set(out.timings) >= {"target_forward", "draft_forward", "verifier", "total"}
    assert set(out.timings) >= {"draft_sampling", "target_probs", "stopping", "cache"}
    assert sum(v for k, v in out.timings.items() if k != "total") <= out.timings["total"]
    assert out.timings["total"] >= out.timings["target_forward"] + out.timings["draft_forward"]


def test_verification_callback_sees_verified_rows(target, draft):
    calls = []

    def callback(depth, q, p, drafts, result):
        calls.append((depth, q.shape, p.shape, drafts.shape, result.token.shape))
        assert torch.allclose(q.sum(-1), torch.ones(q.shape[0], dtype=q.dtype), atol=1e-9)
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-9)
        present = drafts >= 0
        assert present.any(-1).all()
        assert torch.equal(result.accepted, (drafts == result.token[:, None]).any(-1))

    inputs = batch()
    hf_globalres.generate(
        target, **inputs, assistant_model=draft, num_drafts=3, num_assistant_tokens=2, do_sample=True,
        max_new_tokens=8, verification_callback=callback,
    )  # fmt: skip
    assert calls and {c[0] for c in calls} <= {1, 2}
    assert all(c[1][1] == 16 and c[3][1] == 3 for c in calls)
    assert calls[0][1][0] == len(PROMPTS)


@pytest.mark.parametrize(
    "extra", [{}, {"num_assistant_tokens": 4, "assistant_confidence_threshold": 0.09, "draft_shape": "spine"}]
)
def test_entry_points_agree(target, draft, extra):
    inputs = batch()
    options = {"assistant_model": draft, "num_drafts": 3, "num_assistant_tokens": 2, "do_sample": True}
    options.update(max_new_tokens=9, temperature=0.9, **extra)

    def run(fn):
        torch.manual_seed(11)
        return fn()

    reference = run(lambda: hf_globalres.generate(target, **inputs, **options))
    plain = run(lambda: target.generate(**inputs, do_sample=True, max_new_tokens=9))
    hf_globalres.enable(target)
    try:
        assert torch.equal(run(lambda: target.generate(**inputs, **options)), reference)
        # without multi-draft keywords, generate is unchanged
        assert torch.equal(run(lambda: target.generate(**inputs, do_sample=True, max_new_tokens=9)), plain)
    finally:
        hf_globalres.disable(target)
    with pytest.raises(ValueError, match="num_drafts"):
        target.generate(**inputs, **options)
    hf_globalres.enable()
    try:
        assert torch.equal(run(lambda: target.generate(**inputs, **options)), reference)
    finally:
        hf_globalres.disable()
    with pytest.raises(ValueError, match="num_drafts"):
        target.generate(**inputs, **options)

    mixed = type("MixedLlama", (MultiDraftGenerationMixin, LlamaForCausalLM), {})(target.config).eval()
    mixed.load_state_dict(target.state_dict())
    assert torch.equal(run(lambda: mixed.generate(**inputs, **options)), reference)
    assert torch.equal(run(lambda: mixed.generate(**inputs, do_sample=True, max_new_tokens=9)), plain)

    hub_style = run(
        lambda: target.generate(**inputs, custom_generate=str(REPOSITORY), trust_remote_code=True, **options)
    )
    assert torch.equal(hub_style, reference)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_drafts": 0}, "num_drafts"),
        ({"num_drafts": 1.5}, "num_drafts"),
        ({"num_assistant_tokens": 0}, "num_assistant_tokens"),
        ({"tree_attention": "yes"}, "tree_attention"),
        ({"assistant_confidence_threshold": 1.5}, "assistant_confidence_threshold"),
        ({"assistant_confidence_threshold": "high"}, "assistant_confidence_threshold"),
        ({"draft_shape": "bush"}, "draft_shape"),
        ({"assistant_top_k": 0}, "assistant_top_k"),
        ({"assistant_top_k": 2.5}, "assistant_top_k"),
        ({"verifier": "no-such-rule"}, "unknown verifier"),
        ({"verifier": "single", "num_drafts": 2}, "at most 1"),
        ({"assistant_model": None}, "assistant_model"),
        ({"num_beams": 2}, "num_beams"),
        ({"output_scores": True}, "output_scores"),
        ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
        ({"stop_strings": ["ab"]}, "tokenizer"),
        ({"synced_gpus": True}, "synced_gpus"),
    ],
)
def test_bad_arguments(target, draft, options, message):
    kwargs = {"assistant_model": draft, "num_drafts": 2, "do_sample": True, "max_new_tokens": 3, **options}
    with pytest.raises(ValueError, match=message):
        hf_globalres.generate(target, **batch(), **kwargs)


def test_prompt_ids_outside_the_vocabulary_are_refused(target, draft):
    inputs = batch()
    inputs["input_ids"][0, -1] = 99  # the tiny models have 16 embedding rows
    with pytest.raises(ValueError, match="token id 99, outside the embedding rows"):
        hf_globalres.generate(target, **inputs, assistant_model=draft, num_drafts=2, max_new_tokens=3)
    inputs["input_ids"][0, -1] = 3
    inputs["input_ids"][1, 0] = 99  # under the attention mask's padding: never fed, so accepted
    assert inputs["attention_mask"][1, 0] == 0
    hf_globalres.generate(target, **inputs, assistant_model=draft, num_drafts=2, max_new_tokens=3)


class NoFiniteScoreAfter(LogitsProcessor):
    """Every score −inf (or NaN) in ``rows`` once the prefix is ``length`` tokens long: no law to sample there."""

    def __init__(self, length: int, rows: list[int], value: float) -> None:
        self.length, self.rows, self.value = length, rows, value

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] >= self.length:
            scores = scores.clone()
            scores[self.rows] = self.value
        return scores


@pytest.mark.parametrize("verifier", ["optimal", "spectr"])
@pytest.mark.parametrize(("rows", "value"), [([0], float("-inf")), ([1], float("nan")), ([0, 1], float("-inf"))])
def test_scores_with_no_finite_maximum_are_refused(target, draft, verifier, rows, value):
    """The loop checks the laws itself (its verifier skips its input checks) and commits nothing from them.

    The scores turn bad one token after the prompt, in the first block, so no row can finish before.
    """
    torch.manual_seed(0)
    inputs = batch()
    processors = LogitsProcessorList([NoFiniteScoreAfter(inputs["input_ids"].shape[1] + 1, rows, value)])
    with pytest.raises(ValueError, match="no finite maximum"):
        hf_globalres.generate(target, **inputs, assistant_model=draft, num_drafts=3, do_sample=True, max_new_tokens=8,
                              logits_processor=processors, verifier=verifier)  # fmt: skip


def test_empty_prompts_are_refused(target, draft):
    with pytest.raises(ValueError, match="a prompt is empty"):
        hf_globalres.generate(target, torch.zeros(1, 0, dtype=torch.long), assistant_model=draft, max_new_tokens=3)
    inputs = batch()
    inputs["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="a prompt is empty"):
        hf_globalres.generate(target, **inputs, assistant_model=draft, num_drafts=2, max_new_tokens=3)


def test_different_tokenizers_are_refused(target, tokenizer):
    other = tiny_llama(7, layers=1, eos_token_id=5)
    with pytest.raises(ValueError, match="different tokenizers"):
        hf_globalres.generate(target, **batch(), assistant_model=other, num_drafts=2, max_new_tokens=3)
    vocab = dict(tokenizer.get_vocab())
    with pytest.raises(ValueError, match="assistant_tokenizer"):
        hf_globalres.generate(
            target, **batch(), assistant_model=target, num_drafts=2, max_new_tokens=3, tokenizer=tokenizer,
            assistant_tokenizer=_renamed(tokenizer, vocab),
        )  # fmt: skip


def _renamed(tokenizer, vocab):
    class Other:
        def get_vocab(self):
            return {f"x{token}": index for token, index in vocab.items()}

    return Other()


def test_sliding_window_is_refused(target):
    windowed = tiny_qwen2(8, layers=1, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding-window"):
        hf_globalres.generate(windowed, **batch(), assistant_model=target, num_drafts=2, max_new_tokens=3)


@pytest.mark.parametrize(
    "options", [{}, {"draft_shape": "spine"}, {"tree_attention": False, "verifier": "spectr"}, {"do_sample": False}]
)
def test_a_block_creates_tensors_on_the_inputs_device(target, draft, options):
    """With meta as the default device, a tensor made without ``device=`` would land on meta and fail."""
    inputs = batch()
    sampling = {"do_sample": True, **options}
    with torch.device("meta"):
        out = hf_globalres.generate(target, **inputs, assistant_model=draft, num_drafts=3, max_new_tokens=6, **sampling)
    assert out.device.type == "cpu" and out.shape[0] == 3


@pytest.mark.parametrize("keyword", [{"draft_shape": "spine"}, {"assistant_top_k": 5}])
def test_enabled_generate_routes_every_multi_draft_keyword(target, draft, keyword):
    """Each of MULTI_DRAFT_KWARGS alone switches an enabled model.generate to multi-draft decoding."""
    model = tiny_llama(0)
    hf_globalres.enable(model)
    try:
        out = model.generate(
            **batch(), assistant_model=draft, do_sample=True, max_new_tokens=4, return_dict_in_generate=True,
            **keyword,
        )  # fmt: skip
    finally:
        hf_globalres.disable(model)
    assert out.target_forwards is not None and out.accepted_lengths is not None


@pytest.mark.parametrize("verifier", ["optimal", "spectr", "rrs_without_replacement"])
def test_a_seeded_generator_reproduces_a_run_whatever_the_global_rng(target, draft, verifier):
    def run(global_seed, seed):
        torch.manual_seed(global_seed)
        return hf_globalres.generate(
            target, **batch(), assistant_model=draft, num_drafts=3, do_sample=True, max_new_tokens=10,
            verifier=verifier, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    first = run(0, 7)
    assert torch.equal(first, run(1, 7))
    assert not torch.equal(first, run(0, 8))


def test_a_generator_on_another_device_is_refused(target, draft):
    from hf_globalres.verifiers.base import sample_categorical

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to make a generator on another device")
    with pytest.raises(ValueError, match="generator is on"):
        hf_globalres.generate(
            target, **batch(), assistant_model=draft, max_new_tokens=3, generator=torch.Generator(device="cuda")
        )
    with pytest.raises(ValueError, match="generator is on"):
        sample_categorical(torch.ones(2, 3), torch.Generator(device="cuda"))
