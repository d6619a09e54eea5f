"""Memory of `optimal`'s full-width Newton path: its passes over slots hold one chunk, not [P, S, K].

``bins = 0`` runs Newton at the full width of a tier (docs/design.md §4.4); its [P, S, K] terms
(P problems, S slots, K quadrature nodes) are taken in slot blocks of at most a chunk of elements
(``_race.slot_blocks``). Here the chunks are made tiny: the results must not depend on them, and
no operation may return a tensor much larger than one chunk.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from hf_globalres.verifiers import _race
from hf_globalres.verifiers._race import RaceProblems, newton_direction, race_terms, slot_blocks
from hf_globalres.verifiers.optimal import Optimal

from ..syncs import accelerator_path
from ..tensor_sizes import largest_tensor

CHUNKS = ("LAW_CHUNK", "EXPANSION_CHUNK", "TERMS_CHUNK", "ACCELERATOR_CHUNK")


def use_chunk(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Every pass of the race, on either path, in blocks of at most ``chunk`` elements."""
    for name in CHUNKS:
        monkeypatch.setattr(_race, name, chunk)


def softmax_rows(batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, p, drafts) [B, V], [B, 4]: full-support rows and 4 i.i.d. drafts."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(batch, vocab, generator=g, dtype=torch.float64) * 2, -1)
    p = torch.softmax(torch.randn(batch, vocab, generator=g, dtype=torch.float64) * 2, -1)
    return q, p, torch.multinomial(p, 4, replacement=True, generator=g)


def race_problems(vocab: int, background: float) -> tuple[RaceProblems, torch.Tensor]:
    """Three problems (n = 2, 3, 4) with padding slots, and α uniform in [0, 3) on the tier.

    A generic α: far-off starts (α = log(c/p) on slots of tiny c) give nearly singular Hessians,
    whose Newton directions (~1e20) change in their leading digits with any rounding.
    """
    g = torch.Generator().manual_seed(vocab + int(10 * background))
    p = torch.rand(3, vocab, generator=g, dtype=torch.float64) ** 3
    p[:, ::7] = 0
    p = (1 - background) * p / p.sum(-1, keepdim=True)
    c = torch.rand(3, vocab, generator=g, dtype=torch.float64) ** 3 * (p > 0)
    c = 0.9 * c / c.sum(-1, keepdim=True)
    problems = RaceProblems(
        draft_mass=p,
        target=c,
        background=torch.full((3,), background, dtype=torch.float64),
        num_draws=torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64),
    )
    return problems, torch.where(p > 0, 3 * torch.rand(3, vocab, generator=g, dtype=torch.float64), 0)


@pytest.mark.parametrize("background", [0.0, 0.2])
@pytest.mark.parametrize(("vocab", "chunk"), [(50, 1), (3000, 1 << 14)])
def test_newton_terms_and_direction_do_not_depend_on_the_chunk(vocab: int, chunk: int, background: float) -> None:
    """Slot blocks only reorder sums over slots: law, ``b − e`` and the Newton direction agree to rounding.

    At V = 50 one block takes the dense |S| × |S| system and 50 blocks the Woodbury one.
    """
    problems, alpha = race_problems(vocab, background)
    whole, parts = race_terms(problems, alpha, 0.3), race_terms(problems, alpha, 0.3, chunk=chunk)
    assert len(whole.blocks) == 1 and whole.low_rank is not None
    assert len(parts.blocks) > 10 and parts.low_rank is None
    assert float((parts.law - whole.law).abs().max()) <= 1e-15
    assert float((parts.diagonal - whole.diagonal).abs().max()) <= 1e-15
    direction = newton_direction(problems, whole)
    chunked = newton_direction(problems, parts)
    scale = direction.abs().amax(-1)
    assert bool((scale > 0).all())
    assert float(((chunked - direction).abs().amax(-1) / scale).max()) <= 1e-12


@pytest.mark.parametrize(
    ("vocab", "chunk", "accelerator", "max_iters"),
    [(50, 1, False, 50), (3000, 1 << 14, False, 50), (50, 1, True, 8), (500, 1 << 14, True, 4)],
)
def test_optimal_gives_the_same_rule_in_tiny_chunks(
    monkeypatch: pytest.MonkeyPatch, vocab: int, chunk: int, accelerator: bool, max_iters: int
) -> None:
    """``bins = 0`` in one block per pass and in many: the same masses, laws and tokens.

    The masses ``ā``, the conditional law and the sampled tokens agree to 1e-12. The weights
    α agree to 1e-9 only: the solve fixes them to its tolerance (residual 1e-10), and a slot
    of tiny mass moves its α far for a change of its law in the last bits. The accelerator path
    (every row in every iteration, four trial sizes: slow on a CPU) takes a few iterations.
    """
    q, p, drafts = softmax_rows(3, vocab, seed=vocab)
    rule = Optimal(bins=0, max_iters=max_iters)

    def outputs() -> tuple[Any, torch.Tensor, torch.Tensor]:
        with accelerator_path() if accelerator else torch.no_grad():
            solved = rule.solve(q, p, 3)
            law = rule.conditional(q, p, drafts)
            tokens = rule.verify(q, p, drafts, torch.Generator().manual_seed(2)).token
        return solved, law, tokens

    whole = outputs()
    use_chunk(monkeypatch, chunk)
    parts = outputs()
    finite = torch.isfinite(whole[0].alpha)
    assert torch.equal(finite, torch.isfinite(parts[0].alpha))
    assert float((parts[0].alpha - whole[0].alpha)[finite].abs().max()) <= 1e-9
    assert float((parts[0].mass - whole[0].mass).abs().max()) <= 1e-12
    assert float((parts[0].residual - whole[0].residual).abs().max()) <= 1e-12
    assert float((parts[1] - whole[1]).abs().max()) <= 1e-12
    assert torch.equal(parts[2], whole[2])


def test_top_64_rows_of_a_batch_of_64_take_one_block() -> None:
    """The common small tiers keep one pass at any node count (no recomputation, same op count).

    ``acceptance`` solves both tiers of 64 rows at once (P = 128), at most 64 slots, and at the
    default step at most ``ceil(WINDOW_BOUND / 0.3) + 1`` nodes.
    """
    nodes = math.ceil(_race.WINDOW_BOUND / 0.3) + 1
    assert len(slot_blocks(torch.zeros(1), 64, 128 * nodes, _race.TERMS_CHUNK)) == 1
    assert slot_blocks(torch.zeros(1), 64, 128 * nodes, _race.TERMS_CHUNK)[0] == slice(0, 64)


@pytest.mark.parametrize(("vocab", "accelerator", "options"), [(20_000, False, {}), (3000, True, {"max_iters": 3})])
def test_full_width_newton_holds_no_tensor_beyond_a_chunk(
    monkeypatch: pytest.MonkeyPatch, vocab: int, accelerator: bool, options: dict
) -> None:
    """``Optimal(bins=0).verify`` on 2 full-support rows: no tensor past the bound, far below [P, S, K].

    The bound: one chunk (2^16 elements), or else a few values per row and token, or the
    Woodbury system. Besides the chunked passes, the largest tensors are the ``TRIAL_STEPS``
    trial rows per row of the accelerator path's line search ([T · B, V]), both tiers' rows with
    the extra column of q off ``supp p`` ([2B, V + 1]), and the [P, K + 1, K + 1] systems of
    :func:`newton_direction` (P ≤ 2B, ``K ≤ ceil(WINDOW_BOUND / step) + 1``). The [P, S, K]
    tensors of an unchunked pass (recorded from the quadrature's shapes) must exceed the bound
    several times over, so that the test fails without the blocks. The accelerator path runs 3
    iterations at V = 3000: each masked iteration has the same shapes, and it is slow on a CPU.
    """
    chunk, batch = 1 << 16, 2
    q, p, drafts = softmax_rows(batch, vocab, seed=7)
    use_chunk(monkeypatch, chunk)
    unchunked = []
    nodes_of = _race.quadrature_nodes

    def recorded(problems: RaceProblems, alpha: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
        t, quad = nodes_of(problems, alpha, step)
        unchunked.append(alpha.numel() * t.shape[1])  # P · S · K
        return t, quad

    monkeypatch.setattr(_race, "quadrature_nodes", recorded)
    most_nodes = math.ceil(_race.WINDOW_BOUND / 0.3) + 1
    bound = max(chunk, _race.TRIAL_STEPS * batch * vocab, 2 * batch * (vocab + 1), 2 * batch * (most_nodes + 1) ** 2)
    with accelerator_path() if accelerator else torch.no_grad(), largest_tensor() as memory:
        Optimal(bins=0, **options).verify(q, p, drafts, torch.Generator().manual_seed(1))
    assert memory.elements <= bound
    assert max(unchunked) > 5 * bound
