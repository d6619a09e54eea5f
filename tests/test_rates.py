"""Acceptance rates against the transport LP and their defining equations."""

from __future__ import annotations

import pytest
import torch

from hf_globalres import rates
from hf_globalres.reference import transport_lp

from .tensor_sizes import largest_tensor
from .verifiers.cases import CASE_KINDS, make_case, random_batch


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_optimal_acceptance_equals_transport_lp(scheme: str) -> None:
    worst = 0.0
    for seed in range(24):
        kind = CASE_KINDS[seed % len(CASE_KINDS)]
        vocab = 3 + seed % 3
        n = 1 + seed % 4
        if vocab**n > 700:
            n -= 1
        q, p = make_case(kind, vocab, seed)
        optimum = float(rates.optimal_acceptance(q[None], p[None], n, scheme)[0])
        worst = max(worst, abs(optimum - transport_lp(q, p, n, scheme)))
    assert worst <= 1e-9


def test_single_draft_optimum_is_one_minus_tv() -> None:
    q, p = random_batch(6, 50, 3)
    tv = 0.5 * (q - p).abs().sum(-1)
    for scheme in ("iid", "without_replacement"):
        assert torch.allclose(rates.optimal_acceptance(q, p, 1, scheme), 1 - tv, atol=1e-12)
    assert torch.allclose(rates.single_acceptance(q, p), 1 - tv, atol=1e-12)


def test_rates_grow_with_n_and_are_ordered() -> None:
    q, p = random_batch(5, 200, 4)
    previous = torch.zeros(5, dtype=torch.float64)
    for n in (1, 2, 4, 8):
        rrs = rates.rrs_acceptance(q, p, n)
        spectr = rates.spectr_acceptance(q, p, n)
        optimal = rates.optimal_acceptance(q, p, n)
        optimal_wor = rates.optimal_acceptance(q, p, n, "without_replacement")
        assert bool((rrs <= spectr + 1e-12).all()) and bool((spectr <= optimal + 1e-12).all())
        assert bool((optimal >= previous - 1e-12).all())
        # SpecTr's guarantee: at least (1 − 1/e) of the optimum.
        assert bool((spectr >= (1 - 1 / torch.e) * optimal - 1e-12).all())
        # Drawing without replacement never hurts the optimum.
        assert bool((optimal_wor >= optimal - 1e-9).all())
        previous = optimal


def test_spectr_rho_is_the_smallest_root() -> None:
    q, p = random_batch(8, 300, 5)
    for n in (2, 3, 5, 8):
        rho = rates.spectr_rho(q, p, n)
        assert bool(((rho >= 1) & (rho <= n)).all())

        def g(r: torch.Tensor, n: int = n) -> torch.Tensor:
            beta = rates.spectr_beta(q, p, r)
            return r * beta - 1 + (1 - beta) ** n

        at_one = rho == 1
        assert bool((g(rho)[at_one] >= 0).all()), "ρ* = 1 only when g(1) ≥ 0"
        assert bool((g(rho)[~at_one].abs() <= 1e-12).all()), "ρ* is a root of g"
        assert bool((g(rho * (1 - 1e-6))[~at_one] < 0).all()), "and the smallest one"


def test_per_row_draft_counts() -> None:
    q, p = random_batch(4, 100, 6)
    n = torch.tensor([0, 1, 3, 6])
    for fn in (rates.rrs_acceptance, rates.spectr_acceptance, rates.optimal_acceptance):
        batched = fn(q, p, n)
        alone = torch.stack([fn(q[i : i + 1], p[i : i + 1], int(n[i]))[0] for i in range(4)])
        assert torch.allclose(batched, alone, atol=1e-12), fn.__name__
        assert float(batched[0]) == pytest.approx(0.0, abs=1e-12)


def test_optimal_subset_is_a_largest_prefix_by_ratio() -> None:
    q, p = random_batch(3, 60, 7)
    alpha, inside = rates.optimal_subset(q, p, 4)
    ratio = q / p
    for row in range(3):
        # Every token in H* is at most as under-proposed as every token outside.
        if bool(inside[row].any()) and bool((~inside[row]).any()):
            assert float(ratio[row][inside[row]].max()) <= float(ratio[row][~inside[row]].min())
        psi = q[row][inside[row]].sum() - p[row][inside[row]].sum() ** 4
        assert float(1 + psi) == pytest.approx(float(alpha[row]), abs=1e-12)
    # The same subset as a prefix of the q/p order.
    prefix_alpha, order, size, *_ = rates.optimal_prefix(q, p, 4)
    assert torch.equal(prefix_alpha, alpha)
    ratio_sorted = ratio.gather(1, order)
    assert bool((ratio_sorted[:, 1:] >= ratio_sorted[:, :-1]).all())
    for row in range(3):
        assert set(order[row, : int(size[row])].tolist()) == set(inside[row].nonzero()[:, 0].tolist())


def test_power_matches_pow() -> None:
    base = torch.rand(3, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for n in (0, 1, 2, 3, 4, 7, 16):
        exponent = torch.full((3,), n)
        assert torch.allclose(rates.power(base, exponent), base.pow(n), rtol=1e-14, atol=0)
    # Exponents that differ per row (or exceed 16) take pow itself.
    mixed = torch.tensor([2, 5, 17])
    assert torch.equal(rates.power(base, mixed), base.pow(mixed.double()[:, None]))


def test_bad_arguments() -> None:
    q, p = random_batch(2, 10, 0)
    with pytest.raises(ValueError, match="scheme"):
        rates.optimal_acceptance(q, p, 2, scheme="sorted")
    with pytest.raises(ValueError, match="num_drafts"):
        rates.optimal_acceptance(q, p, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="non-negative"):
        rates.rrs_acceptance(q, p, -1)


def test_prefix_law_without_replacement_is_the_same_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows in chunks: bit for bit the law of the whole batch; quadrature nodes in chunks: 1e-12."""
    _, p = random_batch(7, 120, 8)
    p = torch.where(p >= p.topk(40, -1).values[:, -1:], p, 0)
    p_sorted = (p / p.sum(-1, keepdim=True)).sort(-1, descending=True).values
    n = torch.tensor([0, 1, 2, 3, 4, 6, 9])
    whole = rates._all_in_prefix_without_replacement(p_sorted, n)
    assert rates.PREFIX_CHUNK_CPU >= 7 * rates.PREFIX_NODES * 121  # one chunk by default here
    monkeypatch.setattr(rates, "PREFIX_CHUNK_CPU", 2 * rates.PREFIX_NODES * 121)  # 2 rows a chunk
    assert torch.equal(rates._all_in_prefix_without_replacement(p_sorted, n), whole)
    monkeypatch.setattr(rates, "PREFIX_CHUNK_CPU", 5 * 121)  # one row of 5 nodes a chunk
    assert torch.allclose(rates._all_in_prefix_without_replacement(p_sorted, n), whole, rtol=0, atol=1e-12)


def test_prefix_law_without_replacement_holds_no_tensor_of_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a bound of 4 (V + 1) elements, nothing is larger than the [B, V + 1] float64 output (32 nodes were)."""
    batch, vocab = 16, 400
    q, p = random_batch(batch, vocab, 9)
    monkeypatch.setattr(rates, "PREFIX_CHUNK_CPU", 4 * (vocab + 1))
    with largest_tensor() as largest:
        rates.optimal_acceptance(q, p, 4, "without_replacement")
    assert largest.bytes <= 8 * batch * (vocab + 1), largest.bytes
