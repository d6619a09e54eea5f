"""Losslessness of the whole decoding loop on tiny random models.

For each case, 20,000 continuations of 3 new tokens are sampled in one batch
and compared with the exact law of plain sampling from the target (enumerated
over all V³ = 4096 outcomes, EOS absorbing) by Pearson's chi-square test.
Seeds are fixed, so each case is deterministic; a case fails when its p-value
is below ``LEVEL`` = 1e-4. ``test_detects_wrong_draft_law`` shows the same
test rejects a loop whose drafts do not follow the p given to the verifier.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import hf_globalres
from hf_globalres import devices, verifiers
from hf_globalres.generation import drafting
from hf_globalres.verifiers._selection import FittedVerifier

from .conftest import EOS, PAD, tiny_llama
from .law import NEW_TOKENS, chi_square, exact_law, pvalue

LEVEL = 1e-4
SAMPLES = 20_000
PROMPTS = [[1, 5, 7, 3], [1, 9], [1, 4, 4, 12, 6], [1, 11, 3]]
SAMPLINGS = [
    {},
    {"temperature": 0.7, "top_k": 8},
    {"temperature": 1.3, "top_p": 0.85},
    {"repetition_penalty": 1.5, "min_p": 0.05},
]


#: Confidence-stopped and spine-shaped drafts (τ near the median draft confidence under each sampling,
#: so that branches both stop and go on): (verifier, n, L, tree, batch of 4, sampling, τ, shape, top-k).
CONFIDENCE_CASES = [
    ("optimal", 4, 3, True, True, {}, 0.09, "tree", None),
    ("spectr", 2, 3, False, False, {"temperature": 0.7, "top_k": 8}, 0.2, "tree", None),
    ("rrs_without_replacement", 4, 3, True, False, {"top_k": 3}, 0.35, "tree", None),
    ("single", 1, 3, True, True, {"temperature": 1.3, "top_p": 0.85}, 0.07, "tree", None),
    ("optimal", 4, 3, True, False, {"top_k": 4}, None, "spine", None),
    ("spectr", 3, 3, False, True, {}, 0.09, "spine", None),
    ("rrs", 4, 3, True, False, {"temperature": 0.7, "top_k": 8}, 0.2, "spine", None),
    ("optimal_block", 4, 3, True, True, {}, None, "spine", None),
    ("optimal_block", 3, 3, False, False, {"repetition_penalty": 1.5, "min_p": 0.05}, 0.09, "spine", None),
]

#: Drafts from p truncated to its top-k tokens (``assistant_top_k``, the last entry; 1: greedy drafts).
TRUNCATION_CASES = [
    ("optimal", 4, 3, True, True, {}, None, "tree", 3),
    ("optimal", 4, 3, True, False, {"temperature": 0.7, "top_k": 8}, 0.09, "spine", 5),
    ("spectr", 2, 2, False, True, {"temperature": 1.3, "top_p": 0.85}, None, "tree", 1),
    ("single", 1, 3, True, False, {"repetition_penalty": 1.5, "min_p": 0.05}, None, "tree", 4),
    ("rrs_without_replacement", 4, 2, True, True, {}, None, "tree", 2),
    ("khisti", 3, 2, True, False, {}, None, "tree", 6),
]


def _cases() -> list[tuple]:
    """A covering design over verifiers, n, L, layout, batch and sampling, plus the confidence and truncation cases.

    Rules fitted row by row (:class:`FittedVerifier`: the paper reproductions)
    cost seconds per thousand rows, so they get one case each (n = 2, L = 3);
    their token-level exactness is enumerated in ``tests/verifiers``.
    """
    cases = []
    counter = itertools.count()
    for name in verifiers.available():
        rule = verifiers.get(name)
        fitted = isinstance(rule, FittedVerifier)
        for n in (2,) if fitted else (1, 2, 4):
            if rule.max_drafts is not None and n > rule.max_drafts:
                continue
            for depth in (3,) if fitted else (1, 3):
                i = next(counter)
                cases.append(
                    (name, n, depth, i % 2 == 0, (i // 2) % 2 == 0, SAMPLINGS[i % len(SAMPLINGS)], None, "tree", None)
                )
    return cases + CONFIDENCE_CASES + TRUNCATION_CASES


def left_pad(prompts: list[list[int]], repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(prompts)·repeats, T] ids and mask, prompt ``i`` in rows ``i·repeats .. (i + 1)·repeats − 1``."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)


def sample_continuations(target, draft, prompts, seed=0, **kwargs) -> torch.Tensor:
    """[len(prompts)·(SAMPLES / len(prompts)), 3] first new tokens (PAD after EOS)."""
    ids, mask = left_pad(prompts, SAMPLES // len(prompts))
    torch.manual_seed(seed)
    out = hf_globalres.generate(
        target, ids, attention_mask=mask, assistant_model=draft, do_sample=True, max_new_tokens=NEW_TOKENS, **kwargs
    )
    new = out[:, ids.shape[1] :]
    return torch.nn.functional.pad(new, (0, NEW_TOKENS - new.shape[1]), value=PAD)


def lossless_pvalue(target, draft, prompts, sampling, **kwargs) -> float:
    samples = sample_continuations(target, draft, prompts, **sampling, **kwargs)
    per_prompt = samples.shape[0] // len(prompts)
    parts = [
        chi_square(exact_law(target, prompt, sampling, EOS, PAD), samples[i * per_prompt : (i + 1) * per_prompt])
        for i, prompt in enumerate(prompts)
    ]
    return pvalue(parts)


@pytest.mark.parametrize(
    ("verifier", "n", "depth", "tree", "batch4", "sampling", "threshold", "shape", "top_k"), _cases()
)
def test_lossless(target, draft, verifier, n, depth, tree, batch4, sampling, threshold, shape, top_k):
    prompts = PROMPTS if batch4 else PROMPTS[:1]
    p = lossless_pvalue(
        target,
        draft,
        prompts,
        sampling,
        verifier=verifier,
        num_drafts=n,
        num_assistant_tokens=depth,
        tree_attention=tree,
        assistant_confidence_threshold=threshold,
        draft_shape=shape,
        assistant_top_k=top_k,
    )
    assert p > LEVEL, f"output law differs from the target's (chi-square p = {p:.2e})"


@pytest.mark.parametrize("draft_vocab", [12, 20])
def test_lossless_with_different_logit_widths(target, draft_vocab):
    """A draft whose embedding matrix is narrower or padded wider still gives the target's law."""
    narrow = tiny_llama(5, vocab=draft_vocab, layers=1)
    p = lossless_pvalue(target, narrow, PROMPTS[:2], {"temperature": 0.8}, verifier="spectr", num_drafts=4)
    assert p > LEVEL


def test_lossless_qwen2(qwen_pair):
    target, draft = qwen_pair
    p = lossless_pvalue(target, draft, PROMPTS[1:3], {"top_k": 6}, verifier="rrs", num_drafts=3, num_assistant_tokens=2)
    assert p > LEVEL


def test_lossless_with_int8_draft(target):
    """An int8 draft (devices.quantize_int8) drafts from another law; the output keeps the target's."""
    quantized = tiny_llama(1, layers=1)
    devices.quantize_int8(quantized)
    p = lossless_pvalue(
        target, quantized, PROMPTS, {"temperature": 0.8}, verifier="optimal", num_drafts=4, assistant_top_k=6,
        draft_shape="spine",
    )  # fmt: skip
    assert p > LEVEL


@pytest.mark.skipif(not devices.onednn_linear_available(), reason="this torch build has no oneDNN")
def test_lossless_with_packed_onednn_linears():
    """Target and draft with packed oneDNN weights (devices.PackedLinear): the output law is the packed target's."""
    target, draft = tiny_llama(0), tiny_llama(1, layers=1)
    devices.use_onednn_linear(target, pack_rows=devices.PACK_ROWS)
    devices.use_onednn_linear(draft, pack_rows=4)
    p = lossless_pvalue(
        target, draft, PROMPTS, {"temperature": 0.8}, verifier="optimal", num_drafts=4, num_assistant_tokens=3
    )
    assert p > LEVEL


def test_lossless_in_bfloat16():
    """bf16 models: q and p are float64 softmaxes of the bf16 logits, so the rules stay exact for the model as run."""
    target, draft = tiny_llama(0).to(torch.bfloat16), tiny_llama(1, layers=1).to(torch.bfloat16)
    p = lossless_pvalue(target, draft, PROMPTS, {}, verifier="optimal", num_drafts=4, num_assistant_tokens=3)
    assert p > LEVEL


def test_detects_wrong_draft_law(target, draft, monkeypatch):
    """Drafts drawn from p² (renormalised) while the verifier is told p: the test must reject."""
    honest = drafting.sample_categorical

    def distorted(probs, generator=None, draws=None):
        return honest(probs**2, generator, draws)

    monkeypatch.setattr(drafting, "sample_categorical", distorted)
    p = lossless_pvalue(target, draft, PROMPTS[:1], {}, verifier="spectr", num_drafts=2, num_assistant_tokens=3)
    assert p < LEVEL, f"a wrong draft law went undetected (p = {p:.2e})"


def test_lossless_without_replacement_beyond_support(target, draft):
    """top_k = 3 < n = 4: sampling without replacement runs out of support and branches die."""
    p = lossless_pvalue(
        target,
        draft,
        PROMPTS[:2],
        {"top_k": 3},
        verifier="rrs_without_replacement",
        num_drafts=4,
        num_assistant_tokens=3,
    )
    assert p > LEVEL
