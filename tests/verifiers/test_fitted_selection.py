"""The fitted selection rule's building blocks (verifiers/_selection.py): draft sets, memory bounds, solver paths."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hf_globalres import _sync, verifiers
from hf_globalres.verifiers import _selection
from hf_globalres.verifiers._selection import draft_sets, tuple_count

from ..syncs import accelerator_path, count_syncs
from ..tensor_sizes import largest_tensor
from . import fitted_cases as cases

CPU = torch.device("cpu")


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_draft_sets_are_torch_combinations(scheme: str) -> None:
    """Same rows in the same (lexicographic) order, including no slots and more drafts than slots."""
    for support in range(9):
        for drafts in range(1, 7):
            expected = torch.combinations(torch.arange(support), r=drafts, with_replacement=scheme == "iid")
            sets = draft_sets(support, drafts, scheme, CPU)
            assert torch.equal(sets, expected.reshape(-1, drafts)), (support, drafts)
            assert sets.shape[0] == tuple_count(support, drafts, scheme) // (
                1 if scheme == "iid" else math.factorial(drafts)
            )


@pytest.mark.parametrize(("scheme", "support", "drafts"), [("iid", 12, 7), ("without_replacement", 24, 6)])
def test_draft_sets_build_nothing_of_size_support_to_the_drafts(scheme: str, support: int, drafts: int) -> None:
    """D^k = 3.6e7 (1.9e8) grid cells for M = 31824 (134596) sets: every tensor stays within 2 · M · k int64."""
    with largest_tensor() as largest:
        sets = draft_sets(support, drafts, scheme, CPU)
    count, width = sets.shape
    assert support**drafts > 100 * count * width
    assert largest.bytes <= 2 * count * width * 8, largest.bytes
    assert largest.from_host <= 1  # nothing to copy from the host


def test_draft_sets_reject_negative_sizes() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        _selection.draft_sets(-1, 2, "iid", CPU)


def objective(seed: int, batch: int = 6, support: int = 7, drafts: int = 3, scheme: str = "iid"):
    """A fitted objective on random rows: (evaluate, target, lower, upper) as ``_fit_rows`` builds them."""
    g = torch.Generator().manual_seed(seed)
    p_slots = torch.rand(batch, support, generator=g, dtype=torch.float64) ** 2
    p_slots = p_slots / p_slots.sum(-1, keepdim=True)
    q_slots = torch.rand(batch, support, generator=g, dtype=torch.float64) ** 3
    q_slots = 0.95 * q_slots / q_slots.sum(-1, keepdim=True)
    outer = torch.rand(batch, support, generator=g) < 0.4
    sets = draft_sets(support, drafts, scheme, CPU)
    evaluate = _selection.SetObjective.build(sets, _selection.set_probs(p_slots, sets, scheme), outer, q_slots)
    lower = torch.full_like(q_slots, -_selection.ALPHA_BOUND)
    upper = torch.where(outer, 0.0, _selection.ALPHA_BOUND).double()
    return evaluate, q_slots, lower, upper


def plain_lbfgs(evaluate, target, lower, upper, *, tol: float, max_iters: int, memory: int = 10):
    """The solver's loop as it reads on a CPU: a convergence read and a full backtracking search every iteration."""
    value, emitted = evaluate(torch.zeros_like(target).clamp(lower, upper))
    point = _selection.LbfgsPoint(torch.zeros_like(target).clamp(lower, upper), value, emitted, emitted - target)
    history = _selection.LbfgsMemory.empty(target, memory)

    def projected(point):
        pinned = ((point.alpha <= lower) & (point.grad > 0)) | ((point.alpha >= upper) & (point.grad < 0))
        return torch.where(pinned, 0, point.grad)

    done = projected(point).abs().sum(-1) <= tol
    iterations = 0
    for _ in range(max_iters):
        if bool(done.all()):
            break
        iterations += 1
        direction = history.direction(projected(point), point.grad)
        box = _selection._BoxObjective(evaluate, target, lower, upper)
        point, stalled = _selection._armijo_search(box, point, direction, ~done, history)
        done = done | stalled | (projected(point).abs().sum(-1) <= tol)
    return point.alpha, point.emitted, projected(point).abs().sum(-1) <= tol, iterations


@pytest.mark.parametrize(("scheme", "max_iters"), [("iid", 500), ("iid", 7), ("without_replacement", 500)])
def test_cpu_solver_iterates_are_the_plain_loop(scheme: str, max_iters: int) -> None:
    """Bit for bit, at convergence and stopped early: the accelerator path's changes leave the CPU's iterates alone."""
    for seed in range(3):
        problem = objective(seed, scheme=scheme)
        got = _selection.projected_lbfgs(*problem, tol=1e-10, max_iters=max_iters)
        expected = plain_lbfgs(*problem, tol=1e-10, max_iters=max_iters)
        assert got[3] == expected[3] and got[3] > 3
        for a, b in zip(got[:3], expected[:3], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_objective_chunks_change_no_bit(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """F, b, the set probabilities and a verifier's law are the same with every set in one chunk or in many."""
    evaluate, target, _, _ = objective(4, support=8, scheme=scheme)
    assert len(evaluate.chunks) == 1
    alpha = torch.randn(target.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    count = evaluate.sets.shape[0]
    pairs = dataclasses.replace(evaluate, chunks=[slice(start, start + 2) for start in range(0, count, 2)])
    for whole, chunked in zip(evaluate(alpha), pairs(alpha), strict=True):
        assert torch.equal(whole, chunked)
    p_slots = target / target.sum(-1, keepdim=True)
    probs = _selection.set_probs(p_slots, evaluate.sets, scheme)
    name = "khisti" if scheme == "iid" else "optimal_without_replacement"
    q, p, drafts = verifier_rows(scheme)
    law = verifiers.get(name, tau=1e-8).conditional(q, p, drafts)
    monkeypatch.setattr(_selection, "SET_CHUNK_CPU", 1)  # one set per chunk
    assert torch.equal(_selection.set_probs(p_slots, evaluate.sets, scheme), probs)
    assert torch.equal(verifiers.get(name, tau=1e-8).conditional(q, p, drafts), law)


def verifier_rows(scheme: str, batch: int = 4, vocab: int = 30, top: int = 9, drafts: int = 3):
    """(q, p, drafts): p near q, cut to its ``top`` most probable tokens; drafts drawn under ``scheme``."""
    g = torch.Generator().manual_seed(8)
    logits = 2 * torch.randn(batch, vocab, generator=g, dtype=torch.float64)
    q = torch.softmax(logits, -1)
    p = torch.softmax(logits + torch.randn(batch, vocab, generator=g, dtype=torch.float64), -1)
    p = torch.where(p >= p.topk(top, -1).values[:, -1:], p, 0)
    p = p / p.sum(-1, keepdim=True)
    return q, p, torch.multinomial(p, drafts, replacement=scheme == "iid", generator=g)


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_objective_holds_no_float64_tensor_of_every_set_and_draft(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With chunks of 2^10 elements, set probabilities, F and b never hold a [B, M, k] float64 tensor.

    What stays whole: the set probabilities and log Z [B, M] float64, the softmax entries [B, M, k] bool
    (at k = 4 both are a quarter of a [B, M, k] float64 tensor).
    """
    monkeypatch.setattr(_selection, "SET_CHUNK_CPU", 1 << 10)
    batch, support, drafts = 8, 14, 4
    with largest_tensor() as largest:
        evaluate, target, _, _ = objective(6, batch=batch, support=support, drafts=drafts, scheme=scheme)
        evaluate(torch.zeros_like(target))
    count = evaluate.sets.shape[0]
    assert batch * count * drafts > 16 * (1 << 10)
    assert largest.bytes <= 2 * batch * count * drafts, (largest.bytes, 8 * batch * count * drafts)
    assert largest.from_host <= 1  # the drawing orders are built on the device


FITTED = ("khisti", "global_resolution", "optimal_without_replacement")


@pytest.mark.parametrize("name", FITTED)
def test_accelerator_path_is_exact_and_optimal(name: str) -> None:
    """Every draft tuple enumerated on the accelerator path: law q (1e-10), acceptance the LP optimum (1e-7)."""
    with accelerator_path():
        gaps = [cases.check_exact_and_optimal(name, q, p, n, tau=1e-10) for q, p, n in cases.small_cases(41, 8)]
        for _label, q, p in cases.degenerate_cases():
            gaps.append(cases.check_exact_and_optimal(name, q, p, 3, tau=1e-10))
    assert max(gaps) <= cases.LP_TOL


@pytest.mark.parametrize("name", FITTED)
def test_accelerator_path_reads_convergence_every_few_iterations(name: str) -> None:
    """Default options on top-9 draft rows (V = 5000): the fixed reads, then one per ``CHECK_EVERY`` solver iterations.

    Fixed: check_inputs and the rejected rows (2); which draft counts occur and their rows (2); the width of
    supp p, the rows to fit, their statistics and the failed rows (4); |T| (1); for drafts without replacement,
    H*'s quadrature reads the most drafts and its node span (2). No row fails here.
    """
    rule = verifiers.get(name)
    scheme = rule.draft_scheme
    q, p, drafts = verifier_rows(scheme, batch=8, vocab=5000)
    with accelerator_path(), count_syncs() as syncs:
        rule.verify(q, p, drafts, torch.Generator().manual_seed(0))
    stats = rule.last_stats
    fixed = 9 + (2 if scheme == "without_replacement" else 0)
    assert stats.failures == 0 and stats.iterations >= _sync.CHECK_EVERY
    assert syncs.total <= fixed + stats.iterations // _sync.CHECK_EVERY, (syncs.counts, stats.iterations)
