"""Acceptance rates: the optimum over all lossless rules and each baseline's.

All functions take q = ``target_probs`` and p = ``draft_probs`` of shape
[B, V] and return [B]; ``num_drafts`` is an int or a LongTensor [B]. The
acceptance of a rule is ``P(Y ∈ {X_1..X_n})`` averaged over the drafts.

Optimal acceptance (docs/design.md §3; Thomas & Pal 2025, §3 "subset selection"):

    α*(p, q, n) = 1 + min_{H ⊆ V} [ q(H) − P(all n drafts ∈ H) ]

and a minimising ``H`` is a prefix of the tokens sorted by ``q/p`` ascending,
so ``α*`` costs one sort and one prefix scan. For i.i.d. drafts
``P(all ∈ H) = p(H)^n``. Without replacement it is computed from the
exponential-clock form of sequential sampling (see
:func:`_all_in_prefix_without_replacement`).

This module is pure tensor math and never imports transformers.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from . import _sync

DraftScheme = Literal["iid", "without_replacement"]

#: Most elements of the [rows, nodes, V + 1] float64 temporaries of the without-replacement prefix law
#: (:func:`_all_in_prefix_without_replacement`): cache-sized on a CPU, larger elsewhere (each chunk costs
#: kernel launches there). Rows are independent; its quadrature sums ``PREFIX_NODES`` nodes at a time,
#: fewer only where one row of them would pass the bound (V + 1 > bound / PREFIX_NODES).
PREFIX_CHUNK_CPU = 1 << 22
PREFIX_CHUNK = 1 << 24
PREFIX_NODES = 32


def _as_float64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in tensors:
        t = t.double()
        out.append(t / t.sum(-1, keepdim=True))
    return out


def _drafts_per_row(num_drafts: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """[B] long drafts per row; negative counts raise, except in a tensor on an accelerator (no host read there)."""
    if not isinstance(num_drafts, torch.Tensor) and num_drafts < 0:
        raise ValueError("num_drafts must be non-negative")
    n = torch.as_tensor(num_drafts, device=device).long()
    if n.dim() == 0:
        n = n.expand(batch)
    if n.shape != (batch,):
        raise ValueError(f"num_drafts must be an int or a [B] = [{batch}] tensor, got shape {tuple(n.shape)}")
    if isinstance(num_drafts, torch.Tensor) and _sync.reads_are_cheap(n) and bool((n < 0).any()):
        raise ValueError("num_drafts must be non-negative")
    return n


def single_acceptance(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """[B]: ``Σ_y min(p, q)(y) = 1 − TV(p, q)``, single-draft speculative sampling."""
    q, p = _as_float64(target_probs, draft_probs)
    return torch.minimum(p, q).sum(-1)


def rrs_acceptance(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, num_drafts: int | torch.Tensor
) -> torch.Tensor:
    """[B]: recursive rejection sampling with i.i.d. drafts.

    ``1 − Π_{j=1..n} (1 − β_j)`` with ``β_j = Σ min(p, r_j)``, ``r_1 = q``,
    ``r_{j+1} = norm(max(0, r_j − p))``.
    """
    q, p = _as_float64(target_probs, draft_probs)
    n = _drafts_per_row(num_drafts, q.shape[0], q.device)
    residual, survive = q, torch.ones_like(q[:, 0])
    for j in range(int(n.max()) if n.numel() else 0):
        beta = torch.minimum(p, residual).sum(-1)
        survive = torch.where(j < n, survive * (1 - beta), survive)
        mass = (residual - p).clamp_min(0)
        total = mass.sum(-1, keepdim=True)
        residual = torch.where(total > 0, mass / total.clamp_min(1e-300), residual)
    return 1 - survive


def spectr_beta(target_probs: torch.Tensor, draft_probs: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """[B]: ``β(ρ) = Σ_y min(p(y), q(y)/ρ)``, the per-draft acceptance of K-SEQ."""
    return torch.minimum(draft_probs, target_probs / rho[:, None]).sum(-1)


def spectr_rho(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    num_drafts: int | torch.Tensor,
    *,
    tol: float = 1e-14,
    max_iters: int = 100,
) -> torch.Tensor:
    """[B]: SpecTr's ρ*, the root in [1, n] of ``g(ρ) = ρ β(ρ) − 1 + (1 − β(ρ))^n``.

    Sun et al. 2023 (K-SEQ). ``g`` is increasing, ``g(1) ≤ 0 ≤ g(n)``, and any
    ``ρ`` with ``g(ρ) ≥ 0`` makes the K-SEQ residual non-negative; ρ* is the
    smallest, which maximises acceptance. Solved by Newton's method kept inside
    a bisection bracket; ``g' = P_{q>ρp} + n (1 − β)^{n−1} Q_{q<ρp} / ρ²`` where
    ``P_S = Σ_S p``, ``Q_S = Σ_S q``. Works in the input dtype, to ``tol`` or a
    few ulps of it, whichever is larger. Rows that converged keep their ρ; on
    an accelerator convergence is read back every ``CHECK_EVERY`` iterations
    only (each read stalls it), which changes no result.
    """
    q, p = target_probs, draft_probs
    n = _drafts_per_row(num_drafts, q.shape[0], q.device).to(q.dtype)
    lo = torch.ones_like(n)
    hi = n.clamp_min(1)

    tol = max(tol, 8 * torch.finfo(q.dtype).eps)

    def g_and_slope(rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = rho[:, None] * p
        rho_beta = torch.minimum(scaled, q).sum(-1)  # ρ β(ρ) = Σ min(ρp, q)
        q_under = (q * (q < scaled)).sum(-1)  # mass where min(p, q/ρ) = q/ρ
        p_over = (rho_beta - q_under) / rho
        beta = rho_beta / rho
        fail = (1 - beta).clamp(0, 1)
        g = rho_beta - 1 + fail.pow(n)
        slope = p_over + n * fail.pow((n - 1).clamp_min(0)) * q_under / rho**2
        return g, slope

    x = lo.clone()
    g_x, slope_x = g_and_slope(x)
    done = g_x >= 0  # ρ* = 1
    rho = torch.where(done, lo, hi)
    for iteration in range(max_iters):
        if _sync.check_now(done, iteration) and bool(done.all()):
            break
        newton = x - g_x / slope_x.clamp_min(1e-300)
        inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        x = torch.where(inside, newton, (lo + hi) / 2)
        g_x, slope_x = g_and_slope(x)
        lo = torch.where(g_x < 0, x, lo)
        hi = torch.where(g_x >= 0, x, hi)
        # At |g| ≤ tol the residual is off by at most ~tol before clamping.
        at_root = g_x.abs() <= tol
        closed = hi - lo <= tol * hi
        rho = torch.where(done, rho, torch.where(at_root, x, hi))
        done = done | at_root | closed
    return rho


def spectr_acceptance(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, num_drafts: int | torch.Tensor
) -> torch.Tensor:
    """[B]: SpecTr K-SEQ acceptance ``1 − (1 − β(ρ*))^n``."""
    q, p = _as_float64(target_probs, draft_probs)
    n = _drafts_per_row(num_drafts, q.shape[0], q.device)
    beta = spectr_beta(q, p, spectr_rho(q, p, n))
    return 1 - (1 - beta).clamp(0, 1).pow(n.double())


class OptimalPrefix(NamedTuple):
    """:func:`optimal_prefix`: α*, the tokens in ``q/p`` order and ``H*`` as their first ``size``.

    Attributes:
        alpha: [B] float64, the optimal acceptance α*.
        order: [B, V], token ids by ``q/p`` ascending, ``p = 0`` tokens last.
        size: [B], ``|H*|``: ``H* = order[:, :size]``.
        ratio: [B, V] float64, ``q/p`` in that order (``inf`` where ``p = 0``).
        q, p: [B, V] float64, the normalised rows in that order.
    """

    alpha: torch.Tensor
    order: torch.Tensor
    size: torch.Tensor
    ratio: torch.Tensor
    q: torch.Tensor
    p: torch.Tensor


def power(base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``base ** exponent`` for ``base`` [B, M] and integer-valued ``exponent`` [B].

    On a CPU, one shared exponent up to 16 takes repeated squaring (a few
    multiplications per element, where ``pow`` with a tensor exponent costs
    ~10× more); finding it takes two host reads, which on an accelerator cost
    more than ``pow`` itself.
    """
    if not _sync.reads_are_cheap(exponent):
        return base.pow(exponent.to(base.dtype)[:, None])
    values = exponent.unique()
    if values.numel() != 1 or not 0 <= float(values) <= 16:
        return base.pow(exponent.to(base.dtype)[:, None])
    remaining, out, square = int(values), None, base
    while remaining:
        if remaining & 1:
            out = square if out is None else out * square
        remaining >>= 1
        if remaining:
            square = square * square
    return torch.ones_like(base) if out is None else out


def optimal_prefix(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    num_drafts: int | torch.Tensor,
    scheme: DraftScheme = "iid",
) -> OptimalPrefix:
    """The optimal acceptance and ``H*`` as a prefix of the tokens sorted by ``q/p``.

    ``H*`` is the largest prefix of the order minimising ``ψ(H) = q(H) −
    P(all drafts ∈ H)``; ``α* = 1 + ψ(H*)`` (see :class:`OptimalPrefix`).
    Tokens of equal ``q/p`` may come in any order: along a run of them ``ψ``
    is concave in ``p(H)`` (``q = ρ p`` there), so no minimiser ends inside
    the run.
    """
    q, p = _as_float64(target_probs, draft_probs)
    batch, vocab = q.shape
    n = _drafts_per_row(num_drafts, batch, q.device)
    if scheme not in ("iid", "without_replacement"):
        raise ValueError(f"scheme must be 'iid' or 'without_replacement', got {scheme!r}")
    ratio = torch.where(p > 0, q / p.clamp_min(1e-300), math.inf)
    # Non-negative float64 values (inf included) order like their bit patterns, and integers sort faster.
    ratio, order = ratio.view(torch.int64).sort(-1)
    ratio = ratio.view(torch.float64)
    q_sorted, p_sorted = q.gather(1, order), p.gather(1, order)
    zero = q.new_zeros(batch, 1)
    q_prefix = torch.cat([zero, q_sorted.cumsum(-1)], dim=-1)  # [B, V+1], prefix k = first k tokens
    if scheme == "iid":
        all_inside = power(torch.cat([zero, p_sorted.cumsum(-1)], dim=-1).clamp(0, 1), n)
    else:
        all_inside = _all_in_prefix_without_replacement(p_sorted, n)
    psi = q_prefix - all_inside
    best = psi.amin(-1)
    # Largest minimiser: the last prefix length attaining the minimum.
    size = (vocab - torch.flip(psi == best[:, None], dims=[-1]).float().argmax(-1)).clamp_max(vocab)
    return OptimalPrefix((1 + best).clamp(0, 1), order, size, ratio, q_sorted, p_sorted)


def optimal_subset(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    num_drafts: int | torch.Tensor,
    scheme: DraftScheme = "iid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal acceptance and the largest minimising subset ``H*`` (see :func:`optimal_prefix`).

    Returns ``(alpha [B] float64, in_subset [B, V] bool)``.
    """
    prefix = optimal_prefix(target_probs, draft_probs, num_drafts, scheme)
    return prefix.alpha, prefix_members(prefix.order, prefix.size)


def prefix_members(order: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens ``order[:, :size]`` of each row (``H*`` from :func:`optimal_prefix`)."""
    in_prefix = torch.arange(order.shape[1], device=order.device) < size[:, None]
    return torch.zeros_like(in_prefix).scatter(1, order, in_prefix)


def optimal_acceptance(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    num_drafts: int | torch.Tensor,
    scheme: DraftScheme = "iid",
) -> torch.Tensor:
    """[B] float64: the best acceptance of any lossless rule (the transport LP's value)."""
    return optimal_subset(target_probs, draft_probs, num_drafts, scheme)[0]


def _all_in_prefix_without_replacement(p_sorted: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """[B, V+1]: P(every draft lies in the first k sorted tokens), k = 0..V.

    Drafts are sequential draws without replacement from p; ``m = min(n, |supp p|)``
    tokens are drawn. In the exponential-clock picture token ``z`` fires at an
    Exp(p_z) time and the drafts are the first ``m`` to fire, so with
    ``h = p(H)``, ``c = 1 − h`` and ``N_H(t)`` the tokens of H fired by ``t``:

        P(all ∈ H) = P(N_H(T_c) ≥ m),  T_c ~ Exp(c)
                   = 1 − c ∫_0^∞ e^{−t} Σ_{j<m} e_j(t) dt,

    where ``e_j(t)`` is the elementary symmetric polynomial of degree ``j`` in
    ``e^{p_z t} − 1`` over ``z ∈ H`` (``P(N_H(t) = j) = e^{−ht} e_j(t)``). Over
    prefixes, ``e_j^{(k)} = Σ_{i≤k} (e^{p_i t} − 1) e_{j−1}^{(i−1)}``: a cumulative
    sum of non-negative terms, done in log space with ``logcumsumexp``. The
    integral uses the trapezoid rule in ``s = log t`` (error ~ exp(−π²/h)),
    over chunks of rows and nodes of at most ``PREFIX_CHUNK(_CPU)`` elements.
    """
    p = p_sorted
    batch, vocab = p.shape
    support = (p > 0).sum(-1)
    m = torch.minimum(num_drafts, support)  # [B]
    max_m = int(m.max()) if m.numel() else 0
    h_prefix = torch.cat([p.new_zeros(batch, 1), p.cumsum(-1)], dim=-1).clamp(0, 1)
    outside = (1 - h_prefix).clamp_min(0)  # c_k, [B, V+1]
    if max_m == 0:
        return torch.ones_like(h_prefix)
    # Slowest decay of e^{−t} e_j(t): 1 − (mass of the m−1 largest tokens).
    top = torch.topk(p, k=min(max(max_m - 1, 1), vocab), dim=-1).values.cumsum(-1)
    top_mass = top.gather(1, (m - 2).clamp_min(0)[:, None])[:, 0]
    top_mass = torch.where(m >= 2, top_mass, 0)
    slowest = (1 - top_mass).clamp_min(1e-300)
    s_max = float((torch.log(60.0 / slowest)).max()) + 1.0
    s_min, step = -45.0, 0.2
    nodes = torch.arange(s_min, s_max + step, step, dtype=p.dtype, device=p.device)
    # The temporaries are [rows, nodes, V + 1]: PREFIX_NODES nodes and as many rows as the bound holds.
    bound = PREFIX_CHUNK_CPU if _sync.reads_are_cheap(p) else PREFIX_CHUNK
    per_chunk = min(PREFIX_NODES, max(1, bound // (vocab + 1)))
    rows = max(1, bound // (per_chunk * (vocab + 1)))
    integral = p.new_empty(batch, vocab + 1)
    for start in range(0, batch, rows):
        part = slice(start, start + rows)
        integral[part] = _prefix_integral(p[part], m[part], max_m, nodes, step, per_chunk)
    all_inside = 1 - outside * integral
    # H containing the whole support of p: every draft is inside.
    all_inside = torch.where(outside <= 0, 1.0, all_inside)
    return all_inside.clamp(0, 1)


def _prefix_integral(
    p: torch.Tensor, m: torch.Tensor, max_m: int, nodes: torch.Tensor, step: float, per_chunk: int
) -> torch.Tensor:
    """[B, V+1]: ``∫_0^∞ e^{−t} Σ_{j<m} e_j(t) dt`` over prefixes (:func:`_all_in_prefix_without_replacement`).

    Args:
        p: [B, V] sorted draft rows; m: [B] drafts drawn; max_m: at least ``max(m)``;
        nodes: [K] quadrature nodes in ``s = log t``, ``step`` apart, summed ``per_chunk`` at a time.
    """
    batch, vocab = p.shape
    integral = p.new_zeros(batch, vocab + 1)
    for chunk in torch.split(nodes, per_chunk):
        t = chunk.exp()  # [K]
        x = p[:, None, :] * t[None, :, None]  # [B, K, V]
        # log(e^x − 1), stable for small and large x; −inf where p = 0.
        log_c = torch.where(x > 20, x + torch.log1p(-torch.exp(-x)), torch.log(torch.expm1(x.clamp_max(20))))
        # Σ_{j<m} e_j over prefixes k = 0..V, starting with e_0 = 1.
        log_e = p.new_zeros(batch, t.shape[0], vocab + 1)  # log e_0 = 0
        log_sum = torch.where((m >= 1)[:, None, None], log_e, -math.inf)
        for j in range(1, max_m):
            prev = log_e[..., :-1]  # e_{j−1}^{(i−1)} for i = 1..V
            cumulative = torch.logcumsumexp(log_c + prev, dim=-1)
            log_e = torch.cat([torch.full_like(cumulative[..., :1], -math.inf), cumulative], dim=-1)
            log_sum = torch.where((j < m)[:, None, None], torch.logaddexp(log_sum, log_e), log_sum)
        # trapezoid in s: ∫ f dt = ∫ f t ds; weight 1 (interior), ½ at the ends is negligible.
        integrand = torch.exp(log_sum - t[None, :, None] + t.log()[None, :, None])
        integral = integral + step * integrand.sum(1)
    return integral


__all__ = [
    "OptimalPrefix",
    "optimal_acceptance",
    "optimal_prefix",
    "optimal_subset",
    "power",
    "prefix_members",
    "rrs_acceptance",
    "single_acceptance",
    "spectr_acceptance",
    "spectr_beta",
    "spectr_rho",
]
