"""The weighted race between i.i.d. drafts: its law, and the weights that realise a target law.

One *race problem* (a row of a batch of ``P`` problems) has tokens ``y`` with
draft mass ``p_y > 0`` on a tier ``S`` and a background mass ``r = 1 − p(S)``
of draws that never win. ``n`` draws are i.i.d.; each draw ``i`` that lands on
``y ∈ S`` starts an exponential clock of rate ``w_y = e^{α_y}`` and the first
clock to ring wins: draw ``i`` wins with probability ``w_{x_i} / Σ_{j: x_j ∈ S}
w_{x_j}``. The law of the winning token is (docs/design.md §4.3)

    b_y(α) = n p_y w_y ∫_0^∞ e^{−t w_y} M(t)^{n−1} dt,   M(t) = r + Σ_{z∈S} p_z e^{−t w_z},

and ``Σ_y b_y = 1 − r^n``. ``b`` is the gradient of the convex function

    Φ(α) = E[log Σ_{i: x_i ∈ S} e^{α_{x_i}}] = ∫_0^∞ ((1 − r^n) e^{−t} − M(t)^n + r^n) / t dt,

so the weights whose race has a prescribed law ``c`` minimise ``Φ(α) − c·α``
(α up to a common shift, which the race ignores).

Integrals are trapezoid sums over nodes ``t_k`` with weights ``ω_k`` (for
``∫ · d log t``, see :func:`quadrature_nodes`; error ~ exp(−π²/h) for step ``h``).
The Hessian of ``Φ`` is

    ∇²Φ = diag(b − e) − U C Uᵀ,   U_yk = p_y w_y e^{−t_k w_y},
    C_k = n (n − 1) ω_k t_k² M_k^{n−2},   e_y = n p_y w_y² ∫ t e^{−t w_y} M^{n−1} dt,

a diagonal minus rank ``K`` (nodes), so a Newton step costs O(|S| K²) through
the Woodbury identity. Every pass over the slots takes them in blocks
(:func:`slot_blocks`), so that beyond [P, S] values and the [P, K, K] Woodbury
system no intermediate holds more than about one chunk of elements
(``TERMS_CHUNK`` = 2^22, 32 MiB in float64, on a CPU; ``ACCELERATOR_CHUNK`` =
2^24 elsewhere), whatever the width: never a [P, S, K] tensor of a wide tier.
This module is pure tensor math.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from .. import _sync

#: Quadrature window. Nodes are uniform in u, with s = log t = c + u − e^{−u}
#: and c = −max α − SHIFT: for u ≫ 0 that is the plain log grid, and below it
#: the map compresses t → 0 double-exponentially, where the integrand only
#: decays like t w. From u = −3.5 (t w_max ≤ e^{−38}) to s = −min α + 4, past
#: which the slowest clock has rung with probability 1 − exp(−e^4).
SHIFT = 2.0
U_START = -3.5
UPPER_MARGIN = 4.0
#: Widest range of log weights a tier may span. Weights further apart than e^40 only move masses
#: below ~1e-17, while the quadrature's node count grows with the range: bounding it bounds the
#: memory and time of every race evaluation. The rule stays exact (b is computed at the bounded α).
ALPHA_SPAN = 40.0
#: On problems wider than ``COARSE_MIN_WIDTH`` slots, the Newton iterations first run with
#: quadrature step ``min(2 · step, COARSE_STEP)`` down to a residual of ``COARSE_TOL``, then with
#: the requested step (error ~ exp(−π²/h): 7e-8 at h = 0.6). Narrower ones cost about the same
#: at either step, so they skip the coarse phase.
COARSE_STEP = 0.6
COARSE_TOL = 1e-6
COARSE_MIN_WIDTH = 256
#: On problems of at least ``EXPANSION_MIN_WIDTH`` slots, :func:`race_law` groups the slots into
#: buckets of α-width ``EXPANSION_WIDTH`` and expands each clock in α about its bucket's centre to
#: order ``EXPANSION_ORDER`` (:func:`expanded_race_law`): the remainder, ~ sup|D^{J+1} e^{−s}|
#: (Δ/2)^{J+1} / (J+1)!, stays under the quadrature's own error (measured: relative ≤ 1e-14 per slot
#: at V = 150k, α spans up to 40). It replaces S·K exponentials by O(S·J + (span/Δ)·K·J) work.
EXPANSION_MIN_WIDTH = 16384
EXPANSION_WIDTH = 0.1
EXPANSION_ORDER = 10
#: A wide problem whose grouped weights may lose more than this much acceptance also tries the
#: per-slot weights of :func:`binned_start` (see :func:`wide_weights`).
MERGE_LOSS = 1e-5
#: The grouped weights already miss the optimum by up to the merge bound (~1e-6 on LLM rows):
#: their reduced problem is solved to this residual, not further (each Newton step past it
#: gains ~10× on a residual that no longer shows in the acceptance).
GROUPED_TOL = 1e-8
#: Widest window in u of a tier whose α spans at most ``ALPHA_SPAN`` (every α the solver evaluates):
#: on an accelerator the number of quadrature nodes comes from it, with no host read.
WINDOW_BOUND = ALPHA_SPAN + SHIFT + UPPER_MARGIN - U_START
#: On an accelerator, the line search of a Newton iteration evaluates this many step sizes at once
#: (halving each time) instead of halving until one helps, which would read back every halving.
TRIAL_STEPS = 4
#: Chunks, in elements of the [P, ·, K] (or [P, ·, J]) tensors a pass over slot blocks holds
#: (:func:`slot_blocks`): no intermediate of the race's passes is larger than about one chunk,
#: whatever the tier's width. The race law's (:func:`race_law`) stay in a CPU's caches; the
#: Newton terms' (:func:`race_terms`, :func:`newton_direction`) hold a whole tier of up to
#: ``TERMS_CHUNK / (P K)`` slots (hundreds for a batch of 64 rows), which then takes one pass
#: and keeps its [P, S, K] values instead of recomputing them.
LAW_CHUNK = 1 << 20
EXPANSION_CHUNK = 1 << 22
TERMS_CHUNK = 1 << 22
#: Least chunk on an accelerator, where each chunk costs kernel launches and memory is plentiful
#: (2^24 float64 elements: 128 MiB per tensor).
ACCELERATOR_CHUNK = 1 << 24


def masked_range(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest, highest) [P, 1] of ``values`` [P, S] over ``mask`` per row; ±inf (inverted) on rows it leaves empty."""
    low = torch.where(mask, values, math.inf).amin(-1, keepdim=True)
    high = torch.where(mask, values, -math.inf).amax(-1, keepdim=True)
    return low, high


def slot_blocks(reference: torch.Tensor, width: int, per_slot: int, chunk: int) -> list[slice]:
    """Consecutive blocks covering slots ``0..width − 1``, each of at most ``chunk // per_slot`` slots (at least one).

    ``per_slot`` is what one slot adds to a pass's tensors (``P · K`` for [P, ·, K]), so each
    holds at most ``max(chunk, per_slot)`` elements; off the CPU (``reference``'s device)
    ``chunk`` is at least ``ACCELERATOR_CHUNK``. One block is ``slice(0, width)``, which
    indexing returns as the tensor itself. The blocks follow from shapes alone (no host read).
    """
    chunk = chunk if _sync.reads_are_cheap(reference) else max(chunk, ACCELERATOR_CHUNK)
    per_block = max(1, chunk // max(1, per_slot))
    return [slice(start, min(start + per_block, width)) for start in range(0, max(width, 1), per_block)]


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """The per-block results [P, ·] side by side (the one block's as it is)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _clocks(t: torch.Tensor, rate: torch.Tensor, block: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_yk = t_k w_y`` and ``e^{−x_yk}`` [P, ·, K] on the slots ``block``."""
    x = t[:, None, :] * rate[:, block, None]
    return x, x.neg().exp_()


@dataclass
class RaceProblems:
    """A batch of ``P`` race problems over padded token slots ``S``.

    Attributes:
        draft_mass: p_y, [P, S], 0 on slots outside the tier (padding).
        target: c_y, [P, S], the law the race should have on the tier.
        background: r, [P], draft mass of draws that never win.
        num_draws: n, [P] float.
    """

    draft_mass: torch.Tensor
    target: torch.Tensor
    background: torch.Tensor
    num_draws: torch.Tensor

    @cached_property
    def tier(self) -> torch.Tensor:
        """[P, S] bool: the slot holds a tier token (computed once: the masses are never changed in place)."""
        return self.draft_mass > 0

    def proportional_alpha(self) -> torch.Tensor:
        """[P, S]: ``α = log(c / p)`` on the tier (−inf where ``c = 0``), 0 elsewhere.

        The start of every solve: ``w ∝ c/p`` is exact when the race is far from saturated.
        """
        tier = self.tier
        return torch.where(tier, torch.log(self.target / torch.where(tier, self.draft_mass, 1)), 0)

    def select(self, index: torch.Tensor, width: int | None = None) -> RaceProblems:
        """The problems ``index`` [P'], keeping their first ``width`` slots (all by default)."""
        return RaceProblems(
            draft_mass=self.draft_mass[index, :width],
            target=self.target[index, :width],
            background=self.background[index],
            num_draws=self.num_draws[index],
        )


@dataclass
class RaceTerms:
    """Law of the race at some α and the pieces of its Hessian.

    Attributes:
        law: b, [P, S].
        diagonal: ``b − e``, [P, S].
        nodes: the quadrature nodes ``t`` [P, K].
        rate: the weights ``w = e^α`` [P, S] (1 off the tier).
        draft_mass: p, [P, S].
        scale: ``C_k^{1/2} / t_k`` [P, K] (``x_yk = t_k w_y`` brings the ``t_k``).
        blocks: the slot blocks of the passes (:func:`slot_blocks`, ``TERMS_CHUNK``).
        low_rank: ``W = U C^{1/2}`` [P, S, K], so that ∇²Φ = diag(b − e) − W Wᵀ, kept from the
            law's pass when one block holds every slot; else None, and each block's is recomputed.
    """

    law: torch.Tensor
    diagonal: torch.Tensor
    nodes: torch.Tensor
    rate: torch.Tensor
    draft_mass: torch.Tensor
    scale: torch.Tensor
    blocks: list[slice]
    low_rank: torch.Tensor | None

    def low_rank_block(self, block: slice) -> torch.Tensor:
        """``W_yk = p_y x_yk e^{−x_yk} · scale_k`` [P, ·, K] on the slots ``block``."""
        if self.low_rank is not None:  # kept only when ``block`` is every slot
            return self.low_rank
        x, clock = _clocks(self.nodes, self.rate, block)
        return clock.mul_(x).mul_(self.draft_mass[:, block, None]).mul_(self.scale[:, None, :])


def quadrature_nodes(
    problems: RaceProblems, alpha: torch.Tensor, step: float, lift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``t`` [P, K] and weights ``ω`` [P, K] with ``∫_0^∞ g(t) d log t ≈ Σ_k ω_k g(t_k)``.

    ``d log t = (1 + e^{−u}) du`` with ``log t = c + u − e^{−u}`` (see
    ``U_START``): the integrands are analytic in a strip of half-width about
    π/2 and decay double-exponentially at both ends, so the trapezoid rule
    with step ``h ≤ step`` in u errs by ~ exp(−π²/h). Each problem has its own
    window and step; the batch shares one number of nodes ``K``: on a CPU from
    the widest window (a host read), elsewhere from ``WINDOW_BOUND``, which
    needs α to span at most ``ALPHA_SPAN`` on each tier (as :func:`_normalise`
    leaves it). ``lift`` widens the window by that much at the fast end, for
    clocks up to ``e^lift`` times faster than the fastest weight (the tilted race).
    """
    tier = problems.tier
    empty = ~tier.any(-1)
    bottom, top = (bound[:, 0].masked_fill(empty, 0) for bound in masked_range(alpha, tier))
    top = top + lift
    span = (top - bottom + SHIFT + UPPER_MARGIN) - U_START  # u window length, [P]
    widest = float(span.max()) if _sync.reads_are_cheap(span) else WINDOW_BOUND + lift
    nodes = math.ceil(widest / step) + 1
    grid = torch.linspace(0, 1, nodes, dtype=alpha.dtype, device=alpha.device)
    u = U_START + span[:, None] * grid
    compress = torch.exp(-u)
    t = torch.exp((-top - SHIFT)[:, None] + u - compress)
    quad = (span / (nodes - 1))[:, None] * (1 + compress)
    return t, quad


def survival(problems: RaceProblems, t: torch.Tensor, rate: torch.Tensor, blocks: list[slice]) -> torch.Tensor:
    """``M_k = r + Σ_y p_y e^{−t_k w_y}`` [P, K] at the nodes ``t`` [P, K], one pass over the slot ``blocks``."""
    survive = problems.background[:, None].expand_as(t).clone()
    for block in blocks:
        _, clock = _clocks(t, rate, block)
        survive += torch.bmm(problems.draft_mass[:, None, block], clock)[:, 0]
    return survive


def race_law(problems: RaceProblems, alpha: torch.Tensor, step: float, chunk: int | None = None) -> torch.Tensor:
    """The race law b(α) [P, S], in slot blocks of at most ``chunk`` [P, ·, K] elements (``LAW_CHUNK``).

    Two passes: the survival function ``M_k`` accumulates over all slots, then
    ``b_y = n p_y Σ_k ω_k x_yk e^{−x_yk} M_k^{n−1}`` with ``x_yk = t_k w_y``.
    Chunking keeps the [P, S, K] values of a wide tier out of memory (they are
    recomputed in the second pass), which on a CPU is faster than storing them;
    elsewhere chunks hold at least ``ACCELERATOR_CHUNK`` elements (:func:`slot_blocks`).
    """
    tier = problems.tier
    alpha = torch.where(tier, alpha, 0)
    t, quad = quadrature_nodes(problems, alpha, step)
    if alpha.shape[1] >= EXPANSION_MIN_WIDTH:
        return expanded_race_law(problems, alpha, t, quad)
    rate = torch.exp(alpha)
    p = problems.draft_mass
    n = problems.num_draws[:, None]
    size, width, nodes = p.shape[0], p.shape[1], t.shape[1]
    blocks = slot_blocks(p, width, size * nodes, LAW_CHUNK if chunk is None else chunk)
    survive = survival(problems, t, rate, blocks)
    weight = n * quad * survive.pow(n - 1)  # n ω M^{n−1}, [P, K]
    law = torch.empty_like(p)
    for block in blocks:
        x = t[:, None, :] * rate[:, block, None]
        x_clock = torch.exp(x.neg()).mul_(x)
        law[:, block] = p[:, block] * torch.bmm(x_clock, weight[:, :, None])[..., 0]
    return law


def race_law_by_count(
    problems: RaceProblems,
    alpha: torch.Tensor,
    step: float,
    classes: int,
    slots: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """``B_{y,m}`` [P, R, N]: the chance that y wins the race at ``alpha`` while exactly m draws show y.

    For the slots ``slots`` [P, R] (None: every slot, R = S). ``N`` = ``classes``, at
    least the most draws of any problem (from shapes: no host read); entry
    ``m − 1`` holds m. With ``A_yk = p_y e^{−x_yk}`` (``x_yk = t_k w_y``) the draws
    that show y and the others' survival ``M_k − A_yk`` (docs/design.md §4.7),

        B_{y,m} = C(n, m) m Σ_k ω_k x_yk A_yk^m (M_k − A_yk)^{n−m},

    which sums over m to :func:`race_law`'s ``b_y = n p_y Σ_k ω_k x_yk e^{−x_yk} M_k^{n−1}``.
    ``M`` sums over every slot (through :class:`SlotExpansion` on tiers of
    ``EXPANSION_MIN_WIDTH`` slots or more); the terms are evaluated at the
    requested slots only, in blocks of at most ``chunk`` [P, ·, K, N] elements
    (``LAW_CHUNK``), so splitting the drafts' few tokens costs one survival pass.
    """
    tier = problems.tier
    alpha = torch.where(tier, alpha, 0)
    t, quad = quadrature_nodes(problems, alpha, step)
    rate = torch.exp(alpha)
    p = problems.draft_mass
    n = problems.num_draws
    size, width, nodes = p.shape[0], p.shape[1], t.shape[1]
    if width >= EXPANSION_MIN_WIDTH:
        survive = SlotExpansion.of(problems, alpha).survival(problems, t)
    else:
        survive = survival(problems, t, rate, slot_blocks(p, width, size * nodes, LAW_CHUNK))
    if slots is not None:
        p, rate = p.gather(1, slots), rate.gather(1, slots)
    most = max(classes, 1)
    count = torch.arange(1, most + 1, dtype=p.dtype, device=p.device)  # m, [N]
    rest = n[:, None] - count  # n − m, [P, N]
    ways = torch.where(
        rest >= 0,
        count * torch.exp(torch.lgamma(n[:, None] + 1) - torch.lgamma(count + 1) - torch.lgamma(rest.clamp_min(0) + 1)),
        0,
    )  # C(n, m) m, [P, N]
    blocks = slot_blocks(p, p.shape[1], size * nodes * most, LAW_CHUNK if chunk is None else chunk)
    law = p.new_empty(size, p.shape[1], most)
    for block in blocks:
        x, clock = _clocks(t, rate, block)
        shows = (clock * p[:, block, None])[..., None]  # A, [P, ·, K, 1]
        others = (survive[:, None, :] - shows[..., 0]).clamp_min(0)[..., None]
        terms = shows.pow(count) * others.pow(rest.clamp_min(0)[:, None, None, :])  # [P, ·, K, N]
        law[:, block] = torch.einsum("pskm,psk,pk->psm", terms, x, quad) * ways[:, None, :]
    return law


def clock_derivatives(s: torch.Tensor, order: int) -> torch.Tensor:
    """[..., order + 1]: ``D^j e^{−s}`` for j = 0..order, with ``D = s d/ds``.

    With ``s = t e^α``, ``D = d/dα``; ``D^j e^{−s} = e^{−s} Σ_i S(j, i) (−s)^i`` with
    Stirling numbers of the second kind ``S(j, i)``.
    """
    stirling = torch.zeros(order + 1, order + 1, dtype=s.dtype, device=s.device)
    stirling[0, 0] = 1
    for j in range(1, order + 1):
        for i in range(1, j + 1):
            stirling[j, i] = i * stirling[j - 1, i] + stirling[j - 1, i - 1]
    powers = torch.stack([(-s) ** i for i in range(order + 1)], dim=-1)
    return torch.exp(-s)[..., None] * (powers @ stirling.T)


@dataclass
class SlotExpansion:
    """The slots of a batch of race problems in buckets of α, for sums over the nodes in O(S·J + G·K·J).

    Slots are grouped into G buckets of α-width ``width`` with centres ``a_g``;
    with ``δ_y = α_y − a_g`` and ``s_gk = t_k e^{a_g}``, Taylor's formula in α gives

        e^{−t_k w_y} = Σ_j D^j e^{−s_gk} δ_y^j / j!,   t_k w_y e^{−t_k w_y} = −Σ_j D^{j+1} e^{−s_gk} δ_y^j / j!

    (:func:`clock_derivatives`), so a sum over the slots needs only the bucket
    moments ``m_gj = Σ_{y∈g} p_y δ_y^j`` and a sum over the nodes only the
    bucket centres. The truncation after ``order`` terms errs by less than the
    quadrature (see ``EXPANSION_WIDTH``). Buckets are taken in blocks of at most
    ``chunk`` [P, ·, K, J] elements (``EXPANSION_CHUNK``; at least
    ``ACCELERATOR_CHUNK`` off the CPU), and slots in blocks of at most ``chunk``
    [P, ·, J] elements (:func:`slot_blocks`).

    Attributes:
        bucket: [P, S] each slot's bucket; centre: [P, G] ``a_g``; delta: [P, S] ``δ_y`` (0 off the tier).
        factorial: [J + 1] j!; order: J; chunk: elements per block.
        kept: the scaled powers of a block of every slot, once computed.
    """

    bucket: torch.Tensor
    centre: torch.Tensor
    delta: torch.Tensor
    factorial: torch.Tensor
    order: int
    chunk: int
    kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        problems: RaceProblems,
        alpha: torch.Tensor,
        width: float = EXPANSION_WIDTH,
        order: int = EXPANSION_ORDER,
        chunk: int | None = None,
    ) -> SlotExpansion:
        tier = problems.tier
        low, high = (torch.where(torch.isfinite(bound), bound, 0) for bound in masked_range(alpha, tier))
        if _sync.reads_are_cheap(alpha):
            groups = int(((high - low) / width).max()) + 1
        else:  # α spans at most ALPHA_SPAN (see quadrature_nodes)
            groups = math.ceil(ALPHA_SPAN / width) + 1
        bucket = ((alpha - low) / width).floor().clamp(0, groups - 1).long()
        centre = low + (torch.arange(groups, dtype=alpha.dtype, device=alpha.device) + 0.5) * width  # [P, G]
        delta = torch.where(tier, alpha - centre.gather(1, bucket), 0)
        # j! on the device itself: a tensor built from host values would be a blocking copy there.
        factorial = torch.arange(order + 1, dtype=alpha.dtype, device=alpha.device).clamp_min(1).cumprod(0)
        return cls(bucket, centre, delta, factorial, order, EXPANSION_CHUNK if chunk is None else chunk)

    def slot_blocks(self) -> list[slice]:
        size, width = self.delta.shape
        return slot_blocks(self.delta, width, size * (self.order + 1), self.chunk)

    def bucket_blocks(self, nodes: int) -> list[slice]:
        size, groups = self.centre.shape
        return slot_blocks(self.delta, groups, size * nodes * (self.order + 2), self.chunk)

    def scaled_powers(self, block: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """δ^j / j! [P, ·, J+1] on the slots ``block``, and the slots' buckets repeated to that shape.

        Kept when the block is every slot (one chunk holds them), for the next pass.
        """
        key = (block.start, block.stop)
        if key in self.kept:
            return self.kept[key]
        step = self.delta[:, block, None].expand(-1, -1, self.order)
        powers = torch.cat([torch.ones_like(step[..., :1]), step.cumprod(-1)], -1) / self.factorial
        pair = powers, self.bucket[:, block, None].expand(-1, -1, self.order + 1)
        if key == (0, self.delta.shape[1]):
            self.kept[key] = pair
        return pair

    def survival(self, problems: RaceProblems, t: torch.Tensor) -> torch.Tensor:
        """``M_k = r + Σ_g Σ_j D^j e^{−s_gk} m_gj / j!`` [P, K] at the nodes ``t`` [P, K]."""
        p = problems.draft_mass
        moments = p.new_zeros(*self.centre.shape, self.order + 1)
        for block in self.slot_blocks():
            powers, index = self.scaled_powers(block)
            moments.scatter_add_(1, index, p[:, block, None] * powers)
        survive = problems.background[:, None].expand_as(t).clone()
        for block in self.bucket_blocks(t.shape[1]):
            derivs = clock_derivatives(t[:, None, :] * torch.exp(self.centre[:, block, None]), self.order)
            survive += torch.einsum("pgkj,pgj->pk", derivs, moments[:, block])
        return survive

    def clock_sums(self, t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``Σ_k W_k x_yk e^{−x_yk}`` [P, S], ``x_yk = t_k w_y``, for node weights ``W`` = ``weight`` [P, K].

        Per bucket ``H_gj = −Σ_k W_k D^{j+1} e^{−s_gk}``, then ``Σ_j H_gj δ_y^j / j!`` per slot.
        """
        size, groups = self.centre.shape
        level = weight.new_empty(size, groups, self.order + 1)  # H_gj
        for block in self.bucket_blocks(t.shape[1]):
            derivs = clock_derivatives(t[:, None, :] * torch.exp(self.centre[:, block, None]), self.order + 1)
            level[:, block] = -torch.einsum("pgkj,pk->pgj", derivs[..., 1:], weight)
        sums = []
        for block in self.slot_blocks():
            powers, index = self.scaled_powers(block)
            sums.append((level.gather(1, index) * powers).sum(-1))
        return _join(sums)


def expanded_race_law(
    problems: RaceProblems,
    alpha: torch.Tensor,
    t: torch.Tensor,
    quad: torch.Tensor,
    *,
    width: float = EXPANSION_WIDTH,
    order: int = EXPANSION_ORDER,
    chunk: int | None = None,
) -> torch.Tensor:
    """The race law b(α) [P, S] of :func:`race_law` at the nodes ``t``, ``ω`` [P, K], in O(S·J + G·K·J).

    ``b_y = p_y Σ_k n ω_k M_k^{n−1} x_yk e^{−x_yk}`` with ``M`` and the sum over
    the nodes from the buckets of :class:`SlotExpansion`.
    """
    expansion = SlotExpansion.of(problems, alpha, width, order, chunk)
    survive = expansion.survival(problems, t)
    n = problems.num_draws[:, None]
    return problems.draft_mass * expansion.clock_sums(t, n * quad * survive.pow(n - 1))


def race_terms(problems: RaceProblems, alpha: torch.Tensor, step: float, chunk: int | None = None) -> RaceTerms:
    """The race law b(α) [P, S] and the pieces of its Hessian (see the module docstring).

    Two passes over slot blocks of at most ``chunk`` [P, ·, K] elements
    (``TERMS_CHUNK``, :func:`slot_blocks`), as in :func:`race_law`: ``M_k``, then
    ``b`` and ``e`` per slot. A single block keeps its ``W`` [P, S, K] for
    :func:`newton_direction`; with several, no [P, S, K] tensor is formed and each
    block's ``W`` is recomputed where it is used (:meth:`RaceTerms.low_rank_block`).
    """
    tier = problems.tier
    alpha = torch.where(tier, alpha, 0)
    t, quad = quadrature_nodes(problems, alpha, step)
    rate = torch.exp(alpha)
    p = problems.draft_mass
    n = problems.num_draws[:, None]
    blocks = slot_blocks(p, p.shape[1], p.shape[0] * t.shape[1], TERMS_CHUNK if chunk is None else chunk)
    survive = problems.background[:, None]  # M_k, [P, K] once summed
    for block in blocks:
        x, clock = _clocks(t, rate, block)  # t_k w_y and e^{−t_k w_y}
        survive = survive + torch.bmm(p[:, None, block], clock)[:, 0]
    weight = n * quad * survive.pow(n - 1)  # n ω M^{n−1}, [P, K]
    # C_k = n (n − 1) ω_k t_k² M_k^{n−2}; the t_k w_y factors sit in x e^{−x}.
    scale = (n * (n - 1) * quad * survive.pow((n - 2).clamp_min(0))).sqrt()
    laws, seconds, low_rank = [], [], None
    for block in blocks:
        if len(blocks) > 1:  # one block still holds its pass-one values; the others are recomputed
            x, clock = _clocks(t, rate, block)
        x_clock = clock.mul_(x)
        mass = p if len(blocks) == 1 else p[:, block]  # even a slice of every column costs an op per call
        laws.append(mass * torch.bmm(x_clock, weight[:, :, None])[..., 0])
        seconds.append(mass * torch.bmm(x.mul_(x_clock), weight[:, :, None])[..., 0])
        if len(blocks) == 1:
            low_rank = x_clock.mul_(p[:, :, None]).mul_(scale[:, None, :])
    law = _join(laws)
    return RaceTerms(law, law - _join(seconds), t, rate, p, scale, blocks, low_rank)


def law_residual(problems: RaceProblems, law: torch.Tensor) -> torch.Tensor:
    """[P]: ``Σ_y |b_y − c_y|`` over the tier, the gradient of ``Φ − c·α`` in norm 1; 0 exactly at the solution."""
    return torch.where(problems.tier, (law - problems.target).abs(), 0).sum(-1)


def newton_direction(problems: RaceProblems, terms: RaceTerms) -> torch.Tensor:
    """[P, S]: the Newton direction ``d = H⁻¹ g`` on the tier (0 elsewhere).

    ``H = diag(D) − W Wᵀ`` on the tier is singular along ``1`` (the race is
    invariant under a common shift of α); ``τ v vᵀ`` with ``v = D`` is added.
    Since ``vᵀ1 ≠ 0`` that makes it invertible, and when ``1ᵀg = 0`` the
    solution still satisfies ``H d = g``. Woodbury:

        (D − W' Σ W'ᵀ)⁻¹ = D⁻¹ + D⁻¹ W' (Σ⁻¹ − W'ᵀ D⁻¹ W')⁻¹ W'ᵀ D⁻¹,

    with ``W' = [W, v]``, ``Σ = diag(1, …, 1, −τ)``. Its pieces are sums over
    slots, accumulated over the slot blocks of ``terms`` (no tensor beyond one
    block's [P, ·, K] and the [P, K, K] system); the lift ``W' x`` is per slot.
    """
    tier = problems.tier
    grad = torch.where(tier, terms.law - problems.target, 0)
    diagonal = torch.where(tier & (terms.diagonal > 0), terms.diagonal, 1)
    gauge = tier.any(-1)  # [P]
    v = torch.where(tier, diagonal, 0)
    tau = 1 / v.sum(-1).clamp_min(1e-300)  # makes τ (vᵀ1)² = vᵀ1, the scale of D
    blocks = terms.blocks
    if len(blocks) == 1 and grad.shape[1] <= terms.nodes.shape[1]:
        # Fewer slots than nodes: the dense |S| × |S| system is the cheaper one.
        low_rank = torch.where(tier[:, :, None], terms.low_rank_block(blocks[0]), 0)
        hessian = torch.diag_embed(diagonal) - torch.bmm(low_rank, low_rank.transpose(1, 2))
        hessian = hessian + tau[:, None, None] * v[:, :, None] * v[:, None, :]
        # solve_ex: no host read of its error flag; a singular system gives a step that lowers nothing.
        return torch.where(tier, torch.linalg.solve_ex(hessian, grad[:, :, None]).result[..., 0], 0)
    # Whitened: H' = D^{1/2} (I − E Σ Eᵀ) D^{1/2} with E = D^{−1/2} [W, v] (W in place).
    root = diagonal.sqrt()
    gauge_column = torch.where(tier, root, 0)  # D^{−1/2} v
    grad_w = grad / root

    def whitened(block: slice) -> torch.Tensor:
        """``D^{−1/2} W`` [P, ·, K] on the tier slots of ``block``."""
        return torch.where(tier[:, block, None], terms.low_rank_block(block), 0).div_(root[:, block, None])

    gram, cross, top, kept = _woodbury_sums(blocks, whitened, gauge_column, grad_w)
    inner = torch.cat(
        [
            torch.cat([-gram, -cross], -1),
            torch.cat([-cross.transpose(1, 2), -(gauge_column**2).sum(-1)[:, None, None]], -1),
        ],
        1,
    )  # Σ⁻¹ − EᵀE without Σ⁻¹, [P, K+1, K+1]
    sigma_inv = torch.ones(inner.shape[:2], dtype=inner.dtype, device=inner.device)
    sigma_inv[:, -1] = torch.where(gauge, -1 / tau, -1)
    inner = inner + torch.diag_embed(sigma_inv)
    rhs = torch.cat([top, (gauge_column * grad_w).sum(-1)[:, None, None]], 1)
    solution = torch.linalg.solve_ex(inner, rhs).result
    parts = [torch.bmm(whitened(block) if kept is None else kept, solution[:, :-1])[..., 0] for block in blocks]
    lifted = _join(parts) + gauge_column * solution[:, -1]
    return torch.where(tier, (grad_w + lifted) / root, 0)


def _woodbury_sums(
    blocks: list[slice], whitened: Callable[[slice], torch.Tensor], gauge_column: torch.Tensor, grad_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(EᵀE [P, K, K], Eᵀ D^{−1/2} v [P, K, 1], Eᵀ D^{−1/2} g [P, K, 1], E or None)``, summed over ``blocks``.

    ``E = whitened(block)`` per block; the one block's ``E`` is handed back for the lift (with
    several, the lift recomputes each).
    """
    gram = cross = top = None
    for block in blocks:
        part = whitened(block)
        part_t = part.transpose(1, 2)
        sums = (
            torch.bmm(part_t, part),
            torch.bmm(part_t, gauge_column[:, block, None]),
            torch.bmm(part_t, grad_w[:, block, None]),
        )
        totals = sums if gram is None else [old + new for old, new in zip((gram, cross, top), sums, strict=True)]
        gram, cross, top = totals
    return gram, cross, top, part if len(blocks) == 1 else None


@dataclass(frozen=True)
class NewtonSchedule:
    """How the Newton loops run: stop once ``Σ |b − c| ≤ tol`` or after ``max_iters`` iterations, quadrature
    step ``step`` (docs/design.md §4.5), and at most ``max_halvings`` step halvings per line search."""

    tol: float
    max_iters: int
    step: float
    max_halvings: int


def solve_race(
    problems: RaceProblems,
    alpha: torch.Tensor,
    *,
    tol: float,
    max_iters: int,
    step: float,
    max_halvings: int = 30,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights α [P, S] whose race law meets the target, their residual [P] and law b(α) [P, S].

    Damped Newton from ``alpha``. A step ``α − s d`` is
    accepted when it lowers the residual ``Σ |b − c|``: Φ itself is only known to
    ~1e-13 from quadrature, too coarse to compare near the solution. Each
    iteration works on the problems still above ``tol`` only, trimmed to their
    widest tier; a problem stops when no step size helps. Each iteration costs
    O(|S| K²) time (problems of many thousand slots take :func:`wide_weights`
    instead) and holds, beyond [P, S] values and the [P, K, K] system, tensors of
    at most one chunk (:func:`race_terms`, :func:`newton_direction`).
    The returned law is always the law at the returned α. On an accelerator
    every problem takes part in every pass, masked, so that the only host reads
    are the convergence checks of :func:`_newton_loop`.
    """
    tier = problems.tier
    alpha = _normalise(problems, alpha)
    # A single draw always wins its race (b = p); only problems with two or more draws integrate.
    law = torch.where(problems.num_draws[:, None] >= 1, problems.draft_mass, 0)
    solvable = (problems.num_draws >= 2) & tier.any(-1)
    # Most iterations run on a coarser quadrature (half the nodes, a quarter of the Woodbury
    # cost); its solution is within ~exp(−π²/h) of the fine one, which the last steps remove.
    coarse = solvable & (tier.sum(-1) > COARSE_MIN_WIDTH)
    fine = NewtonSchedule(tol=tol, max_iters=max_iters, step=step, max_halvings=max_halvings)
    rough = replace(fine, tol=max(tol, COARSE_TOL), step=min(2 * step, COARSE_STEP))
    if not _sync.reads_are_cheap(alpha):
        if max_iters > 0 and tier.shape[1] > COARSE_MIN_WIDTH:
            coarse_law = race_law(problems, alpha, rough.step)
            coarse_residual = torch.where(coarse, law_residual(problems, coarse_law), 0)
            alpha, _, _ = _newton_loop(problems, alpha, coarse_law, coarse_residual, rough)
        law = torch.where(solvable[:, None], race_law(problems, alpha, step), law)
    else:
        coarse = coarse.nonzero()[:, 0]
        if coarse.numel() > 0 and max_iters > 0:
            sub, sub_alpha = problems.select(coarse), alpha[coarse]
            sub_law = race_law(sub, sub_alpha, rough.step)
            sub_residual = law_residual(sub, sub_law)
            sub_alpha, _, _ = _newton_loop(sub, sub_alpha, sub_law, sub_residual, rough)
            alpha = alpha.index_put((coarse,), sub_alpha)
        racing = solvable.nonzero()[:, 0]
        if racing.numel() > 0:
            law[racing] = race_law(problems.select(racing), alpha[racing], step)
    residual = law_residual(problems, law)
    residual = torch.where(solvable, residual, 0)
    alpha, law, residual = _newton_loop(problems, alpha, law, residual, fine)
    return alpha, torch.where(solvable, law_residual(problems, law), 0), law


def _newton_loop(
    problems: RaceProblems,
    alpha: torch.Tensor,
    law: torch.Tensor,
    residual: torch.Tensor,
    schedule: NewtonSchedule,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Newton iterations on the problems with ``residual > tol``, each on the unconverged ones only.

    On an accelerator, :func:`_masked_newton_loop` instead.
    """
    if not _sync.reads_are_cheap(residual):
        return _masked_newton_loop(problems, alpha, law, residual, schedule)
    tier = problems.tier
    active = residual > schedule.tol
    # The last iteration's problems, width and (when all of them took the full step) terms at their
    # current α: problems only ever leave ``active``, so an unchanged count means the same problems.
    carried: tuple[int, int, RaceProblems, RaceTerms | None] | None = None
    for _ in range(schedule.max_iters):
        chosen = active.nonzero()[:, 0]
        if chosen.numel() == 0:
            break
        if carried is not None and carried[0] == chosen.numel():
            _, width, sub, terms = carried
        else:
            width = int(tier[chosen].any(0).nonzero().max()) + 1
            sub, terms = problems.select(chosen, width), None
        sub_alpha, sub_law, sub_residual, improved, terms = _newton_iteration(
            sub, alpha[chosen, :width], residual[chosen], terms, schedule
        )
        alpha[chosen, :width] = sub_alpha
        law[chosen, :width] = sub_law
        residual[chosen] = sub_residual
        # A problem no step size improves has reached the quadrature's noise floor.
        active[chosen] = improved & (sub_residual > schedule.tol)
        carried = (chosen.numel(), width, sub, terms)
    return alpha, law, residual


def _masked_newton_loop(
    problems: RaceProblems,
    alpha: torch.Tensor,
    law: torch.Tensor,
    residual: torch.Tensor,
    schedule: NewtonSchedule,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_newton_loop` with no host read but one convergence check every ``_sync.CHECK_EVERY`` iterations.

    Every problem takes part in every iteration; only the active ones move. The
    line search evaluates ``TRIAL_STEPS`` sizes ``s, s/2, s/4, …`` at once and
    takes the largest that lowers the residual; ``s`` is 1 after a successful
    step, and a problem none of them helps searches on from the next smaller
    size in the next iteration, stopping after ``max_halvings`` halvings in all
    (as the CPU loop gives up after ``max_halvings`` halvings in one iteration).
    """
    count = residual.shape[0]
    halvings = torch.pow(0.5, torch.arange(TRIAL_STEPS, dtype=alpha.dtype, device=alpha.device))[:, None]
    trials = problems.select(torch.arange(count, device=alpha.device).repeat(TRIAL_STEPS))  # [T·P, S]
    step = schedule.step
    first = torch.ones_like(residual)  # largest trial size of the next line search
    active = residual > schedule.tol
    for iteration in range(schedule.max_iters):
        if _sync.check_now(active, iteration) and not bool(active.any()):
            break
        direction = newton_direction(problems, race_terms(problems, alpha, step))
        trial = _normalise(trials, (alpha - (halvings * first)[:, :, None] * direction).flatten(0, 1))
        trial_law = race_law(trials, trial, step)
        trial_residual = law_residual(trials, trial_law).view(TRIAL_STEPS, count)
        better = active & (trial_residual < residual)  # [T, P]
        improved = better.any(0)
        pick = better.int().argmax(0)  # the largest size that helps (0 where none)
        rows = pick * count + torch.arange(count, device=pick.device)
        alpha = torch.where(improved[:, None], trial[rows], alpha)
        law = torch.where(improved[:, None], trial_law[rows], law)
        residual = torch.where(improved, trial_residual.gather(0, pick[None])[0], residual)
        first = torch.where(improved, 1.0, torch.where(active, first * 0.5**TRIAL_STEPS, first))
        # A problem no step size improves has reached the quadrature's noise floor.
        active = active & (residual > schedule.tol) & (first > 0.5**schedule.max_halvings)
    return alpha, law, residual


def _normalise(problems: RaceProblems, alpha: torch.Tensor) -> torch.Tensor:
    """α [P, S] shifted to its gauge, the highest slot at 0, and spanning at most ``ALPHA_SPAN``."""
    tier = problems.tier
    alpha = torch.where(tier, alpha, 0)
    _, high = masked_range(alpha, tier)
    shifted = (alpha - high).clamp_min(-ALPHA_SPAN)
    return torch.where(tier & torch.isfinite(high), shifted, 0)


def _newton_iteration(
    problems: RaceProblems,
    alpha: torch.Tensor,
    residual: torch.Tensor,
    terms: RaceTerms | None,
    schedule: NewtonSchedule,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, RaceTerms | None]:
    """One damped Newton step: (α, b(α), residual, improved [P], terms at the new α or None).

    ``terms`` are the :class:`RaceTerms` at ``alpha`` when the caller has them (None: evaluated here).
    The full step is evaluated with its Hessian pieces, which the next iteration reuses when every
    problem takes it (the common case); shorter steps evaluate the law alone.
    """
    step = schedule.step
    terms = race_terms(problems, alpha, step) if terms is None else terms
    law = terms.law
    direction = newton_direction(problems, terms)
    size = torch.ones_like(residual)
    searching = torch.ones_like(residual, dtype=torch.bool)
    next_terms = None
    for halving in range(schedule.max_halvings):
        trial = alpha - size[:, None] * direction
        trial = _normalise(problems, trial)
        trial_terms = race_terms(problems, trial, step) if halving == 0 else None
        trial_law = trial_terms.law if trial_terms is not None else race_law(problems, trial, step)
        trial_residual = law_residual(problems, trial_law)
        better = searching & (trial_residual < residual)
        alpha = torch.where(better[:, None], trial, alpha)
        law = torch.where(better[:, None], trial_law, law)
        residual = torch.where(better, trial_residual, residual)
        searching = searching & ~better
        if not bool(searching.any()):
            next_terms = trial_terms  # every problem took the full step: the terms are at the new α
            break
        size = torch.where(searching, size / 2, size)
    return alpha, law, residual, ~searching, next_terms


def ratio_bins(problems: RaceProblems, binned: torch.Tensor, bins: int) -> torch.Tensor:
    """[P, S] long: each ``binned`` slot's bin 0..bins − 1, uniform in ``log(τ / (n − τ))``; ``bins`` elsewhere.

    ``τ = c / p``. At the solution ``b_y = p_y G(α_y)`` with one increasing
    ``G`` per problem rising from 0 to ``n``, so ``α_y`` depends on the slot
    only through ``τ_y``, and grows like ``log(τ / (n − τ))`` as ``τ → n``.
    ``binned`` slots need ``c > 0``.
    """
    p, c = problems.draft_mass, problems.target
    ratio = torch.where(binned, c / torch.where(binned, p, 1), 1)
    key = torch.log(ratio) - torch.log((problems.num_draws[:, None] - ratio).clamp_min(1e-300))
    low, high = masked_range(key, binned)
    low = torch.where(torch.isfinite(low), low, 0)
    span = (high - low).clamp_min(1e-12)
    which = ((key - low) / span * bins).floor().clamp(0, bins - 1).long()
    return torch.where(binned, which, bins)


def merge_slots(problems: RaceProblems, group: torch.Tensor, width: int) -> RaceProblems:
    """The problems over ``width`` groups [P, width]: each group one token with its slots' total ``p`` and ``c``.

    Exact for slots that share one weight: ``M(t)`` only sees their summed mass.
    """
    tier = problems.tier
    zeros = problems.draft_mass.new_zeros(group.shape[0], width)
    return RaceProblems(
        draft_mass=zeros.scatter_add(1, group, torch.where(tier, problems.draft_mass, 0)),
        target=zeros.scatter_add(1, group, torch.where(tier, problems.target, 0)),
        background=problems.background,
        num_draws=problems.num_draws,
    )


def binned_start(problems: RaceProblems, bins: int, *, tol: float, step: float, max_iters: int = 50) -> torch.Tensor:
    """Weights α [P, S] for wide problems from a reduced problem of ``bins`` super-tokens.

    Slots are binned by :func:`ratio_bins` (slots with ``c = 0`` share one
    more bin) and merged (:func:`merge_slots`). The reduced problem is solved,
    and each slot's α follows from its bin's by one Newton step on ``log G(α)
    = log τ_y``: ``d log G / dα = G'/G = (b − e)/b`` (the diagonal of the
    Hessian over the law). The error is second order in the bin width.
    """
    tier = problems.tier
    positive = tier & (problems.target > 0)
    which = ratio_bins(problems, positive, bins)
    reduced = merge_slots(problems, which, bins + 1)
    reduced_tier = reduced.tier
    mass = torch.where(reduced_tier, reduced.draft_mass, 1)
    start = reduced.proportional_alpha()
    coarser = bins // 8
    # On an accelerator the reduced width stands in for the widest reduced tier (no host read).
    widest = int(reduced_tier.sum(-1).max()) if _sync.reads_are_cheap(mass) else reduced_tier.shape[1]
    if bins >= 512 and widest > 2 * coarser:
        # The reduced problem is itself wide enough to start from a coarser one.
        start = binned_start(reduced, coarser, tol=tol, step=step, max_iters=max_iters)
    coarse, _, _ = solve_race(reduced, start, tol=tol, max_iters=max_iters, step=step)
    terms = race_terms(reduced, coarse, step)
    log_level = torch.log((terms.law / mass).clamp_min(1e-300))  # log G(α) of each bin
    slope = torch.where(reduced_tier & (terms.diagonal > 0), terms.law / terms.diagonal, 0)
    alpha = coarse.gather(1, which)
    step_to_slot = (problems.proportional_alpha() - log_level.gather(1, which)) * slope.gather(1, which)
    return torch.where(positive, alpha + step_to_slot, torch.where(tier, alpha, 0))


def log_ratio_bins(problems: RaceProblems, binned: torch.Tensor, bins: int) -> torch.Tensor:
    """[P, S] long: each ``binned`` slot's bin 0..bins − 1, about uniform in ``log(c / p)``; ``bins`` elsewhere.

    The key is the bit pattern of the positive float64 ``τ``, an increasing
    function that is piecewise linear in ``log₂ τ`` (exponent, then mantissa);
    its bins are up to ~1.4× wider in ``log τ`` than uniform ones, at a
    fraction of the cost of two logarithms per slot. ``binned`` slots need ``c > 0``.
    """
    ratio = problems.target / torch.where(binned, problems.draft_mass, 1)
    key = ratio.view(torch.int64) >> 32  # sign 0, 11 exponent and the top 20 mantissa bits
    low = torch.where(binned, key, torch.iinfo(torch.int64).max).amin(-1, keepdim=True)
    high = torch.where(binned, key, -1).amax(-1, keepdim=True)
    which = (key - low) * bins // (high - low + 1).clamp_min(1)
    return torch.where(binned, which, bins)


def slot_groups(problems: RaceProblems, bins: int) -> tuple[torch.Tensor, RaceProblems, torch.Tensor]:
    """Groups of slots that share one weight: ``(group [P, S], reduced problems [P, 2 · bins + 1], loss [P])``.

    The ``bins`` slots of largest target mass ``c`` keep a group each; the
    others are binned by :func:`log_ratio_bins` (slots with ``c = 0`` share one
    more bin) and merged (:func:`merge_slots`). ``loss`` bounds what the
    merging costs: ``Σ_y (c_y − p_y C_g / P_g)_+``, the target mass a group's
    race cannot give its slots when the group meets its own total ``b_g ≥ C_g``.
    """
    tier, c = problems.tier, problems.target
    heavy = min(bins, c.shape[1])
    top = c.topk(heavy, dim=-1).indices
    merged = tier & (c > 0)
    merged.scatter_(1, top, False)
    own = torch.arange(heavy, device=top.device).expand_as(top)
    group = (log_ratio_bins(problems, merged, bins) + heavy).scatter(1, top, own)
    reduced = merge_slots(problems, group, heavy + bins + 1)
    level = (reduced.target / torch.where(reduced.tier, reduced.draft_mass, 1)).gather(1, group)
    loss = torch.where(tier, c - problems.draft_mass * level, 0).clamp_min(0).sum(-1)
    return group, reduced, loss


def grouped_race(
    reduced: RaceProblems, group: torch.Tensor, draft_mass: torch.Tensor, *, tol: float, step: float, max_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights α [P, S], constant on the groups of :func:`slot_groups`, and their exact race law b(α) [P, S].

    Slots sharing a weight race like one token of their summed mass
    (:func:`merge_slots`), so once the reduced problem is solved, ``b_y = p_y
    b_g / P_g`` is the law of the full race at these weights, with no pass over
    all slots and quadrature nodes.
    """
    mass = torch.where(reduced.tier, reduced.draft_mass, 1)
    start = reduced.proportional_alpha()
    alpha, _, law = solve_race(reduced, start, tol=max(tol, GROUPED_TOL), max_iters=max_iters, step=step)
    tier = draft_mass > 0
    share = (law / mass).gather(1, group)
    return torch.where(tier, alpha.gather(1, group), 0), torch.where(tier, draft_mass * share, 0)


def wide_weights(
    problems: RaceProblems, bins: int, *, tol: float, step: float, max_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights α [P, S] and their exact law b(α) [P, S] for problems wider than ``2 · bins``, without full-width Newton.

    First the grouped weights (:func:`slot_groups`, :func:`grouped_race`): no
    quadrature over all slots, and an acceptance loss of at most the merge
    bound, which is tiny where the target mass sits on a few hundred slots (LLM
    rows). Where the bound exceeds ``MERGE_LOSS`` (flat rows), the per-slot
    weights of :func:`binned_start` are tried too, their law evaluated over all
    slots, and the weights that keep more target mass ``Σ min(c, b)`` win. On
    an accelerator, :func:`_masked_wide_weights`.
    """
    if not _sync.reads_are_cheap(problems.draft_mass):
        return _masked_wide_weights(problems, bins, tol=tol, step=step, max_iters=max_iters)
    group, reduced, loss = slot_groups(problems, bins)
    alpha, law = grouped_race(reduced, group, problems.draft_mass, tol=tol, step=step, max_iters=max_iters)
    loose = (loss > MERGE_LOSS).nonzero()[:, 0]
    if loose.numel() > 0 and problems.draft_mass.shape[1] > 8 * bins:
        # Four times the groups: the bound shrinks with the groups' width and the merged mass.
        sub = problems.select(loose)
        group, reduced, finer_loss = slot_groups(sub, 4 * bins)
        alpha[loose], law[loose] = grouped_race(reduced, group, sub.draft_mass, tol=tol, step=step, max_iters=max_iters)
        loose = loose[finer_loss > MERGE_LOSS]
    if loose.numel() > 0:
        sub = problems.select(loose)
        binned = binned_start(sub, bins, tol=tol, step=step, max_iters=max_iters)
        binned = _normalise(sub, binned)
        binned_law = race_law(sub, binned, step)

        def kept(values: torch.Tensor) -> torch.Tensor:
            return torch.where(sub.tier, torch.minimum(sub.target, values), 0).sum(-1)

        better = kept(binned_law) > kept(law[loose])
        rows = loose[better]
        alpha[rows], law[rows] = binned[better], binned_law[better]
    return alpha, law


def _masked_wide_weights(
    problems: RaceProblems, bins: int, *, tol: float, step: float, max_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wide_weights` with no host read: every problem takes every fallback, and masks keep what it would.

    Finding the problems whose merge bound exceeds ``MERGE_LOSS`` would read
    them back; the finer groups and per-slot weights are computed for all
    problems instead, and kept only by those.
    """

    def kept(values: torch.Tensor) -> torch.Tensor:
        return torch.where(problems.tier, torch.minimum(problems.target, values), 0).sum(-1)

    group, reduced, loss = slot_groups(problems, bins)
    alpha, law = grouped_race(reduced, group, problems.draft_mass, tol=tol, step=step, max_iters=max_iters)
    loose = loss > MERGE_LOSS
    if problems.draft_mass.shape[1] > 8 * bins:
        group, reduced, finer_loss = slot_groups(problems, 4 * bins)
        finer = grouped_race(reduced, group, problems.draft_mass, tol=tol, step=step, max_iters=max_iters)
        alpha, law = (torch.where(loose[:, None], new, old) for new, old in zip(finer, (alpha, law), strict=True))
        loose = loose & (finer_loss > MERGE_LOSS)
    binned = binned_start(problems, bins, tol=tol, step=step, max_iters=max_iters)
    binned = _normalise(problems, binned)
    binned_law = race_law(problems, binned, step)
    # Problems with fewer than two draws are exact as grouped (b = p); their quadrature law is not.
    better = (loose & (problems.num_draws >= 2) & (kept(binned_law) > kept(law)))[:, None]
    return torch.where(better, binned, alpha), torch.where(better, binned_law, law)
