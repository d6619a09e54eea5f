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
from .base import EmissionPlan, Verifier, normalize_rows


def recursive_rejection_plan(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    *,
    without_replacement: bool,
) -> EmissionPlan:
    """The RRS emission plan. Shapes: q, p [B, V]; draft_tokens [B, n] (−1 absent).

    Residual and draft rows are kept unnormalised with their masses tracked
    per row, so each step costs one fused update and one sum over V.
    """
    batch = target_probs.shape[0]
    rows = torch.arange(batch, device=target_probs.device)
    residual = target_probs.clone()  # ∝ r_j
    residual_mass = torch.ones_like(residual[:, 0])
    draft = draft_probs.clone() if without_replacement else draft_probs  # ∝ p_j
    draft_mass = torch.ones_like(residual_mass)
    survive = torch.ones_like(residual_mass)  # P(every draft so far rejected)
    draft_emit = torch.zeros(draft_tokens.shape, dtype=target_probs.dtype, device=target_probs.device)
    for j in range(draft_tokens.shape[1]):
        present = draft_tokens[:, j] >= 0
        token = draft_tokens[:, j].clamp_min(0)
        p_at = draft[rows, token] / draft_mass
        r_at = residual[rows, token] / residual_mass.clamp_min(torch.finfo(residual.dtype).tiny)
        accept = torch.where(present, (r_at / p_at.clamp_min(torch.finfo(p_at.dtype).tiny)).clamp_max(1), 0)
        draft_emit[:, j] = survive * accept
        survive = survive * (1 - accept)
        # r_{j+1} ∝ max(0, r_j − p_j), in r's units; a factor 0 leaves rows without this draft unchanged.
        scale = torch.where(present, residual_mass / draft_mass, 0)
        residual.addcmul_(draft, scale[:, None], value=-1).clamp_min_(0)
        residual_mass = residual.sum(-1)
        if without_replacement:
            removed = torch.where(present, p_at * draft_mass, 0)
            draft[rows, token] -= removed
            draft_mass = draft_mass - removed
    # A row with no residual mass left is reached with probability 0; q keeps it a distribution.
    return EmissionPlan(draft_emit=draft_emit, residual=normalize_rows(residual, fallback=target_probs))


@register
class RecursiveRejectionSampling(Verifier):
    name = "rrs"
    draft_scheme = "iid"

    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        without_replacement = self.draft_scheme == "without_replacement"
        return recursive_rejection_plan(
            target_probs, draft_probs, draft_tokens, without_replacement=without_replacement
        )


@register
class RecursiveRejectionSamplingWithoutReplacement(RecursiveRejectionSampling):
    name = "rrs_without_replacement"
    draft_scheme = "without_replacement"
