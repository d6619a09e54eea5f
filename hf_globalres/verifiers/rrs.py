"""Recursive rejection sampling, with and without replacement.

With replacement (SpecInfer, Miao et al. 2024; MCSD, Yang et al. 2024): drafts
``x_1..x_n`` i.i.d. from p. With ``r_1 = q``, draft ``j`` is accepted with
probability ``min(1, r_j(x_j) / p(x_j))``; on rejection the target moves to
the residual ``r_{j+1} = norm(max(0, r_j − p))``. After ``n`` rejections the
recovered token is drawn from ``r_{n+1}``. Each step is single-draft
speculative sampling of ``r_j`` by ``p``, so the output law is q. Acceptance
``1 − Π_j (1 − Σ_y min(p, r_j)(y))`` (:func:`hf_globalres.rates.rrs_acceptance`).

Without replacement (Jeon et al. 2024; SpecTree, Sequoia): draft ``j`` is
drawn from ``p_j`` = p with the earlier drafts removed and renormalised, so
step ``j`` verifies ``x_j`` against ``p_j`` and then sets
``p_{j+1} = norm(p_j · 1[y ≠ x_j])``. A rejected ``x_j`` has
``r_{j+1}(x_j) = 0``, which is why drafting ``x_{j+1}`` away from it stays
lossless.
"""

from __future__ import annotations

import torch

from . import register
from .base import EmissionPlan, Verifier, gather_draft_probs, normalize_rows


def recursive_rejection_plan(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    *,
    without_replacement: bool,
) -> EmissionPlan:
    """The RRS emission plan. Shapes: q, p [B, V]; draft_tokens [B, n] (−1 absent)."""
    residual = target_probs
    current_draft = draft_probs
    survive = torch.ones_like(target_probs[:, 0])  # P(every draft so far rejected)
    draft_emit = torch.zeros(draft_tokens.shape, dtype=target_probs.dtype, device=target_probs.device)
    for j in range(draft_tokens.shape[1]):
        column = draft_tokens[:, j : j + 1]
        present = column[:, 0] >= 0
        r_at_draft = gather_draft_probs(residual, column)[:, 0]
        p_at_draft = gather_draft_probs(current_draft, column)[:, 0]
        accept = torch.where(present, (r_at_draft / p_at_draft.clamp_min(1e-300)).clamp_max(1), 0)
        draft_emit[:, j] = survive * accept
        survive = survive * (1 - accept)
        next_residual = normalize_rows((residual - current_draft).clamp_min(0), fallback=residual)
        residual = torch.where(present[:, None], next_residual, residual)
        if without_replacement:
            removed = current_draft.scatter(1, column.clamp_min(0), 0)
            next_draft = normalize_rows(removed, fallback=current_draft)
            current_draft = torch.where(present[:, None], next_draft, current_draft)
    return EmissionPlan(draft_emit=draft_emit, residual=residual)


@register
class RecursiveRejectionSampling(Verifier):
    name = "rrs"
    draft_scheme = "iid"

    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        return recursive_rejection_plan(target_probs, draft_probs, draft_tokens, without_replacement=False)


@register
class RecursiveRejectionSamplingWithoutReplacement(Verifier):
    name = "rrs_without_replacement"
    draft_scheme = "without_replacement"

    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        return recursive_rejection_plan(target_probs, draft_probs, draft_tokens, without_replacement=True)
