"""Canonical decomposition (Khisti et al. 2025, "Multi-draft speculative sampling: canonical architectures
and theoretical limits").

Drafts ``x_1..x_k`` i.i.d. from p. Step 1, importance sampling: choose one
draft, token y ∈ set(x) with probability ``w_y / Σ_{z ∈ set(x)} w_z``; the
chosen token then has some law s (its "induced" law). Step 2, single-draft
speculative sampling of the chosen y against s: accept with
``min(1, q_y / s_y)``, else recover from ``norm(max(0, q − s))``. The output
law is q for any weights, and the acceptance is ``Σ_y min(q_y, s_y)``;
Khisti et al. show that the best selection reaches the optimal transport
value, with a closed-form optimum for two identical drafts.

The selection LP (maximise ``Σ min(q, s)`` over the laws s a selection can
induce) is solved over a truncated alphabet T, the most probable draft
tokens (missing mass ``1 − p(T)^k ≤ tau``, at most ``max_support`` tokens
and ``max_tuples`` draft multisets): with weights ``w = e^α`` it is the
convex problem

    min_{−A ≤ α ≤ 0}  Σ_{multisets x of T} P(x) log Σ_{z ∈ set(x)} e^{α_z} − Σ_{y ∈ T} q_y α_y,

whose gradient is ``s − q``: at the optimum tokens strictly inside the box
get ``s = q``, tokens at 0 get ``s ≤ q`` and tokens at −A (over-proposed,
selected only when every draft is one of them) ``s ≥ q``, which makes
``Σ min(q, s) = 1 + q(D) − p(D)^k`` for the set D at −A, the optimum up to
``e^{−A}`` and the solver tolerance. A tuple with a draft outside T selects
its first such draft. s is computed exactly (enumeration on T, closed form
beyond), so the rule is exact whatever the solver returned; an unconverged
fit only lowers acceptance (counted in :attr:`Khisti.last_stats`). There is
no fallback: a too-large T is truncated further instead.
"""

from __future__ import annotations

import torch

from . import register
from ._selection import FitOptions, SolveStats, check_options, fitted_plan
from .base import EmissionPlan, Verifier


def _no_fallback(q: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> EmissionPlan:
    raise RuntimeError("khisti truncates its alphabet instead of failing; no row can fall back")


@register
class Khisti(Verifier):
    """Importance-sampling selection + single-draft verification (canonical decomposition).

    Args:
        tau: largest missing draft mass of the truncated alphabet, and the
            solver's tolerance.
        max_support: largest truncated alphabet.
        max_iters: solver iterations.
        max_tuples: largest number of draft multisets of T (T shrinks to fit).
        validate: check inputs.
    """

    name = "khisti"
    draft_scheme = "iid"

    def __init__(
        self,
        *,
        tau: float = 1e-3,
        max_support: int = 200,
        max_iters: int = 500,
        max_tuples: int = 200_000,
        validate: bool = True,
    ) -> None:
        super().__init__(validate=validate)
        check_options(tau, max_support, max_iters, max_tuples)
        self.options = FitOptions(
            scheme="iid",
            tau=tau,
            max_support=max_support,
            max_iters=max_iters,
            max_tuples=max_tuples,
            subset_selection=False,
            fail_on_truncation=False,
            fail_on_iterations=False,
        )
        self.last_stats = SolveStats()

    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        plan, self.last_stats = fitted_plan(target_probs, draft_probs, draft_tokens, self.options, _no_fallback)
        return plan
