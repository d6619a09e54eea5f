"""Acceptance, failure rate and time of `optimal` and the fitted verifiers at the paper's Table 1 settings.

    python eval/bench_fitted.py [--vocab 151936] [--rows 5] [--out bench_fitted.json]

Rows: q, p = softmax of correlated random logits (target logits z·3, draft
logits z·3 + N(0, 1)), drafts restricted to the top-k draft tokens, one row
verified at a time (B = 1) on CPU with one thread. Acceptance is each rule's
exact ``Σ a`` (``last_stats.acceptance``; for `optimal`, ``Optimal.acceptance``)
next to ``rates.optimal_acceptance``; "failed" rows fell back
(``global_resolution``: SpecTr; `optimal` has no fallback). One untimed call
per method and setting comes first. Thomas & Pal report
for Global Resolution (ms per token [success]): (10,2) 5.3 [98%], (10,4) 40
[97%], (10,5) 71 [96%], (100,2) 24 [38%], (1000,2) 35 [31%] at τ = 1e−3.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from hf_globalres import rates, verifiers

SETTINGS = [(10, 2), (10, 4), (10, 5), (100, 2), (1000, 2)]
METHODS = ["optimal", "global_resolution", "khisti", "optimal_without_replacement"]


def correlated_row(vocab: int, top_k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [1, V], p [1, V]) float64; p keeps its top_k tokens."""
    logits = torch.randn(1, vocab, generator=generator, dtype=torch.float64) * 3
    draft = logits + torch.randn(1, vocab, generator=generator, dtype=torch.float64)
    cut = draft.topk(top_k, -1).values[:, -1:]
    return torch.softmax(logits, -1), torch.softmax(torch.where(draft >= cut, draft, -math.inf), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--tau", type=float, default=1e-3)
    parser.add_argument("--out", default="bench_fitted.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    results = []
    header = ("method", "k", "n", "accept", "optimum", "rel gap", "failed", "ms/tok")
    print(f"{header[0]:28s} " + " ".join(f"{h:>8s}" for h in header[1:]))
    for top_k, drafts in SETTINGS:
        cases = [correlated_row(args.vocab, top_k, generator) for _ in range(args.rows)]
        for name in METHODS:
            rule = verifiers.get(name) if name == "optimal" else verifiers.get(name, tau=args.tau)
            replacement = rule.draft_scheme == "iid"
            accepted, optimum, failed, seconds = [], [], 0, 0.0
            q, p = cases[0]
            rule.verify(q, p, torch.multinomial(p, drafts, replacement=replacement, generator=generator))
            for q, p in cases:
                x = torch.multinomial(p, drafts, replacement=replacement, generator=generator)
                start = time.perf_counter()
                rule.verify(q, p, x, generator=generator)
                seconds += time.perf_counter() - start
                if name == "optimal":
                    accepted.append(float(rule.acceptance(q, p, drafts)[0][0]))
                else:
                    accepted.append(float(rule.last_stats.acceptance[0]))
                    failed += rule.last_stats.failures
                optimum.append(float(rates.optimal_acceptance(q, p, drafts, rule.draft_scheme)[0]))
            mean_acc, mean_opt = sum(accepted) / len(cases), sum(optimum) / len(cases)
            row = {
                "method": name,
                "top_k": top_k,
                "drafts": drafts,
                "acceptance": mean_acc,
                "optimum": mean_opt,
                "relative_gap": (mean_opt - mean_acc) / mean_opt if not math.isnan(mean_acc) else math.nan,
                "failure_rate": failed / len(cases),
                "ms_per_token": 1e3 * seconds / len(cases),
                "vocab": args.vocab,
                "device": "cpu",
            }
            results.append(row)
            print(
                f"{name:28s} {top_k:8d} {drafts:8d} {mean_acc:8.4f} {mean_opt:8.4f} {row['relative_gap']:8.1e} "
                f"{row['failure_rate']:8.0%} {row['ms_per_token']:8.1f}",
                flush=True,
            )
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
