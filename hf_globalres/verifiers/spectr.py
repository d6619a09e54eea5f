"""SpecTr K-SEQ (Sun et al. 2023, "SpecTr: Fast speculative decoding via optimal transport").

Drafts ``x_1..x_k`` i.i.d. from p. With ρ* from
:func:`hf_globalres.rates.spectr_rho`, draft ``i`` is accepted in order with
probability ``min(1, q(x_i) / (ρ* p(x_i)))``, so each is accepted with
probability ``β = Σ min(p, q/ρ*)`` and the output is a draft with probability
``1 − (1 − β)^k``, at least ``(1 − 1/e)`` of the optimum. When all are
rejected the recovered token is drawn from

    [q − min(p, q/ρ*) · (1 − (1 − β)^k) / β] / (1 − β)^k,

which is non-negative exactly when ``ρ* β ≥ 1 − (1 − β)^k``. ``k`` is the
number of drafts present in the row.
"""

from __future__ import annotations

import torch

from ..rates import spectr_rho
from . import register
from .base import EmissionPlan, Verifier, gather_draft_probs, normalize_rows


@register
class SpecTr(Verifier):
    name = "spectr"
    draft_scheme = "iid"

    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        q, p = target_probs, draft_probs
        present = draft_tokens >= 0
        k = present.sum(-1)
        rho = spectr_rho(q, p, k)
        accept_mass = torch.minimum(p, q / rho[:, None])  # p(y) · P(accept | x_i = y)
        beta = accept_mass.sum(-1)
        # Acceptance probability of each draft, then "first accepted" in order.
        p_at = gather_draft_probs(p, draft_tokens)
        accept = torch.where(present, gather_draft_probs(accept_mass, draft_tokens) / p_at.clamp_min(1e-300), 0)
        accept = accept.clamp(0, 1)
        survive_before = torch.cumprod(torch.cat([torch.ones_like(accept[:, :1]), 1 - accept[:, :-1]], -1), -1)
        draft_emit = survive_before * accept
        fail = (1 - beta).clamp(0, 1)
        all_rejected = fail.pow(k.to(q.dtype))
        # (1 − (1 − β)^k) / β, with its limit k as β → 0.
        any_accepted_per_beta = torch.where(beta > 0, (1 - all_rejected) / beta.clamp_min(1e-300), k.to(q.dtype))
        residual_mass = (q - accept_mass * any_accepted_per_beta[:, None]).clamp_min(0)
        return EmissionPlan(draft_emit=draft_emit, residual=normalize_rows(residual_mass, fallback=q))
