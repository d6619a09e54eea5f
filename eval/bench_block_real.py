"""Tokens per block of optimal, optimal_block and the tilted race on two-level trees of the real pair.

    python eval/bench_block_real.py [--prompts 12] [--top 5] [--drafts 4] [--out bench_block_real.json]

Each tree is a node of a GSM8K answer the target samples (T = 1; depths 0, 6 and
11) and its children: q and p from the built-in pair (float32) at the node and
at the child of each of the draft's ``--top`` most likely tokens there. Every p
is truncated to its own top ``--top`` tokens (a draft law like any other,
docs/design.md §8) and every row kept on those tokens plus one column for the
rest of q, the columns a rule sees (``verifiers.base.SupportRows``). Per tree
and draft shape: each rule's exact expected tokens per block with n drafts at the
root (``reference.enumerate_block_tokens``; the tilted race is
``reference.TiltedRace``, docs/design.md §4.8) and the node limit
(``reference.node_limit_lp``). The enumeration runs over ``top^n`` draft tuples,
so ``--top`` stays small. Prints the means per shape and writes every tree's
numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from bench_block import SHAPES, block_tokens  # eval/, beside this script

from hf_globalres import models, reference, verifiers
from hf_globalres.eval.datasets import load_gsm8k

DEPTHS = (0, 6, 11)


class Pair:
    """The built-in target and draft, giving each prefix's (q, p) on the draft's top tokens and the rest of q."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.tokenizer = models.load_tokenizer(models.DEFAULT_TARGET)
        self.target = models.load_model(models.DEFAULT_TARGET, dtype="float32")
        self.draft = models.load_model(models.DEFAULT_DRAFT, dtype="float32")

    @torch.no_grad()
    def laws(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(q, p)`` [top + 1] at the end of ``ids``, and the draft's top tokens the first ``top`` columns are."""
        x = torch.tensor([ids])
        q = torch.softmax(self.target(x).logits[0, -1].double(), -1)
        p = torch.softmax(self.draft(x).logits[0, -1].double(), -1)
        tokens = p.topk(self.top).indices
        kept = p[tokens] / p[tokens].sum()
        rest = (1 - q[tokens].sum()).clamp_min(0)
        return torch.cat([q[tokens], rest[None]]), torch.cat([kept, kept.new_zeros(1)]), tokens.tolist()

    def tree(self, prefix: list[int]) -> reference.TwoLevelTree:
        """The node at ``prefix`` and its children (the rest column's child is never drafted: uniform laws)."""
        q, p, tokens = self.laws(prefix)
        children = [self.laws([*prefix, token])[:2] for token in tokens]
        uniform = torch.full_like(q, 1 / q.shape[0])
        child_q = torch.stack([*(c[0] for c in children), uniform])
        child_p = torch.stack([*(c[1] for c in children), uniform])
        return reference.TwoLevelTree(q, p, child_q, child_p)

    @torch.no_grad()
    def nodes(self, question: str) -> list[list[int]]:
        """Prefixes at :data:`DEPTHS` of one answer the target samples."""
        chat = [{"role": "user", "content": question}]
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        answer = self.target.generate(
            torch.tensor([ids]), do_sample=True, max_new_tokens=max(DEPTHS) + 1, top_k=0, top_p=1.0, temperature=1.0
        )[0].tolist()
        return [answer[: len(ids) + depth] for depth in DEPTHS if len(ids) + depth <= len(answer)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12, help="GSM8K questions (three trees each)")
    parser.add_argument("--top", type=int, default=5, help="draft tokens kept per row")
    parser.add_argument("--drafts", type=int, default=4, help="n at the root")
    parser.add_argument("--tilt", type=float, default=1000.0, help="θ of the tilted race")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_block_real.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    pair = Pair(args.top)
    rules = {
        shape: {
            "optimal": verifiers.get("optimal"),
            "optimal_block": verifiers.get("optimal_block", draft_shape=shape),
            "tilted race": reference.TiltedRace(args.tilt, shape),
        }
        for shape in SHAPES
    }
    records = []
    for prompt in load_gsm8k(limit=args.prompts):
        for depth, prefix in zip(DEPTHS, pair.nodes(prompt.turns[0]), strict=False):
            tree = pair.tree(prefix)
            row = {shape: block_tokens(rules[shape], tree, args.drafts, shape, tree_limit=False) for shape in SHAPES}
            records.append({"prompt": prompt.uid, "depth": depth, "tokens_per_block": row})
            print(json.dumps({shape: {k: round(v, 5) for k, v in r.items()} for shape, r in row.items()}), flush=True)
    for shape in SHAPES:
        names = records[0]["tokens_per_block"][shape]
        means = {name: statistics.fmean(r["tokens_per_block"][shape][name] for r in records) for name in names}
        print(f"{shape} ({len(records)} trees): " + ", ".join(f"{name} {value:.5f}" for name, value in means.items()))
    summary = {"description": __doc__.splitlines()[0], **vars(args), "trees": records}
    with open(args.out, "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
