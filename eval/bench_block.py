"""Tokens per block of each rule on tiny two-level draft trees, against the limits of any lossless rule.

    python eval/bench_block.py [--trees 6] [--out bench_block.json]

Each tree: a root with laws q, p and one child per token with its own laws
(softmax of random logits, temperature ``--spread``), n i.i.d. drafts at the
root, one draft per branch below (L = 2, docs/design.md §4.7), drafted in both
shapes: every branch goes on ("tree"), or only the branches of the token most
root drafts show ("spine", ties to the first). Per rule (in the rule's form for
the shape, ``Verifier.for_shape``), the exact expected tokens per block
(``reference.enumerate_block_tokens``; ``single`` drafts one branch), and
``tilted race``: ``optimal_block`` with the clocks of the most-drawn tokens sped
up ``--tilt`` times (``reference.TiltedRace``, docs/design.md §4.8). Limits:
``node limit``, the best root coupling when every child then runs ``optimal``
and the value of each acceptance is known to the root
(``reference.node_limit_lp``; no rule at the root may know it, so this bounds
every node-wise rule from above); in the tree shape ``tree limit``, the best
coupling of the whole tree with the output pair (``reference.block_limit_lp``),
which may look below the root. Prints a table per shape and (V, n) and writes
every tree's numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from hf_globalres import reference, verifiers

SETTINGS = [(3, 2), (3, 3), (4, 2), (4, 3)]
RULES = ["single", "spectr", "khisti", "optimal", "optimal_block"]
SHAPES = ["tree", "spine"]


def block_tokens(
    rules: dict[str, verifiers.Verifier],
    tree: reference.TwoLevelTree,
    drafts: int,
    shape: str,
    tree_limit: bool = True,
) -> dict[str, float]:
    """Each rule's exact tokens per block on ``tree`` drafted in ``shape``, then the limits.

    ``tree_limit=False`` leaves out the whole-tree LP (its size grows as ``V^{2n}``).
    """
    tokens = {
        name: reference.enumerate_block_tokens(rule, tree, 1 if name == "single" else drafts, shape)
        for name, rule in rules.items()
    }
    tokens["node limit"] = reference.node_limit_lp(tree, drafts, shape)
    if shape == "tree" and tree_limit:
        tokens["tree limit"] = reference.block_limit_lp(tree, drafts)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=6, help="random trees per (V, n)")
    parser.add_argument("--spread", type=float, default=1.5, help="logit scale of the random laws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tilt", type=float, default=1000.0, help="θ of the tilted race (1: optimal_block)")
    parser.add_argument("--out", default="bench_block.json")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    trees = {setting: [reference.TwoLevelTree.random(setting[0], args.spread, generator) for _ in range(args.trees)]
             for setting in SETTINGS}  # fmt: skip
    records = []
    for shape in SHAPES:
        rules = {name: verifiers.get(name).for_shape(shape) for name in RULES}
        rules["tilted race"] = reference.TiltedRace(args.tilt, shape)
        limits = ["node limit", "tree limit"] if shape == "tree" else ["node limit"]
        print(f"{shape}:\n{'V':>2} {'n':>2} " + " ".join(f"{name:>13s}" for name in [*rules, *limits]))
        for (vocab, drafts), settings_trees in trees.items():
            rows = [block_tokens(rules, tree, drafts, shape) for tree in settings_trees]
            records += [{"shape": shape, "vocab": vocab, "num_drafts": drafts, "tokens_per_block": r} for r in rows]
            means = {name: statistics.fmean(row[name] for row in rows) for name in rows[0]}
            print(f"{vocab:>2} {drafts:>2} " + " ".join(f"{means[name]:13.5f}" for name in means))
    with open(args.out, "w") as handle:
        summary = {"description": __doc__.splitlines()[0], "spread": args.spread, "tilt": args.tilt, "trees": records}
        json.dump(summary, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
