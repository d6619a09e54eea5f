"""Tiny random models for generation tests, built once per session (vocabulary 16, hidden 32)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 16
BOS, EOS, PAD = 1, 2, 0


def _config(vocab: int, layers: int, hidden: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }


def tiny_llama(seed: int, *, vocab: int = VOCAB, layers: int = 2, hidden: int = 32, **overrides) -> LlamaForCausalLM:
    """A random Llama whose logits are spread enough that every token has visible mass."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**_config(vocab, layers, hidden), **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the default init, so q and p differ visibly
        model.lm_head.weight.mul_(8.0)
    return model


def tiny_qwen2(seed: int, *, vocab: int = VOCAB, layers: int = 2, hidden: int = 32, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(**{**_config(vocab, layers, hidden), **overrides})
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def target() -> LlamaForCausalLM:
    return tiny_llama(0)


@pytest.fixture(scope="session")
def draft() -> LlamaForCausalLM:
    return tiny_llama(1, layers=1)


@pytest.fixture(scope="session")
def qwen_pair() -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    return tiny_qwen2(2), tiny_qwen2(3, layers=1)


@pytest.fixture(scope="session")
def tokenizer():
    """A character tokenizer over the 16 ids of the tiny models (tokens: <pad> <s> </s> a b c ... m)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", *[chr(ord("a") + i) for i in range(VOCAB - 3)]]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
