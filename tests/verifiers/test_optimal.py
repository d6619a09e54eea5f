"""The `optimal` verifier: output law exactly q, acceptance the transport-LP optimum.

Exactness is checked by enumerating every draft tuple in float64 (1e-10);
optimality against scipy's HiGHS LP (1e-7) and the closed form
``rates.optimal_acceptance`` (1e-9); sampling by chi-square at level 1e-4 with
fixed seeds. The race quadrature is checked against the race enumerated exactly.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_globalres import rates, verifiers
from hf_globalres.reference import draft_tuples, enumerate_law, transport_lp
from hf_globalres.verifiers import _race
from hf_globalres.verifiers._race import RaceProblems, expanded_race_law, quadrature_nodes, race_law, race_terms
from hf_globalres.verifiers.optimal import Optimal, floor_level, water_level

from .cases import CASE_KINDS, WIDE_RACES, chi_square_pvalue, make_case, wide_race_problems

EXACT = 1e-10
LP_MATCH = 1e-7
CLOSED_FORM_MATCH = 1e-9
LEVEL = 1e-4
SAMPLES = 100_000


def optimum(q: torch.Tensor, p: torch.Tensor, n: int) -> float:
    return float(rates.optimal_acceptance(q[None], p[None], n)[0])


def random_case(vocab: int, seed: int, zero_fraction: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, p) [V] float64 with random zeros (each row keeps some mass)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(vocab, generator=g, dtype=torch.float64) ** 2
    p = torch.rand(vocab, generator=g, dtype=torch.float64) ** 2
    q[torch.rand(vocab, generator=g) < zero_fraction] = 0
    p[torch.rand(vocab, generator=g) < zero_fraction] = 0
    q[int(torch.randint(vocab, (1,), generator=g))] += 0.3
    p[int(torch.randint(vocab, (1,), generator=g))] += 0.3
    return q / q.sum(), p / p.sum()


@pytest.mark.parametrize("kind", CASE_KINDS)
def test_enumerated_law_is_q_and_acceptance_is_lp_optimum(kind: str) -> None:
    rule = verifiers.get("optimal")
    for vocab, seed in ((3, 10), (4, 11), (6, 12)):
        q, p = make_case(kind, vocab, seed)
        for n in (1, 2, 3, 4):
            if vocab**n > 1300:
                continue
            marginal, acceptance, emitted = enumerate_law(rule, q, p, n)
            assert float((marginal - q).abs().max()) <= EXACT, (kind, vocab, n)
            # The residual never lands on a draft: every accepted token is an emission.
            assert float(acceptance) == pytest.approx(float(emitted), abs=EXACT)
            assert float(acceptance) == pytest.approx(optimum(q, p, n), abs=CLOSED_FORM_MATCH), (kind, vocab, n)
            if vocab**n <= 256:
                assert float(acceptance) == pytest.approx(transport_lp(q, p, n), abs=LP_MATCH), (kind, vocab, n)


def test_random_cases_with_zeros_reach_the_lp_optimum() -> None:
    rule = verifiers.get("optimal")
    g = torch.Generator().manual_seed(0)
    for case in range(30):
        vocab = int(torch.randint(2, 7, (1,), generator=g))
        n = int(torch.randint(1, 5, (1,), generator=g))
        while vocab**n > 1300:
            n -= 1
        q, p = random_case(vocab, 1000 + case)
        marginal, acceptance, _ = enumerate_law(rule, q, p, n)
        assert float((marginal - q).abs().max()) <= EXACT, (case, vocab, n)
        lp = transport_lp(q, p, n) if vocab**n <= 400 else optimum(q, p, n)
        assert float(acceptance) == pytest.approx(lp, abs=LP_MATCH), (case, vocab, n)


def test_rows_with_different_numbers_of_drafts_in_one_batch() -> None:
    """One call holds rows with k = 0..4 drafts (−1 anywhere) and different q, p."""
    rule = verifiers.get("optimal")
    width = 4
    cases = [random_case(5, 50 + k) for k in range(width + 1)]
    blocks, groups = [], []
    g = torch.Generator().manual_seed(1)
    for k, (q, p) in enumerate(cases):
        if k == 0:
            tuples, weights = torch.empty(1, 0, dtype=torch.long), torch.ones(1, dtype=torch.float64)
        else:
            tuples, weights = draft_tuples(p, k)
        padded = torch.full((len(tuples), width), -1, dtype=torch.long)
        for row in range(len(tuples)):
            padded[row, torch.randperm(width, generator=g)[:k].sort().values] = tuples[row]
        blocks.append((q.expand(len(padded), -1), p.expand(len(padded), -1), padded))
        groups.append((k, q, p, weights))
    q_all, p_all, x_all = (torch.cat(parts) for parts in zip(*blocks, strict=True))
    law = rule.conditional(q_all, p_all, x_all)
    start = 0
    for k, q, p, weights in groups:
        rows = slice(start, start + len(weights))
        start += len(weights)
        marginal = (weights[:, None] * law[rows]).sum(0)
        assert float((marginal - q).abs().max()) <= EXACT, k
        drafts = x_all[rows]
        is_draft = ((drafts[:, :, None] == torch.arange(q.shape[0])) & (drafts[:, :, None] >= 0)).any(1)
        acceptance = float((weights * torch.where(is_draft, law[rows], 0).sum(-1)).sum())
        assert acceptance == pytest.approx(optimum(q, p, k) if k else 0.0, abs=CLOSED_FORM_MATCH), k


def test_batch_of_different_rows_matches_each_row_alone() -> None:
    rule = verifiers.get("optimal")
    g = torch.Generator().manual_seed(2)
    cases = [random_case(7, 70 + i) for i in range(6)] + [make_case(kind, 7, 3) for kind in CASE_KINDS]
    q = torch.stack([c[0] for c in cases])
    p = torch.stack([c[1] for c in cases])
    drafts = torch.multinomial(p, 4, replacement=True, generator=g)
    drafts[::3, 1] = -1  # rows with 3 drafts among rows with 4
    batched = rule.conditional(q, p, drafts)
    for row in range(len(cases)):
        alone = rule.conditional(q[row : row + 1], p[row : row + 1], drafts[row : row + 1])[0]
        assert float((batched[row] - alone).abs().max()) <= 1e-12, row


def test_acceptance_reaches_the_optimum_on_larger_vocabularies() -> None:
    """Correlated logits, V = 3000, top-k supports up to V: Σ ā = α* (Newton at full width converged)."""
    rule = Optimal(bins=0)
    g = torch.Generator().manual_seed(3)
    base = 2 * torch.randn(6, 3000, generator=g, dtype=torch.float64)
    q = torch.softmax(base + 0.7 * torch.randn(base.shape, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(base + 0.7 * torch.randn(base.shape, generator=g, dtype=torch.float64), -1)
    for row, top in enumerate((10, 100, 1000, 3000, 3000, 300)):
        kept = p[row].topk(top).indices
        p[row] = torch.zeros_like(p[row]).scatter(0, kept, p[row, kept]) / p[row, kept].sum()
    for n in (2, 4, 8):
        accepted, best = rule.acceptance(q, p, n)
        assert torch.allclose(best, rates.optimal_acceptance(q, p, n), rtol=0, atol=1e-12)
        assert float((best - accepted).abs().max()) <= 1e-8, n


def test_enumerated_exactness_on_a_wider_vocabulary() -> None:
    """V = 30, n = 2 (900 tuples) and V = 11, n = 3: law q, acceptance α*."""
    rule = verifiers.get("optimal")
    for vocab, n, seed in ((30, 2, 5), (11, 3, 6)):
        q, p = random_case(vocab, seed, zero_fraction=0.2)
        marginal, acceptance, _ = enumerate_law(rule, q, p, n)
        assert float((marginal - q).abs().max()) <= EXACT
        assert float(acceptance) == pytest.approx(optimum(q, p, n), abs=CLOSED_FORM_MATCH)


@settings(max_examples=40, deadline=None)
@given(
    vocab=st.integers(2, 5),
    num_drafts=st.integers(1, 4),
    q_zeros=st.lists(st.booleans(), min_size=5, max_size=5),
    p_zeros=st.lists(st.booleans(), min_size=5, max_size=5),
    same=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_exact_and_optimal(
    vocab: int, num_drafts: int, q_zeros: list[bool], p_zeros: list[bool], same: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(vocab, generator=g, dtype=torch.float64)
    p = q.clone() if same else torch.rand(vocab, generator=g, dtype=torch.float64)
    q[torch.tensor(q_zeros[:vocab])] = 0
    p[torch.tensor(p_zeros[:vocab])] = 0
    q[seed % vocab] += 0.2
    p[(seed // 5) % vocab] += 0.2
    q, p = q / q.sum(), p / p.sum()
    marginal, acceptance, _ = enumerate_law(verifiers.get("optimal"), q, p, num_drafts)
    assert float((marginal - q).abs().max()) <= EXACT
    assert float(acceptance) == pytest.approx(optimum(q, p, num_drafts), abs=CLOSED_FORM_MATCH)


def test_unconverged_solves_stay_exact_and_lose_acceptance() -> None:
    q, p = random_case(6, 21, zero_fraction=0.0)
    n = 4
    best = optimum(q, p, n)
    converged = enumerate_law(Optimal(), q, p, n)[1]
    assert float(converged) == pytest.approx(best, abs=CLOSED_FORM_MATCH)
    for iters in (0, 1):
        marginal, acceptance, _ = enumerate_law(Optimal(max_iters=iters), q, p, n)
        assert float((marginal - q).abs().max()) <= EXACT, iters
        assert float(acceptance) <= best + EXACT
    # The closed-form start alone is measurably short of the optimum on this case.
    assert float(enumerate_law(Optimal(max_iters=0), q, p, n)[1]) < best - 1e-4


@pytest.mark.parametrize("max_iters", [50, 1, 0])
def test_agreeing_drafts_solve_nothing_and_keep_the_law_exact(monkeypatch: pytest.MonkeyPatch, max_iters: int) -> None:
    """Tuples verified one at a time: those whose racing drafts agree skip the solve until a rejection.

    Their conditional law equals the batched rule's (which solves every row), and the output law
    averaged over all tuples is q, converged or not; the accepted masses match ``acceptance``.
    """
    solves = []
    original = Optimal._solve_tiers
    monkeypatch.setattr(Optimal, "_solve_tiers", lambda self, race: solves.append(1) or original(self, race))
    rule = Optimal(max_iters=max_iters)
    for seed in range(6):
        q, p = random_case(5, 40 + seed, zero_fraction=0.2)
        tuples, weights = draft_tuples(p, 3)
        count = tuples.shape[0]
        rows_q, rows_p = q.expand(count, -1), p.expand(count, -1)
        batched = rule.conditional(rows_q, rows_p, tuples)
        marginal = torch.zeros_like(q)
        agreeing = 0
        for row, (drafts, weight) in enumerate(zip(tuples, weights, strict=True)):
            solves.clear()
            _, p_checked, x = rule.prepare(q[None], p[None], drafts[None])
            plan = rule.plan(q[None], p_checked, x)
            emit = plan.draft_emit
            if int(drafts.unique().numel()) == 1:
                agreeing += 1
                assert not solves  # nothing solved before a rejection
            law = torch.zeros_like(q).index_add_(0, drafts, emit[0]) + (1 - emit.sum()) * plan.residual[0]
            assert float((law - batched[row]).abs().max()) <= 1e-12
            marginal += weight * law
        assert agreeing == int((p > 0).sum())
        assert float((marginal - q).abs().max()) <= EXACT
        accepted, _ = rule.acceptance(q[None], p[None], 3)
        _, _, emitted = enumerate_law(rule, q, p, 3)
        assert float(accepted[0]) == pytest.approx(float(emitted), abs=1e-12)


def test_verify_samples_the_conditional_law() -> None:
    """V = 40 with zeros, 4 drafts incl. repeats: verify's tokens follow conditional (χ², level 1e-4)."""
    rule = verifiers.get("optimal")
    q, p = random_case(40, 8, zero_fraction=0.25)
    g = torch.Generator().manual_seed(7)
    for drafts in (torch.multinomial(p, 4, replacement=True, generator=g), torch.tensor([0, 0, 0, 0])):
        drafts = drafts if float(p[drafts].min()) > 0 else p.argmax().expand(4)
        rows = drafts.expand(SAMPLES, -1)
        result = rule.verify(q.expand(SAMPLES, -1), p.expand(SAMPLES, -1), rows, generator=g)
        law = rule.conditional(q[None], p[None], drafts[None])[0]
        assert chi_square_pvalue(result.token, law) > LEVEL, drafts.tolist()


def test_verify_end_to_end_marginal_is_target() -> None:
    rule = verifiers.get("optimal")
    q, p = random_case(40, 9, zero_fraction=0.25)
    g = torch.Generator().manual_seed(11)
    qs, ps = q.expand(SAMPLES, -1), p.expand(SAMPLES, -1)
    drafts = torch.multinomial(ps, 3, replacement=True, generator=g)
    result = rule.verify(qs, ps, drafts, generator=g)
    assert chi_square_pvalue(result.token, q) > LEVEL
    accepted_rate = float(result.accepted.double().mean())
    # Acceptance is α* up to sampling noise (6 standard errors).
    assert accepted_rate == pytest.approx(optimum(q, p, 3), abs=6 * math.sqrt(0.25 / SAMPLES))


def enumerated_race_law(p: torch.Tensor, background: float, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """Exact law of the race winner: tokens 0..S−1 with masses p, plus a background that never wins."""
    outcomes = [*range(len(p)), -1]
    mass = torch.cat([p, torch.tensor([background], dtype=torch.float64)])
    law = torch.zeros_like(p)
    for combo in itertools.product(range(len(outcomes)), repeat=n):
        prob = float(torch.prod(mass[list(combo)]))
        racing = [outcomes[c] for c in combo if outcomes[c] >= 0]
        if not racing:
            continue
        weights = torch.exp(alpha[racing] - alpha[racing].max())
        law.index_add_(0, torch.tensor(racing), prob * weights / weights.sum())
    return law


@pytest.mark.parametrize(("n", "spread", "background"), [(2, 0.0, 0.3), (3, 12.0, 0.0), (4, 40.0, 0.2), (4, 3.0, 0.0)])
def test_race_quadrature_matches_the_enumerated_race(n: int, spread: float, background: float) -> None:
    g = torch.Generator().manual_seed(int(spread) + n)
    size = 5
    p = torch.rand(size, generator=g, dtype=torch.float64) + 0.05
    p = (1 - background) * p / p.sum()
    alpha = spread * (torch.rand(size, generator=g, dtype=torch.float64) - 0.5)
    problems = RaceProblems(
        draft_mass=p[None],
        target=torch.zeros(1, size, dtype=torch.float64),
        background=torch.tensor([background], dtype=torch.float64),
        num_draws=torch.tensor([float(n)], dtype=torch.float64),
    )
    law = race_terms(problems, alpha[None], step=0.3).law[0]
    exact = enumerated_race_law(p, background, alpha, n)
    assert float((law - exact).abs().max()) <= 1e-13
    assert float(law.sum()) == pytest.approx(1 - background**n, abs=1e-13)
    # The chunked law-only evaluation (here one slot per chunk) gives the same law; so does the expansion in α.
    chunked = race_law(problems, alpha[None], step=0.3, chunk=1)[0]
    assert float((chunked - exact).abs().max()) <= 1e-13
    expanded = expanded_race_law(problems, alpha[None], *quadrature_nodes(problems, alpha[None], 0.3))[0]
    assert float((expanded - exact).abs().max()) <= 1e-13


@pytest.mark.parametrize(("n", "span", "background"), WIDE_RACES)
def test_expanded_race_law_matches_the_direct_law_on_wide_tiers(
    monkeypatch: pytest.MonkeyPatch, n: int, span: float, background: float
) -> None:
    """Tiers of ≥ EXPANSION_MIN_WIDTH slots take the bucketed Taylor expansion: same law to 1e-13 per slot."""
    problems, alpha = wide_race_problems(n, span, background)
    expanded = race_law(problems, alpha, step=0.3)
    monkeypatch.setattr(_race, "EXPANSION_MIN_WIDTH", 10**9)
    direct = race_law(problems, alpha, step=0.3)
    assert float(((expanded - direct).abs() / direct.clamp_min(1e-300)).max()) <= 1e-12
    assert float((expanded - direct).abs().sum(-1).max()) <= 1e-13


def test_expanded_race_law_keeps_the_rule_exact_and_optimal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every race evaluation through the expansion (solver steps included): law q (1e-10), acceptance α*."""
    monkeypatch.setattr(_race, "EXPANSION_MIN_WIDTH", 1)
    for vocab, n, seed in ((30, 2, 5), (11, 3, 6), (9, 4, 7)):
        q, p = random_case(vocab, seed, zero_fraction=0.2)
        marginal, acceptance, _ = enumerate_law(Optimal(), q, p, n)
        assert float((marginal - q).abs().max()) <= EXACT
        assert float(acceptance) == pytest.approx(optimum(q, p, n), abs=CLOSED_FORM_MATCH)


def test_coarse_quadrature_phase_stays_exact_and_optimal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiers iterated first on the coarse quadrature (here from 4 tokens on): law q (1e-10), acceptance α*."""
    monkeypatch.setattr(_race, "COARSE_MIN_WIDTH", 4)
    for vocab, n, seed in ((30, 2, 5), (11, 3, 6)):
        q, p = random_case(vocab, seed, zero_fraction=0.2)
        marginal, acceptance, _ = enumerate_law(Optimal(), q, p, n)
        assert float((marginal - q).abs().max()) <= EXACT
        assert float(acceptance) == pytest.approx(optimum(q, p, n), abs=CLOSED_FORM_MATCH)


def test_tiers_solved_on_bins_stay_exact_and_near_optimal() -> None:
    """Tiers wider than 2 · bins take binned weights: law still q (1e-10), acceptance ≤ α* and close."""
    q, p = random_case(30, 11, zero_fraction=0.0)
    n = 2
    best = optimum(q, p, n)
    marginal, acceptance, _ = enumerate_law(Optimal(bins=6), q, p, n)  # crude: 6 bins for 30 tokens
    assert float((marginal - q).abs().max()) <= EXACT
    assert best - 1e-2 <= float(acceptance) <= best + EXACT
    # Wider: V = 3000 on 256 bins misses α* by a second-order amount only (~1e-5; 64 bins: ~2e-4).
    g = torch.Generator().manual_seed(4)
    base = 2 * torch.randn(3, 3000, generator=g, dtype=torch.float64)
    q = torch.softmax(base + 0.7 * torch.randn(base.shape, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(base + 0.7 * torch.randn(base.shape, generator=g, dtype=torch.float64), -1)
    accepted, best = Optimal(bins=256).acceptance(q, p, 4)
    assert bool((accepted <= best + 1e-12).all())
    assert float((best - accepted).max()) <= 5e-5


def test_grouped_tiers_stay_exact_and_within_their_loss_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every wide tier solved on groups of slots sharing a weight: law q (1e-10), acceptance ≥ α* − merge loss."""
    monkeypatch.setattr(_race, "MERGE_LOSS", math.inf)
    bounds: list[torch.Tensor] = []
    grouping = _race.slot_groups

    def recorded(problems: RaceProblems, bins: int) -> tuple[torch.Tensor, RaceProblems, torch.Tensor]:
        group, reduced, loss = grouping(problems, bins)
        bounds.append(loss)
        return group, reduced, loss

    monkeypatch.setattr(_race, "slot_groups", recorded)
    for vocab, n, seed in ((30, 2, 5), (11, 3, 6), (9, 4, 7)):
        q, p = random_case(vocab, seed, zero_fraction=0.2)
        bounds.clear()
        marginal, acceptance, _ = enumerate_law(Optimal(bins=1), q, p, n)  # 1 token apart, 1 group
        assert bounds, "no tier was solved on groups"
        assert float((marginal - q).abs().max()) <= EXACT
        best = optimum(q, p, n)
        # Each tier's bound is in its own units (the H tier's scaled up by 1 / p(H*)^n): their sum bounds the gap.
        assert best - float(sum(b.max() for b in bounds)) - 1e-9 <= float(acceptance) <= best + EXACT


def test_log_ratio_bins_are_monotone_and_about_uniform_in_log() -> None:
    g = torch.Generator().manual_seed(4)
    p = torch.rand(2, 5000, generator=g, dtype=torch.float64)
    c = p * torch.exp(8 * torch.randn(2, 5000, generator=g, dtype=torch.float64))
    binned = torch.rand(2, 5000, generator=g) < 0.9
    problems = RaceProblems(
        draft_mass=p,
        target=c,
        background=torch.zeros(2, dtype=torch.float64),
        num_draws=torch.full((2,), 4.0, dtype=torch.float64),
    )
    bins = 64
    which = _race.log_ratio_bins(problems, binned, bins)
    assert bool((which[~binned] == bins).all())
    for row in range(2):
        log_ratio = torch.log(c[row] / p[row])[binned[row]]
        chosen = which[row][binned[row]]
        assert int(chosen.min()) == 0 and int(chosen.max()) == bins - 1
        order = log_ratio.argsort()
        assert bool((chosen[order].diff() >= 0).all())  # monotone in c/p
        # Bins no more than ~1.5× as wide in log(c/p) as uniform ones.
        span = float(log_ratio.max() - log_ratio.min())
        for b in range(bins):
            inside = log_ratio[chosen == b]
            if inside.numel() > 1:
                assert float(inside.max() - inside.min()) <= 1.5 * span / bins


def test_grouped_race_law_is_the_race_law_at_its_weights() -> None:
    """The law assembled from the groups equals the direct quadrature at the group-constant weights (1e-13)."""
    g = torch.Generator().manual_seed(12)
    width = 3000
    base = 3 * torch.randn(2, width, generator=g, dtype=torch.float64)
    p = torch.softmax(base, -1)
    c = torch.softmax(base + 0.5 * torch.randn(2, width, generator=g, dtype=torch.float64), -1)
    p[:, ::11] = 0  # padding slots
    c = torch.where(p > 0, c, 0)
    p, c = 0.9 * p / p.sum(-1, keepdim=True), 0.6 * c / c.sum(-1, keepdim=True)
    problems = RaceProblems(
        draft_mass=p,
        target=c,
        background=torch.full((2,), 0.1, dtype=torch.float64),
        num_draws=torch.tensor([3.0, 4.0], dtype=torch.float64),
    )
    group, reduced, loss = _race.slot_groups(problems, 64)
    assert reduced.draft_mass.shape == (2, 2 * 64 + 1)
    assert torch.allclose(reduced.draft_mass.sum(-1), p.sum(-1), atol=1e-15)
    alpha, law = _race.grouped_race(reduced, group, p, tol=1e-10, step=0.3, max_iters=50)
    direct = race_law(problems, alpha, step=0.3)
    assert float((law - direct).abs().max()) <= 1e-13
    # The 64 heaviest target slots have their own weights, so they lose nothing: the bound is over the rest.
    kept = torch.minimum(c, law)
    lost = (c - kept).sum(-1)
    assert bool((lost <= loss + 1e-9).all())


def test_wide_tiers_fall_back_to_per_slot_weights_where_they_keep_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped weights made poor on purpose (all equal): the per-slot binned weights win; law q, acceptance near α*."""
    monkeypatch.setattr(_race, "MERGE_LOSS", -1.0)  # every grouping counts as loose

    def equal_weights(
        reduced: RaceProblems, group: torch.Tensor, draft_mass: torch.Tensor, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = torch.zeros_like(draft_mass)
        whole = RaceProblems(draft_mass, draft_mass, reduced.background, reduced.num_draws)
        return alpha, race_law(whole, alpha, 0.3)

    monkeypatch.setattr(_race, "grouped_race", equal_weights)
    q, p = random_case(30, 11, zero_fraction=0.0)
    marginal, acceptance, _ = enumerate_law(Optimal(bins=6), q, p, 2)
    assert float((marginal - q).abs().max()) <= EXACT
    best = optimum(q, p, 2)
    assert best - 1e-2 <= float(acceptance) <= best + EXACT
    monkeypatch.setattr(_race, "MERGE_LOSS", math.inf)  # now the equal weights stand
    _, equal_acceptance, _ = enumerate_law(Optimal(bins=6), q, p, 2)
    assert float(equal_acceptance) < float(acceptance) - 1e-3


def test_peaked_wide_rows_lose_almost_nothing() -> None:
    """LLM-like rows (mass on a few hundred of 32k tokens): gap to α* ≤ MERGE_LOSS (per-slot binning alone: ~1e-2)."""
    g = torch.Generator().manual_seed(1)
    base = 6 * torch.randn(2, 32000, generator=g, dtype=torch.float64)
    q = torch.softmax(base + 0.5 * torch.randn(base.shape, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(base + 0.5 * torch.randn(base.shape, generator=g, dtype=torch.float64), -1)
    accepted, best = Optimal().acceptance(q, p, 4)
    assert bool((accepted <= best + 1e-12).all())
    assert float((best - accepted).max()) <= _race.MERGE_LOSS


def water_fill(q: torch.Tensor, p: torch.Tensor, tier: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``a = min(q, λ p)`` on ``tier`` (0 off it), with λ from :func:`water_level` on the tier sorted by q/p."""
    ratio, order = torch.where(tier, q / torch.where(tier, p, 1), math.inf).sort(-1)
    masses = torch.where(tier, q, 0).gather(1, order), torch.where(tier, p, 0).gather(1, order)
    level = water_level(ratio, *masses, total)
    return torch.where(tier, torch.minimum(q, level[:, None] * p), 0)


def test_water_fill_caps_at_q_and_meets_the_total() -> None:
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.4, 0.1, 0.1, 0.2, 0.2]], dtype=torch.float64)
    tier = torch.tensor([[False, True, True, True, False]])
    for total in (0.05, 0.3, 0.85, 0.9):
        a = water_fill(q, p, tier, torch.tensor([total], dtype=torch.float64))
        assert float(a.sum()) == pytest.approx(min(total, 0.9), abs=1e-15)
        assert bool((a <= q + 1e-15).all()) and bool((a[~tier] == 0).all())
        # Below the cap, a is proportional to p (one common level λ).
        uncapped = tier & (a < q)
        if bool(uncapped.any()):
            levels = a[uncapped] / p[uncapped]
            assert float(levels.max() - levels.min()) <= 1e-15
        # Rows in ρ order with other slots before the tier (as rates.optimal_prefix puts H* before L): same level.
        order = torch.tensor([[4, 0, 1, 3, 2]])  # ρ: 0, 0.25 (off the tier), 2, 2, 3
        in_tier = tier.gather(1, order)
        level = water_level(
            (q / p).gather(1, order),
            torch.where(in_tier, q.gather(1, order), 0),
            torch.where(in_tier, p.gather(1, order), 0),
            torch.tensor([total], dtype=torch.float64),
        )
        assert torch.equal(torch.where(tier, torch.minimum(q, level[:, None] * p), 0), a)


def test_floor_level_meets_the_total_and_floors_the_law() -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(200):
        size = int(torch.randint(1, 9, (1,), generator=g))
        q = torch.rand(1, size, generator=g, dtype=torch.float64) ** 3
        p = torch.rand(1, size, generator=g, dtype=torch.float64) + 1e-3
        tier = torch.rand(1, size, generator=g) < 0.7
        ratio, order = torch.where(tier, q / p, math.inf).sort(-1)
        masses = torch.where(tier, q, 0).gather(1, order), torch.where(tier, p, 0).gather(1, order)
        low, width = float(masses[0].sum()), float(masses[1].sum())
        total = torch.tensor([low + float(torch.rand(1, generator=g)) * width], dtype=torch.float64)
        level = float(floor_level(ratio, *masses, total))
        law = torch.where(tier, torch.maximum(q, level * p), 0)
        assert float(law.sum()) == pytest.approx(float(total), abs=1e-13)
        # Bisection on the non-decreasing Σ max(q, θ p) finds the same level (up to a flat stretch at q).
        lo, hi = 0.0, 1e6
        for _ in range(200):
            mid = (lo + hi) / 2
            below = float(torch.where(tier, torch.maximum(q, mid * p), 0).sum()) < float(total)
            lo, hi = (mid, hi) if below else (lo, mid)
        bisected = torch.where(tier, torch.maximum(q, hi * p), 0)
        assert float((law - bisected).abs().max()) <= 1e-9


@pytest.mark.parametrize("n", [2, 4, 8])
def test_h_tier_solution_solves_the_box_problem(n: int) -> None:
    """The equality solve for ``b^H = max(c^H, θ p)`` meets the box problem's KKT conditions (docs/design.md §4.4).

    With the lowest weight at ``α = 0``: ``α ≥ 0``, ``b ≥ c`` everywhere and ``b = c`` wherever ``α > 0``.
    """
    g = torch.Generator().manual_seed(n)
    logits = 3 * torch.randn(24, 40, generator=g, dtype=torch.float64)
    q = torch.softmax(logits + torch.randn(logits.shape, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(logits, -1)
    rule = Optimal()
    tiers = rule._tier_problems(q, p, torch.full((24,), n))
    race = tiers.h_race
    alpha, law = rule._solve_tiers(race)
    tier = race.tier
    assert int(tier.any(-1).sum()) >= 12  # rows whose H* is empty or negligible have no H race
    low, _ = _race.masked_range(alpha, tier)
    alpha = torch.where(tier, alpha - low, 0)
    c = tiers.h_target
    assert bool((law >= c - 1e-9).all())
    raised = tier & (alpha > 1e-6)
    assert float((law - c)[raised].abs().max()) <= 1e-9
    # Some slots sit at the bound with slack (b > c): the box is active, not an equality problem in disguise.
    assert bool((tier & (law > c + 1e-6)).any())


def test_float32_inputs_give_a_float32_law_close_to_q() -> None:
    rule = verifiers.get("optimal")
    q, p = random_case(5, 31)
    tuples, weights = draft_tuples(p, 3)
    law = rule.conditional(q.float().expand(len(tuples), -1), p.float().expand(len(tuples), -1), tuples)
    assert law.dtype == torch.float32
    assert float(((weights[:, None] * law.double()).sum(0) - q).abs().max()) <= 1e-6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, p, x: (q.clone().fill_(math.nan), p, x), "NaN or infinite"),
        (lambda q, p, x: (q, p.clone().index_fill_(1, torch.tensor([0]), math.inf), x), "NaN or infinite"),
        (lambda q, p, x: (q * 1.5, p, x), "sum to 1"),
        (lambda q, p, x: (q, p[:, :-1] / p[:, :-1].sum(-1, keepdim=True), x), "differ in shape"),
        (lambda q, p, x: (q - 0.5, p, x), "NaN or infinite|negative"),
        (lambda q, p, x: (q, p, x + 100), "draft_tokens must lie"),
    ],
)
def test_bad_input_raises_value_error(change, message: str) -> None:
    q, p = random_case(6, 40, zero_fraction=0.0)
    x = torch.tensor([[0, 1, 2]])
    bad = change(q[None], p[None], x)
    with pytest.raises(ValueError, match=message):
        verifiers.get("optimal").verify(*bad)


@pytest.mark.parametrize("options", [{"tol": 0.0}, {"max_iters": -1}, {"step": 0.0}, {"step": 2.0}])
def test_bad_options_raise_value_error(options: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        verifiers.get("optimal", **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    rule = verifiers.get("optimal")
    q, p = random_case(50, 60, zero_fraction=0.2)
    x = torch.multinomial(p.expand(8, -1), 4, replacement=True, generator=torch.Generator().manual_seed(0))
    cpu = rule.conditional(q.expand(8, -1), p.expand(8, -1), x)
    cuda = rule.conditional(q.cuda().expand(8, -1), p.cuda().expand(8, -1), x.cuda())
    assert float((cuda.cpu() - cpu).abs().max()) <= 1e-12


def test_race_plan_solves_the_other_tier_only_on_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tier the race runs in is solved first; the other one only when the residual is needed."""
    solved: list[int] = []
    original = Optimal._solve_tiers

    def counted(self: Optimal, problems: RaceProblems) -> tuple[torch.Tensor, torch.Tensor]:
        solved.append(problems.draft_mass.shape[0])
        return original(self, problems)

    monkeypatch.setattr(Optimal, "_solve_tiers", counted)
    rule = Optimal()
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, 40, generator=g, dtype=torch.float64), -1)
    # q = p: every draft is accepted (α* = 1), so only the race's own tier is solved.
    result = rule.verify(p, p, torch.tensor([[3, 3, 7]]), generator=g)
    assert bool(result.accepted[0]) and solved == [1]
    # A draft the target never emits is always rejected: the residual needs the other tier too.
    solved.clear()
    q = p.clone()
    q[0, 3] = 0
    result = rule.verify(q / q.sum(), p, torch.tensor([[3, 3, 3]]), generator=g)
    assert not bool(result.accepted[0]) and int(result.token[0]) != 3 and solved == [1, 1]
    # The deferred residual is the one of the full solve.
    plan = rule.plan(q / q.sum(), p, torch.tensor([[3, 5, 9]]))
    rule_all = rule.solve(q / q.sum(), p, 3)
    left = (q / q.sum() - rule_all.mass * rule_all.q_total).clamp_min(0)
    assert torch.allclose(plan.residual, left / left.sum(), atol=1e-15)


def test_emission_plan_takes_the_residual_or_its_recovery() -> None:
    emit = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="either the residual or a function"):
        verifiers.EmissionPlan(emit)
    with pytest.raises(ValueError, match="either the residual or a function"):
        verifiers.EmissionPlan(emit, torch.ones(1, 3) / 3, recover=lambda: torch.ones(1, 3) / 3)
    calls = []
    plan = verifiers.EmissionPlan(emit, recover=lambda: calls.append(1) or torch.ones(1, 3) / 3)
    assert calls == [] and torch.equal(plan.residual, plan.residual) and calls == [1]
