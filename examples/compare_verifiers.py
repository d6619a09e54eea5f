"""Compare verification rules on your own prompts: block efficiency, acceptance and its optimum, tokens/s.

    python examples/compare_verifiers.py "Explain quicksort." "Write a haiku about rain."
    python examples/compare_verifiers.py --file prompts.txt --drafts 2,4 --length 4 --max-new-tokens 64

Every rule sees the same prompts and seeds. Acceptance is measured per verified position, next to the
theoretical optimum of any lossless rule on the same positions (``hf_globalres.rates.optimal_acceptance``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hf_globalres import models, verifiers
from hf_globalres.eval import report, runner
from hf_globalres.eval.datasets import Prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompts (or use --file)")
    parser.add_argument("--file", type=Path, help="one prompt per line")
    parser.add_argument("--target", default=models.DEFAULT_TARGET)
    parser.add_argument("--draft", default=models.DEFAULT_DRAFT)
    parser.add_argument("--verifiers", default="all", help=f"comma-separated, from {', '.join(verifiers.available())}")
    parser.add_argument("--drafts", default="4", help="comma-separated n")
    parser.add_argument("--length", type=int, default=4, help="draft tokens per block L")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--output-dir", default="eval/reports")
    args = parser.parse_args()

    texts = list(args.prompts)
    if args.file:
        texts += [line.strip() for line in args.file.read_text().splitlines() if line.strip()]
    if not texts:
        parser.error("give prompts as arguments or with --file")
    prompts = {"custom": [Prompt(uid=f"custom-{i}", dataset="custom", turns=[t]) for i, t in enumerate(texts)]}

    config = runner.EvalConfig(
        target=args.target,
        draft=args.draft,
        methods=["autoregressive", "multidraft"],
        verifiers=args.verifiers.split(","),
        num_drafts=[int(n) for n in args.drafts.split(",")],
        lengths=[args.length],
        temperatures=[args.temperature],
        max_new_tokens=args.max_new_tokens,
        output_dir=args.output_dir,
        run_name="compare-verifiers",
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = runner.run(config, prompts=prompts)
    print(report.format_table(report.summarize(records)))
    print(f"\nrecords in {config.run_dir()} (rerun to resume; delete the folder to start over)")


if __name__ == "__main__":
    main()
