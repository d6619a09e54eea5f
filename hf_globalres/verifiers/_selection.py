"""Softmax selection rules over a truncation set, fitted by convex minimisation.

Shared by the ``global_resolution``, ``khisti`` and
``optimal_without_replacement`` verifiers. Notation: q target, p draft, k
drafts present in a row, T the truncation set (the most probable draft
tokens, grown until ``P(some draft ∉ T) ≤ τ``), D = |T| slots per row.

**The rule.** Weights ``w = e^α`` on the tokens of T and a split of T into an
*outer* part (tokens outside the optimal subset H*) and an *inner* part
(tokens of H*). Given drafts x (Thomas & Pal 2025, §4):

* some draft lies outside T: emit the first such draft;
* else some draft is outer: emit ``y ∈ set(x) ∩ outer`` with probability
  ``w_y / Σ_{z ∈ set(x) ∩ outer} w_z`` (no rejection: these tuples are fully
  transported, complementary slackness);
* else (every draft inner): emit ``y ∈ set(x)`` with probability
  ``w_y / (1 + Σ_{z ∈ set(x)} w_z)``, reject with ``1 / (1 + Σ w_z)``.

``set(x)`` counts each distinct token once. The rule's emission law is
``b_y = Σ_x P(x) e_y(x)``; on T it is computed exactly by enumerating the
multisets (i.i.d.) or subsets (without replacement) of T, and for a token
``y ∉ T`` it is ``P(some draft ∉ T) · p_y / p(V∖T)``, because the first
draft outside T is distributed as p restricted to V∖T.

**Exact by construction.** Whatever α is, the plan accepts the emitted draft
y with ``γ_y = min(1, q_y / b_y)`` and recovers from ``(q − a) / (1 − Σa)``
with ``a = min(q, b)``, so ``P(Y = y) = a_y + (q_y − a_y) = q_y`` exactly; a
poor α only lowers the acceptance ``Σ a``.

**The fit.** ``b(α)`` is the gradient of the convex function

    F(α) = Σ_x P(x) log Z_x(α) − Σ_{y ∈ T} q_y α_y,
    Z_x = Σ_{z ∈ set(x) ∩ outer} e^{α_z}   (outer tuples)
    Z_x = 1 + Σ_{z ∈ set(x)} e^{α_z}        (inner tuples),

so ``∇F = b − q``. F is minimised over the box ``−A ≤ α ≤ 0`` (outer slots)
and ``−A ≤ α ≤ A`` (inner slots), ``A = ALPHA_BOUND``. At the minimum an
outer slot strictly below 0 has ``b = q`` and one at 0 has ``b ≤ q``; the
outer tuples' total mass is fixed, so the outer tier then accepts all of it.
The inner tier gets ``b = q`` wherever α is interior. With H* the *largest*
minimiser of ``q(H) − P(all drafts ∈ H)`` the outer problem is bounded
(``q(G) > P(drafts meet G, miss outer∖G)`` for every outer G), and the
acceptance is ``α*`` up to the solver tolerance and the truncated mass.
The solver is a batched projected L-BFGS (an L-BFGS-B variant in torch):
one iteration advances every unconverged row, with a per-row line search.
Off the CPU it reads nothing back but its convergence, every ``_sync.CHECK_EVERY``
iterations, and its line search carries its backtracking over to the next iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import _sync
from ..rates import DraftScheme, optimal_subset
from .base import EmissionPlan, Verifier, gather_draft_probs, normalize_rows

#: Box bound on the log-weights α; e^{−2A} ≈ 2e−35 is below float64 resolution.
ALPHA_BOUND = 40.0
#: Step sizes the L-BFGS line search evaluates per iteration off the CPU (no host read between them).
#: One: the unit quasi-Newton step nearly always passes, and a row that fails halves its step in the
#: next iteration. On the fitted rules' test rows two sizes took as many iterations and twice the
#: evaluations of F, and one took about as many iterations as the CPU path (rounded up to CHECK_EVERY).
TRIAL_STEPS = 1


@dataclass
class SolveStats:
    """What the last ``plan`` call of a fitted verifier did (rows with ≥ 1 draft).

    Attributes:
        rows: rows with at least one draft.
        failures: rows that fell back to the cheap exact rule (truncation set
            larger than ``max_support`` / ``max_tuples``, or the fit hit
            ``max_iters`` where that counts as a failure).
        unconverged: rows whose fit stopped at ``max_iters`` (fallen back or not).
        iterations: most solver iterations used by any row.
        mean_support: mean |T| over the rows that were fitted.
        missing_mass: largest ``P(some draft ∉ T)`` over the fitted rows.
        acceptance: [B] float64, each row's exact acceptance ``Σ_y a_y``
            averaged over the drafts (0 without drafts; for a fallen-back
            row the fallback's, NaN where no closed form is known).
    """

    rows: int = 0
    failures: int = 0
    unconverged: int = 0
    iterations: int = 0
    mean_support: float = 0.0
    missing_mass: float = 0.0
    acceptance: torch.Tensor | None = None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.rows if self.rows else 0.0

    def merge(self, other: SolveStats) -> SolveStats:
        fitted = self.rows - self.failures, other.rows - other.failures
        total = max(sum(fitted), 1)
        return SolveStats(
            rows=self.rows + other.rows,
            failures=self.failures + other.failures,
            unconverged=self.unconverged + other.unconverged,
            iterations=max(self.iterations, other.iterations),
            mean_support=(self.mean_support * fitted[0] + other.mean_support * fitted[1]) / total,
            missing_mass=max(self.missing_mass, other.missing_mass),
        )


@dataclass
class FitOptions:
    """Options of a fitted selection rule (see the verifiers' docstrings)."""

    scheme: DraftScheme
    tau: float
    max_support: int
    max_iters: int
    max_tuples: int
    subset_selection: bool  # two tiers (outer/inner) split by H*; else one outer tier
    fail_on_truncation: bool  # |T| too large: fall back (True) or truncate T further (False)
    fail_on_iterations: bool  # fit not converged: fall back (True) or keep the exact-but-worse α


def check_options(tau: float, max_support: int, max_iters: int, max_tuples: int) -> None:
    """Raise ``ValueError`` naming the first invalid option."""
    if not (0 < tau < 1):
        raise ValueError(f"tau must lie in (0, 1), got {tau}")
    for label, value in (("max_support", max_support), ("max_iters", max_iters), ("max_tuples", max_tuples)):
        if int(value) != value or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")


def tuple_count(support: int, drafts: int, scheme: DraftScheme) -> int:
    """Number of enumerated draft sets over ``support`` slots (orderings counted for w/o replacement)."""
    if scheme == "iid":
        return math.comb(support + drafts - 1, drafts)
    return math.comb(support, drafts) * math.factorial(drafts)


Fallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], EmissionPlan]
FallbackAcceptance = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None


def fitted_plan(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    options: FitOptions,
    fallback: Fallback,
    fallback_acceptance: FallbackAcceptance = None,
) -> tuple[EmissionPlan, SolveStats]:
    """The emission plan of the fitted selection rule, rows grouped by their number of drafts.

    Args:
        target_probs: q, [B, V]; draft_probs: p, [B, V] (validated rows).
        draft_tokens: [B, n], −1 marks an absent draft.
        options: see :class:`FitOptions`.
        fallback: the cheap exact plan used for failed rows.
        fallback_acceptance: (q, p, k) → [B], its acceptance (NaN if None).

    Returns:
        ``(plan, stats)``: draft_emit [B, n] and residual [B, V] in q's dtype.
    """
    q = target_probs.double()
    p = draft_probs.double()
    x = draft_tokens
    k = (x >= 0).sum(-1)
    draft_emit = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    residual = q.clone()
    acceptance = torch.zeros_like(q[:, 0])
    stats = SolveStats()
    present = torch.zeros(x.shape[1] + 1, dtype=torch.bool, device=x.device).scatter(0, k, True).tolist()
    for drafts in [count for count, here in enumerate(present) if here]:
        if drafts == 0:
            continue  # no drafts: emit nothing, recover from q
        rows = (k == drafts).nonzero()[:, 0]
        plan, group, accepted = _plan_fixed_drafts(
            q[rows], p[rows], x[rows], drafts, options, fallback, fallback_acceptance
        )
        draft_emit[rows] = plan.draft_emit.double()
        residual[rows] = plan.residual.double()
        acceptance[rows] = accepted
        stats = stats.merge(group)
    stats.acceptance = acceptance
    dtype = target_probs.dtype
    return EmissionPlan(draft_emit=draft_emit.to(dtype), residual=residual.to(dtype)), stats


def _plan_fixed_drafts(
    q: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor,
    drafts: int,
    options: FitOptions,
    fallback: Fallback,
    fallback_acceptance: FallbackAcceptance,
) -> tuple[EmissionPlan, SolveStats, torch.Tensor]:
    """Plan, stats and acceptance [B] for rows that all have ``drafts`` drafts. q, p [B, V]; x [B, n]."""
    batch = q.shape[0]
    # Only drafted tokens matter to the fit: work on supp p, sorted by p descending.
    width = int((p > 0).sum(-1).max())
    p_sorted, order = torch.topk(p, width, dim=-1)
    size = truncation_size(p_sorted, drafts, options.tau, options.scheme)
    largest = _largest_enumerable(drafts, options)
    if options.fail_on_truncation:
        failed = size > largest
    else:
        size = size.clamp_max(largest)
        failed = torch.zeros_like(size, dtype=torch.bool)
    stats = SolveStats(rows=batch)
    fit_rows = (~failed).nonzero()[:, 0]
    draft_emit = torch.zeros(x.shape, dtype=q.dtype, device=q.device)
    residual = q.clone()
    acceptance = torch.full_like(q[:, 0], math.nan)
    if fit_rows.numel():
        rows = fit_rows
        sub = _fit_rows(q[rows], p[rows], x[rows], order[rows], p_sorted[rows], size[rows], drafts, options)
        plan, converged, iterations, missing, accepted = sub
        # One read for the three statistics.
        read = torch.stack([(~converged).sum().double(), size[fit_rows].double().mean(), missing.max()]).tolist()
        stats.unconverged, stats.mean_support, stats.missing_mass = int(read[0]), read[1], read[2]
        stats.iterations = iterations
        if options.fail_on_iterations:
            failed[fit_rows] = failed[fit_rows] | ~converged
        draft_emit[fit_rows] = plan.draft_emit
        residual[fit_rows] = plan.residual
        acceptance[fit_rows] = accepted
    rows = failed.nonzero()[:, 0]
    stats.failures = rows.numel()
    if stats.failures:
        plan = fallback(q[rows], p[rows], x[rows])
        draft_emit[rows] = plan.draft_emit.double()
        residual[rows] = plan.residual.double()
        if fallback_acceptance is not None:
            acceptance[rows] = fallback_acceptance(q[rows], p[rows], drafts).double()
    return EmissionPlan(draft_emit=draft_emit, residual=residual), stats, acceptance


def truncation_size(p_sorted: torch.Tensor, drafts: int, tau: float, scheme: DraftScheme) -> torch.Tensor:
    """[B]: the smallest |T| (a prefix of p sorted descending) with ``P(some draft ∉ T) ≤ τ``.

    i.i.d.: ``P = 1 − (1 − p(V∖T))^k``. Without replacement each draw lands
    outside T with probability at most ``p(V∖T) / (1 − m_{k−1})``, with
    ``m_{k−1}`` the mass of the k − 1 largest tokens, so the union bound
    ``k · p(V∖T) / (1 − m_{k−1})`` is used. Never larger than ``|supp p|``.
    """
    support = (p_sorted > 0).sum(-1)
    # Mass left outside the first j + 1 tokens, summed from the tail for precision.
    outside = torch.cat([p_sorted.flip(-1).cumsum(-1).flip(-1)[:, 1:], p_sorted[:, :1] * 0], dim=-1).clamp(0, 1)
    if scheme == "iid":
        missing = -torch.expm1(drafts * torch.log1p(-outside.clamp_max(1 - 1e-16)))
    else:
        top = p_sorted[:, : max(drafts - 1, 0)].sum(-1, keepdim=True)
        missing = drafts * outside / (1 - top).clamp_min(1e-300)
    size = (missing > tau).sum(-1) + 1
    return torch.minimum(size, support)


def _largest_enumerable(drafts: int, options: FitOptions) -> int:
    """Largest |T| ≤ max_support whose enumeration has at most ``max_tuples`` sets."""
    lo, hi = 1, options.max_support
    if tuple_count(hi, drafts, options.scheme) <= options.max_tuples:
        return hi
    if tuple_count(lo, drafts, options.scheme) > options.max_tuples:
        return 0
    while hi - lo > 1:  # the count grows with |T|: bisect
        mid = (lo + hi) // 2
        if tuple_count(mid, drafts, options.scheme) <= options.max_tuples:
            lo = mid
        else:
            hi = mid
    return lo


def draft_sets(support: int, drafts: int, scheme: DraftScheme, device: torch.device) -> torch.Tensor:
    """[M, k] slot indices of every multiset (i.i.d.) or subset (w/o replacement) of ``support`` slots.

    Rows are sorted, in lexicographic order (``torch.combinations``' order). A
    multiset ``i_1 ≤ … ≤ i_k`` of D slots is the subset ``i_j + j`` of
    ``N = D + k − 1`` slots, an order-preserving bijection, so only k-subsets of N
    are enumerated. They are unranked directly (memory O(M·k), no host read):
    subset number ``r`` in lexicographic order has, in the combinatorial number
    system, ``M − 1 − r = Σ_j C(w_j, k − j)`` with ``w_0 > … > w_{k−1} ≥ 0``
    found greedily (the largest ``w`` with ``C(w, k − j)`` at most what is left),
    and slot ``N − 1 − w_j`` in place j.
    """
    if drafts < 0 or support < 0:
        raise ValueError(f"support and drafts must be non-negative, got {support} and {drafts}")
    iid = scheme == "iid"
    total = support + drafts - 1 if iid else support
    count = math.comb(total, drafts) if total >= 0 else 0
    sets = torch.empty(count, drafts, dtype=torch.long, device=device)
    if count == 0 or drafts == 0:
        return sets
    # C(w, i) for w < N and i = 1..k, built on the device (a copy from the host would wait for it):
    # C(w, i) = Σ_{u<w} C(u, i − 1). Capped at M, which exceeds every rank, so int64 never overflows.
    column = torch.ones(total, dtype=torch.long, device=device)  # C(w, 0)
    table = []
    for _ in range(drafts):
        column = (column.cumsum(0) - column).clamp_max(count)
        table.append(column)
    rank = torch.arange(count - 1, -1, -1, device=device)
    for place in range(drafts):
        binomials = table[drafts - 1 - place]  # C(w, k − place)
        largest = torch.searchsorted(binomials, rank, right=True) - 1
        rank = rank - binomials[largest]
        sets[:, place] = total - 1 - largest - (place if iid else 0)
    return sets


def _orderings(drafts: int, device: torch.device) -> torch.Tensor:
    """[k!, k]: every ordering of ``range(k)``, lexicographic (``itertools.permutations``' order), built on the device.

    Ordering number r has Lehmer digits ``⌊r / (k − 1 − j)!⌋ mod (k − j)``: place j holds the
    digit-th smallest value not yet placed.
    """
    count = math.factorial(drafts)
    rank = torch.arange(count, device=device)
    left = torch.ones(count, drafts, dtype=torch.bool, device=device)  # values not yet placed
    orders = torch.empty(count, drafts, dtype=torch.long, device=device)
    for place in range(drafts):
        digit = rank // math.factorial(drafts - 1 - place) % (drafts - place)
        value = (left & (left.long().cumsum(-1) == digit[:, None] + 1)).long().argmax(-1)
        orders[:, place] = value
        left = left.scatter(1, value[:, None], False)
    return orders


#: Most elements of the [B, M', k] float64 temporaries of one pass over a chunk of M' draft sets:
#: cache-sized on a CPU, larger elsewhere (each chunk costs kernel launches there). Every set's
#: terms are computed alone and summed over the sets in their order, so results do not depend on it.
SET_CHUNK_CPU = 1 << 22
SET_CHUNK = 1 << 24


def set_chunks(like: torch.Tensor, count: int, per_set: int) -> list[slice]:
    """Consecutive slices of ``count`` sets, each with at most ``SET_CHUNK(_CPU)`` elements (at least one set).

    Args:
        like: a tensor on the device that does the work; per_set: elements each set takes.
    """
    bound = SET_CHUNK_CPU if _sync.reads_are_cheap(like) else SET_CHUNK
    size = max(1, bound // max(per_set, 1))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def set_probs(p_slots: torch.Tensor, sets: torch.Tensor, scheme: DraftScheme) -> torch.Tensor:
    """[B, M]: probability that the drafts form each set.

    i.i.d. multiset with counts c: ``k! / Π c! · Π p^c``. Without replacement,
    the sum over the k! drawing orders σ of ``Π_j p_{σ_j} / (1 − Σ_{l<j} p_{σ_l})``.
    Computed over chunks of sets (:func:`set_chunks`).

    Args:
        p_slots: [B, D] draft probabilities of the slots (0 for padding).
        sets: [M, k] from :func:`draft_sets`.
    """
    count, drafts = sets.shape
    out = p_slots.new_empty(p_slots.shape[0], count)
    orders = None if scheme == "iid" else _orderings(drafts, sets.device)  # [k!, k]
    per_set = p_slots.shape[0] * drafts * (1 if orders is None else orders.shape[0])
    for part in set_chunks(p_slots, count, per_set):
        out[:, part] = _set_probs_chunk(p_slots, sets[part], orders)
    return out


def _set_probs_chunk(p_slots: torch.Tensor, sets: torch.Tensor, orders: torch.Tensor | None) -> torch.Tensor:
    """:func:`set_probs` of the sets [M', k]; ``orders`` [k!, k] the drawing orders (None: i.i.d.)."""
    drafts = sets.shape[1]
    probs = p_slots[:, sets]  # [B, M', k]
    if orders is None:
        first = _first_occurrence(sets)
        counts = (sets[:, :, None] == sets[:, None, :]).sum(-1).double()  # [M', k]
        log_coef = math.lgamma(drafts + 1) - torch.where(first, torch.lgamma(counts + 1), 0).sum(-1)
        return torch.exp(log_coef + torch.log(probs).sum(-1))
    ordered = probs[:, :, orders]  # [B, M', k!, k]
    before = ordered.cumsum(-1) - ordered
    step = torch.where(ordered > 0, ordered / (1 - before).clamp_min(1e-300), 0)
    return step.prod(-1).sum(-1)


def _first_occurrence(tokens: torch.Tensor) -> torch.Tensor:
    """[..., k] bool: entry j is the first of its value along the last dim (−1 entries never are)."""
    k = tokens.shape[-1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=tokens.device).tril(-1)  # [j, j'] with j' < j
    repeat = ((tokens[..., :, None] == tokens[..., None, :]) & earlier).any(-1)
    return (tokens >= 0) & ~repeat


def set_softmax(logits: torch.Tensor, active: torch.Tensor, reject: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the active entries, with an extra zero logit (rejection) where ``reject``.

    Args:
        logits: [..., k]; active: [..., k] bool; reject: [...] bool.

    Returns:
        ``(σ [..., k], log Z [...])`` with ``σ_j = e^{α_j} / Z`` on active
        entries (0 elsewhere) and ``Z = [reject] + Σ_active e^{α_j}``.
    """
    masked = torch.where(active, logits, -math.inf)
    extra = torch.where(reject, 0.0, -math.inf).to(logits.dtype)[..., None]
    log_z = torch.logsumexp(torch.cat([masked, extra], dim=-1), dim=-1)
    safe = torch.where(torch.isfinite(log_z), log_z, 0)
    return torch.exp(masked - safe[..., None]), log_z


def _fit_rows(
    q: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor,
    order: torch.Tensor,
    p_sorted: torch.Tensor,
    size: torch.Tensor,
    drafts: int,
    options: FitOptions,
) -> tuple[EmissionPlan, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Fit α on T and build the exact plan.

    Args:
        q, p: [B, V]; x: [B, n]; order: [B, S] the tokens of supp p by p
        descending (S = largest support), p_sorted: [B, S] their p; size: [B] |T|.

    Returns:
        ``(plan, converged [B], iterations, missing mass [B], acceptance [B])``.
    """
    width = int(size.max())
    valid = torch.arange(width, device=q.device)[None, :] < size[:, None]  # [B, D]
    tokens = torch.where(valid, order[:, :width], -1)  # T as token ids, −1 padding
    safe_tokens = tokens.clamp_min(0)
    p_slots = torch.where(valid, p.gather(1, safe_tokens), 0)
    q_slots = torch.where(valid, q.gather(1, safe_tokens), 0)
    if options.subset_selection:
        # H* over supp p plus one p = 0 column holding the rest of q (sorted last, never
        # in a minimising prefix unless its q is 0): same ψ on every prefix, far fewer columns.
        q_support = q.gather(1, order)
        q_rest = (1 - q_support.sum(-1, keepdim=True)).clamp_min(0)
        q_columns = torch.cat([q_support, q_rest], dim=-1)
        p_columns = torch.cat([p_sorted, torch.zeros_like(q_rest)], dim=-1)
        in_subset = optimal_subset(q_columns, p_columns, drafts, options.scheme)[1]
        outer = valid & ~in_subset[:, :width]
    else:
        outer = valid.clone()
    sets = draft_sets(width, drafts, options.scheme, q.device)  # [M, k]
    evaluate = SetObjective.build(sets, set_probs(p_slots, sets, options.scheme), outer, q_slots)
    weights = evaluate.weights
    lower = torch.where(valid, -ALPHA_BOUND, 0.0).double()
    upper = torch.where(outer | ~valid, 0.0, ALPHA_BOUND).double()
    alpha, emitted, converged, iterations = projected_lbfgs(
        evaluate, q_slots, lower, upper, tol=options.tau, max_iters=options.max_iters
    )

    # P(some draft ∉ T): closed form for i.i.d. (precise when tiny), else the enumerated remainder.
    outside_mass = (p - torch.zeros_like(p).scatter_add_(1, safe_tokens, p_slots)).clamp_min(0)
    p_out = outside_mass.sum(-1)
    if options.scheme == "iid":
        missing = -torch.expm1(drafts * torch.log1p(-p_out.clamp_max(1)))
    else:
        missing = (1 - weights.sum(-1)).clamp(0, 1)
    missing = torch.where(p_out > 0, missing, 0)
    emission = outside_mass * (missing / p_out.clamp_min(1e-300))[:, None]
    emission = emission.scatter_add_(1, safe_tokens, torch.where(valid, emitted, 0))
    accepted = torch.minimum(q, emission)  # a = min(q, b)
    keep = torch.where(emission > 0, accepted / emission.clamp_min(1e-300), 0)  # γ = a / b

    choice = _drafted_emission(x, tokens, outer, alpha)
    draft_emit = choice * gather_draft_probs(keep, x)
    residual = normalize_rows(q - accepted, fallback=q)
    plan = EmissionPlan(draft_emit=draft_emit, residual=residual)
    return plan, converged, iterations, missing, accepted.sum(-1)


@dataclass
class SetObjective:
    """``α ↦ (F(α) [B], b(α) [B, D])`` of the fitted rule (module docstring), over chunks of the draft sets.

    Attributes:
        sets: [M, k] slots of each draft set; weights: [B, M] their probabilities.
        active: [B, M, k] bool, the entries of each set's softmax (first occurrences, of its tier);
        reject: [B, M] bool, the sets with a rejection logit (inner sets).
        q_slots: [B, D] the target on the slots; chunks: slices of the sets (:func:`set_chunks`).
    """

    sets: torch.Tensor
    weights: torch.Tensor
    active: torch.Tensor
    reject: torch.Tensor
    q_slots: torch.Tensor
    chunks: list[slice]

    @classmethod
    def build(
        cls, sets: torch.Tensor, weights: torch.Tensor, outer: torch.Tensor, q_slots: torch.Tensor
    ) -> SetObjective:
        """The objective of sets [M, k] with probabilities [B, M], outer slots [B, D] bool, target [B, D]."""
        set_outer = outer[:, sets]  # [B, M, k] bool
        outer_set = set_outer.any(-1)
        active = _first_occurrence(sets) & torch.where(outer_set[..., None], set_outer, ~set_outer)
        chunks = set_chunks(q_slots, sets.shape[0], q_slots.shape[0] * sets.shape[1])
        return cls(sets, weights, active, ~outer_set, q_slots, chunks)

    def __call__(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F(α) [B] and b(α) [B, D]; each chunk's masses are added to b in the order of the sets."""
        batch = alpha.shape[0]
        log_z = torch.empty_like(self.weights)
        emitted = torch.zeros_like(alpha)
        for part in self.chunks:
            sets, weights = self.sets[part], self.weights[:, part]
            sigma, chunk_log_z = set_softmax(alpha[:, sets], self.active[:, part], self.reject[:, part])
            log_z[:, part] = torch.where(weights > 0, chunk_log_z, 0)
            mass = (weights[..., None] * sigma).reshape(batch, -1)
            emitted.scatter_add_(1, sets.reshape(1, -1).expand(batch, -1), mass)
        value = (self.weights * log_z).sum(-1) - (self.q_slots * alpha).sum(-1)
        return value, emitted


def _drafted_emission(x: torch.Tensor, tokens: torch.Tensor, outer: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[B, n]: the rule's emission probability for each draft column of the drafted tuple only.

    Args:
        x: [B, n] drafts (−1 absent); tokens: [B, D] T (−1 padding);
        outer: [B, D] bool; alpha: [B, D].
    """
    present = x >= 0
    match = (x[:, :, None] == tokens[:, None, :]) & present[:, :, None]  # [B, n, D]
    in_set = match.any(-1)
    slot = match.double().argmax(-1)
    beyond = present & ~in_set
    first_beyond = beyond & (beyond.long().cumsum(-1) == 1)
    column_outer = in_set & outer.gather(1, slot)
    outer_tuple = column_outer.any(-1)
    active = _first_occurrence(x) & in_set & torch.where(outer_tuple[:, None], column_outer, ~column_outer)
    sigma, _ = set_softmax(alpha.gather(1, slot), active, ~outer_tuple)
    return torch.where(beyond.any(-1, keepdim=True), first_beyond.double(), sigma)


@dataclass
class LbfgsMemory:
    """The last ``memory`` L-BFGS pairs of each row, newest last: steps s, gradient changes y [B, m, D], 1/(s·y) [B, m].

    A curvature of 0 marks an empty slot.
    """

    steps: torch.Tensor
    changes: torch.Tensor
    curvature: torch.Tensor

    @classmethod
    def empty(cls, like: torch.Tensor, memory: int) -> LbfgsMemory:
        batch, width = like.shape
        return cls(
            like.new_zeros(batch, memory, width), like.new_zeros(batch, memory, width), like.new_zeros(batch, memory)
        )

    def direction(self, free_grad: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """[B, D]: the quasi-Newton descent direction on the free variables (two-loop recursion).

        The first step (empty memory) moves α by at most 1; a direction that is not downhill
        falls back to that scaled projected gradient.
        """
        memory = self.curvature.shape[1]
        work, coefs = free_grad.clone(), []
        for i in reversed(range(memory)):
            coef = self.curvature[:, i] * (self.steps[:, i] * work).sum(-1)
            work = work - coef[:, None] * self.changes[:, i]
            coefs.append(coef)
        sy = (self.steps[:, -1] * self.changes[:, -1]).sum(-1)
        yy = (self.changes[:, -1] ** 2).sum(-1)
        first_scale = 1 / free_grad.abs().amax(-1).clamp_min(1e-300)
        scale = torch.where(self.curvature[:, -1] > 0, sy / yy.clamp_min(1e-300), first_scale)
        work = scale[:, None] * work
        for i, coef in zip(range(memory), reversed(coefs), strict=True):
            beta = self.curvature[:, i] * (self.changes[:, i] * work).sum(-1)
            work = work + self.steps[:, i] * (coef - beta)[:, None]
        direction = torch.where(free_grad != 0, -work, 0)
        uphill = (direction * grad).sum(-1) >= 0
        return torch.where(uphill[:, None], -first_scale[:, None] * free_grad, direction)

    def push(self, rows: torch.Tensor, step: torch.Tensor, change: torch.Tensor) -> None:
        """Store the pair (s, y) [B, D] for ``rows`` [B] whose s·y is positive (keeps the inverse Hessian positive)."""
        sy = (step * change).sum(-1)
        store = (rows & (sy > 1e-30))[:, None, None]
        self.steps = torch.where(store, torch.cat([self.steps[:, 1:], step[:, None]], 1), self.steps)
        self.changes = torch.where(store, torch.cat([self.changes[:, 1:], change[:, None]], 1), self.changes)
        newest = torch.cat([self.curvature[:, 1:], (1 / sy.clamp_min(1e-300))[:, None]], 1)
        self.curvature = torch.where(store[:, :, 0], newest, self.curvature)


@dataclass
class LbfgsPoint:
    """The iterate of each row: α, F(α), b(α) and ∇F = b − target, all at the same α."""

    alpha: torch.Tensor
    value: torch.Tensor
    emitted: torch.Tensor
    grad: torch.Tensor

    def take(self, rows: torch.Tensor, other: LbfgsPoint) -> LbfgsPoint:
        """This point, with ``other``'s values on ``rows`` [B]."""
        pick = rows[:, None]
        return LbfgsPoint(
            torch.where(pick, other.alpha, self.alpha),
            torch.where(rows, other.value, self.value),
            torch.where(pick, other.emitted, self.emitted),
            torch.where(pick, other.grad, self.grad),
        )


@dataclass(frozen=True)
class _BoxObjective:
    """What :func:`projected_lbfgs` minimises: ``evaluate`` α [B, D] → (F [B], b [B, D]), ``∇F = b − target``,
    over the box ``lower ≤ α ≤ upper`` ([B, D] each)."""

    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    target: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    def trial(self, point: LbfgsPoint, step: torch.Tensor) -> tuple[LbfgsPoint, torch.Tensor]:
        """The point at ``point.alpha + step`` projected on the box, and the rows [B] where it passes the Armijo
        test ``F(trial) ≤ F + 1e−4 ∇F · (trial − α) + 1e−13 (1 + |F|)`` (see :func:`projected_lbfgs` for the
        slack)."""
        alpha = (point.alpha + step).clamp(self.lower, self.upper)
        value, emitted = self.evaluate(alpha)
        slack = 1e-13 * (1 + point.value.abs())
        decrease = 1e-4 * (point.grad * (alpha - point.alpha)).sum(-1)
        return LbfgsPoint(alpha, value, emitted, emitted - self.target), value <= point.value + decrease + slack


def _armijo_search(
    objective: _BoxObjective,
    point: LbfgsPoint,
    direction: torch.Tensor,
    pending: torch.Tensor,
    history: LbfgsMemory,
    max_halvings: int = 40,
) -> tuple[LbfgsPoint, torch.Tensor]:
    """Backtrack each ``pending`` row along ``direction`` (projected on the box) until its Armijo test passes.

    Returns the new point and the rows that found no decrease. Each accepted step's pair joins ``history``.
    """
    step_size = torch.ones_like(point.value)
    for _ in range(max_halvings):
        trial, passes = objective.trial(point, step_size[:, None] * direction)
        ok = pending & passes
        if bool(ok.any()):
            history.push(ok, trial.alpha - point.alpha, trial.grad - point.grad)
            point = point.take(ok, trial)
            pending = pending & ~ok
        if not bool(pending.any()):
            break
        step_size = torch.where(pending, step_size / 2, step_size)
    return point, pending


def _armijo_trials(
    objective: _BoxObjective,
    point: LbfgsPoint,
    direction: torch.Tensor,
    pending: torch.Tensor,
    history: LbfgsMemory,
    first: torch.Tensor,
    max_halvings: int = 40,
) -> tuple[LbfgsPoint, torch.Tensor, torch.Tensor]:
    """:func:`_armijo_search` with no host read: ``TRIAL_STEPS`` sizes ``s, s/2, …`` (s = ``first`` [B]) per call.

    Each ``pending`` row takes the largest size that passes its Armijo test. A row
    that none passes keeps its point and memory, so its next direction is this one,
    and its next search goes on from the next smaller size: the CPU's backtracking,
    spread over iterations. It has stalled once its sizes reach ``2^−max_halvings``
    (the CPU search's last). A step taken resets s to 1, as on the CPU.

    Returns ``(point, stalled [B], s [B] for the next search)``.
    """
    found = torch.zeros_like(pending)
    best = point
    for halvings in range(TRIAL_STEPS):
        trial, passes = objective.trial(point, (first * 0.5**halvings)[:, None] * direction)
        ok = pending & ~found & passes
        best = best.take(ok, trial)
        found = found | ok
    history.push(found, best.alpha - point.alpha, best.grad - point.grad)
    first = torch.where(found, 1.0, torch.where(pending, first * 0.5**TRIAL_STEPS, first))
    return best, pending & ~found & (first <= 0.5**max_halvings), first


def projected_lbfgs(
    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    target: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    tol: float,
    max_iters: int,
    memory: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Minimise ``F`` row-wise over a box, where ``∇F(α) = b(α) − target``.

    Batched projected L-BFGS: the quasi-Newton direction is taken on the free
    variables (not at a bound with the gradient pushing outward), the step is
    projected onto the box, and each row backtracks on its own Armijo test.
    The Armijo test allows a 1e−13 relative slack because F is a sum of many
    terms and stops resolving progress long before its gradient does.
    Convergence: the projected gradient's L1 norm ``≤ tol`` (it bounds the
    acceptance lost to the fit). Where host reads stall a device
    (``_sync.reads_are_cheap`` false) convergence is read every
    ``_sync.CHECK_EVERY`` iterations and the line search is
    :func:`_armijo_trials`, which reads nothing; a row that has converged or
    stalled stays put while the others go on. On a CPU every iteration reads
    its convergence and backtracks to a step (bit for bit the plain loop).

    Args:
        evaluate: α [B, D] → (F [B], b [B, D]).
        target, lower, upper: [B, D].

    Returns:
        ``(α, b(α), converged [B], iterations)`` with b recomputed at the α returned.
    """
    objective = _BoxObjective(evaluate, target, lower, upper)
    alpha = torch.zeros_like(target).clamp(lower, upper)
    value, emitted = evaluate(alpha)
    point = LbfgsPoint(alpha, value, emitted, emitted - target)
    history = LbfgsMemory.empty(target, memory)

    def projected(point: LbfgsPoint) -> torch.Tensor:
        pinned = ((point.alpha <= lower) & (point.grad > 0)) | ((point.alpha >= upper) & (point.grad < 0))
        return torch.where(pinned, 0, point.grad)

    done = projected(point).abs().sum(-1) <= tol
    cheap = _sync.reads_are_cheap(target)
    first = torch.ones_like(value)  # the accelerator path's next trial size
    iterations = 0
    for iteration in range(max_iters):
        if _sync.check_now(done, iteration) and bool(done.all()):
            break
        iterations += 1
        direction = history.direction(projected(point), point.grad)
        if cheap:
            point, stalled = _armijo_search(objective, point, direction, ~done, history)
        else:
            point, stalled, first = _armijo_trials(objective, point, direction, ~done, history, first)
        # A row whose line search found no decrease has stalled; it stops (unconverged).
        done = done | stalled | (projected(point).abs().sum(-1) <= tol)
    converged = projected(point).abs().sum(-1) <= tol
    return point.alpha, point.emitted, converged, iterations


class FittedVerifier(Verifier):
    """Base of the verifiers built on the fitted selection rule (not registered itself).

    Subclasses set the class attributes below and may override
    :meth:`fallback` / :meth:`fallback_acceptance`; the options are those of
    :class:`FitOptions`. ``last_stats`` (:class:`SolveStats`) describes the
    last ``plan`` call: failure rate, iterations, |T|, exact acceptance.
    """

    subset_selection: ClassVar[bool] = True
    fail_on_truncation: ClassVar[bool] = True
    fail_on_iterations: ClassVar[bool] = True
    default_max_support: ClassVar[int] = 1000
    default_max_tuples: ClassVar[int] = 1_000_000

    def __init__(
        self,
        *,
        tau: float = 1e-3,
        max_support: int | None = None,
        max_iters: int = 500,
        max_tuples: int | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__(validate=validate)
        max_support = self.default_max_support if max_support is None else max_support
        max_tuples = self.default_max_tuples if max_tuples is None else max_tuples
        check_options(tau, max_support, max_iters, max_tuples)
        self.options = FitOptions(
            scheme=self.draft_scheme,
            tau=tau,
            max_support=max_support,
            max_iters=max_iters,
            max_tuples=max_tuples,
            subset_selection=self.subset_selection,
            fail_on_truncation=self.fail_on_truncation,
            fail_on_iterations=self.fail_on_iterations,
        )
        self.last_stats = SolveStats()

    def fallback(self, q: torch.Tensor, p: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        """The cheap exact plan for rows that fail (float64 q, p [B, V]; drafts [B, n])."""
        raise RuntimeError(f"{self.name} has no fallback; no row can fail")

    def fallback_acceptance(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, drafts: int) -> torch.Tensor:
        """[B]: the fallback's acceptance with ``drafts`` drafts; NaN where unknown."""
        return torch.full_like(target_probs[:, 0], math.nan)

    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        plan, self.last_stats = fitted_plan(
            target_probs, draft_probs, draft_tokens, self.options, self.fallback, self.fallback_acceptance
        )
        return plan


__all__ = [
    "ALPHA_BOUND",
    "FitOptions",
    "FittedVerifier",
    "SetObjective",
    "SolveStats",
    "check_options",
    "draft_sets",
    "fitted_plan",
    "projected_lbfgs",
    "set_chunks",
    "set_probs",
    "set_softmax",
    "truncation_size",
    "tuple_count",
]
