"""Acceptance of a speculative verification rule per draft-tree depth, next to the theoretical optimum."""

import evaluate

from hf_globalres.eval.metrics import acceptance_summary, evaluate_info

_DESCRIPTION = """
One input row per verified position: its tree depth (1 = first draft token), whether a draft was accepted, and
the theoretical optimum for that position, alpha*(p, q, n) = 1 + min_H [q(H) - P(all n drafts in H)]
(`hf_globalres.rates.optimal_acceptance`). Acceptance at depth d = accepted / positions at depth d;
ratio_to_optimal = total accepted / total optimum (1 for an optimal rule, in expectation).
"""

_KWARGS_DESCRIPTION = """
Args:
    depths: tree depth of each verified position (list of int ≥ 1).
    accepted: 1 if a draft was accepted there, else 0 (list of int).
    optimal: theoretical optimum of each position (list of float).
Returns:
    per_depth, rows_per_depth, acceptance, optimal_per_depth, optimal and ratio_to_optimal.
Examples:
    >>> metric = evaluate.load("path/to/acceptance_per_depth")
    >>> metric.compute(depths=[1, 1, 2], accepted=[1, 0, 1], optimal=[0.75, 0.75, 0.5])["per_depth"]
    [0.5, 1.0]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AcceptancePerDepth(evaluate.Metric):
    def _info(self):
        return evaluate_info(_DESCRIPTION, _KWARGS_DESCRIPTION, depths="int64", accepted="int64", optimal="float64")

    def _compute(self, depths, accepted, optimal):
        if any(d < 1 for d in depths):
            raise ValueError("depths start at 1")
        if any(a not in (0, 1) for a in accepted):
            raise ValueError("accepted must hold 0 or 1 per verified position")
        top = max(depths, default=0)
        rows, hits, best = [0] * top, [0] * top, [0.0] * top
        for d, a, o in zip(depths, accepted, optimal, strict=True):
            rows[d - 1] += 1
            hits[d - 1] += a
            best[d - 1] += o
        return acceptance_summary(rows, hits, best)
