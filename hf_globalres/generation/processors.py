"""Logits → sampling distribution: the one step that turns target logits into q and draft logits into p.

Speculative sampling is lossless only if the verifier sees exactly the
distribution each model's token would have been sampled from. Every logits
processor and warper (temperature, top-k, top-p, min-p, repetition penalty,
a user ``LogitsProcessorList``) is therefore applied exactly once per branch
prefix, to target and draft logits alike, by :class:`SpeculativeLogitsProcessor`.
It is a ``LogitsProcessor`` itself (``__call__(input_ids, scores)`` returns the
processed scores) and can be used on its own:

    >>> proc = SpeculativeLogitsProcessor(LogitsProcessorList([TemperatureLogitsWarper(0.7)]))
    >>> scores, probs = proc.distribution(input_ids, logits)   # probs = softmax(processed)  # doctest: +SKIP

Greedy decoding (``do_sample=False``) makes the distribution the one-hot row
at ``argmax`` of the processed scores, which makes every lossless verifier
reproduce greedy decoding token for token.

Rows of different lengths (tree nodes at different depths, batch rows that
accepted different numbers of tokens) are processed in groups of equal length
(:meth:`SpeculativeLogitsProcessor.ragged_scores`): length-dependent
processors (``min_new_tokens``, exponential decay, ngram bans) then see exactly
the ``input_ids`` that plain ``generate`` would have shown them. Processors
that only reshape each row of scores (temperature, top-k, top-p, min-p, ...:
:data:`ROW_WISE`) run once over every entry instead, whatever its length.

The loop knows every entry's length and batch row on the host
(:class:`HostRows`), so grouping reads nothing back from the device; without
them, one read per call recovers them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.generation import logits_process
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from ..verifiers.base import SparseRows
from .tree import true_rows

#: Processors and warpers whose output row ``i`` is a function of score row ``i`` alone: they read
#: neither ``input_ids`` nor the batch size, so one call over entries of any lengths equals the
#: per-length calls row for row. Exact types only (a subclass may read ``input_ids``).
ROW_WISE: frozenset[type] = frozenset(
    getattr(logits_process, name)
    for name in (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "TopHLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "InfNanRemoveLogitsProcessor",
        "LogitNormalization",
        "SuppressTokensLogitsProcessor",
    )
    if hasattr(logits_process, name)
)


def length_groups(lengths: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(length, rows)`` for each distinct value of ``lengths`` [N]; rows is a LongTensor [N_g]."""
    for length in torch.unique(lengths).tolist():
        yield int(length), (lengths == length).nonzero()[:, 0]


@dataclass(frozen=True)
class HostRows:
    """Host copies of the entries' prefix lengths and batch rows, so that grouping reads nothing back.

    Attributes:
        lengths: prefix length of each entry; rows: batch row of each entry.
    """

    lengths: list[int]
    rows: list[int]

    @classmethod
    def read(cls, lengths: torch.Tensor, batch_rows: torch.Tensor) -> HostRows:
        """The host copies of ``lengths`` and ``batch_rows`` [N], in one read."""
        both = torch.stack([lengths.to(batch_rows.dtype), batch_rows]).tolist() if lengths.numel() else [[], []]
        return cls(both[0], both[1])

    def select(self, entries: Sequence[int]) -> HostRows:
        """The entries ``entries`` (host positions, repeats allowed)."""
        return HostRows([self.lengths[i] for i in entries], [self.rows[i] for i in entries])

    def ahead(self, count: int) -> HostRows:
        """Every prefix ``count`` tokens longer."""
        return HostRows([length + count for length in self.lengths], self.rows) if count else self

    def groups(self) -> list[tuple[int, int, int]]:
        """``(length, slot, size)`` of each call of :func:`call_as_batch`, in call order.

        An entry's slot counts the earlier entries of its batch row; a call takes the entries
        of one length and one slot, so no batch row holds two entries in one call.
        """
        seen: Counter[int] = Counter()
        sizes: Counter[tuple[int, int]] = Counter()
        for length, row in zip(self.lengths, self.rows, strict=True):
            sizes[length, seen[row]] += 1
            seen[row] += 1
        return [(length, slot, size) for (length, slot), size in sorted(sizes.items())]


def entry_slots(batch_rows: torch.Tensor) -> torch.Tensor:
    """[N]: how many earlier entries share each entry's batch row (see :meth:`HostRows.groups`)."""
    order = torch.sort(batch_rows, stable=True)
    first = torch.searchsorted(order.values, order.values, side="left")
    slot = torch.empty_like(batch_rows)
    slot[order.indices] = torch.arange(batch_rows.shape[0], device=batch_rows.device) - first
    return slot


def call_as_batch(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    contexts: torch.Tensor,
    lengths: torch.Tensor,
    values: torch.Tensor,
    batch_rows: torch.Tensor,
    batch_tokens: torch.Tensor,
    host: HostRows | None = None,
    include: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Call ``fn(input_ids, values)`` the way plain ``generate`` does: on the whole batch, one length at a time.

    Processors and stopping criteria may hold per-row state sized to the
    batch (e.g. the prompt padding lengths of the repetition penalty), so each
    call gets all B rows in their original order: the entries being evaluated
    in their batch row, every other row its committed tokens from ``batch_tokens``
    (and zero ``values``).

    Args:
        contexts: [N, T] entry ``i``'s prefix is ``contexts[i, :lengths[i]]``.
        lengths: [N]; values: [N, ...] second argument per entry (scores).
        batch_rows: [N] batch row of each entry (several entries may share a row:
            they go to separate calls).
        batch_tokens: [B, T'] committed tokens of every batch row, T' ≥ max(lengths).
        host: host copies of ``lengths`` and ``batch_rows`` (None: read once).
        include: [N] bool; an entry marked False is shown as its batch row's committed tokens
            and zero values instead (its output is then meaningless).

    Yields:
        (entries [N_g], fn's output rows for those entries).
    """
    host = host if host is not None else HostRows.read(lengths, batch_rows)
    slot = entry_slots(batch_rows)
    for length, group_slot, size in host.groups():
        entries = true_rows((lengths == length) & (slot == group_slot), size)
        rows = batch_rows[entries]
        own = contexts[entries, :length]
        own_values = values[entries]
        input_ids = batch_tokens[:, :length].clone()
        if include is not None:
            shown = include[entries]
            own = torch.where(shown[:, None], own, input_ids[rows])
            own_values = torch.where(shown.view(-1, *[1] * (values.dim() - 1)), own_values, 0)
        input_ids[rows] = own
        full = values.new_zeros((batch_tokens.shape[0], *values.shape[1:]))
        full[rows] = own_values
        yield entries, fn(input_ids, full)[rows]


@dataclass
class BatchView:
    """Entries of a batch being decoded, as processors and stopping criteria must see them.

    Several entries may stand for one batch row (tree nodes of one sequence);
    see :func:`call_as_batch` for why each call sees the whole batch.

    Attributes:
        contexts: [N, T] entry ``i``'s committed tokens, left-aligned with its batch row's.
        lengths: [N] committed length of each entry.
        batch_rows: [N] batch row of each entry.
        batch_tokens: [B, T'] committed tokens of every batch row, T' ≥ max(lengths).
        host: host copies of ``lengths`` and ``batch_rows`` (None: read when first needed).
    """

    contexts: torch.Tensor
    lengths: torch.Tensor
    batch_rows: torch.Tensor
    batch_tokens: torch.Tensor
    host: HostRows | None = None

    def select(
        self, entries: torch.Tensor, contexts: torch.Tensor | None = None, host_entries: Sequence[int] | None = None
    ) -> BatchView:
        """The entries ``entries`` [N'] of this view (repeats allowed), with ``contexts`` [N', T] in place of theirs.

        ``host_entries`` names the same entries on the host; without it the view has no host copies.
        """
        own = self.contexts[entries] if contexts is None else contexts
        host = self.host.select(host_entries) if self.host is not None and host_entries is not None else None
        return BatchView(own, self.lengths[entries], self.batch_rows[entries], self.batch_tokens, host)

    def call(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        values: torch.Tensor,
        ahead: int = 0,
        include: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`call_as_batch` on the prefixes ``contexts[i, :lengths[i] + ahead]``."""
        lengths = self.lengths + ahead if ahead else self.lengths
        host = self.host.ahead(ahead) if self.host is not None else None
        return call_as_batch(fn, self.contexts, lengths, values, self.batch_rows, self.batch_tokens, host, include)


#: Width of the chunks :func:`top_k_indices` first reduces a wide row to.
TOP_K_CHUNK = 64


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k]: the columns of each row's ``k`` largest ``scores`` [N, V] (ties: any of them).

    A wide row is searched in two stages: the maximum of each chunk of
    :data:`TOP_K_CHUNK` columns, then the columns of the ``k`` chunks with the
    largest maxima. Every one of the row's ``k`` largest entries lies in those
    chunks (a chunk holding one has a maximum at least the k-th largest), so the
    second stage's ``k`` largest are the row's. At V = 152k, k = 64 this reads
    4,096 candidates after one pass, ~5× faster than one ``topk`` over V.
    """
    rows, vocab = scores.shape
    if vocab < 8 * k * TOP_K_CHUNK:
        return scores.topk(k, dim=-1).indices
    padding = -vocab % TOP_K_CHUNK  # 0 for Qwen2's 151,936 = 64 · 2,374
    padded = torch.nn.functional.pad(scores, (0, padding), value=float("-inf")) if padding else scores.contiguous()
    chunks = padded.view(rows, -1, TOP_K_CHUNK).amax(-1).topk(k, dim=-1).indices  # [N, k]
    offsets = torch.arange(TOP_K_CHUNK, device=scores.device)
    candidates = (chunks[..., None] * TOP_K_CHUNK + offsets).view(rows, -1)  # [N, k · chunk]
    return candidates.gather(1, padded.gather(1, candidates).topk(k, dim=-1).indices)


@dataclass(frozen=True)
class DraftLaw:
    """The law a draft token is sampled from, over [..., V]: dense, or on k tokens per row when truncated.

    Attributes:
        dense: [..., V] float64 probabilities (None when truncated).
        sparse: the law on k distinct tokens per row holding every nonzero entry, float64 (None: not truncated).
    """

    dense: torch.Tensor | None = None
    sparse: SparseRows | None = None

    @property
    def probs(self) -> torch.Tensor:
        """[..., V] float64 (a truncated law is spread over the vocabulary, the same values)."""
        return self.dense if self.dense is not None else self.sparse.dense()

    @property
    def entries(self) -> torch.Tensor:
        """[..., K]: the entries the law holds, V (dense) or k (truncated) per row."""
        return self.dense if self.dense is not None else self.sparse.values

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DraftLaw:
        """The law with ``fn`` applied to each tensor (an index or an expansion of its leading dimensions)."""
        return DraftLaw(dense=fn(self.dense)) if self.dense is not None else DraftLaw(sparse=self.sparse.map(fn))

    def at(self, tokens: torch.Tensor) -> torch.Tensor:
        """[...]: the law of each row at ``tokens`` [...] (one token per row)."""
        if self.dense is not None:
            return self.dense.gather(-1, tokens[..., None])[..., 0]
        return self.sparse.at(tokens[..., None])[..., 0]

    def rows(self) -> torch.Tensor | SparseRows:
        """A 2-D law [B, V] as a verifier takes it: the dense rows, or :class:`SparseRows`."""
        return self.dense if self.dense is not None else self.sparse


def truncated_softmax(scores: torch.Tensor, top_k: int) -> DraftLaw:
    """``softmax`` over each row's ``top_k`` largest ``scores`` [N, V], 0 elsewhere, held on those tokens.

    This equals ``softmax(scores)`` truncated to those entries and renormalised,
    computed from ``top_k`` exponentials per row instead of V. A verifier is exact
    for any draft law it is told, so drafting from this law and handing the same
    law to the verifier keeps the output's law the target's; the draft's support
    shrinks from V to ``top_k`` tokens, and with it the verifier's work.
    """
    support = top_k_indices(scores, top_k)
    weights = torch.softmax(scores.gather(-1, support), dim=-1, dtype=torch.float64)
    return DraftLaw(sparse=SparseRows(support, weights, scores.shape[-1]))


class SpeculativeLogitsProcessor(LogitsProcessor):
    """Turns one model's raw logits into its sampling distribution, once per prefix.

    Args:
        logits_processor: the processors and warpers to apply (``None``: none).
        do_sample: ``False`` makes the distribution one-hot at the argmax.
        vocab_size: common width V of q and p. Narrower logits are padded with
            ``-inf`` (probability 0), so a draft with a smaller (or a target
            with a padded) embedding matrix works on the shared token ids and
            the target's law is unchanged.
        dtype: floating dtype of the processed scores (probabilities are float64).
    """

    def __init__(
        self,
        logits_processor: LogitsProcessorList | None = None,
        *,
        do_sample: bool = True,
        vocab_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.do_sample = do_sample
        self.vocab_size = vocab_size
        self.dtype = dtype

    def _widen(self, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.to(self.dtype)
        if self.vocab_size is None or scores.shape[-1] == self.vocab_size:
            return scores
        if scores.shape[-1] > self.vocab_size:
            raise ValueError(
                f"logits have width {scores.shape[-1]} but the shared vocabulary has {self.vocab_size} entries"
            )
        pad = scores.new_full((*scores.shape[:-1], self.vocab_size - scores.shape[-1]), float("-inf"))
        return torch.cat([scores, pad], dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Processed scores [N, V] for ``input_ids`` [N, T] (one prefix per row) and raw ``scores`` [N, V']."""
        return self.logits_processor(input_ids, self._widen(scores))

    def probabilities(self, scores: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        """[N, V] float64: ``softmax(scores)``, or one-hot at ``argmax(scores)`` when not sampling.

        With ``top_k`` the law is truncated to each row's ``top_k`` largest
        scores and renormalised, ``softmax`` over those scores alone (the
        draft side only: see :meth:`draft_law`).

        float64 keeps every row's sum within 1e-12 of 1 at V = 152k; float32 rows
        of real models were seen 1e-4 off, which the verifiers' input checks refuse.
        """
        return self.draft_law(scores, top_k).probs

    def draft_law(self, scores: torch.Tensor, top_k: int | None = None) -> DraftLaw:
        """:meth:`probabilities` of ``scores`` [N, V], with its support when it has at most ``top_k`` tokens.

        A greedy law is one-hot: its support is the argmax. A sampled law with
        ``top_k`` < V is :func:`truncated_softmax`.
        """
        if not self.do_sample:
            support = scores.argmax(-1, keepdim=True)
            weights = torch.ones(support.shape, dtype=torch.float64, device=scores.device)
            return DraftLaw(sparse=SparseRows(support, weights, scores.shape[-1]))
        if top_k is not None and top_k < scores.shape[-1]:
            return truncated_softmax(scores, top_k)
        return DraftLaw(dense=torch.softmax(scores, dim=-1, dtype=torch.float64))

    def distribution(self, input_ids: torch.LongTensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Processed scores and probabilities, both [N, V], for rows sharing one length T."""
        scores = self(input_ids, logits)
        return scores, self.probabilities(scores)

    @property
    def row_wise(self) -> bool:
        """Every processor is in :data:`ROW_WISE`: one call serves prefixes of any lengths."""
        return all(type(processor) in ROW_WISE for processor in self.logits_processor)

    def ragged_scores(
        self,
        contexts: torch.LongTensor,
        lengths: torch.Tensor,
        logits: torch.Tensor,
        batch_rows: torch.Tensor | None = None,
        batch_tokens: torch.LongTensor | None = None,
        *,
        host: HostRows | None = None,
    ) -> torch.Tensor:
        """[N, V]: the processed scores of prefixes of different lengths.

        Args:
            contexts: [N, T_max], entry ``i``'s prefix is ``contexts[i, :lengths[i]]``.
            lengths: [N] prefix lengths.
            logits: [N, V'] raw next-token logits after each prefix.
            batch_rows, batch_tokens: batch row of each entry [N] and the committed
                tokens of the whole batch [B, T]; with them every processor call
                sees the full batch in order (see :func:`call_as_batch`).
                Without them the entries are processed as a batch of their own.
            host: host copies of ``lengths`` and ``batch_rows`` (None: read once, when the processors need them).
        """
        if self.row_wise and logits.shape[0] > 0:
            # Row i of the output depends on logits row i alone: the same rows the per-length calls give.
            return self(contexts, logits)
        if batch_rows is None:
            batch_rows = torch.arange(contexts.shape[0], device=contexts.device)
            batch_tokens = contexts
        width = self.vocab_size or logits.shape[-1]
        scores = logits.new_empty((logits.shape[0], width), dtype=self.dtype)
        for entries, processed in call_as_batch(self, contexts, lengths, logits, batch_rows, batch_tokens, host):
            scores[entries] = processed
        return scores

    def view_scores(self, view: BatchView, logits: torch.Tensor, ahead: int = 0) -> torch.Tensor:
        """:meth:`ragged_scores` after the prefixes ``view.contexts[i, :view.lengths[i] + ahead]``."""
        lengths = view.lengths + ahead if ahead else view.lengths
        host = view.host.ahead(ahead) if view.host is not None else None
        return self.ragged_scores(view.contexts, lengths, logits, view.batch_rows, view.batch_tokens, host=host)

    def view_distribution(
        self, view: BatchView, logits: torch.Tensor, ahead: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and probabilities [N, V] after the prefixes ``view.contexts[i, :view.lengths[i] + ahead]``."""
        scores = self.view_scores(view, logits, ahead)
        return scores, self.probabilities(scores)


__all__ = [
    "ROW_WISE",
    "BatchView",
    "DraftLaw",
    "HostRows",
    "SpeculativeLogitsProcessor",
    "call_as_batch",
    "entry_slots",
    "length_groups",
    "top_k_indices",
    "truncated_softmax",
]
