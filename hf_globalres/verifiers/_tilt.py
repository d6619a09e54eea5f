"""The tilted race: the clocks of the most-drawn tokens run θ times faster (docs/design.md §4.8).

One *tilted problem* (a row of a batch of ``P``) has slots ``y`` with draft
mass ``p_y > 0`` — every token a draw may show, whether it races or not — and
``n`` i.i.d. draws. Let ``c_y`` be the number of draws on y and ``μ = max_y c_y``.
A draw on a racing slot y starts an exponential clock of rate
``w_y θ^{[c_y = μ]}`` (``w = e^α``); the other draws start none; the first clock
to ring wins. ``optimal_block`` with ``tilt`` runs this race in place of
``optimal``'s, with the same targets (docs/design.md §4.2 and docs/design.md §4.4): the law ``b``
is the gradient of the convex ``Φ(α) = E[log Σ_i rate_i]``, so the weights
with ``b = c`` minimise ``Φ − c·α``.

The law has a closed form by ``μ``. With ``A_y = p_y e^{−t w_y}``,
``Ã_y = p_y e^{−t θ w_y}`` and the truncated exponential series in ``s``

    F^μ_y = Σ_{j<μ} (A_y s)^j / j! + (Ã_y s)^μ / μ!,    G^μ_y = Σ_{j<μ} (A_y s)^j / j!,

``E[e^{−tR}; max c = μ] = n! [s^n] (Π_y F^μ_y − Π_y G^μ_y)`` for the total rate
``R``, and the chance that y wins while ``c_y = m`` is

    B_{y,m} = n! Σ_μ ∫_0^∞ [s^n] (F'^μ_{y,m} s^m Π_{z≠y} F^μ_z − G'^μ_{y,m} s^m Π_{z≠y} G^μ_z) dt,

``F'^μ_{y,m}`` the rate of the m draws on y times their term of ``F^μ_y``.
The product over all slots is the exponential of a sum of series logarithms,
and "all but y" one series division, so a law costs ``O(S K N²)`` per ``μ``
(``K`` quadrature nodes, ``N`` draws). The Hessian is
``∇²Φ = diag(b) − E[R_y R_z / R²]``, whose off-diagonal part is, per node and
``μ``, the bilinear form ``h_y · Hankel(P) · h_z`` of the series
``h_y = t F'_y / F_y``: it is formed densely, so tilted tiers stay narrow
(``TILT_MAX_WIDTH`` slots; draft laws cut to their top 64 tokens are).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .. import _sync
from ._race import TRIAL_STEPS, RaceProblems, _normalise, law_residual, quadrature_nodes

#: Widest tier the tilted race is solved on: its Newton step holds a dense [P, S, S] Hessian.
TILT_MAX_WIDTH = 256
#: Longest Newton step in any α coordinate (the solve starts from the untilted weights, which
#: can be far from the tilted ones).
MAX_STEP = 3.0


@dataclass
class TiltedProblems:
    """A batch of ``P`` tilted race problems over padded slots ``S``.

    Attributes:
        mass: p_y [P, S] of every token a draw may show (0 on padding).
        racing: [P, S] bool, a draw on the slot starts a clock.
        target: c_y [P, S], the law the race should have (0 off the racing slots).
        num_draws: n [P] float.
        tilt: θ [P] ≥ 1 (1: the untilted race).
        most_tilt: a bound on θ (widens the quadrature window, no host read).
    """

    mass: torch.Tensor
    racing: torch.Tensor
    target: torch.Tensor
    num_draws: torch.Tensor
    tilt: torch.Tensor
    most_tilt: float

    @functools.cached_property
    def race(self) -> RaceProblems:
        """The racing slots as a :class:`~._race.RaceProblems` (the quadrature window, the gauge, the
        residual), built once: every law evaluation and step of a solve uses it."""
        mass = torch.where(self.racing, self.mass, 0)
        return RaceProblems(mass, self.target, 1 - mass.sum(-1), self.num_draws)

    def select(self, index: torch.Tensor, width: int | None = None) -> TiltedProblems:
        """The problems ``index`` [P'], keeping their first ``width`` slots (all by default)."""
        return TiltedProblems(
            self.mass[index, :width],
            self.racing[index, :width],
            self.target[index, :width],
            self.num_draws[index],
            self.tilt[index],
            self.most_tilt,
        )


@dataclass
class TiltedTerms:
    """The tilted race at some α: ``law`` b [P, S], ``by_count`` ``B_{y,m}`` [P, S, N] (entry m − 1),
    and the Hessian of Φ [P, S, S] when asked for."""

    law: torch.Tensor
    by_count: torch.Tensor
    hessian: torch.Tensor | None

    def select(self, rows: torch.Tensor) -> TiltedTerms:
        return TiltedTerms(self.law[rows], self.by_count[rows], None if self.hessian is None else self.hessian[rows])

    def put(self, rows: torch.Tensor, other: TiltedTerms) -> None:
        """Writes ``other``, the terms of the problems ``rows``, in place."""
        self.law[rows], self.by_count[rows] = other.law, other.by_count
        if self.hessian is not None and other.hessian is not None:
            self.hessian[rows] = other.hessian


#: A polynomial in one slot's clocks: ``{(a, b, c): coefficient}`` for ``A^a Ã^b θ^c``.
_Poly = dict[tuple[int, int, int], Fraction]


def _times(left: _Poly, right: _Poly) -> _Poly:
    out: _Poly = {}
    for (a, b, c), u in left.items():
        for (d, e, f), v in right.items():
            out[a + d, b + e, c + f] = out.get((a + d, b + e, c + f), Fraction(0)) + u * v
    return out


def _plus(*polys: _Poly, scale: Fraction = Fraction(1)) -> _Poly:
    out: _Poly = {}
    for poly in polys:
        for key, value in poly.items():
            out[key] = out.get(key, Fraction(0)) + value * scale
    return out


def _series_times(left: list[_Poly], right: list[_Poly]) -> list[_Poly]:
    """Product of two series in s (coefficient lists of one length, truncated there)."""
    return [_plus(*(_times(left[i], right[j - i]) for i in range(j + 1))) for j in range(len(left))]


def _series_inverse(f: list[_Poly]) -> list[_Poly]:
    """``1 / f`` for ``f_0 = 1``: ``g_j = −Σ_{i=1}^{j} f_i g_{j−i}``."""
    out: list[_Poly] = [{(0, 0, 0): Fraction(1)}]
    for j in range(1, len(f)):
        out.append(_plus(*(_times(f[i], out[j - i]) for i in range(1, j + 1)), scale=Fraction(-1)))
    return out


def _series_log(f: list[_Poly]) -> list[_Poly]:
    """``log f`` for ``f_0 = 1``: ``l_j = f_j − (1/j) Σ_{i=1}^{j−1} i l_i f_{j−i}``."""
    out: list[_Poly] = [{}]
    for j in range(1, len(f)):
        rest = _plus(*(_plus(_times(out[i], f[j - i]), scale=Fraction(i)) for i in range(1, j)))
        out.append(_plus(f[j], _plus(rest, scale=Fraction(-1, j))))
    return out


def _slot_series(draws: int, mu: int, tilted: bool) -> tuple[list[_Poly], list[_Poly], list[_Poly]]:
    """One slot's ``F^μ`` (``tilted``) or ``G^μ``, and its terms times ``t`` · rate and ``t²`` · rate².

    Degree j holds ``A^j / j!`` below μ (rate ``j w``); F's degree μ holds ``Ã^μ / μ!`` (rate ``μ θ w``).
    The factors ``x = t w`` are left to the caller.
    """
    factor, rate, square = [], [], []
    for j in range(draws + 1):
        term = Fraction(1, math.factorial(j))
        if j < mu:
            factor.append({(j, 0, 0): term})
            rate.append({(j, 0, 0): j * term})
            square.append({(j, 0, 0): j * j * term})
        elif j == mu and tilted:
            factor.append({(0, j, 0): term})
            rate.append({(0, j, 1): j * term})
            square.append({(0, j, 2): j * j * term})
        else:
            factor.append({})
            rate.append({})
            square.append({})
    return factor, rate, square


@dataclass(frozen=True)
class _Coefficients:
    """The tilted race's series as polynomials of one slot's clocks, for up to ``N`` draws.

    Monomials ``A^a Ã^b`` (1 ≤ a + b ≤ N) are indexed by ``basis`` (axis X), ``θ^c`` by the last
    axis (c ≤ 2). Per part (F, then G: axis 2), ``μ`` = 1..N (M) and degree (J = N + 1):

    - ``log`` [2, M, J, X]: ``log F`` (summed over the slots, the log of their product);
    - ``share`` [2, M, J, N, X, C]: ``(1/F)_d F'_m`` for (d, m): against ``(Π F)_{n−m−d}``, ``B_{y,m}``;
    - ``spread`` [2, M, J, X, C]: ``(F'/F)_i``, the Hessian's ``h``;
    - ``own`` [2, M, J, X, C]: ``(F''/F)_d``, for its diagonal.
    """

    basis: tuple[tuple[int, int], ...]
    log: torch.Tensor
    share: torch.Tensor
    spread: torch.Tensor
    own: torch.Tensor


@functools.cache
def _coefficients(draws: int) -> _Coefficients:
    basis = tuple((a, d - a) for d in range(1, draws + 1) for a in range(d, -1, -1))
    where = {monomial: i for i, monomial in enumerate(basis)}
    degrees, width = draws + 1, len(basis)
    log = torch.zeros(2, draws, degrees, width, dtype=torch.float64)
    share = torch.zeros(2, draws, degrees, draws, width, 3, dtype=torch.float64)
    spread = torch.zeros(2, draws, degrees, width, 3, dtype=torch.float64)
    own = torch.zeros(2, draws, degrees, width, 3, dtype=torch.float64)

    def put(target: torch.Tensor, poly: _Poly) -> None:
        """Adds ``poly`` to ``target`` [X, C]; degrees past N never meet a coefficient ``(Π F)_{≥ 0}``."""
        for (a, b, c), value in poly.items():
            if value and a + b <= draws:
                target[where[a, b], c] += float(value)

    for part, tilted in enumerate((True, False)):
        for mu in range(1, draws + 1):
            factor, rate, square = _slot_series(draws, mu, tilted)
            inverse = _series_inverse(factor)
            for j, poly in enumerate(_series_log(factor)):
                for (a, b, _), value in poly.items():
                    if value:
                        log[part, mu - 1, j, where[a, b]] += float(value)
            pairs = zip(_series_times(rate, inverse), _series_times(square, inverse), strict=True)
            for j, (h, o) in enumerate(pairs):
                put(spread[part, mu - 1, j], h)
                put(own[part, mu - 1, j], o)
                for m in range(1, draws + 1):
                    put(share[part, mu - 1, j, m - 1], _times(inverse[j], rate[m]))
    return _Coefficients(basis, log, share, spread, own)


def _series_exp(log: torch.Tensor) -> torch.Tensor:
    """``exp`` along the last dimension of a series with constant term 0."""
    out = [torch.ones_like(log[..., 0])]
    for j in range(1, log.shape[-1]):
        out.append(sum(i * log[..., i] * out[j - i] for i in range(1, j + 1)) / j)
    return torch.stack(out, -1)


def _shifted(total: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``total[..., index]`` for ``total`` [2, P, K, M, J] and per-problem ``index`` [P, ...] (0 where < 0)."""
    flat = index.reshape(1, index.shape[0], 1, 1, -1).expand(*total.shape[:-1], -1)
    picked = total.gather(-1, flat.clamp_min(0)).where(flat >= 0, 0)
    return picked.reshape(*total.shape[:-1], *index.shape[1:])


def _monomials(plain: torch.Tensor, fast: torch.Tensor, basis: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``A^a Ã^b`` [P, S, X, K] for the clocks ``A``, ``Ã`` [P, S, K] and the monomials ``basis`` (a, b)."""
    most = max(max(monomial) for monomial in basis)
    plain_powers, fast_powers = [None, plain], [None, fast]
    for _ in range(2, most + 1):
        plain_powers.append(plain_powers[-1] * plain)
        fast_powers.append(fast_powers[-1] * fast)
    terms = [
        plain_powers[a] if b == 0 else fast_powers[b] if a == 0 else plain_powers[a] * fast_powers[b] for a, b in basis
    ]
    return torch.stack(terms, 2)


def tilted_terms(
    problems: TiltedProblems, alpha: torch.Tensor, step: float, classes: int, *, hessian: bool = False
) -> TiltedTerms:
    """The law ``B_{y,m}`` (and the Hessian) of the tilted race at ``alpha`` [P, S] (module docstring).

    ``classes`` N ≥ the most draws of any problem (from shapes: no host read). Each series
    coefficient of a slot is a polynomial in its clocks ``A = p e^{−x}`` and ``Ã = p e^{−θx}``
    (:func:`_coefficients`), so the products over slots need the sums of ``p^{a+b} e^{−(a+θb)x}``
    and the per-slot terms are those exponentials against per-node weights: O(S K X) work for
    the law (X = N(N + 3)/2 monomials), O(S² K X) for the Hessian. Integrals
    ``∫ g dt = ∫ t g d log t`` run over :func:`~._race.quadrature_nodes` widened by ``log θ`` for
    the fast clocks; every term is the ``F`` part minus the ``G`` part.
    """
    racing = problems.racing
    alpha = torch.where(racing, alpha, 0)
    t, quad = quadrature_nodes(problems.race, alpha, step, lift=math.log(problems.most_tilt))
    x = t[:, None, :] * torch.where(racing, alpha.exp(), 0)[:, :, None]  # [P, S, K]
    table = _coefficients(classes)
    theta = problems.tilt
    powers = theta[:, None] ** torch.arange(3, dtype=alpha.dtype, device=alpha.device)  # θ^c, [P, C]
    sign = torch.tensor([1.0, -1.0], dtype=alpha.dtype, device=alpha.device)  # F part minus G part
    mass = problems.mass[:, :, None]
    clocks = _monomials(mass * torch.exp(-x), mass * torch.exp(-theta[:, None, None] * x), table.basis)  # [P, S, X, K]
    total = _series_exp(torch.einsum("pxk,fmjx->fpkmj", clocks.sum(1), table.log.to(alpha)))  # Π_y, [2, P, K, M, J]
    n = problems.num_draws.long()
    degree = torch.arange(classes + 1, device=alpha.device)
    weight = (quad * torch.exp(torch.lgamma(problems.num_draws + 1))[:, None])[None, :, :, None]  # n! ω
    signed = total * (sign[:, None, None, None, None] * weight[..., None])
    # B_{y,m} = Σ_k n! ω_k Σ_μ Σ_d (Π F)_{n−m−d} ((1/F)_d F'_m)_y − (G part), F' = x · polynomial.
    share = torch.einsum("fmdnxc,pc->fpmdnx", table.share.to(alpha), powers)
    ahead = _shifted(signed, n[:, None, None] - degree[:, None] - degree[1:])  # (Π)_{n−m−d}, [2, P, K, M, J, N]
    per_node = torch.einsum("fpkmdn,fpmdnx->pxkn", ahead, share).flatten(1, 2)  # [P, X K, N]
    terms = x[:, :, None, :] * clocks  # [P, S, X, K]
    by_count = torch.bmm(terms.flatten(2), per_node)  # [P, S, N]
    rest = n[:, None] - degree[1:]
    by_count = torch.where(racing[..., None] & (rest >= 0)[:, None, :], by_count.clamp_min(0), 0)
    law = by_count.sum(-1)
    if not hessian:
        return TiltedTerms(law, by_count, None)
    # E[R_y R_z e^{−tR}] = [s^n] (Π) h_y h_z off the diagonal (h = t F'/F); on it, [s^n] (Π_{z≠y}) t² F''_y.
    spread = torch.einsum("fmixc,pc->fpmix", table.spread.to(alpha), powers)
    hankel = _shifted(signed, n[:, None, None] - degree[:, None] - degree)  # [2, P, K, M, J, J]
    inner = torch.einsum("fpkmij,fpmjy->fpkmiy", hankel, spread)
    coupling = torch.einsum("fpmix,fpkmiy->pkxy", spread, inner)  # [P, K, X, X]
    size, width, monomials, nodes = terms.shape
    by_node = terms.permute(0, 3, 1, 2).reshape(size * nodes, width, monomials)  # [P K, S, X]
    lifted = torch.bmm(by_node, coupling.flatten(0, 1))  # Σ_y C_{xy} U_y per node (C is symmetric)
    lifted = lifted.view(size, nodes, width, monomials).permute(0, 2, 3, 1)  # [P, S, X, K]
    pairs = torch.bmm(terms.flatten(2), lifted.flatten(2).transpose(1, 2))
    own_coef = torch.einsum("fmdxc,pc->fpmdx", table.own.to(alpha), powers)
    own_node = torch.einsum("fpkmd,fpmdx->pxk", _shifted(signed, n[:, None] - degree), own_coef)
    own = (x[:, :, None, :] * terms * own_node[:, None]).sum((2, 3)) - (terms * lifted).sum((2, 3))
    matrix = torch.diag_embed(law - own) - pairs
    return TiltedTerms(law, by_count, torch.where(racing[:, :, None] & racing[:, None, :], matrix, 0))


def _direction(problems: TiltedProblems, terms: TiltedTerms) -> torch.Tensor:
    """[P, S]: the Newton direction ``H⁻¹ (b − c)`` on the racing slots.

    ``H`` is singular along ``1`` (a common shift of α changes no race); ``τ v vᵀ`` with
    ``v = diag H`` is added, as in :func:`._race.newton_direction`.
    """
    racing = problems.racing
    grad = torch.where(racing, terms.law - problems.target, 0)
    diagonal = terms.hessian.diagonal(dim1=1, dim2=2)
    v = torch.where(racing & (diagonal > 0), diagonal, 0)
    tau = 1 / v.sum(-1).clamp_min(1e-300)
    unit = torch.where(racing, 0.0, 1.0)  # the identity off the racing slots
    matrix = terms.hessian + tau[:, None, None] * v[:, :, None] * v[:, None, :] + torch.diag_embed(unit)
    return torch.where(racing, torch.linalg.solve_ex(matrix, grad[:, :, None]).result[..., 0], 0)


def solve_tilted(
    problems: TiltedProblems,
    alpha: torch.Tensor,
    classes: int,
    *,
    tol: float,
    max_iters: int,
    step: float,
    max_halvings: int = 30,
) -> tuple[torch.Tensor, TiltedTerms]:
    """Weights α [P, S] whose tilted race meets ``target``, from ``alpha``, and the race at them.

    Damped Newton on ``Φ − c·α`` (dense Hessian): a step is taken when it lowers
    ``Σ |b − c|``, and a problem stops at ``tol``, after ``max_iters`` iterations or
    when no step size helps. The returned terms are always the law at the returned α,
    so the rule built on them is exact whether or not the solve converged.
    """
    alpha = _normalise(problems.race, torch.where(problems.racing, alpha, 0))
    terms = tilted_terms(problems, alpha, step, classes, hessian=True)
    residual = law_residual(problems.race, terms.law)
    active = residual > tol
    settings = (step, classes, max_halvings)
    for iteration in range(max_iters):
        if not _sync.reads_are_cheap(active):  # every problem, masked: no host read
            if _sync.check_now(active, iteration) and not bool(active.any()):
                break
            alpha, terms, residual, improved = _newton_step(problems, alpha, terms, residual, active, settings)
            active = active & improved & (residual > tol)
            continue
        rows = active.nonzero()[:, 0]  # on a CPU, the problems still above tol only
        if rows.numel() == 0:
            break
        sub_alpha, sub_terms, sub_residual, improved = _newton_step(
            problems.select(rows), alpha[rows], terms.select(rows), residual[rows], active[rows], settings
        )
        alpha[rows], residual[rows] = sub_alpha, sub_residual
        terms.put(rows, sub_terms)
        # A problem no step size improves has reached the quadrature's noise floor.
        active[rows] = improved & (sub_residual > tol)
    return alpha, terms


def _newton_step(
    problems: TiltedProblems,
    alpha: torch.Tensor,
    terms: TiltedTerms,
    residual: torch.Tensor,
    active: torch.Tensor,
    settings: tuple[float, int, int],
) -> tuple[torch.Tensor, TiltedTerms, torch.Tensor, torch.Tensor]:
    """One damped Newton iteration of the ``active`` problems: (α, terms with the Hessian, residual, improved)."""
    direction = _direction(problems, terms)
    # Far from the solution a full step can throw small slots to the ends of the α range, where
    # the Hessian all but vanishes; no coordinate moves more than MAX_STEP per iteration.
    longest = direction.abs().amax(-1, keepdim=True)
    direction = direction * (MAX_STEP / longest.clamp_min(MAX_STEP))
    alpha, terms, residual, improved, fresh = _line_search(
        problems, alpha, direction, terms, residual, active, settings
    )
    if not fresh:
        step, classes, _ = settings
        terms = tilted_terms(problems, alpha, step, classes, hessian=True)
    return alpha, terms, residual, improved


def _line_search(
    problems: TiltedProblems,
    alpha: torch.Tensor,
    direction: torch.Tensor,
    terms: TiltedTerms,
    residual: torch.Tensor,
    active: torch.Tensor,
    settings: tuple[float, int, int],
) -> tuple[torch.Tensor, TiltedTerms, torch.Tensor, torch.Tensor, bool]:
    """Steps ``α − s d`` for ``s = 1, 1/2, …``: each active problem takes the first that lowers its residual.

    Returns (α, terms, residual, improved [P], fresh): ``fresh`` when the terms' Hessian is at the
    returned α (every problem that moved took the full step, whose Hessian is evaluated with it).
    """
    step, classes, max_halvings = settings
    size = torch.ones_like(residual)
    searching = active.clone()
    fresh = True
    # On an accelerator every problem tries every size (no read to stop early): a few sizes only.
    for halving in range(max_halvings if _sync.reads_are_cheap(residual) else min(max_halvings, TRIAL_STEPS)):
        trial_alpha = _normalise(problems.race, alpha - size[:, None] * direction)
        trial = tilted_terms(problems, trial_alpha, step, classes, hessian=halving == 0)
        trial_residual = law_residual(problems.race, trial.law)
        better = searching & (trial_residual < residual)
        keep = better[:, None]
        alpha = torch.where(keep, trial_alpha, alpha)
        hessian = terms.hessian
        if trial.hessian is not None:
            hessian = torch.where(keep[..., None], trial.hessian, hessian)
        elif not _sync.reads_are_cheap(better) or bool(better.any()):
            fresh = False
        law = torch.where(keep, trial.law, terms.law)
        terms = TiltedTerms(law, torch.where(keep[..., None], trial.by_count, terms.by_count), hessian)
        residual = torch.where(better, trial_residual, residual)
        searching = searching & ~better
        if _sync.reads_are_cheap(searching) and not bool(searching.any()):
            break
        size = torch.where(searching, size / 2, size)
    return alpha, terms, residual, active & ~searching, fresh
