"""Rank a draft's vocabulary for ``draft_vocab.restrict_vocabulary`` and write the ranking the package ships.

The ranking is :func:`hf_globalres.draft_vocab.frequent_tokens` (the draft's
summed next-token probability) over calibration text that no benchmark of the
eval suite uses: Python's own documentation (``pydoc_data.topics``, English
prose with code and numbers), this repository's docs and a few standard-library
modules. GSM8K and MT-Bench stay out, so their measurements are not tuned to
them; each generate call adds its prompt's tokens to the kept set anyway
(``draft_vocab.prompt_vocabulary``).

    python eval/calibrate_draft_vocab.py                       # the built-in draft, ~50k tokens
    python eval/calibrate_draft_vocab.py --tokens 2000 --keep 4096 --output /tmp/ranking.txt

The output is a text file: ``#`` comment lines saying what was ranked and how,
then the ``--keep`` most expected token ids, most expected first, one per line.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from hf_globalres import draft_vocab, models

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/design.md", "eval/README.md")
STDLIB_MODULES = ("argparse", "dataclasses", "fractions", "statistics", "textwrap", "json.decoder")


def calibration_kinds() -> list[list[tuple[str, str]]]:
    """(source, text) pairs of three kinds: Python's topic help, the repository's docs, stdlib sources."""
    import pydoc_data.topics

    topics = [(f"pydoc_data.topics[{key}]", pydoc_data.topics.topics[key]) for key in sorted(pydoc_data.topics.topics)]
    docs = [(name, (REPO / name).read_text()) for name in DOCS if (REPO / name).exists()]
    code = [(name, inspect.getsource(importlib.import_module(name))) for name in STDLIB_MODULES]
    return [topics, docs, code]


def windows(tokenizer, texts: list[tuple[str, str]], size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(source, ids) windows of at most ``size`` tokens, text after text."""
    for source, text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        for start in range(0, len(ids) - 1, size):
            yield source, ids[start : start + size]


def calibration_windows(tokenizer, budget: int, size: int = 512) -> tuple[list[torch.Tensor], list[str]]:
    """Windows of the three kinds taken in turns, so each gives about a third of the ``budget`` tokens;
    and the sources they came from."""
    streams = [windows(tokenizer, texts, size) for texts in calibration_kinds()]
    pieces: list[torch.Tensor] = []
    used: list[str] = []
    for turn in itertools.zip_longest(*streams):
        for source, ids in filter(None, turn):
            left = budget - sum(map(len, pieces))
            if left < 2:
                return pieces, used
            pieces.append(ids[:left])
            used += [] if source in used else [source]
    return pieces, used


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default=models.DEFAULT_DRAFT, help="built-in name, local directory or Hub id")
    parser.add_argument("--tokens", type=int, default=50_000, help="calibration tokens in all")
    parser.add_argument("--keep", type=int, default=draft_vocab.BUILTIN_RANKING_SIZE, help="ids written")
    parser.add_argument("--output", type=Path, default=None, help="default: the ranking the package ships")
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.keep < 1:
        parser.error(f"--tokens must be ≥ 2 and --keep ≥ 1, got {args.tokens} and {args.keep}")
    model = models.load_model(args.draft, dtype=torch.float32).eval()
    tokenizer = models.load_tokenizer(args.draft)
    pieces, used = calibration_windows(tokenizer, args.tokens)
    start = time.perf_counter()
    ranked = draft_vocab.frequent_tokens(model, pieces)
    seconds = time.perf_counter() - start
    output = args.output or draft_vocab.builtin_ranking_path(args.draft)
    header = {
        "draft": str(args.draft),
        "vocab_size": len(ranked),
        "calibration_tokens": sum(map(len, pieces)),
        "sources": used,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "script": "eval/calibrate_draft_vocab.py",
    }
    lines = ["# " + json.dumps(header)] + [str(i) for i in ranked[: args.keep].tolist()]
    output.write_text("\n".join(lines) + "\n")
    print(f"ranked {len(ranked)} ids over {header['calibration_tokens']} tokens in {seconds:.0f} s; "
          f"wrote the first {args.keep} to {output}")  # fmt: skip


if __name__ == "__main__":
    main()
