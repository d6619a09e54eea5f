"""`optimal_block`: `optimal`'s acceptance per token, spent on high-multiplicity winners first (design §4.7).

Exactness of the output law is checked for every rule in test_exactness.py and,
in generate, in tests/generation; here: the multiplicity split of the race law
against the race enumerated exactly, the accepted mass per token against
`optimal`'s, the multiplicity-weighted value against `optimal` and the per-node
LP, the rows that need no solve, tokens per block on two-level trees
against the limit of any lossless rule, and, for spine trees, the wins moved
towards the spine's leader.
"""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch

from hf_globalres import reference, verifiers
from hf_globalres.reference import draft_tuples
from hf_globalres.verifiers import _race
from hf_globalres.verifiers._race import RaceProblems, race_law, race_law_by_count
from hf_globalres.verifiers.base import heaviest_child
from hf_globalres.verifiers.optimal_block import OptimalBlock, count_acceptance, leader_shares

from .cases import CASE_KINDS, WIDE_RACES, make_case, wide_race_problems

EXACT = 1e-10


def by_count_enumerated(p: torch.Tensor, background: float, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """``B_{y,m}`` [S, n] of one race problem by enumerating its draws (the background is one more outcome)."""
    outcomes = [*p.tolist(), background]
    weight = [*alpha.exp().tolist(), 0.0]
    law = torch.zeros(p.shape[0], n, dtype=torch.float64)
    for draws in itertools.product(range(len(outcomes)), repeat=n):
        chance, total = math.prod(outcomes[d] for d in draws), sum(weight[d] for d in draws)
        if chance == 0 or total == 0:
            continue
        for token, times in collections.Counter(d for d in draws if d < p.shape[0]).items():
            law[token, times - 1] += chance * times * weight[token] / total
    return law


def test_race_law_by_count_matches_enumeration_and_sums_to_the_race_law() -> None:
    g = torch.Generator().manual_seed(3)
    draws = torch.tensor([2.0, 4.0, 3.0], dtype=torch.float64)
    mass = torch.rand(3, 5, generator=g, dtype=torch.float64)
    mass[0, 3:] = 0  # padding slots
    mass = 0.8 * mass / mass.sum(-1, keepdim=True)
    problems = RaceProblems(mass, mass, torch.full((3,), 0.2, dtype=torch.float64), draws)
    alpha = torch.randn(3, 5, generator=g, dtype=torch.float64)
    split = race_law_by_count(problems, alpha, step=0.3, classes=4)
    assert split.shape == (3, 5, 4)
    assert torch.allclose(split.sum(-1), race_law(problems, alpha, step=0.3), rtol=0, atol=1e-15)
    for row in range(3):
        n = int(draws[row])
        exact = by_count_enumerated(mass[row], 0.2, alpha[row], n)
        assert torch.allclose(split[row, :, :n], exact, rtol=0, atol=1e-13), row
        assert not split[row, :, n:].any()  # no class above the row's draws
    chunked = race_law_by_count(problems, alpha, step=0.3, classes=4, chunk=3 * 40 * 4)
    assert torch.allclose(chunked, split, rtol=0, atol=1e-16)


@pytest.mark.parametrize(("n", "span", "background"), WIDE_RACES)
def test_wide_tiers_split_the_race_law_through_the_expansion(
    monkeypatch: pytest.MonkeyPatch, n: int, span: float, background: float
) -> None:
    """Tiers of ≥ EXPANSION_MIN_WIDTH slots (full-support rows) sum their survival through the expansion in α."""
    problems, alpha = wide_race_problems(n, span, background)
    expanded = race_law_by_count(problems, alpha, step=0.3, classes=n)
    monkeypatch.setattr(_race, "EXPANSION_MIN_WIDTH", 10**9)
    direct = race_law_by_count(problems, alpha, step=0.3, classes=n)
    assert float((expanded - direct).abs().max()) <= 1e-14
    assert float((expanded - direct).abs().sum((-1, -2)).max()) <= 1e-13
    # The drafts' slots alone: the same values, at the cost of one survival pass.
    slots = torch.tensor([[5, 3, 5, 1000], [3, 0, 9, 1]])
    picked = race_law_by_count(problems, alpha, step=0.3, classes=n, slots=slots)
    assert torch.equal(picked, direct.gather(1, slots[..., None].expand(-1, -1, n)))


def test_expanded_split_keeps_the_rule_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every race evaluation and split through the expansion: law q (1e-10), `optimal`'s acceptance per token."""
    monkeypatch.setattr(_race, "EXPANSION_MIN_WIDTH", 1)
    for vocab, n, seed in ((9, 3, 6), (6, 4, 7)):
        q, p = make_case("random", vocab, seed)
        for shape in ("tree", "spine"):
            marginal, acceptance, _ = reference.enumerate_law(
                verifiers.get("optimal_block", draft_shape=shape), q, p, n
            )
            assert float((marginal - q).abs().max()) <= EXACT, (vocab, n, shape)
            optimal = float(reference.enumerate_law(verifiers.get("optimal"), q, p, n)[1])
            assert float(acceptance) == pytest.approx(optimal, abs=1e-9)


def test_count_acceptance_fills_the_largest_multiplicity_first() -> None:
    """One slot, k = 3: B = (0.2, 0.3, 0.1) for m = 1, 2, 3; cap 0.35 takes m = 3 whole, then 0.25 of m = 2."""
    by_count = torch.tensor([[[0.2, 0.3, 0.1]]], dtype=torch.float64)
    rule = count_acceptance(
        torch.tensor([[0.35]]).double(), torch.tensor([[0.1]]).double(), torch.tensor([3]), by_count
    )
    assert float(rule.top[0, 0]) == pytest.approx(1.0)
    assert rule.lower[0, 0].tolist() == pytest.approx([0.0, 0.25 / 0.3, 0.0])
    assert float(0.1 * rule.top[0, 0] + (by_count * rule.lower).sum()) == pytest.approx(0.35)  # min(κ, b)
    # A cap below the top class accepts only part of it, and nothing else.
    rule = count_acceptance(
        torch.tensor([[0.05]]).double(), torch.tensor([[0.1]]).double(), torch.tensor([3]), by_count
    )
    assert float(rule.top[0, 0]) == pytest.approx(0.5) and rule.lower.abs().max() == 0


def accepted_by_count(name: str, q: torch.Tensor, p: torch.Tensor, n: int) -> torch.Tensor:
    """[V, n]: P(Y = y, y accepted, m drafts show y) of rule ``name``, by enumeration."""
    tuples, weights = draft_tuples(p, n)
    law = verifiers.get(name).conditional(q.expand(len(weights), -1), p.expand(len(weights), -1), tuples)
    count = torch.zeros_like(law).scatter_add(1, tuples, torch.ones_like(law[:, :1]).expand_as(tuples).clone())
    return torch.stack([(weights[:, None] * law * (count == m)).sum(0) for m in range(1, n + 1)], -1)


@pytest.mark.parametrize("kind", CASE_KINDS)
def test_same_acceptance_per_token_as_optimal_moved_to_larger_multiplicities(kind: str) -> None:
    for vocab, n, seed in ((4, 3, 0), (5, 2, 1), (3, 4, 2)):
        q, p = make_case(kind, vocab, seed)
        block, optimal = accepted_by_count("optimal_block", q, p, n), accepted_by_count("optimal", q, p, n)
        assert torch.allclose(block.sum(-1), optimal.sum(-1), rtol=0, atol=1e-9), (kind, vocab, n)
        # Mass at m or more drafts never falls: the rule moves acceptance up the multiplicities.
        at_least = lambda mass: mass.flip(-1).cumsum(-1).flip(-1)  # noqa: E731
        assert bool((at_least(block) >= at_least(optimal) - 1e-9).all()), (kind, vocab, n)


def test_multiplicity_value_between_optimal_and_the_lp() -> None:
    """For g(m) = 1 + m/n the rule does at least as well as `optimal` and at most as well as any coupling."""
    gains, n = 0, 3
    for seed in range(6):
        q, p = make_case("random", 4, 40 + seed)
        weights = torch.tensor([1 + m / n for m in range(1, n + 1)], dtype=torch.float64)
        block = float((accepted_by_count("optimal_block", q, p, n) * weights).sum())
        optimal = float((accepted_by_count("optimal", q, p, n) * weights).sum())
        limit = reference.transport_lp(q, p, n, gain=lambda token, times: 1 + times / n)
        assert optimal - 1e-9 <= block <= limit + 1e-7, (seed, optimal, block, limit)
        gains += block > optimal + 1e-6
    assert gains >= 3  # it is not `optimal` under another name


def test_agreeing_drafts_need_no_solve(monkeypatch) -> None:
    q, p = make_case("random", 6, 5)
    rule = verifiers.get("optimal_block")
    solves = []
    original = OptimalBlock._solve_tiers
    monkeypatch.setattr(
        OptimalBlock, "_solve_tiers", lambda self, problems: solves.append(1) or original(self, problems)
    )
    drafts = torch.tensor([[2, 2, 2], [4, 4, -1]])
    plan = rule.plan(q.expand(2, -1), p.expand(2, -1), drafts)
    assert not solves
    emitted = plan.draft_emit.sum(-1)
    for row, (token, k) in enumerate(((2, 3), (4, 2))):
        # All k drafts show y with chance p_y^k (in the H race (p_y / p(H*))^k against q_y / p(H*)^k): the same.
        assert float(emitted[row]) == pytest.approx(min(1.0, float(q[token] / p[token] ** k)), abs=1e-12)
    plan.residual  # noqa: B018 - a rejection solves both tiers
    assert solves


@pytest.mark.parametrize(("vocab", "n"), [(3, 2), (3, 3)])
def test_two_level_trees_at_least_optimal_and_below_the_limit(vocab: int, n: int) -> None:
    g = torch.Generator().manual_seed(vocab * 10 + n)
    better = 0
    for _ in range(5):
        tree = reference.TwoLevelTree.random(vocab, 1.5, g)
        tokens = {
            name: reference.enumerate_block_tokens(verifiers.get(name), tree, n)
            for name in ("spectr", "optimal", "optimal_block")
        }
        limit = reference.block_limit_lp(tree, n)
        assert tokens["optimal"] - EXACT <= tokens["optimal_block"] <= limit + 1e-7, tokens
        assert tokens["spectr"] <= limit + 1e-7
        better += tokens["optimal_block"] > tokens["optimal"] + 1e-7
    assert better >= 1


def test_leader_shares_keep_each_multisets_race_law() -> None:
    """Averaged over the orders of a multiset, each token wins as in the race; the leader wins at least as often."""
    weight = {0: 0.5, 1: 2.0, 2: 1.0, 3: 0.0}  # token 3 does not race (the background of the L race)
    for multiset in ((0, 1, 2, 3), (0, 0, 1, 1), (1, 1, 3, 3), (0, 1, 2), (2, 2, 2, 0), (0, 1, 1, 3)):
        orders = torch.tensor(sorted(set(itertools.permutations(multiset))))
        present = orders >= 0
        same = (orders[:, :, None] == orders[:, None, :]) & present[:, None, :]
        raw = torch.tensor([[weight[int(t)] for t in row] for row in orders], dtype=torch.float64)
        shares = raw / raw.sum(-1, keepdim=True)
        moved = leader_shares(shares, orders, present, same)
        assert torch.allclose(moved.sum(-1), torch.ones(len(orders), dtype=torch.float64), atol=1e-12), multiset
        for token in set(multiset):
            race = (shares * (orders == token)).sum(-1).mean()
            assert float((moved * (orders == token)).sum(-1).mean()) == pytest.approx(float(race), abs=1e-12)
        lead = heaviest_child(orders, present)
        assert float((moved * lead).sum(-1).mean()) >= float((shares * lead).sum(-1).mean()) - 1e-12
    # All distinct, equal weights: the first draft (the leader) always wins.
    orders = torch.tensor([[3, 1, 2, 0]])
    flat = leader_shares(
        torch.full((1, 4), 0.25, dtype=torch.float64), orders, orders >= 0, torch.eye(4, dtype=torch.bool)[None]
    )
    assert flat[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])


def test_for_shape_picks_the_spine_rule_and_keeps_the_options() -> None:
    rule = verifiers.get("optimal_block", tol=1e-9)
    spine = rule.for_shape("spine")
    assert (spine.draft_shape, spine.tol, rule.draft_shape) == ("spine", 1e-9, "tree")
    assert spine.for_shape("tree").draft_shape == "tree"
    assert "spine" in repr(spine)
    for bad in (lambda: verifiers.get("optimal_block", draft_shape="chain"), lambda: rule.for_shape("chain")):
        with pytest.raises(ValueError, match="draft_shape must be one of"):
            bad()


@pytest.mark.parametrize(("vocab", "n"), [(3, 3), (4, 3)])
def test_spine_trees_gain_on_the_tree_rule_and_stay_below_the_node_limit(vocab: int, n: int) -> None:
    g = torch.Generator().manual_seed(vocab * 10 + n)
    spine, tree_rule = verifiers.get("optimal_block", draft_shape="spine"), verifiers.get("optimal_block")
    gains = 0
    for _ in range(4):
        tree = reference.TwoLevelTree.random(vocab, 1.5, g)
        leader = reference.enumerate_block_tokens(spine, tree, n, "spine")
        counts_only = reference.enumerate_block_tokens(tree_rule, tree, n, "spine")
        optimal = reference.enumerate_block_tokens(verifiers.get("optimal"), tree, n, "spine")
        limit = reference.node_limit_lp(tree, n, "spine")
        assert optimal - EXACT <= counts_only and leader <= limit + 1e-7, (optimal, counts_only, leader, limit)
        gains += leader > counts_only + 1e-6
    assert gains >= 2
