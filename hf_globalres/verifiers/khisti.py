"""Canonical decomposition (Khisti et al. 2025, "Multi-draft speculative sampling: canonical architectures
and theoretical limits").

Drafts ``x_1..x_k`` i.i.d. from p. Step 1, importance sampling: choose one
draft, token y ∈ set(x) with probability ``w_y / Σ_{z ∈ set(x)} w_z``; the
chosen token then has some law s (its "induced" law). Step 2, single-draft
speculative sampling of the chosen y against s: accept with
``min(1, q_y / s_y)``, else recover from ``norm(max(0, q − s))``. The output
law is q for any weights, and the acceptance is ``Σ_y min(q_y, s_y)``;
Khisti et al. show that the best selection reaches the optimal transport
value, with a closed-form optimum for two identical drafts.

The selection LP (maximise ``Σ min(q, s)`` over the laws s a selection can
induce) is solved over a truncated alphabet T, the most probable draft
tokens (missing mass ``1 − p(T)^k ≤ tau``, at most ``max_support`` tokens
and ``max_tuples`` draft multisets): with weights ``w = e^α`` it is the
convex problem

    min_{−A ≤ α ≤ 0}  Σ_{multisets x of T} P(x) log Σ_{z ∈ set(x)} e^{α_z} − Σ_{y ∈ T} q_y α_y,

whose gradient is ``s − q``: at the optimum tokens strictly inside the box
get ``s = q``, tokens at 0 get ``s ≤ q`` and tokens at −A (over-proposed,
selected only when every draft is one of them) ``s ≥ q``, which makes
``Σ min(q, s) = 1 + q(D) − p(D)^k`` for the set D at −A, the optimum up to
``e^{−A}`` and the solver tolerance. A tuple with a draft outside T selects
its first such draft. s is computed exactly (enumeration on T, closed form
beyond), so the rule is exact whatever the solver returned; an unconverged
fit only lowers acceptance (counted in :attr:`Khisti.last_stats`). There is
no fallback: a too-large T is truncated further instead.
"""

from __future__ import annotations

from . import register
from ._selection import FittedVerifier


@register
class Khisti(FittedVerifier):
    """Importance-sampling selection + single-draft verification (canonical decomposition).

    Args:
        tau: largest missing draft mass of the truncated alphabet, and the
            solver's tolerance (default 1e-3).
        max_support: largest truncated alphabet (default 200).
        max_iters: solver iterations (default 500).
        max_tuples: largest number of draft multisets of T; T shrinks to fit (default 2e5).
        validate: check inputs.

    Takes at most 6 drafts per position (``max_drafts``); use ``optimal`` for more.
    """

    name = "khisti"
    draft_scheme = "iid"
    #: Its selection law sums over every draft multiset of the truncated alphabet: one call at
    #: V = 152k takes 0.35 s at n = 4, 1.2 s at 5 and 5.7 s at 6 on a 2-core CPU, and n = 8 ran
    #: past a minute. Larger n is refused at once.
    max_drafts = 6
    subset_selection = False
    fail_on_truncation = False
    fail_on_iterations = False
    default_max_support = 200
    default_max_tuples = 200_000
