"""``optimal`` for the block: the same acceptance, spent where the accepted token's drafts go on.

In a draft tree, accepting a token that m of the n drafts show leaves m i.i.d.
drafts at the child, so the walk is likelier to go on below it the larger m is
(docs/design.md §4.7). ``optimal`` accepts each race winner y with one
probability ``γ_y`` whatever its multiplicity m. This rule keeps ``optimal``'s
race, weights and accepted mass ``ā_y`` per token (so its acceptance is α*
and its residual ``q − ā`` is ``optimal``'s) and spends ``ā_y`` on the events
"y wins while m drafts show it" in decreasing m:

    γ_{y,m} = clamp((ā_y − Σ_{m' > m} B_{y,m'}) / B_{y,m}, 0, 1),

with ``B_{y,m}`` the chance of that event at the solved weights
(:func:`._race.race_law_by_count`). The rule is a function of the node's drafts
alone, and for every token ``Σ_m B_{y,m} γ_{y,m} = ā_y ≤ q_y`` whatever the
weights, so the output law is q exactly as for ``optimal`` (docs/design.md §5).
A winner that all k drafts show is accepted with ``min(1, κ_y / B_{y,k})``,
``B_{y,k} = p_y^k`` (in the H tier ``(p_y / p(H*))^k``), which needs no weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _sync
from . import register
from ._race import RaceProblems, race_law_by_count
from .base import EmissionPlan
from .optimal import Optimal, RacingDrafts, TierProblems


@dataclass
class CountAcceptance:
    """Acceptance of a tier's race winner by its multiplicity ([B, S] slots, N classes).

    Attributes:
        top: ``γ_{y,k}`` [B, S], when all k drafts show the winner (needs no weights).
        lower: ``γ_{y,m}`` [B, S, N] for m < k (entry m − 1), None before the tier is solved.
        mass: ``ā`` [B, S] in the tier's units, the mass these accept (None before the solve).
    """

    top: torch.Tensor
    lower: torch.Tensor | None = None
    mass: torch.Tensor | None = None


def count_acceptance(
    cap: torch.Tensor, every: torch.Tensor, draws: torch.Tensor, by_count: torch.Tensor | None
) -> CountAcceptance:
    """The greedy fill of the module docstring for one tier.

    Args:
        cap: κ [B, S], the most a slot may be accepted with in the tier's units.
        every: ``B_{y,k}`` [B, S], the chance that all k drafts show y.
        draws: k [B].
        by_count: ``B_{y,m}`` [B, S, N] at the solved weights, or None (only ``top`` then).
    """
    top = torch.where(cap > 0, (cap / torch.where(every > 0, every, 1)).clamp_max(1), 0)
    top = torch.where(every > 0, top, 0)
    if by_count is None:
        return CountAcceptance(top)
    classes = torch.arange(1, by_count.shape[-1] + 1, device=draws.device)
    lower = torch.where((classes < draws[:, None])[:, None, :], by_count, 0)  # the classes m < k
    fill = (torch.minimum(cap, by_count.sum(-1)) - every * top).clamp_min(0)
    above = lower.flip(-1).cumsum(-1).flip(-1) - lower  # Σ_{k > m' > m} B_{y,m'}
    accept = ((fill[..., None] - above) / torch.where(lower > 0, lower, 1)).clamp(0, 1)
    accept = torch.where(lower > 0, accept, 0)
    return CountAcceptance(top, accept, every * top + (lower * accept).sum(-1))


@register
class OptimalBlock(Optimal):
    """``optimal`` with each winner's acceptance spent on its most-drawn events first (module docstring).

    Options as :class:`~.optimal.Optimal`.
    """

    name = "optimal_block"

    def _tier_acceptance(
        self, tiers: TierProblems, in_l: torch.Tensor, race: RaceProblems, alpha: torch.Tensor | None, classes: int
    ) -> CountAcceptance:
        """:func:`count_acceptance` of each row's tier (L where ``in_l`` [B]) at the weights ``alpha`` (None: unsolved).

        ``classes``: the draft columns n, the most drafts any row has.
        """
        k = tiers.drafts
        share = tiers.p / tiers.p_h.clamp_min(1e-300)[:, None]
        pick = in_l[:, None]
        cap = torch.where(pick, torch.where(tiers.in_l, tiers.q, 0), tiers.h_target)
        every_l = torch.where(tiers.in_l, tiers.p.pow(k.double()[:, None]), 0)
        every_h = torch.where(tiers.h_solved, share.pow(k.double()[:, None]), 0)
        every = torch.where(pick, every_l, every_h)
        by_count = None if alpha is None else race_law_by_count(race, alpha, self.step, classes)
        return count_acceptance(cap, every, k, by_count)

    def _race_plan(
        self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor
    ) -> EmissionPlan:
        """The race of :class:`~.optimal.Optimal`, accepting by multiplicity; solved only where the drafts differ."""
        present = draft_tokens >= 0
        tiers = self._tier_problems(target_probs, draft_probs, present.sum(-1))
        drafts = RacingDrafts.of(tiers, draft_probs, draft_tokens)
        same = (draft_tokens[:, :, None] == draft_tokens[:, None, :]) & present[:, None, :]
        count = same.sum(-1)  # m of each draft's token, [B, n]
        all_same = (count == tiers.drafts[:, None]) | ~present  # [B, n]: the draft's token is every draft's
        race = tiers.races(drafts.in_l_race)
        agreed = _sync.reads_are_cheap(all_same) and bool(all_same.all())
        alpha = None if agreed else self._solve_tiers(race)[0]
        rule = self._tier_acceptance(tiers, drafts.in_l_race, race, alpha, draft_tokens.shape[1])
        accept = rule.top.gather(1, drafts.slot)
        if rule.lower is not None:
            cls = (count - 1).clamp(0, rule.lower.shape[-1] - 1)
            lower = rule.lower.gather(1, drafts.slot[..., None].expand(-1, -1, rule.lower.shape[-1]))
            accept = torch.where(all_same, accept, lower.gather(2, cls[..., None])[..., 0])
        accept = torch.where(present & drafts.racing, accept, 0)

        def recover() -> torch.Tensor:
            """Residual ``q − ā`` over both tiers (each solved now if it was not)."""
            race_rule = rule
            if rule.mass is None:
                race_rule = self._tier_acceptance(
                    tiers, drafts.in_l_race, race, self._solve_tiers(race)[0], draft_tokens.shape[1]
                )
            other = tiers.races(~drafts.in_l_race)
            other_alpha = self._solve_tiers(other)[0]
            other_rule = self._tier_acceptance(tiers, ~drafts.in_l_race, other, other_alpha, draft_tokens.shape[1])
            pick = drafts.in_l_race[:, None]
            low = torch.where(pick, race_rule.mass, other_rule.mass)
            high = torch.where(pick, other_rule.mass, race_rule.mass)
            mass = torch.where(tiers.in_l, low, high * tiers.all_h[:, None])
            return tiers.residual(target_probs, torch.where((tiers.drafts > 0)[:, None] & tiers.on, mass, 0))

        return EmissionPlan((drafts.shares(alpha) * accept).to(target_probs.dtype), recover=recover)
