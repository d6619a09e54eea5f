"""Tiny random models with a character tokenizer and a chat template, saved once per session."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

CHARS = string.digits + string.ascii_lowercase + " .,?#:+-*/=\n"
SPECIAL = ["<pad>", "<s>", "</s>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<user>' if m['role'] == 'user' else '<assistant>' }}{{ m['content'] | lower }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(seed: int, layers: int, vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the default init, so q and p differ visibly
        model.lm_head.weight.mul_(6.0)
    return model


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Target (2 layers) and draft (1 layer) saved with the tokenizer, loadable by directory."""
    root = tmp_path_factory.mktemp("tiny_pair")
    tokenizer = tiny_tokenizer()
    dirs = []
    for name, seed, layers in (("target", 0, 2), ("draft", 1, 1)):
        model = tiny_model(seed, layers, len(tokenizer))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1]


@pytest.fixture
def data_files(tmp_path) -> dict[str, Path]:
    """A 3-question GSM8K jsonl and a 2-question MT-Bench jsonl in the FastChat format."""
    gsm8k = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": "what is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "what is 10 * 12?", "answer": "10 * 12 = 120\n#### 120"},
        {"question": "what is 1,000 + 1?", "answer": "it is 1,001\n#### 1,001"},
    ]
    gsm8k.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mtbench = tmp_path / "question.jsonl"
    questions = [
        {"question_id": 81, "category": "writing", "turns": ["write a poem.", "make it shorter."]},
        {"question_id": 101, "category": "math", "turns": ["what is 3 * 3?", "and 4 * 4?"]},
    ]
    mtbench.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"gsm8k": gsm8k, "mtbench": mtbench}
