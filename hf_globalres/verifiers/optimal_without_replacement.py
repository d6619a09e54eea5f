"""Optimal transport for drafts drawn without replacement.

Drafts ``x_1..x_k`` are sequential draws from p with earlier tokens removed
(``k ≤ |supp p|``, all distinct). The optimum over all lossless rules is

    α*_wor = 1 + min_H [ q(H) − P(all k drafts ∈ H) ],

(:func:`~hf_globalres.rates.optimal_acceptance` with
``scheme="without_replacement"``), and the Global Resolution construction
carries over unchanged with the set law of draws without replacement: split
by the largest minimiser H*, the outer tier (draft sets meeting ``V ∖ H*``)
is transported in full onto its outer tokens with softmax weights, the inner
tier (sets inside H*) serves H* with a rejection term. The weights solve the
convex problems of :mod:`hf_globalres.verifiers._selection`, summing over the
k-subsets of a truncation set T (the most probable draft tokens, grown until
the union bound on ``P(some draft ∉ T)`` is ≤ ``tau``), each weighted by the
sum over its k! drawing orders of ``Π_j p_{σ_j} / (1 − Σ_{l<j} p_{σ_l})``.

This is not an approximation: at the solver's optimum the acceptance equals
``α*_wor`` up to the truncated mass and the solver tolerance (both ≤ tau),
and the tests compare it with the transport LP. The marginal is exactly q
whatever the solver returned (the achieved acceptance is computed exactly and
the residual recovered from it). Rows whose T needs more than
``max_support`` tokens or ``max_tuples`` ordered draft sets, or whose fit is
not converged after ``max_iters``, fall back to recursive rejection sampling
without replacement (SpecTr's K-SEQ assumes i.i.d. drafts and would not be
exact here); :attr:`OptimalWithoutReplacement.last_stats` counts them.
"""

from __future__ import annotations

import torch

from . import register
from ._selection import FittedVerifier
from .base import EmissionPlan
from .rrs import recursive_rejection_plan


@register
class OptimalWithoutReplacement(FittedVerifier):
    """Optimal verification of drafts drawn without replacement.

    Args:
        tau: bound on the missing draft mass of T, and the solver's tolerance (default 1e-3).
        max_support: largest |T| before a row fails (default 1000).
        max_iters: solver iterations before a row fails (default 500).
        max_tuples: largest number of ordered draft sets of T before a row fails (default 1e6).
        validate: check inputs (the base checks also refuse repeated drafts in a row).
    """

    name = "optimal_without_replacement"
    draft_scheme = "without_replacement"

    def fallback(self, q: torch.Tensor, p: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        return recursive_rejection_plan(q, p, draft_tokens, without_replacement=True)
