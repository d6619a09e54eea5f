"""Host reads per ``verify`` on the accelerator code path, counted on CPU tensors.

On an accelerator every host read of a tensor value (``.item()``, ``bool(t)``,
``.tolist()``, ``nonzero``, …) stalls the device (``hf_globalres._sync``). The
verifiers take the accelerator path here on CPU tensors (:func:`accelerator_path`)
and :class:`~tests.syncs.SyncCounter` counts the reads. ``optimal`` reads a fixed
number of values per call at a fixed iteration count, whatever the vocabulary,
batch or data; the accelerator path itself is checked for exactness here too,
since the other tests run the CPU path.
"""

from __future__ import annotations

import pytest
import torch

from hf_globalres import _sync, rates, verifiers
from hf_globalres.reference import enumerate_law
from hf_globalres.verifiers.base import SparseRows, check_inputs
from hf_globalres.verifiers.optimal import Optimal

from ..syncs import accelerator_path, count_syncs
from .cases import make_case

VOCABS = (50, 5000)
BATCHES = (1, 8)
#: Options that fix the iteration counts where a rule has them. ``tol=1e-300``: optimal's Newton
#: loops never stop early. ``bins=64``: at V = 5000 optimal takes its wide path (more than
#: 2 · bins slots), at V = 50 Newton at the slot width.
OPTIONS = {
    "optimal": {"max_iters": 3, "tol": 1e-300, "bins": 64},
    "optimal_block": {"max_iters": 3, "tol": 1e-300, "bins": 64},
    "khisti": {"max_iters": 3},
    "global_resolution": {"max_iters": 3},
}
#: Most host reads of one ``verify`` on the accelerator path, with ``OPTIONS``, at every V in
#: ``VOCABS`` and B in ``BATCHES`` (n = 4 drafts, 1 for ``single``). Every rule pays two:
#: ``check_inputs`` reads all its failure flags at once, and ``verify`` finds the rows that
#: rejected every draft (``nonzero``), which alone draw from the residual.
BUDGET = {
    # + 1: _tier_problems reads the width of supp p and whether every row has full support (one
    # read). Nothing else: the quadrature takes its node count from the α-span bound, the line
    # search tries TRIAL_STEPS sizes at once, tier problems are merged and solved masked, and
    # convergence is read every _sync.CHECK_EVERY Newton iterations, so never at max_iters = 3.
    # The other tier's solve on rejection reads nothing either.
    "optimal": 3,
    # As optimal: the multiplicity classes are the draft columns (a shape), and rows whose drafts all
    # agree are found only where reads are cheap.
    "optimal_block": 3,
    "single": 2,
    "rrs": 2,
    "rrs_without_replacement": 2,
    # + 2: spectr_rho reads its convergence every CHECK_EVERY iterations; it converges within 8.
    "spectr": 4,
    # The fitted selection rule (verifiers/_selection.py), 2 + 5: fitted_plan reads which draft
    # counts occur (one tolist) and the rows of each (nonzero); _plan_fixed_drafts the width of
    # supp p, the rows to fit and the rows that fall back (here all: their T has too many sets).
    "optimal_without_replacement": 7,
    # 2 + fitted_plan 2 + _plan_fixed_drafts 4 (as above, and the fitted rows' statistics in one
    # read) + _fit_rows 1 (the largest |T|). Nothing else: draft_sets unranks its sets, and the
    # L-BFGS takes one step size per iteration with no read and reads its convergence every
    # _sync.CHECK_EVERY iterations, so never at max_iters = 3.
    "khisti": 9,
    # As khisti, and its rows stop unconverged at max_iters = 3 and fall back to SpecTr at V = 50:
    # spectr_rho's 2 reads twice (the fallback's acceptance and its plan), 9 + 4. At V = 5000 every
    # row falls back on |T| (no fit): 11.
    "global_resolution": 13,
}


#: The rules fitted per row (verifiers/_selection.py), whose reads follow the rows they fit.
FITTED = {"khisti", "global_resolution", "optimal_without_replacement"}


def rows(name: str, vocab: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, p, drafts) [B, V], [B, n]: softmax rows and drafts drawn under the rule's scheme."""
    g = torch.Generator().manual_seed(seed + vocab + batch)
    q = torch.softmax(torch.randn(batch, vocab, generator=g, dtype=torch.float64) * 2, -1)
    p = torch.softmax(torch.randn(batch, vocab, generator=g, dtype=torch.float64) * 2, -1)
    rule = verifiers.get(name)
    n = min(4, rule.max_drafts or 4)
    drafts = torch.multinomial(p, n, replacement=rule.draft_scheme == "iid", generator=g)
    return q, p, drafts


def reads(rule: verifiers.Verifier, q: torch.Tensor, p: torch.Tensor, drafts: torch.Tensor) -> int:
    g = torch.Generator().manual_seed(3)
    with accelerator_path(), count_syncs() as syncs:
        rule.verify(q, p, drafts, g)
    return syncs.total


def test_every_rule_has_a_budget() -> None:
    assert set(BUDGET) == set(verifiers.available())


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_verify_reads_within_budget(name: str) -> None:
    rule = verifiers.get(name, **OPTIONS.get(name, {}))
    counts = {(vocab, batch): reads(rule, *rows(name, vocab, batch)) for vocab in VOCABS for batch in BATCHES}
    assert max(counts.values()) <= BUDGET[name], counts


def test_tilted_optimal_block_reads_as_few_as_untilted() -> None:
    """``tilt`` > 1 on top-64 rows (the tilted solve runs masked over every row, at the fixed iteration
    count its convergence is never read): optimal_block's budget, and the law is still q."""
    rule = verifiers.get("optimal_block", tilt=30.0, **OPTIONS["optimal_block"])
    for batch in BATCHES:
        q, p, _ = rows("optimal_block", 50, batch)
        p = torch.where(p >= p.topk(20, -1).values[:, -1:], p, 0)
        p = p / p.sum(-1, keepdim=True)
        drafts = torch.multinomial(p, 4, replacement=True, generator=torch.Generator().manual_seed(1))
        assert reads(rule, q, p, drafts) <= BUDGET["optimal_block"]
    q, p = make_case("random", 4, 5)
    with accelerator_path():
        marginal, _, _ = enumerate_law(verifiers.get("optimal_block", tilt=30.0), q, p, 3)
    assert torch.allclose(marginal, q, rtol=0, atol=1e-10)


def test_optimal_reads_depend_on_neither_vocabulary_nor_batch_nor_rejection() -> None:
    """At a fixed iteration count: the same reads at V = 50 (Newton) and 5000 (wide path), B = 1 and 8,
    and when every row rejects its drafts (q = 0 on them), so that the other tier is solved too."""
    rule = verifiers.get("optimal", **OPTIONS["optimal"])
    counts = {}
    for vocab in VOCABS:
        for batch in BATCHES:
            q, p, drafts = rows("optimal", vocab, batch)
            counts[vocab, batch] = reads(rule, q, p, drafts)
            q = q.scatter(1, drafts, 0)
            q = q / q.sum(-1, keepdim=True)
            counts[vocab, batch, "rejected"] = reads(rule, q, p, drafts)
    assert set(counts.values()) == {BUDGET["optimal"]}, counts


def test_optimal_reads_at_the_default_options_stay_few() -> None:
    """Default options (Newton to 1e-10) on top-64 draft rows, as generation hands them over: the three
    fixed reads and the convergence reads of the Newton loops, every ``CHECK_EVERY`` iterations until they
    converge (4 to 7 here; flat rows with the full vocabulary as support take the wide path's several
    loops, about 20 at V = 5000)."""
    rule = verifiers.get("optimal")
    for vocab in VOCABS:
        for batch in BATCHES:
            q, p, _ = rows("optimal", vocab, batch)
            p = torch.where(p >= p.topk(min(64, vocab), -1).values[:, -1:], p, 0)
            p = p / p.sum(-1, keepdim=True)
            drafts = torch.multinomial(p, 4, replacement=True, generator=torch.Generator().manual_seed(1))
            assert reads(rule, q, p, drafts) <= 10


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_sparse_draft_rows_verify_on_their_support_within_budget(name: str) -> None:
    """Top-64 p handed as SparseRows on the accelerator path: the rule works on the support columns with
    no read to find them (a dense p would need one), the law is the dense p's, the reads within budget
    (the fitted rules' reads depend on which rows they fit, which the narrow support changes: counted
    here for exactness only)."""
    rule = verifiers.get(name, **OPTIONS.get(name, {}))
    q, p, _ = rows(name, 5000, 8)
    top = p.topk(64, -1).indices
    held = SparseRows(top, p.gather(1, top) / p.gather(1, top).sum(-1, keepdim=True), 5000)
    drafts = torch.multinomial(held.dense(), min(4, rule.max_drafts or 4), replacement=rule.draft_scheme == "iid",
                               generator=torch.Generator().manual_seed(2))  # fmt: skip
    count = reads(rule, q, held, drafts)
    # + 1: the rows whose output lands in the column of the rest of q draw their token off the support
    # (SupportRows.expand_tokens finds them, as verify finds the rows that drew from the residual).
    assert count <= BUDGET[name] + 1 or name in FITTED
    with accelerator_path():
        sparse_law = rule.conditional(q, held, drafts)
    assert torch.allclose(sparse_law, rule.conditional(q, held.dense(), drafts), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("kind", "vocab", "n", "options"),
    [
        ("random", 6, 3, {}),
        ("sparse", 8, 2, {}),
        ("q_zero_where_p", 6, 3, {}),
        ("random", 12, 2, {"bins": 2}),  # wide path: 12 slots > 2 · bins
    ],
)
def test_accelerator_path_is_exact_and_optimal(kind: str, vocab: int, n: int, options: dict) -> None:
    """Every draft tuple enumerated on the accelerator path: law q (1e-10), acceptance α* (1e-9; wide: 1e-3)."""
    q, p = make_case(kind, vocab, 4)
    with accelerator_path():
        marginal, acceptance, _ = enumerate_law(Optimal(**options), q, p, n)
    best = float(rates.optimal_acceptance(q[None], p[None], n)[0])
    assert float((marginal - q).abs().max()) <= 1e-10
    assert float(acceptance) <= best + 1e-10
    assert float(acceptance) >= best - (1e-3 if options else 1e-9)


def test_accelerator_path_gives_the_cpu_path_law() -> None:
    """Rows with 0, 1 and 3 drafts in one batch (the accelerator path races them all): same law (1e-9)."""
    q, p = make_case("sparse", 10, 2)
    support = p.nonzero()[:, 0]
    drafts = torch.stack([support[[0, 1, 2]], support[[1, -1, -1]], support[[2, 2, 0]], support[[0, 0, 0]]])
    drafts[1, 1:] = -1  # one draft
    drafts[3] = -1  # none
    rule = verifiers.get("optimal")
    batch = drafts.shape[0]
    on_cpu = rule.conditional(q.expand(batch, -1), p.expand(batch, -1), drafts)
    with accelerator_path():
        on_accelerator = rule.conditional(q.expand(batch, -1), p.expand(batch, -1), drafts)
    assert torch.allclose(on_accelerator, on_cpu, rtol=0, atol=1e-9)


def test_spectr_rho_is_the_same_on_both_paths() -> None:
    """Rows that converged keep their ρ: checking convergence less often changes nothing."""
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(16, 300, generator=g, dtype=torch.float64) * 3, -1)
    p = torch.softmax(torch.randn(16, 300, generator=g, dtype=torch.float64) * 3, -1)
    n = torch.arange(16) % 6
    with accelerator_path():
        on_accelerator = rates.spectr_rho(q, p, n)
    assert torch.equal(on_accelerator, rates.spectr_rho(q, p, n))


def test_check_inputs_reads_once_and_names_the_first_problem() -> None:
    q, p, drafts = rows("rrs_without_replacement", 50, 4)
    with count_syncs() as syncs:
        check_inputs(q, p, drafts, distinct=True)
    assert syncs.total == 1
    bad = q.clone()
    bad[2, 3] = float("nan")
    drafts[1, 0] = 50
    with pytest.raises(ValueError, match="target_probs contains NaN"):
        check_inputs(bad, p, drafts)
    with pytest.raises(ValueError, match=r"must lie in \[0, 50\)"):
        check_inputs(q, p, drafts)


def test_accelerator_path_is_taken_only_off_the_cpu() -> None:
    cpu = torch.zeros(1)
    assert _sync.reads_are_cheap(cpu)
    with accelerator_path():
        assert not _sync.reads_are_cheap(cpu)
    assert _sync.reads_are_cheap(cpu)
    assert [_sync.check_now(cpu, i) for i in range(3)] == [True] * 3
