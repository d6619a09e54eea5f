"""The weighted race between i.i.d. drafts: its law, and the weights that realise a target law.

One *race problem* (a row of a batch of ``P`` problems) has tokens ``y`` with
draft mass ``p_y > 0`` on a tier ``S`` and a background mass ``r = 1 − p(S)``
of draws that never win. ``n`` draws are i.i.d.; each draw ``i`` that lands on
``y ∈ S`` starts an exponential clock of rate ``w_y = e^{α_y}`` and the first
clock to ring wins: draw ``i`` wins with probability ``w_{x_i} / Σ_{j: x_j ∈ S}
w_{x_j}``. The law of the winning token is (NOTES §3)

    b_y(α) = n p_y w_y ∫_0^∞ e^{−t w_y} M(t)^{n−1} dt,   M(t) = r + Σ_{z∈S} p_z e^{−t w_z},

and ``Σ_y b_y = 1 − r^n``. ``b`` is the gradient of the convex function

    Φ(α) = E[log Σ_{i: x_i ∈ S} e^{α_{x_i}}] = ∫_0^∞ ((1 − r^n) e^{−t} − M(t)^n + r^n) / t dt,

so the weights whose race has a prescribed law ``c`` minimise ``Φ(α) − c·α``
(an equality problem), and the weights with ``b ≥ c`` and ``b = c`` wherever
``α > 0`` minimise it over the box ``α ≥ 0`` (a box problem).

Integrals are trapezoid sums over nodes ``t_k`` with weights ``ω_k`` (for
``∫ · d log t``, see :func:`race_terms`; error ~ exp(−π²/h) for step ``h``).
The Hessian of ``Φ`` is

    ∇²Φ = diag(b − e) − U C Uᵀ,   U_yk = p_y w_y e^{−t_k w_y},
    C_k = n (n − 1) ω_k t_k² M_k^{n−2},   e_y = n p_y w_y² ∫ t e^{−t w_y} M^{n−1} dt,

a diagonal minus rank ``K`` (nodes), so a Newton step costs O(|S| K²) through
the Woodbury identity. This module is pure tensor math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


@dataclass
class RaceProblems:
    """A batch of ``P`` race problems over padded token slots ``S``.

    Attributes:
        draft_mass: p_y, [P, S], 0 on slots outside the tier (padding).
        target: c_y, [P, S], the law the race should have on the tier.
        background: r, [P], draft mass of draws that never win.
        num_draws: n, [P] float.
        boxed: [P] bool, box problem (``α ≥ 0``, ``b ≥ c``) instead of an
            equality problem (``b = c``, α up to a shift).
    """

    draft_mass: torch.Tensor
    target: torch.Tensor
    background: torch.Tensor
    num_draws: torch.Tensor
    boxed: torch.Tensor

    @property
    def tier(self) -> torch.Tensor:
        """[P, S] bool: the slot holds a tier token."""
        return self.draft_mass > 0


@dataclass
class RaceTerms:
    """Law of the race at some α, and optionally the pieces of its Hessian.

    Attributes:
        law: b, [P, S].
        diagonal: ``b − e``, [P, S] (None unless asked for).
        low_rank: ``W = U C^{1/2}``, [P, S, K] (None unless asked for), so
            that ∇²Φ = diag(b − e) − W Wᵀ.
    """

    law: torch.Tensor
    diagonal: torch.Tensor | None = None
    low_rank: torch.Tensor | None = None


def race_terms(problems: RaceProblems, alpha: torch.Tensor, step: float, hessian: bool = False) -> RaceTerms:
    """The race law b(α) [P, S] by the trapezoid rule with step ≤ ``step`` in u.

    ``∫_0^∞ f(t) dt = ∫ f(t) t (1 + e^{−u}) du`` with ``log t = c + u − e^{−u}``
    (see ``U_START``): the integrand is analytic in a strip of half-width
    about π/2 and decays double-exponentially at both ends, so the error is
    ~ exp(−π²/h). Each problem has its own window and step; the batch shares
    one number of nodes ``K`` and one [P, S, K] tensor of ``x = t w`` values.
    """
    tier = problems.tier
    alpha = torch.where(tier, alpha, 0)
    empty = ~tier.any(-1)
    top = torch.where(tier, alpha, -math.inf).amax(-1).masked_fill(empty, 0)
    bottom = torch.where(tier, alpha, math.inf).amin(-1).masked_fill(empty, 0)
    offset = -top - SHIFT
    span = (top - bottom + SHIFT + UPPER_MARGIN) - U_START  # u window length, [P]
    nodes = math.ceil(float(span.max()) / step) + 1
    grid = torch.linspace(0, 1, nodes, dtype=alpha.dtype, device=alpha.device)
    u = U_START + span[:, None] * grid  # [P, K]
    compress = torch.exp(-u)
    t = torch.exp(offset[:, None] + u - compress)
    quad = (span / (nodes - 1))[:, None] * (1 + compress)  # trapezoid weight of each node for ∫ · ds
    # The [P, S, K] tensors are the bulk of the work: two are allocated, the rest is in place.
    x = t[:, None, :] * torch.exp(alpha)[:, :, None]  # t_k w_y
    clock = x.neg().exp_()  # e^{−t w_y}
    p = problems.draft_mass
    n = problems.num_draws[:, None]
    survive = problems.background[:, None] + torch.bmm(p[:, None, :], clock)[:, 0]  # M_k, [P, K]
    x_clock = clock.mul_(x)
    weight = n * quad * survive.pow(n - 1)  # n ω M^{n−1}, [P, K]
    law = p * torch.bmm(x_clock, weight[:, :, None])[..., 0]
    if not hessian:
        return RaceTerms(law=law)
    second = p * torch.bmm(x.mul_(x_clock), weight[:, :, None])[..., 0]
    # C_k = n (n − 1) ω_k t_k² M_k^{n−2}; the t_k w_y factors already sit in x_clock.
    scale = (n * (n - 1) * quad * survive.pow((n - 2).clamp_min(0))).sqrt()
    low_rank = x_clock.mul_(p[:, :, None]).mul_(scale[:, None, :])
    return RaceTerms(law=law, diagonal=law - second, low_rank=low_rank)


def kkt_residual(problems: RaceProblems, alpha: torch.Tensor, law: torch.Tensor) -> torch.Tensor:
    """[P]: ``Σ_y |projected gradient|`` of ``Φ − c·α``; 0 exactly at the solution.

    The gradient is ``b − c``; for box problems a slot at ``α = 0`` pushed
    outwards (``b > c``) is at its bound, and ``|α − max(0, α − g)|`` is used.
    """
    grad = law - problems.target
    boxed = problems.boxed[:, None]
    projected = torch.where(boxed, alpha - (alpha - grad).clamp_min(0), grad)
    return torch.where(problems.tier, projected.abs(), 0).sum(-1)


def newton_direction(problems: RaceProblems, terms: RaceTerms, alpha: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """[P, S]: the Newton direction ``d = H⁻¹ g`` on the free slots (0 elsewhere).

    ``H = diag(D) − W Wᵀ`` restricted to the free slots, plus ``τ v vᵀ`` with
    ``v = D`` where ``H`` is singular along ``1`` (equality problems, and box
    problems with no slot at its bound: the race is invariant under a common
    shift of α). Since ``vᵀ1 ≠ 0`` that makes it invertible, and when
    ``1ᵀg = 0`` the solution still satisfies ``H d = g``. Woodbury:

        (D − W' Σ W'ᵀ)⁻¹ = D⁻¹ + D⁻¹ W' (Σ⁻¹ − W'ᵀ D⁻¹ W')⁻¹ W'ᵀ D⁻¹,

    with ``W' = [W, v]``, ``Σ = diag(1, …, 1, −τ)``. Overwrites ``terms.low_rank``.
    """
    assert terms.diagonal is not None and terms.low_rank is not None
    grad = torch.where(free, terms.law - problems.target, 0)
    diagonal = torch.where(free & (terms.diagonal > 0), terms.diagonal, 1)
    low_rank = torch.where(free[:, :, None], terms.low_rank, 0)
    at_bound = problems.tier & ~free
    gauge = ~(problems.boxed & at_bound.any(-1)) & free.any(-1)  # [P]
    v = torch.where(free & gauge[:, None], diagonal, 0)
    tau = 1 / v.sum(-1).clamp_min(1e-300)  # makes τ (vᵀ1)² = vᵀ1, the scale of D
    if low_rank.shape[1] <= low_rank.shape[2]:
        # Fewer slots than nodes: the dense |S| × |S| system is the cheaper one.
        hessian = torch.diag_embed(diagonal) - torch.bmm(low_rank, low_rank.transpose(1, 2))
        hessian = hessian + tau[:, None, None] * v[:, :, None] * v[:, None, :]
        return torch.where(free, torch.linalg.solve(hessian, grad[:, :, None])[..., 0], 0)
    # Whitened: H' = D^{1/2} (I − E Σ Eᵀ) D^{1/2} with E = D^{−1/2} [W, v] (W in place).
    root = diagonal.sqrt()
    whitened = low_rank.div_(root[:, :, None])
    gauge_column = torch.where(free & gauge[:, None], root, 0)  # D^{−1/2} v
    grad_w = grad / root
    cross = torch.bmm(whitened.transpose(1, 2), gauge_column[:, :, None])  # Wᵀ D⁻¹ v, [P, K, 1]
    inner = torch.cat(
        [
            torch.cat([-torch.bmm(whitened.transpose(1, 2), whitened), -cross], -1),
            torch.cat([-cross.transpose(1, 2), -(gauge_column**2).sum(-1)[:, None, None]], -1),
        ],
        1,
    )  # Σ⁻¹ − EᵀE without Σ⁻¹, [P, K+1, K+1]
    sigma_inv = torch.ones(inner.shape[:2], dtype=inner.dtype, device=inner.device)
    sigma_inv[:, -1] = torch.where(gauge, -1 / tau, -1)
    inner = inner + torch.diag_embed(sigma_inv)
    rhs = torch.cat(
        [torch.bmm(whitened.transpose(1, 2), grad_w[:, :, None]), (gauge_column * grad_w).sum(-1)[:, None, None]], 1
    )
    solution = torch.linalg.solve(inner, rhs)
    lifted = torch.bmm(whitened, solution[:, :-1])[..., 0] + gauge_column * solution[:, -1]
    return torch.where(free, (grad_w + lifted) / root, 0)


def solve_race(
    problems: RaceProblems,
    alpha: torch.Tensor,
    *,
    tol: float,
    max_iters: int,
    step: float,
    bins: int = 0,
    max_halvings: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights α [P, S] whose race law meets the target, and their KKT residual [P].

    Damped projected Newton.

    Starts from ``alpha`` (box problems are projected onto α ≥ 0 and shifted
    down until one slot touches 0, which lowers ``Φ − c·α`` since
    ``Σ c ≤ 1``). A step ``α − s d`` (projected for box problems) is accepted
    when it lowers the KKT residual: Φ itself is only known to ~1e-13 from
    quadrature, too coarse to compare near the solution. Problems stop at
    residual ≤ ``tol`` or when no step size helps. With ``bins > 0``, problems
    wider than ``2 · bins`` slots first take the start of :func:`binned_start`.
    """
    tier, boxed = problems.tier, problems.boxed[:, None]
    if max_iters > 0 and bins > 0 and int(tier.sum(-1).max()) > 2 * bins:
        alpha = binned_start(problems, bins, tol=tol, max_iters=max_iters, step=step)

    def normalise(a: torch.Tensor) -> torch.Tensor:
        a = torch.where(tier, a, 0)
        low = torch.where(tier, a, math.inf).amin(-1, keepdim=True)
        high = torch.where(tier, a, -math.inf).amax(-1, keepdim=True)
        shifted = torch.where(boxed, (a - low).clamp_min(0), a - high)  # box: touch 0; else max α = 0
        shifted = torch.where(boxed, shifted.clamp_max(ALPHA_SPAN), shifted.clamp_min(-ALPHA_SPAN))
        return torch.where(tier & torch.isfinite(low), shifted, 0)

    alpha = normalise(torch.where(boxed, alpha.clamp_min(0), alpha))
    law = race_terms(problems, alpha, step).law
    residual = kkt_residual(problems, alpha, law)
    solvable = (problems.num_draws >= 2) & tier.any(-1)
    active = solvable & (residual > tol)
    for _ in range(max_iters):
        if not bool(active.any()):
            break
        terms = race_terms(problems, alpha, step, hessian=True)
        free = tier & ~(boxed & (alpha <= 0) & (terms.law > problems.target))
        direction = newton_direction(problems, terms, alpha, free & active[:, None])
        size = torch.ones_like(residual)
        searching = active.clone()
        for _ in range(max_halvings):
            trial = alpha - size[:, None] * direction
            trial = normalise(torch.where(boxed, trial.clamp_min(0), trial))
            trial_residual = kkt_residual(problems, trial, race_terms(problems, trial, step).law)
            better = searching & (trial_residual < residual)
            alpha = torch.where(better[:, None], trial, alpha)
            residual = torch.where(better, trial_residual, residual)
            searching = searching & ~better
            if not bool(searching.any()):
                break
            size = torch.where(searching, size / 2, size)
        # A problem no step size improves has reached the quadrature's noise floor.
        active = active & ~searching & (residual > tol)
    return alpha, torch.where(solvable, residual, 0)


def binned_start(problems: RaceProblems, bins: int, *, tol: float, max_iters: int, step: float) -> torch.Tensor:
    """A start α [P, S] for wide problems from a reduced problem of ``bins`` super-tokens.

    At the solution ``b_y = p_y G(α_y)`` with one increasing function ``G`` per
    problem, so ``α_y`` depends on the slot only through ``τ_y = c_y / p_y``.
    Slots are binned uniformly in ``log(τ / (n − τ))`` (slots with ``c = 0``
    share one more bin); each bin becomes one token with the bin's total ``p`` and
    ``c``, which is exact for slots sharing one α. The reduced problem is
    solved, and each slot's α follows from its bin's by one Newton step on
    ``log G(α) = log τ_y``: ``d log G / dα = G'/G = (b − e)/b`` (the diagonal of
    the Hessian over the law). The error is second order in the bin width.
    """
    tier = problems.tier
    p, c = problems.draft_mass, problems.target
    positive = tier & (c > 0)
    ratio = torch.where(positive, c / torch.where(tier, p, 1), 1)
    log_ratio = torch.log(ratio)
    # G rises from 0 to n, and α → ∞ as τ → n: bin in log(τ / (n − τ)), which grows like α.
    key = log_ratio - torch.log((problems.num_draws[:, None] - ratio).clamp_min(1e-300))
    low = torch.where(positive, key, math.inf).amin(-1, keepdim=True)
    high = torch.where(positive, key, -math.inf).amax(-1, keepdim=True)
    low = torch.where(torch.isfinite(low), low, 0)
    span = (high - low).clamp_min(1e-12)
    which = ((key - low) / span * bins).floor().clamp(0, bins - 1).long()
    which = torch.where(positive, which, bins)
    zeros = p.new_zeros(p.shape[0], bins + 1)
    reduced = RaceProblems(
        draft_mass=zeros.scatter_add(1, which, torch.where(tier, p, 0)),
        target=zeros.scatter_add(1, which, torch.where(tier, c, 0)),
        background=problems.background,
        num_draws=problems.num_draws,
        boxed=problems.boxed,
    )
    reduced_tier = reduced.tier
    mass = torch.where(reduced_tier, reduced.draft_mass, 1)
    start = torch.where(reduced_tier, torch.log(reduced.target / mass), 0)
    # The reduced problem is itself wide enough to start from a coarser one.
    coarser = bins // 8 if bins >= 512 else 0
    coarse, _ = solve_race(reduced, start, tol=tol, max_iters=max_iters, step=step, bins=coarser)
    terms = race_terms(reduced, coarse, step, hessian=True)
    assert terms.diagonal is not None
    log_level = torch.log((terms.law / mass).clamp_min(1e-300))  # log G(α) of each bin
    slope = torch.where(reduced_tier & (terms.diagonal > 0), terms.law / terms.diagonal, 0)
    alpha = coarse.gather(1, which)
    step_to_slot = (log_ratio - log_level.gather(1, which)) * slope.gather(1, which)
    return torch.where(positive, alpha + step_to_slot, torch.where(tier, alpha, 0))
