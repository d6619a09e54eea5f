"""Single-draft speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

Accept the draft ``x ~ p`` with probability ``min(1, q(x)/p(x))``; otherwise
recover a token from ``norm(max(0, q − p))``. Acceptance ``Σ_y min(p, q)(y)``.
It is recursive rejection sampling with ``n = 1``, so it shares that plan.
"""

from __future__ import annotations

from . import register
from .rrs import RecursiveRejectionSampling


@register
class SingleDraft(RecursiveRejectionSampling):
    name = "single"
    draft_scheme = "iid"
    max_drafts = 1
