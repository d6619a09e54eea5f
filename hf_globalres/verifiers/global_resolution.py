"""Global Resolution (Thomas & Pal 2025, arXiv 2511.15898): optimal transport by convex minimisation.

Drafts ``x_1..x_k`` i.i.d. from p. The transport LP over the ``V^k`` draft
tuples relaxes to a max-flow (source → token y, capacity q(y) → tuple ∋ y →
sink, capacity P(tuple)) whose minimum cut is the subset selection

    α* = 1 + min_H [ q(H) − p(H)^k ],

solved by one sort by ``q/p`` and a prefix scan (:func:`~hf_globalres.rates.optimal_subset`,
the largest minimiser H*). Complementary slackness splits the transport:

* **outer system** — tuples that meet ``L = V ∖ H*`` are transported in full
  onto their L tokens; a token of L receives at most q and the outer
  residual ``q_L − b_L`` is what recovery must supply;
* **inner system** — tuples inside H* serve every token of H* exactly q and
  reject the rest.

Each system becomes a convex problem in at most |T| log-weights α whose
solution is a softmax column per tuple: mass ∝ ``e^{α_y}`` on the distinct
tokens of the tuple in its system, with a "1 +" rejection term for the inner
one (see :mod:`hf_globalres.verifiers._selection`, which also holds the
batched projected L-BFGS that solves them). Sums run over the draft
multisets of a truncation set T, the most probable draft tokens, grown until
the missing mass ``1 − p(T)^k ≤ tau``. At run time only the column of the
drafted tuple is evaluated.

**Error bounds.** The paper's rule, used as is, has a marginal L1 error
≤ 15τ and an acceptance gap ≤ 10τ. Here the marginal is exactly q whatever
the solver returned: the achieved acceptance ``b`` of the rule is computed
exactly (enumeration on T, a closed form beyond it: a tuple with a draft
outside T emits its first such draft), the emission is capped at
``a = min(q, b)`` and the residual ``(q − a) / (1 − Σ a)`` is recovered. The
truncation and the solver tolerance (projected-gradient L1 ≤ τ) then cost
acceptance only: the gap to α* is at most about 2τ ≤ 10τ.

**Failures** (the paper's "failure" rows): T needs more than ``max_support``
tokens or more than ``max_tuples`` multisets, or the fit is not converged
after ``max_iters`` iterations. Such rows use SpecTr K-SEQ's exact plan; the
count is in :attr:`GlobalResolution.last_stats` (``failure_rate``).
"""

from __future__ import annotations

import torch

from ..rates import spectr_acceptance
from . import register
from ._selection import FittedVerifier
from .base import EmissionPlan
from .spectr import SpecTr


@register
class GlobalResolution(FittedVerifier):
    """Global Resolution with truncation tolerance ``tau``.

    Args:
        tau: largest missing draft mass ``1 − p(T)^k`` of the truncation set,
            and the solver's tolerance (default 1e-3).
        max_support: largest |T| before a row fails (falls back to SpecTr; default 1000).
        max_iters: solver iterations before a row fails (default 500).
        max_tuples: largest number of draft multisets of T before a row fails (default 1e6).
        validate: check inputs (see :class:`~hf_globalres.verifiers.base.Verifier`).
    """

    name = "global_resolution"
    draft_scheme = "iid"

    def fallback(self, q: torch.Tensor, p: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        return SpecTr(validate=False).plan(q, p, draft_tokens)

    def fallback_acceptance(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, drafts: int) -> torch.Tensor:
        return spectr_acceptance(target_probs, draft_probs, drafts)
