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
(:meth:`SpeculativeLogitsProcessor.ragged_distribution`): length-dependent
processors (``min_new_tokens``, exponential decay, ngram bans) then see exactly
the ``input_ids`` that plain ``generate`` would have shown them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList


def length_groups(lengths: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(length, rows)`` for each distinct value of ``lengths`` [N]; rows is a LongTensor [N_g]."""
    for length in torch.unique(lengths).tolist():
        yield int(length), (lengths == length).nonzero()[:, 0]


def call_as_batch(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    contexts: torch.Tensor,
    lengths: torch.Tensor,
    values: torch.Tensor,
    batch_rows: torch.Tensor,
    batch_tokens: torch.Tensor,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Call ``fn(input_ids, values)`` the way plain ``generate`` does: on the whole batch, one length at a time.

    Processors and stopping criteria may hold per-row state sized to the
    batch (e.g. the prompt padding lengths of the repetition penalty), so each
    call gets all B rows in their original order: the entries being evaluated
    in their batch row, every other row its committed tokens from ``batch_tokens``.

    Args:
        contexts: [N, T] entry ``i``'s prefix is ``contexts[i, :lengths[i]]``.
        lengths: [N]; values: [N, ...] second argument per entry (scores).
        batch_rows: [N] batch row of each entry (several entries may share a row:
            they go to separate calls).
        batch_tokens: [B, T'] committed tokens of every batch row, T' ≥ max(lengths).

    Yields:
        (entries [N_g], fn's output rows for those entries).
    """
    count = batch_rows.shape[0]
    order = torch.sort(batch_rows, stable=True)
    first = torch.searchsorted(order.values, order.values, side="left")
    slot = torch.empty_like(batch_rows)
    slot[order.indices] = torch.arange(count, device=batch_rows.device) - first
    key = lengths * (count + 1) + slot
    for _, entries in length_groups(key):
        length = int(lengths[entries[0]])
        rows = batch_rows[entries]
        input_ids = batch_tokens[:, :length].clone()
        input_ids[rows] = contexts[entries, :length]
        full = values.new_zeros((batch_tokens.shape[0], *values.shape[1:]))
        full[rows] = values[entries]
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
    """

    contexts: torch.Tensor
    lengths: torch.Tensor
    batch_rows: torch.Tensor
    batch_tokens: torch.Tensor

    def select(self, entries: torch.Tensor, contexts: torch.Tensor | None = None) -> BatchView:
        """The entries ``entries`` [N'] of this view (repeats allowed), with ``contexts`` [N', T] in place of theirs."""
        own = self.contexts[entries] if contexts is None else contexts
        return BatchView(own, self.lengths[entries], self.batch_rows[entries], self.batch_tokens)

    def call(
        self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], values: torch.Tensor, ahead: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`call_as_batch` on the prefixes ``contexts[i, :lengths[i] + ahead]``."""
        lengths = self.lengths + ahead if ahead else self.lengths
        return call_as_batch(fn, self.contexts, lengths, values, self.batch_rows, self.batch_tokens)


def truncated_softmax(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, V] float64: ``softmax`` over each row's ``top_k`` largest ``scores`` [N, V], 0 elsewhere.

    This equals ``softmax(scores)`` truncated to those entries and renormalised,
    computed from ``top_k`` exponentials per row instead of V. A verifier is exact
    for any draft law it is told, so drafting from this law and handing the same
    law to the verifier keeps the output's law the target's; the draft's support
    shrinks from V to ``top_k`` tokens, and with it the verifier's work.
    """
    top = scores.topk(top_k, dim=-1)
    probs = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    return probs.scatter_(-1, top.indices, torch.softmax(top.values, dim=-1, dtype=torch.float64))


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
        draft side only: see :func:`truncated_softmax`).

        float64 keeps every row's sum within 1e-12 of 1 at V = 152k; float32 rows
        of real models were seen 1e-4 off, which the verifiers' input checks refuse.
        """
        if not self.do_sample:
            return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(torch.float64)
        if top_k is not None and top_k < scores.shape[-1]:
            return truncated_softmax(scores, top_k)
        return torch.softmax(scores, dim=-1, dtype=torch.float64)

    def distribution(self, input_ids: torch.LongTensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Processed scores and probabilities, both [N, V], for rows sharing one length T."""
        scores = self(input_ids, logits)
        return scores, self.probabilities(scores)

    def ragged_distribution(
        self,
        contexts: torch.LongTensor,
        lengths: torch.Tensor,
        logits: torch.Tensor,
        batch_rows: torch.Tensor | None = None,
        batch_tokens: torch.LongTensor | None = None,
        *,
        top_k: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`distribution` for prefixes of different lengths.

        Args:
            contexts: [N, T_max], entry ``i``'s prefix is ``contexts[i, :lengths[i]]``.
            lengths: [N] prefix lengths.
            logits: [N, V'] raw next-token logits after each prefix.
            batch_rows, batch_tokens: batch row of each entry [N] and the committed
                tokens of the whole batch [B, T]; with them every processor call
                sees the full batch in order (see :func:`call_as_batch`).
                Without them the entries are processed as a batch of their own.
            top_k: truncate the probabilities to each row's ``top_k`` largest scores (see :meth:`probabilities`).

        Returns:
            scores, probs: [N, V] each.
        """
        if batch_rows is None:
            batch_rows = torch.arange(contexts.shape[0], device=contexts.device)
            batch_tokens = contexts
        width = self.vocab_size or logits.shape[-1]
        scores = logits.new_empty((logits.shape[0], width), dtype=self.dtype)
        for entries, processed in call_as_batch(self, contexts, lengths, logits, batch_rows, batch_tokens):
            scores[entries] = processed
        return scores, self.probabilities(scores, top_k)

    def view_distribution(
        self, view: BatchView, logits: torch.Tensor, ahead: int = 0, *, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`ragged_distribution` after the prefixes ``view.contexts[i, :view.lengths[i] + ahead]``."""
        lengths = view.lengths + ahead if ahead else view.lengths
        return self.ragged_distribution(view.contexts, lengths, logits, view.batch_rows, view.batch_tokens, top_k=top_k)


__all__ = ["BatchView", "SpeculativeLogitsProcessor", "call_as_batch", "length_groups", "truncated_softmax"]
