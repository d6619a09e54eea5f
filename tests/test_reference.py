"""Reference solvers: the max-flow equals the transport LP and the subset-selection closed form."""

from __future__ import annotations

import pytest
import torch

from hf_globalres.rates import optimal_acceptance
from hf_globalres.reference import transport_lp, transport_maxflow
from tests.verifiers.fitted_cases import degenerate_cases, small_cases


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_maxflow_equals_lp_and_closed_form(scheme: str) -> None:
    cases = [*small_cases(seed=41, count=30), *((q, p, 3) for _, q, p in degenerate_cases())]
    for q, p, n in cases:
        drafts = n if scheme == "iid" else min(n, int((p > 0).sum()))
        flow = transport_maxflow(q, p, drafts, scheme)
        assert flow == pytest.approx(transport_lp(q, p, drafts, scheme), abs=1e-9)
        assert flow == pytest.approx(float(optimal_acceptance(q[None], p[None], drafts, scheme)[0]), abs=1e-12)


def test_maxflow_single_draft_is_one_minus_tv() -> None:
    q = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    p = torch.tensor([0.1, 0.1, 0.4, 0.4], dtype=torch.float64)
    assert transport_maxflow(q, p, 1) == pytest.approx(float(torch.minimum(p, q).sum()), abs=1e-15)
