"""The tilted race (design §4.8): its law against enumeration, its Hessian, its solve, and `optimal_block(tilt=θ)`.

The output law of `optimal_block` with a tilt is checked with every other rule in
test_exactness.py (the ``optimal_block+tilt=30`` forms); here: the closed-form law
and its split by multiplicity against the race enumerated draw by draw, θ = 1
against `optimal`'s race, the Hessian against the law's finite differences, the
Newton solve, the acceptance kept at α*, tokens per block on two-level trees, and
the rows the tilt leaves alone.
"""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch

from hf_globalres import reference, verifiers
from hf_globalres.verifiers import _tilt, optimal_block
from hf_globalres.verifiers._race import RaceProblems, race_law
from hf_globalres.verifiers._tilt import TiltedProblems, solve_tilted, tilted_terms

from .cases import make_case

EXACT = 1e-10


def by_count_enumerated(
    mass: list[float], racing: list[bool], alpha: list[float], n: int, theta: float
) -> torch.Tensor:
    """``B_{y,m}`` [S, n] of one tilted race by enumerating its draws (most-drawn tokens' clocks θ× faster)."""
    law = torch.zeros(len(mass), n, dtype=torch.float64)
    for draws in itertools.product(range(len(mass)), repeat=n):
        chance = math.prod(mass[d] for d in draws)
        counts = collections.Counter(draws)
        most = max(counts.values())
        rate = {y: math.exp(alpha[y]) * (theta if c == most else 1) if racing[y] else 0.0 for y, c in counts.items()}
        total = sum(rate[d] for d in draws)
        if chance == 0 or total == 0:
            continue
        for y, c in counts.items():
            law[y, c - 1] += chance * c * rate[y] / total
    return law


def problems_for(rows: list[tuple[list[float], list[bool], int]], theta: float) -> TiltedProblems:
    """Tilted problems from (mass, racing, n) rows of one width; the target is the mass of the racing slots."""
    mass = torch.tensor([row[0] for row in rows], dtype=torch.float64)
    racing = torch.tensor([row[1] for row in rows])
    draws = torch.tensor([float(row[2]) for row in rows], dtype=torch.float64)
    target = torch.where(racing, mass, 0)
    still = torch.where(racing, 0, mass).sum(-1, keepdim=True)  # a race needs a racing draw: 1 − still^n
    target = target / target.sum(-1, keepdim=True) * (1 - still ** draws[:, None])
    return TiltedProblems(mass, racing, target, draws, torch.full_like(draws, theta), theta)


ROWS = [
    ([0.4, 0.3, 0.2, 0.1, 0.0], [True, True, False, True, False], 4),  # a slot that counts but does not race
    ([0.25, 0.05, 0.5, 0.2, 0.0], [True, True, True, True, False], 3),  # padding; fewer draws than classes
    ([0.7, 0.1, 0.1, 0.05, 0.05], [True, False, True, True, True], 4),  # a peaked row
]


@pytest.mark.parametrize("theta", [1.0, 7.0, 1000.0])
def test_tilted_law_matches_the_race_enumerated_draw_by_draw(theta: float) -> None:
    problems = problems_for(ROWS, theta)
    alpha = torch.tensor([[0.3, -1.2, 0.0, 2.0, 0.0], [1.0, 0.5, -0.5, 0.0, 0.0], [-3.0, 0.0, 1.5, 0.2, -0.7]])
    terms = tilted_terms(problems, alpha.double(), 0.3, 4)
    for row, (mass, racing, n) in enumerate(ROWS):
        exact = by_count_enumerated(mass, racing, alpha[row].tolist(), n, theta)
        assert torch.allclose(terms.by_count[row, :, :n], exact, rtol=0, atol=1e-13), row
        assert not terms.by_count[row, :, n:].any()  # no class above the row's draws
    assert torch.allclose(terms.law, terms.by_count.sum(-1), rtol=0, atol=0)


@pytest.mark.parametrize(("n", "width"), [(6, 4), (8, 3)])
def test_tilted_law_holds_for_many_draws(n: int, width: int) -> None:
    """The series' polynomial coefficients (exact fractions, up to n = 8) keep the law to 1e-13."""
    mass = [0.5, 0.3, 0.15, 0.05][:width]
    mass = [m / sum(mass) for m in mass]
    racing, alpha = [True, True, False, True][:width], [0.5, -2.0, 0.0, 3.0][:width]
    problems = problems_for([(mass, racing, n)], 1000.0)
    terms = tilted_terms(problems, torch.tensor([alpha], dtype=torch.float64), 0.3, n)
    exact = by_count_enumerated(mass, racing, alpha, n, 1000.0)
    assert torch.allclose(terms.by_count[0], exact, rtol=0, atol=1e-13)


def test_without_tilt_the_law_is_optimals_race() -> None:
    """θ = 1: the race of `_race.race_law`, whose background is the mass that does not race."""
    problems = problems_for(ROWS, 1.0)
    alpha = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    race = problems.race
    assert torch.allclose(
        tilted_terms(problems, alpha, 0.3, 4).law, torch.where(race.tier, race_law(race, alpha, 0.3), 0), atol=1e-14
    )


@pytest.mark.parametrize("theta", [1.0, 30.0])
def test_hessian_is_the_jacobian_of_the_law(theta: float) -> None:
    problems = problems_for(ROWS, theta)
    alpha = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hessian = tilted_terms(problems, alpha, 0.3, 4, hessian=True).hessian
    eps = 1e-6
    for slot in range(5):
        step = torch.zeros_like(alpha)
        step[:, slot] = eps
        up, down = (tilted_terms(problems, alpha + sign * step, 0.3, 4).law for sign in (1, -1))
        column = torch.where(problems.racing, (up - down) / (2 * eps), 0)
        assert torch.allclose(hessian[:, :, slot], column * problems.racing[:, slot, None], atol=1e-8), slot
    # A common shift of α changes no race: H 1 = 0.
    assert float(hessian.sum(-1).abs().max()) <= 1e-11


def test_newton_meets_the_target_from_the_untilted_weights() -> None:
    """Top-64-like rows, n = 4: from the weights whose untilted race has law c, the tilted race reaches c."""
    g = torch.Generator().manual_seed(3)
    mass = torch.softmax(3 * torch.randn(4, 64, generator=g, dtype=torch.float64), -1)
    draws = torch.full((4,), 4.0, dtype=torch.float64)
    start = 2 * torch.randn(4, 64, generator=g, dtype=torch.float64)
    target = race_law(RaceProblems(mass, mass, torch.zeros(4, dtype=torch.float64), draws), start, 0.3)
    problems = TiltedProblems(mass, mass > 0, target, draws, torch.full_like(draws, 100.0), 100.0)
    before = tilted_terms(problems, start, 0.3, 4).law
    assert float((before - target).abs().sum(-1).min()) > 1e-2  # the tilt moves the law
    alpha, terms = solve_tilted(problems, start, 4, tol=1e-10, max_iters=50, step=0.3)
    assert float((terms.law - target).abs().sum(-1).max()) <= 1e-10
    # The law at the returned weights (to the quadrature error: the nodes follow the batch evaluated).
    assert torch.allclose(terms.law, tilted_terms(problems, alpha, 0.3, 4).law, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", ["tree", "spine"])
@pytest.mark.parametrize("kind", ["random", "sparse", "q_zero_where_p"])
def test_tilted_rule_keeps_the_optimal_acceptance(shape: str, kind: str) -> None:
    for vocab, n, seed in ((4, 3, 0), (5, 3, 1), (3, 4, 2)):
        q, p = make_case(kind, vocab, seed)
        rule = verifiers.get("optimal_block", tilt=1000.0, draft_shape=shape)
        marginal, acceptance, _ = reference.enumerate_law(rule, q, p, n)
        assert torch.allclose(marginal, q, rtol=0, atol=EXACT), (kind, vocab, n)
        optimal = float(reference.enumerate_law(verifiers.get("optimal"), q, p, n)[1])
        assert float(acceptance) == pytest.approx(optimal, abs=1e-9), (kind, vocab, n)


@pytest.mark.parametrize("shape", ["tree", "spine"])
def test_tilted_rule_lengthens_blocks_towards_the_node_limit(shape: str) -> None:
    """On two-level trees: never below the untilted rule, never above the best root coupling, above on some."""
    g = torch.Generator().manual_seed(43)
    untilted = verifiers.get("optimal_block", draft_shape=shape)
    tilted = verifiers.get("optimal_block", draft_shape=shape, tilt=1000.0)
    gain = 0.0
    for _ in range(3):
        tree = reference.TwoLevelTree.random(4, 1.5, g)
        base = reference.enumerate_block_tokens(untilted, tree, 3, shape)
        value = reference.enumerate_block_tokens(tilted, tree, 3, shape)
        assert base - 1e-9 <= value <= reference.node_limit_lp(tree, 3, shape) + 1e-7
        gain += value - base
    assert gain > 1e-3


def test_rows_the_tilt_leaves_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two drafts, or a support wider than TILT_MAX_WIDTH: the untilted rule, and no tilted solve."""
    q, p = make_case("random", 5, 4)
    tuples, _ = reference.draft_tuples(p, 2)
    rows = q.expand(len(tuples), -1), p.expand(len(tuples), -1)
    tilted, plain = verifiers.get("optimal_block", tilt=30.0), verifiers.get("optimal_block")
    solves = []
    monkeypatch.setattr(optimal_block, "solve_tilted", lambda *a, **k: solves.append(1) or _tilt.solve_tilted(*a, **k))
    assert torch.allclose(tilted.conditional(*rows, tuples), plain.conditional(*rows, tuples), atol=1e-15)
    monkeypatch.setattr(optimal_block, "TILT_MAX_WIDTH", 4)
    tuples, _ = reference.draft_tuples(p, 3)
    rows = q.expand(len(tuples), -1), p.expand(len(tuples), -1)
    assert torch.allclose(tilted.conditional(*rows, tuples), plain.conditional(*rows, tuples), atol=1e-15)
    assert not solves
    monkeypatch.setattr(optimal_block, "TILT_MAX_WIDTH", 5)
    tilted.conditional(*rows, tuples)
    assert solves


def test_tilt_option() -> None:
    rule = verifiers.get("optimal_block", tilt=30.0)
    assert rule.for_shape("spine").tilt == 30.0 and "tilt=30.0" in repr(rule)
    for bad in (0.5, float("inf"), float("nan"), "3"):
        with pytest.raises(ValueError, match="tilt must be a finite number ≥ 1"):
            verifiers.get("optimal_block", tilt=bad)


def test_race_problems_view_keeps_the_racing_slots() -> None:
    problems = problems_for(ROWS, 5.0)
    race = problems.race
    assert isinstance(race, RaceProblems)
    assert torch.equal(race.tier, problems.racing & (problems.mass > 0))
