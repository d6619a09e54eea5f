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

With ``draft_shape="spine"`` only the spine's token (the one most drafts show,
ties to the earliest draft's, :func:`~.base.heaviest_child`) has drafts below
it, and which of the tied tokens leads depends on the drafts' order alone. The
rule then moves the race's wins within each multiset of drafts towards the
leader (:func:`leader_shares`): per multiset every token wins as often as in the
race, so ``B_{y,m}``, the acceptance and the output law stay the same, while the
winner leads the spine more often (docs/design.md §4.7).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from .. import _sync
from . import register
from ._race import RaceProblems, race_law_by_count
from ._tilt import TILT_MAX_WIDTH, TiltedProblems, solve_tilted
from .base import DraftShape, EmissionPlan, check_draft_shape, heaviest_child
from .optimal import Optimal, RacingDrafts, TierProblems


@dataclass
class CountAcceptance:
    """Acceptance of a tier's race winner by its multiplicity ([B, X]: the slots asked for, N classes).

    Attributes:
        top: ``γ_{y,k}`` [B, X], when all k drafts show the winner (needs no weights).
        lower: ``γ_{y,m}`` [B, X, N] for m < k (entry m − 1), None before the tier is solved.
    """

    top: torch.Tensor
    lower: torch.Tensor | None = None


def count_acceptance(
    cap: torch.Tensor, every: torch.Tensor, draws: torch.Tensor, by_count: torch.Tensor | None
) -> CountAcceptance:
    """The greedy fill of the module docstring for one tier, on any [B, X] set of slots.

    It accepts ``min(κ_y, b_y)`` in all (``b_y = Σ_m B_{y,m}``), largest m first.

    Args:
        cap: κ [B, X], the most a slot may be accepted with in the tier's units.
        every: ``B_{y,k}`` [B, X], the chance that all k drafts show y.
        draws: k [B].
        by_count: ``B_{y,m}`` [B, X, N] at the solved weights, or None (only ``top`` then).
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
    return CountAcceptance(top, torch.where(lower > 0, accept, 0))


def leader_shares(
    shares: torch.Tensor, draft_tokens: torch.Tensor, present: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """[B, n]: each draft's chance to win, moved towards the spine's leader within the drafts' multiset.

    Args:
        shares: [B, n] each draft's chance to win the race (0 for drafts that do not race);
        draft_tokens: [B, n], −1 where absent; present: [B, n] ``draft_tokens ≥ 0``;
        same: [B, n, n] draft j is present and shows draft i's token (its row sums: m per draft).

    Given the multiset, the race's chance ``r_y`` that token y wins does not
    depend on the drafts' order, and the leader ℓ (:func:`~.base.heaviest_child`)
    is each of the ``t`` tokens tied at the largest count with chance 1/t. ℓ wins
    with ``min(1, t r_ℓ)``, and what it leaves goes to the other tokens in
    proportion to ``d_y = r_y − min(1, t r_y)/t`` (y tied) or ``r_y`` (y not
    tied). Averaged over the leader, y wins with ``min(1, t r_y)/t + d_y = r_y``
    (the leaders that leave something have ``d = 0``, and the d's sum to what
    they leave): the multiset's law of the winner is the race's. A token's
    chance is split evenly over its m drafts.
    """
    count = same.sum(-1)
    chance = (same.double() * shares[:, None, :]).sum(-1)  # r of each draft's token
    most = torch.where(present, count, 0).amax(-1, keepdim=True)
    tied = present & (count == most)
    ties = tied.sum(-1, keepdim=True).double() / most.double().clamp_min(1)  # t
    lead = heaviest_child(draft_tokens, present)
    keep = (ties * torch.where(lead, chance, 0).amax(-1, keepdim=True)).clamp_max(1)  # ℓ's chance
    rest = chance - torch.where(tied, (ties * chance).clamp_max(1) / ties, 0)  # d
    per_draft = count.double().clamp_min(1)
    left = torch.where(present & ~lead, rest / per_draft, 0).sum(-1, keepdim=True)  # Σ_y d_y over tokens
    won = torch.where(lead, keep, (1 - keep) * rest / left.clamp_min(1e-300))
    return torch.where(present, won / per_draft, 0)


@dataclass
class BlockRace:
    """The race a tier runs at its solved weights ([B, S] on the slots of ``supp p``).

    Attributes:
        alpha: the weights' logarithms.
        law: b, each slot's chance to win.
        tilt: θ [B] of each row's race (1: untilted, :meth:`OptimalBlock.tilted_rows`).
        by_count: ``B_{y,m}`` [B, S, N] of the rows solved as tilted races (None: no row was).
        series: [B] bool, the row's ``B_{y,m}`` are in ``by_count``.
    """

    alpha: torch.Tensor
    law: torch.Tensor
    tilt: torch.Tensor
    by_count: torch.Tensor | None = None
    series: torch.Tensor | None = None


@register
class OptimalBlock(Optimal):
    """``optimal`` with each winner's acceptance spent on its most-drawn events first (module docstring).

    Options as :class:`~.optimal.Optimal`, and
        draft_shape: ``"tree"`` (every accepted token's drafts go on) or ``"spine"`` (only the
            spine's leader's do: wins move towards it, :func:`leader_shares`). ``generate`` sets it
            from its own ``draft_shape`` (:meth:`for_shape`).
        tilt: θ ≥ 1. Where a row has three or more drafts and its race's tier at most
            ``TILT_MAX_WIDTH`` tokens, the clocks of the most-drawn tokens run θ times faster
            (:mod:`._tilt`, docs/design.md §4.8): the race's law stays the target, and the wins
            move to the multisets whose winner has more drafts behind it. 1: ``optimal``'s race.
    """

    name = "optimal_block"

    def __init__(self, *, draft_shape: DraftShape = "tree", tilt: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        self.draft_shape = check_draft_shape(draft_shape)
        if not (isinstance(tilt, (int, float)) and 1 <= tilt < float("inf")):
            raise ValueError(f"tilt must be a finite number ≥ 1 (1: optimal's race), got {tilt!r}")
        self.tilt = float(tilt)

    def for_shape(self, draft_shape: DraftShape) -> OptimalBlock:
        rule = copy.copy(self)
        rule.draft_shape = check_draft_shape(draft_shape)
        return rule

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, draft_shape={self.draft_shape!r}, tilt={self.tilt!r})"

    def _tier_caps(self, tiers: TierProblems, in_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """κ and ``B_{y,k}`` [B, S] of each row's tier (L where ``in_l`` [B]): see :func:`count_acceptance`."""
        k = tiers.drafts.double()[:, None]
        pick = in_l[:, None]
        cap = torch.where(pick, torch.where(tiers.in_l, tiers.q, 0), tiers.h_target)
        every_l = torch.where(tiers.in_l, tiers.p.pow(k), 0)
        every_h = torch.where(tiers.h_solved, (tiers.p / tiers.p_h.clamp_min(1e-300)[:, None]).pow(k), 0)
        return cap, torch.where(pick, every_l, every_h)

    def tilted_rows(self, tiers: TierProblems, race: RaceProblems) -> torch.Tensor:
        """[B] bool: the rows whose race (tier ``race``) is tilted: ``tilt > 1``, three or more drafts
        (with two, a tie tilts both), two or more racing tokens and at most ``TILT_MAX_WIDTH`` in ``supp p``.

        A function of q, p and k alone, never of the drafts, as losslessness needs (docs/design.md §4.7).
        """
        racers = race.tier.sum(-1)
        narrow = tiers.on.sum(-1) <= TILT_MAX_WIDTH
        return (race.num_draws >= 3) & (racers >= 2) & narrow & (self.tilt > 1)

    def _solve_block(self, tiers: TierProblems, in_l: torch.Tensor, race: RaceProblems, classes: int) -> BlockRace:
        """The weights and law of each row's race (L where ``in_l`` [B]), tilted where :meth:`tilted_rows`.

        ``optimal``'s weights first; the tilted rows then start from them (:func:`._tilt.solve_tilted`),
        on the first slots up to their widest ``supp p``. On an accelerator every row takes the tilted
        solve when the slots are few enough (θ = 1 where not tilted: the same race), none otherwise.
        """
        alpha, law = self._solve_tiers(race)
        tilted = self.tilted_rows(tiers, race)
        tilt = torch.where(tilted, self.tilt, 1.0).double()
        if self.tilt == 1:
            return BlockRace(alpha, law, tilt)
        if _sync.reads_are_cheap(tilted):
            rows = tilted.nonzero()[:, 0]
            if rows.numel() == 0:
                return BlockRace(alpha, law, tilt)
            width = int(tiers.on[rows].sum(-1).max())
        elif race.draft_mass.shape[1] <= TILT_MAX_WIDTH:
            rows, width = torch.arange(tilted.shape[0], device=tilted.device), race.draft_mass.shape[1]
        else:
            return BlockRace(alpha, law, torch.ones_like(tilt))
        # The L race counts every draft for the most-drawn test, H* draws too (they race in no clock).
        counted = torch.where(in_l[:, None], torch.where(tiers.on, tiers.p, 0), race.draft_mass)
        problems = TiltedProblems(counted, race.tier, race.target, race.num_draws, tilt, self.tilt)
        sub_alpha, terms = solve_tilted(
            problems.select(rows, width),
            alpha[rows, :width],
            classes,
            tol=self.tol,
            max_iters=self.max_iters,
            step=self.step,
        )
        alpha, law = alpha.clone(), law.clone()
        alpha[rows, :width], law[rows, :width] = sub_alpha, terms.law
        law[rows, width:] = 0
        by_count = law.new_zeros((*law.shape, classes))
        by_count[rows, :width] = terms.by_count
        series = torch.zeros_like(tilted).index_fill(0, rows, True)
        return BlockRace(alpha, law, tilt, by_count, series)

    def _tier_acceptance(
        self, tiers: TierProblems, in_l: torch.Tensor, race: RaceProblems, block: BlockRace | None, slots: torch.Tensor
    ) -> CountAcceptance:
        """:func:`count_acceptance` on ``slots`` [B, X] of each row's tier (L where ``in_l`` [B]) in race ``block``.

        ``block`` None: the tier is unsolved (only the top class). X is the draft columns n, the
        most drafts any row has, and so the most classes.
        """
        cap, every = (value.gather(1, slots) for value in self._tier_caps(tiers, in_l))
        if block is None:
            return count_acceptance(cap, every, tiers.drafts, None)
        classes = slots.shape[1]
        series = block.series
        everywhere = series is not None and _sync.reads_are_cheap(series) and bool(series.all())
        by_count = None
        if not everywhere:
            by_count = race_law_by_count(race, block.alpha, self.step, classes, slots)
        if block.by_count is not None:
            tilted = block.by_count.gather(1, slots[..., None].expand(-1, -1, classes))
            by_count = tilted if by_count is None else torch.where(series[:, None, None], tilted, by_count)
        return count_acceptance(cap, every, tiers.drafts, by_count)

    def _tier_mass(self, tiers: TierProblems, in_l: torch.Tensor, law: torch.Tensor) -> torch.Tensor:
        """``ā = min(κ, b)`` [B, S] of each row's tier at race law ``law``: what the fill accepts, in any order."""
        cap, _ = self._tier_caps(tiers, in_l)
        return torch.minimum(cap, law)

    def _race_plan(
        self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor
    ) -> EmissionPlan:
        """The race of :class:`~.optimal.Optimal` (tilted: :meth:`_solve_block`), accepting by multiplicity.

        Solved only where the drafts differ; the other tier, with the residual, on a rejection.
        """
        present = draft_tokens >= 0
        classes = draft_tokens.shape[1]
        tiers = self._tier_problems(target_probs, draft_probs, present.sum(-1))
        drafts = RacingDrafts.of(tiers, draft_probs, draft_tokens)
        same = (draft_tokens[:, :, None] == draft_tokens[:, None, :]) & present[:, None, :]
        count = same.sum(-1)  # m of each draft's token, [B, n]
        all_same = (count == tiers.drafts[:, None]) | ~present  # [B, n]: the draft's token is every draft's
        in_l = drafts.in_l_race
        race = tiers.races(in_l)
        agreed = _sync.reads_are_cheap(all_same) and bool(all_same.all())
        block = None if agreed else self._solve_block(tiers, in_l, race, classes)
        rule = self._tier_acceptance(tiers, in_l, race, block, drafts.slot)
        accept = rule.top
        if rule.lower is not None:
            cls = (count - 1).clamp(0, rule.lower.shape[-1] - 1)
            accept = torch.where(all_same, accept, rule.lower.gather(2, cls[..., None])[..., 0])
        accept = torch.where(present & drafts.racing, accept, 0)

        def recover() -> torch.Tensor:
            """Residual ``q − ā`` over both tiers (each solved now if it was not)."""
            race_law = (block if block is not None else self._solve_block(tiers, in_l, race, classes)).law
            other_law = self._solve_block(tiers, ~in_l, tiers.races(~in_l), classes).law
            race_mass, other_mass = self._tier_mass(tiers, in_l, race_law), self._tier_mass(tiers, ~in_l, other_law)
            pick = in_l[:, None]
            low = torch.where(pick, race_mass, other_mass)
            high = torch.where(pick, other_mass, race_mass)
            mass = torch.where(tiers.in_l, low, high * tiers.all_h[:, None])
            return tiers.residual(target_probs, torch.where((tiers.drafts > 0)[:, None] & tiers.on, mass, 0))

        speed = None
        if block is not None and self.tilt > 1:
            most = torch.where(present, count, 0).amax(-1, keepdim=True)  # every draft counts, racing or not
            speed = torch.where(drafts.racing & (count == most), block.tilt[:, None], 1.0)
        shares = drafts.shares(None if block is None else block.alpha, speed)
        if self.draft_shape == "spine":
            shares = leader_shares(shares, draft_tokens, present, same)
        return EmissionPlan((shares * accept).to(target_probs.dtype), recover=recover)
