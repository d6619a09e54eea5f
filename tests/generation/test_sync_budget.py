"""Host reads per block of the decoding loop, outside the verifier, on the accelerator path.

On an accelerator every read of a tensor value on the host stalls the device
(``hf_globalres/_sync.py``). The loop takes the forms an accelerator needs
wherever ``_sync.reads_are_cheap`` says no; :func:`tests.syncs.accelerator_path`
makes it say no on CPU tensors, and :class:`tests.syncs.SyncCounter` counts the
reads as they run. The verifier's own reads are counted in
``tests/verifiers`` and left out here.

:data:`BUDGET` lists every read a block may still make and why it stays: each
is a value the host needs for the shape of the next step, or for how many rows
take part in a draw (changing that would change the tokens of a seed). None
grows with the batch; with one branch and L = 4 a block reads at most 5 times.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from hf_globalres import draft_vocab, verifiers
from hf_globalres.generation import loop, timing
from hf_globalres.generation.processors import ROW_WISE, SpeculativeLogitsProcessor, call_as_batch

from ..syncs import SyncCounter, accelerator_path
from .conftest import EOS, PAD, tiny_llama

#: The reads a block may make outside the verifier, each with why it stays.
BUDGET: dict[str, str] = {
    "walk": (
        "one per depth of the walk after the first (at most L, the last for the bonus token): which rows walk on "
        "and which of them have drafts there. The verifier and the bonus draw take exactly those rows, and how many "
        "rows a draw takes decides which random numbers each gets."
    ),
    "block": (
        "one per block, after the stopping criteria: emitted counts, finished rows and the positions each cache "
        "keeps. The next block's rows, its draft depth and the caches' widths are shapes; whether any row is left "
        "ends the loop."
    ),
    "tree width": (
        "one per block with tree attention, unless a single branch drafts every depth: the distinct nodes of the "
        "widest tree, the width of the target forward (padding it would change the forward's rounding)."
    ),
    "draft nodes": (
        "one per draft depth after the first, when more than one node may draft there (n > 1 in the tree shape, "
        "or a confidence threshold): the width of that depth's draft forward, and whether any branch drafts on."
    ),
}


def budget(depth: int, n: int, shape: str, tree_attention: bool, threshold: float | None) -> dict[str, int]:
    """The most reads of each :data:`BUDGET` kind one block may make, for L = ``depth``."""
    several_nodes = threshold is not None or (n > 1 and shape == "tree")
    return {
        "walk": depth,
        "block": 1,
        "tree width": int(tree_attention and (n > 1 or threshold is not None)),
        "draft nodes": depth - 1 if several_nodes else 0,
    }


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


PROMPTS = [[1, 5, 7, 3], [1, 9], [1, 4, 4, 12, 6], [1, 11, 3]]
DEPTH = 3
MAX_LENGTH = 18


def processors(kind: str) -> LogitsProcessorList:
    if kind == "row-wise":
        return LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(10)])
    # Both read input_ids: the repetition penalty the tokens, the other the length.
    return LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.3), MinNewTokensLengthLogitsProcessor(5, 3, EOS), TopPLogitsWarper(0.9)]
    )


@dataclass
class BlockReads:
    """Host reads per block outside the verifier, and outside any block."""

    per_block: list[int] = field(default_factory=list)
    outside_blocks: int = 0
    kinds: set[str] = field(default_factory=set)


@contextlib.contextmanager
def counting(monkeypatch: pytest.MonkeyPatch, verifier: verifiers.Verifier) -> Iterator[BlockReads]:
    """Count host reads on the accelerator path, per call of ``loop._block``, without the verifier's."""
    reads = BlockReads()
    counter = SyncCounter()
    in_verifier: collections.Counter[str] = collections.Counter()
    verify, run_block = verifier.verify, loop._block

    def counted_verify(*args, **kwargs):
        before = collections.Counter(counter.counts)
        try:
            return verify(*args, **kwargs)
        finally:
            in_verifier.update(counter.counts - before)

    def outside() -> int:
        return counter.total - in_verifier.total()

    def counted_block(*args, **kwargs):
        before = outside()
        run_block(*args, **kwargs)
        reads.per_block.append(outside() - before)

    monkeypatch.setattr(verifier, "verify", counted_verify)
    monkeypatch.setattr(loop, "_block", counted_block)
    with accelerator_path(), counter:
        yield reads
    reads.outside_blocks = outside() - sum(reads.per_block)
    reads.kinds = set(counter.counts - in_verifier)


def decode(target, draft, verifier, batch: int, n: int, shape: str, kind: str, tree_attention=True, threshold=None):
    """A seeded decode of the first ``batch`` prompts."""
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS[:batch]])
    mask = (ids != PAD).long()
    return loop.multi_draft_decode(
        target,
        draft,
        ids,
        mask,
        logits_processor=processors(kind),
        stopping_criteria=StoppingCriteriaList(
            [MaxLengthCriteria(MAX_LENGTH), EosTokenCriteria(EOS), StopAfterToken(13)]
        ),
        do_sample=True,
        max_length=MAX_LENGTH,
        pad_token_id=PAD,
        num_drafts=n,
        num_assistant_tokens=DEPTH,
        verifier=verifier,
        tree_attention=tree_attention,
        draft_shape=shape,
        confidence_threshold=threshold,
        generator=torch.Generator().manual_seed(0),
    )


CASES = [
    (batch, n, shape, kind, True, None)
    for batch in (1, 4)
    for n, shape in ((1, "tree"), (4, "tree"), (4, "spine"))
    for kind in ("row-wise", "sequence")
] + [
    (4, 4, "tree", "sequence", False, None),
    (4, 4, "spine", "row-wise", True, 0.2),
    (1, 1, "tree", "row-wise", True, 0.2),
]


@pytest.mark.parametrize(("batch", "n", "shape", "kind", "tree_attention", "threshold"), CASES)
def test_block_reads_stay_within_the_budget(
    target, draft, monkeypatch, batch, n, shape, kind, tree_attention, threshold
):
    """Each block reads at most the budget, which does not grow with B, and the tokens are those of the CPU path."""
    options = {"tree_attention": tree_attention, "threshold": threshold}
    verifier = verifiers.get("optimal")
    with torch.no_grad():
        plain = decode(target, draft, verifier, batch, n, shape, kind, **options)
        with counting(monkeypatch, verifier) as reads:
            counted = decode(target, draft, verifier, batch, n, shape, kind, **options)
    assert torch.equal(counted.sequences, plain.sequences)
    assert counted.accepted_lengths == plain.accepted_lengths
    limit = sum(budget(DEPTH, n, shape, tree_attention, threshold).values())
    assert len(reads.per_block) == max(len(row) for row in plain.accepted_lengths) >= 2
    assert max(reads.per_block) <= limit, reads.per_block
    assert reads.outside_blocks == 0
    assert reads.kinds <= {"tolist", "item"}  # no nonzero, boolean indexing or unique in the loop


def test_the_budget_meets_five_reads_with_one_branch():
    """One branch, L = 4: the walk's four reads and the block's one (the issue's target of five)."""
    assert sum(budget(4, 1, "tree", True, None).values()) == 5
    assert set(budget(4, 4, "tree", True, 0.1)) == set(BUDGET)


def test_reads_follow_the_depths_walked(target, draft, monkeypatch):
    """One branch, one row: a block that emits c tokens reads min(c, L) times in the walk, then once.

    The walk reads before each depth after the first; a row rejected at depth c ≤ L is learnt to have
    stopped at the read before depth c + 1, and a row that accepts all L drafts ends at the bonus token.
    """
    verifier = verifiers.get("optimal")
    with torch.no_grad(), counting(monkeypatch, verifier) as reads:
        result = decode(target, draft, verifier, 1, 1, "tree", "row-wise")
    emitted = result.accepted_lengths[0]
    assert len(set(emitted[:-1])) > 1  # blocks of different lengths
    for count, tokens in zip(reads.per_block[:-1], emitted[:-1], strict=True):  # the last may stop early
        assert count == min(tokens, DEPTH) + 1


def test_grouping_with_host_lengths_reads_nothing():
    """Processors and criteria grouped by length from the host's copy of the lengths read nothing back."""
    from hf_globalres.generation.processors import HostRows

    generator = torch.Generator().manual_seed(0)
    contexts = torch.randint(0, 16, (4, 10), generator=generator)
    lengths = torch.tensor([5, 7, 5, 9])
    rows = torch.tensor([0, 2, 0, 1])
    logits = torch.randn(4, 16, generator=generator)
    component = SpeculativeLogitsProcessor(LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8)]))
    expected = component.ragged_scores(contexts, lengths, logits, rows, contexts[:3])
    with accelerator_path(), SyncCounter() as counter:
        scores = component.ragged_scores(
            contexts, lengths, logits, rows, contexts[:3], host=HostRows([5, 7, 5, 9], [0, 2, 0, 1])
        )
        calls = list(
            call_as_batch(
                lambda ids, values: values, contexts, lengths, logits, rows, contexts[:3], HostRows.read(lengths, rows)
            )
        )
    assert torch.equal(scores, expected)
    assert len(calls) == 4  # length 5 twice (two entries in row 0), then 7 and 9
    assert counter.counts == {"tolist": 1}  # HostRows.read, once


def test_row_wise_processors_run_once_over_every_length(generator, monkeypatch):
    """Warpers that reshape each row alone give, in one call, the rows of the per-length calls."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(5), TopPLogitsWarper(0.8)])
    component = SpeculativeLogitsProcessor(warpers)
    assert component.row_wise and not SpeculativeLogitsProcessor(processors("sequence")).row_wise
    assert TemperatureLogitsWarper in ROW_WISE and RepetitionPenaltyLogitsProcessor not in ROW_WISE
    contexts = torch.randint(0, 16, (5, 12), generator=generator)
    lengths = torch.tensor([3, 8, 5, 8, 11])
    logits = torch.randn(5, 16, generator=generator)
    rows_per_call = []
    temperature = TemperatureLogitsWarper.__call__

    def recorded(self, input_ids, scores):
        rows_per_call.append(scores.shape[0])
        return temperature(self, input_ids, scores)

    monkeypatch.setattr(TemperatureLogitsWarper, "__call__", recorded)
    scores = component.ragged_scores(contexts, lengths, logits)
    probs = component.probabilities(scores)
    assert rows_per_call == [5]  # one call over all five entries
    for i in range(5):
        alone = warpers(contexts[i : i + 1, : lengths[i]], logits[i : i + 1])
        assert torch.equal(scores[i], alone[0])
    assert torch.equal(probs, torch.softmax(scores, -1, dtype=torch.float64))


class _FakeEvent:
    """Stands in for ``torch.cuda.Event``: times are the order of recording, in milliseconds."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.time: float | None = None

    def record(self, stream=None) -> None:
        _FakeEvent.clock += 1.0
        self.time = _FakeEvent.clock

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _FakeEvent) -> float:
        return end.time - self.time


def test_cuda_phases_are_timed_by_events_and_synchronise_once(monkeypatch):
    """On CUDA no phase synchronises; the summary does, once, and reads the events' times."""
    synchronised = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronised.append(device))
    timer = timing.PhaseTimer(torch.device("cuda", 0))
    for _ in range(timing.FOLD_EVERY + 3):
        with timer.phase("verifier"):
            pass
        with timer.phase("draft_forward"):
            _FakeEvent.clock += 2.0  # kernels between the events
    assert synchronised == []
    summary = timer.summary()
    assert synchronised == [torch.device("cuda", 0)]
    assert summary["verifier"] == pytest.approx((timing.FOLD_EVERY + 3) * 1e-3)
    assert summary["draft_forward"] == pytest.approx((timing.FOLD_EVERY + 3) * 3e-3)
    assert summary["target_forward"] == 0.0


def test_a_restricted_draft_reads_nothing_more(target, monkeypatch):
    """A draft over part of the vocabulary scores each call's prompt tokens too: set up with no host read."""
    restricted = tiny_llama(1, layers=1)
    draft_vocab.restrict_vocabulary(restricted, [5, 9, 3, 12], size=4)
    verifier = verifiers.get("optimal")
    with torch.no_grad():
        plain = decode(target, restricted, verifier, 4, 4, "tree", "row-wise")
        with counting(monkeypatch, verifier) as reads:
            counted = decode(target, restricted, verifier, 4, 4, "tree", "row-wise")
    assert torch.equal(counted.sequences, plain.sequences)
    assert max(reads.per_block) <= sum(budget(DEPTH, 4, "tree", True, None).values())
    assert reads.outside_blocks == 0 and reads.kinds <= {"tolist", "item"}
