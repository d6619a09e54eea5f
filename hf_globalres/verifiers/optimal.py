"""Optimal multi-draft verification for i.i.d. drafts, exact by construction.

Reaches the transport-LP optimum (Thomas & Pal 2025, "Global Resolution")

    α*(p, q, n) = 1 + min_{H ⊆ V} [q(H) − p(H)^n]

with no truncation of the vocabulary (docs/design.md §4):

1. **Acceptance masses.** ``H*`` is the largest minimiser
   (:func:`hf_globalres.rates.optimal_prefix`), ``L = supp p \\ H*``. The mass
   ``a_y = P(Y = y, y accepted)`` is ``a_y = q_y`` on ``H*`` and
   ``a_y = min(q_y, λ p_y)`` on ``L`` with ``Σ_L a = 1 − p(H*)^n``
   (water-filling: ``λ`` from one sort of ``L`` by ``q/p``). ``Σ a = α*``.
2. **A race in two strict tiers.** If some draft lies in ``L``, the drafts in
   ``L`` race (draw ``i`` wins with probability ``w^L_{x_i} / Σ_{x_j ∈ L}
   w^L_{x_j}``) and the winner is accepted with ``γ^L``; otherwise all drafts
   race with weights ``w^H`` and the winner ``y`` is accepted with
   ``γ^H_y``. The law ``b`` of each race is the gradient of a convex function
   of ``α = log w`` (:mod:`._race`): the ``L`` weights solve ``b^L = a_L``,
   the ``H`` weights (drafts conditioned on ``H*``) solve ``b^H = max(c^H, θ
   p_H)`` with ``c^H = a_H / p(H*)^n`` (the law of the box problem ``b^H ≥
   c^H`` over ``α ≥ 0``, in closed form; ``θ`` from one pass over the q/p
   order), both by damped Newton.
3. **Exact by construction.** Whatever weights the solver returns, the race
   law ``b`` is recomputed at them and the rule accepts the mass
   ``ā = min(a, b)`` (``γ = ā / b``) per tier, recovering from
   ``(q − ā) / (1 − Σ ā)`` on rejection. A winner that every racing draft
   shows wins whatever the weights: its acceptance needs no solve, and the
   other winners' acceptance makes up the difference (docs/design.md §4.2).
   The output law is q for any weights; an unconverged solve only lowers the
   acceptance.

The law of the race depends on the number ``k`` of drafts present in a row,
so every row is its own pair of problems; a batch of rows with different
supports and ``k`` is solved in one padded call per tier, on ``supp p`` only
(the cost scales with ``|supp p|``, not ``V``), in float64. Newton
iterations run only on the rows not yet converged; tiers of many thousand
tokens are solved on groups of tokens that share one weight (option ``bins``).
The two tiers' problems are independent: :meth:`Optimal.plan` solves the tier
the race runs in and leaves the other, with the residual, to a rejection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property

import torch

from .. import _sync
from ..rates import OptimalPrefix, optimal_prefix, prefix_members
from . import register
from ._race import RaceProblems, law_residual, solve_race, wide_weights
from .base import EmissionPlan, Verifier, distinct_rows, normalize_rows, support_index
from .rrs import recursive_rejection_plan

#: Below this ``p(H*)^n`` the drafts essentially never all fall in ``H*``; its
#: tier is not solved and accepts nothing (its mass ≤ p(H*)^n goes to the residual).
NEGLIGIBLE_TIER = 1e-250


def water_level(
    ratio: torch.Tensor, target_mass: torch.Tensor, draft_mass: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """[B]: the level ``λ`` with ``Σ_tier min(q, λ p) = total`` (``inf`` when even ``q(tier)`` falls short).

    Shapes [B, S]: ``ratio`` = ``q/p`` non-decreasing along each row (``inf``
    where ``p = 0``), ``target_mass``/``draft_mass`` the tier's q and p in that
    order, 0 off the tier; slots off the tier may lie anywhere before it. With
    ``F(λ) = Σ_{ρ ≤ λ} q + λ Σ_{ρ > λ} p``, piecewise linear and increasing,
    ``λ`` lies on the first piece whose right end ``F(ρ_j)`` reaches ``total``.
    """
    valid = torch.isfinite(ratio)
    q_before = target_mass.cumsum(-1) - target_mass  # capped mass below piece j
    p_from = draft_mass.flip(-1).cumsum(-1).flip(-1)  # uncapped draft mass from piece j on
    reach = torch.where(valid, q_before + torch.where(valid, ratio, 0) * p_from, math.inf)
    piece = (reach < total[:, None]).sum(-1, keepdim=True)
    all_capped = piece[:, 0] >= valid.sum(-1)
    piece = piece.clamp_max(ratio.shape[1] - 1)
    level = (total[:, None] - q_before.gather(1, piece)) / p_from.gather(1, piece).clamp_min(1e-300)
    return torch.where(all_capped, math.inf, level[:, 0])


def floor_level(
    ratio: torch.Tensor, target_mass: torch.Tensor, draft_mass: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """[B]: the level ``θ`` with ``Σ_tier max(q, θ p) = total`` (``q(tier) ≤ total ≤ q(tier) + p(tier)``).

    Shapes [B, S] as in :func:`water_level`, with ``ratio = inf`` off the tier.
    ``G(θ) = Σ_{ρ > θ} q + θ Σ_{ρ ≤ θ} p`` is piecewise linear and
    non-decreasing; ``θ`` lies on the first piece whose right end ``G(ρ_j)``
    reaches ``total``, or on ``θ ≤ ρ_0`` (then ``max(q, θ p) = q``).
    """
    valid = torch.isfinite(ratio)
    q_after = target_mass.sum(-1, keepdim=True) - target_mass.cumsum(-1)  # Σ_{i > j} q
    p_upto = draft_mass.cumsum(-1)  # Σ_{i ≤ j} p
    reach = torch.where(valid, q_after + torch.where(valid, ratio, 0) * p_upto, math.inf)
    piece = (reach < total[:, None]).sum(-1, keepdim=True)
    before = (piece - 1).clamp_min(0)
    level = (total[:, None] - q_after.gather(1, before)) / p_upto.gather(1, before).clamp_min(1e-300)
    return torch.where(piece[:, 0] > 0, level[:, 0], torch.where(valid[:, 0], ratio[:, 0], 0))


def unanimous_acceptance(target: torch.Tensor, law_target: torch.Tensor, unanimous: torch.Tensor) -> torch.Tensor:
    """``γ^u = min(1, c / max(b*, u))`` [B, S] (0 where ``c = 0``): acceptance of a winner the racing drafts agree on.

    ``c`` is the most the slot may be accepted with, ``b*`` the race law the
    weights are solved for and ``u`` the probability that every racing draft
    shows the slot's token (docs/design.md §4.2). It needs no weights, and
    ``u γ^u ≤ c`` whatever the inputs.
    """
    floor = torch.maximum(law_target, unanimous)
    return torch.where(target > 0, (target / torch.where(floor > 0, floor, 1)).clamp_max(1), 0)


def split_acceptance(
    target: torch.Tensor, unanimous: torch.Tensor, accept_unanimous: torch.Tensor, law: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ā, γ^s)`` [B, S]: the accepted mass and the winner's acceptance when the racing drafts disagree.

    The race at weights with law ``b`` has the winner ``y`` with probability
    ``u`` by agreement and ``b − u`` by winning among other tokens, so with
    ``γ^s = clamp((min(c, b) − u γ^u) / (b − u), 0, 1)`` the accepted mass
    ``ā = u γ^u + (b − u) γ^s`` stays ``≤ c`` for any weights, and equals
    ``min(c, b)`` unless a clamp acts (never at the solution, where ``γ^s = γ^u``).
    """
    split = (law - unanimous).clamp_min(0)
    kept = torch.minimum(target, law) - unanimous * accept_unanimous
    accept = torch.where(split > 0, (kept / torch.where(split > 0, split, 1)).clamp(0, 1), 0)
    return unanimous * accept_unanimous + split * accept, accept


@dataclass
class RaceRule:
    """The solved rule for a batch, on the slots of ``supp p`` ([B, S]).

    Attributes:
        index: token id of each slot (ascending), V on padding slots.
        in_l: the slot's token lies in ``L`` (the first tier).
        alpha: log race weight of the slot in its tier.
        mass: ā, ``P(Y = y, y accepted)``, summing to the rule's acceptance.
        q_total: [B, 1], ``Σ q`` of the input rows (float64).
        optimum: α* [B], the best acceptance of any lossless rule.
        residual: [B], residual ``Σ |b − c|`` of the solves (L tier plus p(H*)^n times H tier).
    """

    index: torch.Tensor
    in_l: torch.Tensor
    alpha: torch.Tensor
    mass: torch.Tensor
    q_total: torch.Tensor
    optimum: torch.Tensor
    residual: torch.Tensor


@dataclass
class TierProblems:
    """Both tiers of each row (slots [B, S] of ``supp p``); a tier's race problem is built on first use.

    Attributes:
        index, in_l, q_total, optimum: as in :class:`RaceRule`.
        on: the slot holds a token (not padding); ``in_h``: its token lies in ``H*``.
        q, p: [B, S] float64, the rows on the slots, normalised.
        drafts: [B], the number of drafts k.
        p_h, all_h, any_l: [B], ``p(H*)``, ``p(H*)^k`` (every draft in ``H*``) and ``1 − p(H*)^k``.
        prefix: the slots in ``q/p`` order with ``H*`` as a prefix (one more
            column holds q off ``supp p``).
    """

    index: torch.Tensor
    on: torch.Tensor
    in_l: torch.Tensor
    in_h: torch.Tensor
    q: torch.Tensor
    p: torch.Tensor
    q_total: torch.Tensor
    optimum: torch.Tensor
    drafts: torch.Tensor
    p_h: torch.Tensor
    all_h: torch.Tensor
    any_l: torch.Tensor
    prefix: OptimalPrefix

    @cached_property
    def l_race(self) -> RaceProblems:
        """The L tier: drafts in L race (background ``p(H*)``) for ``a = min(q, λ p)``, ``Σ a = 1 − p(H*)^k``."""
        prefix = self.prefix
        # The prefix order sorts L = supp p \ H* by q/p: after H*, before the p = 0 slots.
        positions = torch.arange(prefix.ratio.shape[1], device=prefix.ratio.device)
        in_l_sorted = (positions >= prefix.size[:, None]) & (prefix.p > 0)
        masses = torch.where(in_l_sorted, prefix.q, 0), torch.where(in_l_sorted, prefix.p, 0)
        level = water_level(prefix.ratio, *masses, self.any_l)
        return RaceProblems(
            draft_mass=torch.where(self.in_l, self.p, 0),
            target=torch.where(self.in_l, torch.minimum(self.q, level[:, None] * self.p), 0),
            background=self.p_h,
            num_draws=self.drafts.double(),
        )

    @cached_property
    def h_solved(self) -> torch.Tensor:
        """[B, S]: the slot lies in an H tier worth solving (``p(H*)^k`` above ``NEGLIGIBLE_TIER``, k > 0)."""
        return self.in_h & ((self.all_h > NEGLIGIBLE_TIER) & (self.drafts > 0))[:, None]

    @cached_property
    def h_target(self) -> torch.Tensor:
        """[B, S]: ``c^H = q / p(H*)^k`` on the H tier, the most its winner may be accepted with (0 elsewhere)."""
        return torch.where(self.h_solved, self.q / self.all_h.clamp_min(1e-300)[:, None], 0)

    @cached_property
    def h_race(self) -> RaceProblems:
        """The H tier, drafts conditioned on ``H*`` (draft law ``p / p(H*)``), racing for ``max(c^H, θ p / p(H*))``.

        The box problem ``b^H ≥ c^H`` over ``α ≥ 0`` has this law in closed form
        (docs/design.md §4.4), so it is solved as the equality problem ``b = b^H``.
        """
        prefix = self.prefix
        positions = torch.arange(prefix.ratio.shape[1], device=prefix.ratio.device)
        in_h_sorted = positions < prefix.size[:, None]  # H* is the prefix of the q/p order
        ratio = torch.where(in_h_sorted, prefix.ratio, math.inf)
        masses = torch.where(in_h_sorted, prefix.q, 0), torch.where(in_h_sorted, prefix.p, 0)
        level = floor_level(ratio, *masses, self.all_h)  # Σ_H max(q, θ p) = p(H*)^k
        scale = self.all_h.clamp_min(1e-300)[:, None]
        return RaceProblems(
            draft_mass=torch.where(self.h_solved, self.p / self.p_h.clamp_min(1e-300)[:, None], 0),
            target=torch.where(self.h_solved, torch.maximum(self.q, level[:, None] * self.p) / scale, 0),
            background=torch.zeros_like(self.p_h),
            num_draws=self.drafts.double(),
        )

    @cached_property
    def unanimous(self) -> torch.Tensor:
        """[B, S]: ``u_y``, the chance that the racing drafts all show y, in the units of y's tier's race.

        ``(p_y + p(H*))^k − p(H*)^k`` in L (some draft in L, each of them y),
        ``(p_y / p(H*))^k`` in the H tier (drafts conditioned on ``H*``).
        """
        k, p_h = self.drafts.double()[:, None], self.p_h[:, None]
        share = self.p / p_h.clamp_min(1e-300)
        in_l = torch.where(p_h > 0, p_h.pow(k) * torch.expm1(k * torch.log1p(share)), self.p.pow(k))
        return torch.where(self.in_l, in_l, torch.where(self.h_solved, share.pow(k), 0))

    def races(self, in_l_race: torch.Tensor) -> RaceProblems:
        """[B, S]: each row's L problem where ``in_l_race`` [B], else its H problem.

        On a CPU a batch racing in one tier takes that tier's problems as they
        are; elsewhere the rows are always merged (no host read).
        """
        if _sync.reads_are_cheap(in_l_race):
            if bool(in_l_race.all()):
                return self.l_race
            if not bool(in_l_race.any()):
                return self.h_race
        low, high, pick = self.l_race, self.h_race, in_l_race[:, None]
        return RaceProblems(
            draft_mass=torch.where(pick, low.draft_mass, high.draft_mass),
            target=torch.where(pick, low.target, high.target),
            background=torch.where(in_l_race, low.background, high.background),
            num_draws=low.num_draws,
        )

    def accepted_mass(self, law_l: torch.Tensor, law_h: torch.Tensor) -> torch.Tensor:
        """[B, S]: ``ā = P(Y = y, y accepted)`` (:func:`split_acceptance` in each tier, the H tier's times ``p(H*)^k``).

        ``law_l``, ``law_h``: the race laws of the two tiers at their weights.
        """
        target = torch.where(self.in_l, self.l_race.target, self.h_target)
        law_target = torch.where(self.in_l, self.l_race.target, self.h_race.target)
        accept_unanimous = unanimous_acceptance(target, law_target, self.unanimous)
        law = torch.where(self.in_l, law_l, law_h)
        mass, _ = split_acceptance(target, self.unanimous, accept_unanimous, law)
        mass = torch.where(self.in_l, mass, mass * self.all_h[:, None])
        return torch.where((self.drafts > 0)[:, None] & self.on, mass, 0)

    def residual(self, target_probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """[B, V]: ``(q − ā) / (1 − Σ ā)`` for the accepted mass ``ā`` = ``mass`` [B, S] on the slots.

        Only supp p changes; padding slots write to a spare column.
        """
        batch, vocab = target_probs.shape
        left = torch.where(self.on, target_probs.gather(1, self.index.clamp_max(vocab - 1)).double(), 0)
        left = (left - mass * self.q_total).clamp_min(0)
        residual = torch.cat([target_probs, target_probs.new_zeros(batch, 1)], -1)
        residual = residual.scatter(1, self.index, left.to(residual.dtype))[:, :vocab]
        return normalize_rows(residual, fallback=target_probs)


@dataclass
class RacingDrafts:
    """Where a batch's drafts stand in the race of step 2 ([B, n] unless noted).

    Attributes:
        slot: each draft's slot of ``supp p`` (0 for drafts that take no part).
        racing: the draft races (it lies in the race's tier; absent drafts and tokens off supp p never do).
        in_l_race: [B], some draft lies in L, so the race runs there.
        agree: [B], the racing drafts all show one token, which wins whatever the weights.
    """

    slot: torch.Tensor
    racing: torch.Tensor
    in_l_race: torch.Tensor
    agree: torch.Tensor

    @classmethod
    def of(cls, tiers: TierProblems, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> RacingDrafts:
        clamped = draft_tokens.clamp_min(0)
        draft_on = (draft_tokens >= 0) & (draft_probs.gather(1, clamped) > 0)
        slot = torch.where(draft_on, torch.searchsorted(tiers.index, clamped), 0)
        draft_l = draft_on & tiers.in_l.gather(1, slot)
        in_l_race = draft_l.any(-1)
        racing = torch.where(in_l_race[:, None], draft_l, draft_on)
        first = slot.gather(1, racing.int().argmax(-1, keepdim=True))  # the first racing draft's slot
        return cls(slot, racing, in_l_race, ~(racing & (slot != first)).any(-1))

    def shares(self, alpha: torch.Tensor | None, speed: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n] float64: each racing draft's chance to win at the weights ``alpha`` [B, S] (None: equal weights).

        ``speed`` [B, n]: each draft's clock runs that many times faster (the tilted race; None: 1).
        """
        if alpha is None:
            weight = self.racing.double()
        else:
            draft_alpha = torch.where(self.racing, alpha.gather(1, self.slot), -math.inf)
            top = torch.where(self.racing.any(-1, keepdim=True), draft_alpha.amax(-1, keepdim=True), 0)
            weight = torch.where(self.racing, torch.exp(draft_alpha - top), 0)
        if speed is not None:
            weight = weight * speed
        return weight / weight.sum(-1, keepdim=True).clamp_min(1e-300)


def _single_draft_plan(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor
) -> EmissionPlan:
    """Leviathan et al.'s rule for rows with at most one draft; it reaches α*(p, q, 1) = Σ min(p, q).

    The rows are renormalised first, because ``optimal`` receives them as given.
    """
    q = target_probs / target_probs.sum(-1, keepdim=True)
    p = draft_probs / draft_probs.sum(-1, keepdim=True)
    return recursive_rejection_plan(q, p, draft_tokens, without_replacement=False)


@register
class Optimal(Verifier):
    """The optimal lossless rule for i.i.d. drafts (see the module docstring).

    Options:
        tol: stop a Newton solve when ``Σ |b − c| ≤ tol`` (race law b, target c); the
            acceptance then misses the optimum by at most about ``tol``.
        max_iters: Newton iterations per solve (0: the closed-form start).
        step: quadrature step in ``log t``; the quadrature error of the race
            law, and so the deviation of the output law from q, is
            ~ exp(−π²/step) (1e-13 at the default 0.3).
        bins: a tier wider than ``2 · bins`` tokens takes no Newton
            iterations at full width (O(|tier| K²) each). Its ``bins`` tokens
            of largest target mass keep their own weight and the others share
            one weight per group of nearly equal ``q/p`` (``bins`` groups), so
            that the race law is exact at these weights without a quadrature
            over the whole tier; the acceptance then misses the optimum by at
            most the merged target mass times the groups' width in ``log q/p``
            (≤ 2e-6 on LLM rows at V = 152k). Where that bound exceeds
            ``MERGE_LOSS`` (1e-5), four times the groups are tried, and then
            per-slot weights (each token's from its group's by one Newton step
            in its own coordinate; flat rows), keeping the weights that accept
            more. Exactness is unaffected either way. 0: Newton at full width.
    """

    name = "optimal"
    draft_scheme = "iid"
    normalizes_inputs = False  # the solve works on q / Σq and p restricted to supp p, renormalised there

    def __init__(
        self,
        *,
        tol: float = 1e-10,
        max_iters: int = 50,
        step: float = 0.3,
        bins: int = 512,
        validate: bool = True,
    ) -> None:
        super().__init__(validate=validate)
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        if max_iters < 0:
            raise ValueError(f"max_iters must be non-negative, got {max_iters}")
        if not 0 < step <= 1:
            raise ValueError(f"step must lie in (0, 1], got {step}")
        if bins < 0:
            raise ValueError(f"bins must be non-negative, got {bins}")
        self.tol, self.max_iters, self.step, self.bins = tol, max_iters, step, bins

    def solve(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, num_drafts: int | torch.Tensor) -> RaceRule:
        """The rule for rows with ``num_drafts`` drafts (int or [B]): weights, γ and masses.

        ``q``, ``p`` [B, V] must be valid probability rows (see :meth:`prepare`).
        """
        batch = target_probs.shape[0]
        k = torch.as_tensor(num_drafts, device=target_probs.device).long().expand(batch)
        repeats = distinct_rows(target_probs, draft_probs, k[:, None])
        if repeats is None:
            return self._solve_rows(target_probs, draft_probs, k)
        first, inverse = repeats
        rule = self._solve_rows(target_probs[first], draft_probs[first], k[first])
        return RaceRule(**{field.name: getattr(rule, field.name)[inverse] for field in fields(RaceRule)})

    def _solve_rows(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, k: torch.Tensor) -> RaceRule:
        tiers = self._tier_problems(target_probs, draft_probs, k)
        # Both tiers in one batch [2B, S]: L rows first, then H rows.
        low, high = tiers.l_race, tiers.h_race
        both = RaceProblems(**{f.name: torch.cat([getattr(low, f.name), getattr(high, f.name)]) for f in fields(low)})
        alpha, law = self._solve_tiers(both)
        residual = law_residual(both, law)
        batch = k.shape[0]
        (alpha_l, alpha_h), (law_l, law_h) = alpha.split(batch), law.split(batch)
        residual_l, residual_h = residual.split(batch)
        return RaceRule(
            index=tiers.index,
            in_l=tiers.in_l,
            alpha=torch.where(tiers.in_l, alpha_l, alpha_h),  # each slot in its own tier
            mass=tiers.accepted_mass(law_l, law_h),
            q_total=tiers.q_total,
            optimum=torch.where(k > 0, tiers.optimum, 0),
            residual=residual_l + tiers.all_h * residual_h,
        )

    def _tier_problems(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, k: torch.Tensor) -> TierProblems:
        """Steps 1–2 of the module docstring up to the race problems: ``H*``, the masses ``a``, both tiers."""
        batch, vocab = target_probs.shape
        n = k.double()

        # Work on supp p only: slots [B, S] in token order; padding slots hold the token id V.
        supported = draft_probs > 0
        count = supported.sum(-1)
        cheap = _sync.reads_are_cheap(count)
        if cheap:
            width = max(int(count.max()), 1)
            full = width == vocab and bool((count == vocab).all())
        else:  # one host read for both
            width, full = torch.stack([count.amax(), (count == vocab).all().long()]).tolist()
            width = max(width, 1)
        if full:
            # Full support (an unwarped draft): the slots are the tokens.
            index = torch.arange(vocab, device=supported.device).repeat(batch, 1)
            on = supported
            p_s, q_s = draft_probs.double(), target_probs.double()
        else:
            index = support_index(supported, count, width)
            on = index < vocab
            gather_at = index.clamp_max(vocab - 1)
            p_s = torch.where(on, draft_probs.gather(1, gather_at).double(), 0)
            q_s = torch.where(on, target_probs.gather(1, gather_at).double(), 0)
        p_s = p_s / p_s.sum(-1, keepdim=True)
        q_total = target_probs.sum(-1, keepdim=True, dtype=torch.float64)
        q_s = q_s / q_total
        # One extra column holds q outside supp p: p = 0 there, so it never joins H*.
        outside = (1 - q_s.sum(-1, keepdim=True)).clamp_min(0)
        q_all, p_all = torch.cat([q_s, outside], -1), torch.cat([p_s, torch.zeros_like(outside)], -1)
        prefix = optimal_prefix(q_all, p_all, k)
        optimum = prefix.alpha
        in_h = prefix_members(prefix.order, prefix.size)[:, :width] & on
        in_l = on & ~in_h

        p_h = torch.where(in_h, p_s, 0).sum(-1)
        p_l = torch.where(in_l, p_s, 0).sum(-1)
        all_h = p_h.pow(n)  # P(every draft in H*)
        any_l = torch.where(k > 0, -torch.expm1(n * torch.log1p(-p_l.clamp_max(1))), 0)  # 1 − p(H*)^n
        return TierProblems(index, on, in_l, in_h, q_s, p_s, q_total, optimum, k, p_h, all_h, any_l, prefix)

    def _solve_tiers(self, problems: RaceProblems) -> tuple[torch.Tensor, torch.Tensor]:
        """Race weights α and their law b [P, S] for tier problems on the slots of ``supp p``.

        A tier wider than ``2 · bins`` slots takes the grouped weights of
        :func:`._race.wide_weights` where it lies (no packing: its passes run
        over the S slots once, whichever tier they belong to); the narrower
        ones are packed to the front and solved by Newton at the width of the
        widest of them. On an accelerator the slot count decides for the whole
        batch with no host read: wider than ``2 · bins`` slots, every problem
        takes the grouped weights (a tier of at most ``bins`` slots keeps one
        weight per slot there; a wider one may lose up to its merge bound), else
        Newton at the slot width.
        """
        if not _sync.reads_are_cheap(problems.draft_mass):
            wide = self.bins > 0 and self.max_iters > 0 and problems.draft_mass.shape[1] > 2 * self.bins
            return self._solve_wide(problems) if wide else self._solve_packed(problems)
        count, many = problems.tier.sum(-1), problems.num_draws >= 2
        wide = (count > 2 * self.bins) & many if self.bins > 0 and self.max_iters > 0 else torch.zeros_like(many)
        if bool(wide.all()):
            return self._solve_wide(problems)
        if not bool(wide.any()):
            return self._solve_packed(problems)
        alpha, law = torch.zeros_like(problems.draft_mass), torch.zeros_like(problems.draft_mass)
        for rows, solve in ((wide.nonzero()[:, 0], self._solve_wide), ((~wide).nonzero()[:, 0], self._solve_packed)):
            alpha[rows], law[rows] = solve(problems.select(rows))
        return alpha, law

    def _solve_wide(self, problems: RaceProblems) -> tuple[torch.Tensor, torch.Tensor]:
        return wide_weights(problems, self.bins, tol=self.tol, step=self.step, max_iters=self.max_iters)

    def _solve_packed(self, problems: RaceProblems) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_solve_tiers` by Newton, with each problem's tier slots packed to the front (on a CPU)."""
        tier = problems.tier
        if not _sync.reads_are_cheap(tier):  # packing would read the widest tier back
            alpha, _, law = solve_race(
                problems, problems.proportional_alpha(), tol=self.tol, max_iters=self.max_iters, step=self.step
            )
            return torch.where(tier, alpha, 0), torch.where(tier, law, 0)
        batch, width = tier.shape
        count = tier.sum(-1)
        packed_width = max(int(count.max()), 1)
        # Each tier slot's packed position; the other slots go to a spare column, cut off after.
        position = torch.where(tier, tier.cumsum(-1) - 1, packed_width)
        slots = torch.arange(width, device=tier.device).expand(batch, width)
        order = slots.new_zeros(batch, packed_width + 1).scatter(1, position, slots)[:, :packed_width]
        in_tier = torch.arange(packed_width, device=tier.device) < count[:, None]
        packed = RaceProblems(
            draft_mass=torch.where(in_tier, problems.draft_mass.gather(1, order), 0),
            target=torch.where(in_tier, problems.target.gather(1, order), 0),
            background=problems.background,
            num_draws=problems.num_draws,
        )
        alpha, _, law = solve_race(
            packed, packed.proportional_alpha(), tol=self.tol, max_iters=self.max_iters, step=self.step
        )

        def unpack(values: torch.Tensor) -> torch.Tensor:
            return torch.where(tier, values.gather(1, position.clamp_max(packed_width - 1)), 0)

        return unpack(alpha), unpack(law)

    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        """Rows with at most one draft take the single-draft plan (optimal for k = 1); the rest race.

        On an accelerator, when the batch has several draft columns, every row
        races (finding the rows would read them back): with k ≤ 1 drafts the race
        has the single-draft plan's law, ``min(1, q/p)`` and residual ``∝ (q − p)_+``.
        """
        if draft_tokens.shape[1] == 1:
            return _single_draft_plan(target_probs, draft_probs, draft_tokens)
        if not _sync.reads_are_cheap(draft_tokens):
            return self._race_plan(target_probs, draft_probs, draft_tokens)
        lone = (draft_tokens >= 0).sum(-1) <= 1
        if not bool(lone.any()):
            return self._race_plan(target_probs, draft_probs, draft_tokens)
        if bool(lone.all()):
            return _single_draft_plan(target_probs, draft_probs, draft_tokens)
        one, many = lone.nonzero()[:, 0], (~lone).nonzero()[:, 0]
        parts = [
            (one, _single_draft_plan(target_probs[one], draft_probs[one], draft_tokens[one])),
            (many, self._race_plan(target_probs[many], draft_probs[many], draft_tokens[many])),
        ]
        draft_emit = target_probs.new_zeros(draft_tokens.shape)
        residual = torch.empty_like(target_probs)
        for rows, part in parts:
            draft_emit[rows] = part.draft_emit
            residual[rows] = part.residual
        return EmissionPlan(draft_emit=draft_emit, residual=residual)

    def _race_plan(
        self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor
    ) -> EmissionPlan:
        """The race of step 2, solving only the tier it runs in, and only where the racing drafts disagree.

        A winner its racing drafts agree on is accepted with :func:`unanimous_acceptance`, which needs no
        weights; the others with :func:`split_acceptance` at the solved weights. Whatever waits (the other
        tier; on a CPU, a batch whose drafts all agree) is solved on a rejection, for the residual. The
        tiers' problems are independent, so this gives the same rule as solving everything at once.
        """
        tiers = self._tier_problems(target_probs, draft_probs, (draft_tokens >= 0).sum(-1))
        drafts = RacingDrafts.of(tiers, draft_probs, draft_tokens)
        race = tiers.races(drafts.in_l_race)
        target = torch.where(drafts.in_l_race[:, None], race.target, tiers.h_target)  # c on the race's tier
        accept_unanimous = unanimous_acceptance(target, race.target, tiers.unanimous)
        accept = accept_unanimous.gather(1, drafts.slot)
        agreed = _sync.reads_are_cheap(drafts.agree) and bool(drafts.agree.all())
        alpha, law = (None, None) if agreed else self._solve_tiers(race)
        if law is not None:
            _, accept_split = split_acceptance(target, tiers.unanimous, accept_unanimous, law)
            accept = torch.where(drafts.agree[:, None], accept, accept_split.gather(1, drafts.slot))

        def recover() -> torch.Tensor:
            """Residual ``q − ā``, both tiers solved."""
            race_law = self._solve_tiers(race)[1] if law is None else law
            _, other_law = self._solve_tiers(tiers.races(~drafts.in_l_race))
            pick = drafts.in_l_race[:, None]
            mass = tiers.accepted_mass(torch.where(pick, race_law, other_law), torch.where(pick, other_law, race_law))
            return tiers.residual(target_probs, mass)

        return EmissionPlan((drafts.shares(alpha) * accept).to(target_probs.dtype), recover=recover)

    def acceptance(
        self, target_probs: torch.Tensor, draft_probs: torch.Tensor, num_drafts: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(acceptance, optimum)`` [B] float64: ``P(Y ∈ drafts)`` of this rule and ``α*``.

        The rule's acceptance is ``Σ ā`` (its accepted mass; its residual has
        no mass on drafts); the gap to ``α*`` is what an unconverged solve costs.
        """
        q, p, _ = self.prepare(
            target_probs, draft_probs, torch.full((target_probs.shape[0], 1), -1, device=target_probs.device)
        )
        rule = self.solve(q, p, num_drafts)
        return rule.mass.sum(-1), rule.optimum
