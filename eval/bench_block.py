"""Tokens per block of each rule on tiny two-level draft trees, against the limits of any lossless rule.

    python eval/bench_block.py [--trees 6] [--out bench_block.json]

Each tree: a root with laws q, p and one child per token with its own laws
(softmax of random logits, temperature ``--spread``), n i.i.d. drafts at the
root, one draft per branch below (L = 2, docs/design.md §4.7). Per rule, the
exact expected tokens per block (``reference.enumerate_block_tokens``; ``single``
drafts one branch). Two limits: ``node limit``, the best root coupling when
every child then runs ``optimal`` and the value of accepting y with m drafts,
``1 + α*(q_y, p_y, m)``, is known to the root (the transport LP with that gain;
no rule at the root may know it, so this bounds every node-wise rule from
above); ``tree limit``, the best coupling of the whole tree with the output
pair (``reference.block_limit_lp``), which may look below the root. Prints a
table per (V, n) and writes every tree's numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from hf_globalres import rates, reference, verifiers

SETTINGS = [(3, 2), (3, 3), (4, 2), (4, 3)]
RULES = ["single", "spectr", "khisti", "optimal", "optimal_block"]


def node_limit(tree: reference.TwoLevelTree, n: int) -> float:
    """The root's best coupling when accepting y with m drafts is worth ``1 + α*(q_y, p_y, m)`` (plus the token)."""

    def gain(token: int, times: int) -> float:
        below = rates.optimal_acceptance(tree.child_q[token : token + 1], tree.child_p[token : token + 1], times)
        return 1.0 + float(below)

    # The tokens every block emits (1) plus the root's accepted token and what its child then accepts.
    return 1.0 + reference.transport_lp(tree.q, tree.p, n, gain=gain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=6, help="random trees per (V, n)")
    parser.add_argument("--spread", type=float, default=1.5, help="logit scale of the random laws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_block.json")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    rules = {name: verifiers.get(name) for name in RULES}
    records = []
    print(f"{'V':>2} {'n':>2} " + " ".join(f"{name:>13s}" for name in [*RULES, "node limit", "tree limit"]))
    for vocab, drafts in SETTINGS:
        rows = []
        for _ in range(args.trees):
            tree = reference.TwoLevelTree.random(vocab, args.spread, generator)
            tokens = {
                name: reference.enumerate_block_tokens(rule, tree, 1 if name == "single" else drafts)
                for name, rule in rules.items()
            }
            tokens["node limit"] = node_limit(tree, drafts)
            tokens["tree limit"] = reference.block_limit_lp(tree, drafts)
            rows.append(tokens)
            records.append({"vocab": vocab, "num_drafts": drafts, "tokens_per_block": tokens})
        means = {name: statistics.fmean(row[name] for row in rows) for name in rows[0]}
        print(f"{vocab:>2} {drafts:>2} " + " ".join(f"{means[name]:13.5f}" for name in means))
    with open(args.out, "w") as handle:
        json.dump({"description": __doc__.splitlines()[0], "spread": args.spread, "trees": records}, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
