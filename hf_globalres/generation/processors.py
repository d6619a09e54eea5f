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

from collections.abc import Iterator

import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList


def length_groups(lengths: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(length, rows)`` for each distinct value of ``lengths`` [N]; rows is a LongTensor [N_g]."""
    for length in torch.unique(lengths).tolist():
        yield int(length), (lengths == length).nonzero()[:, 0]


class SpeculativeLogitsProcessor(LogitsProcessor):
    """Turns one model's raw logits into its sampling distribution, once per prefix.

    Args:
        logits_processor: the processors and warpers to apply (``None``: none).
        do_sample: ``False`` makes the distribution one-hot at the argmax.
        vocab_size: common width V of q and p. Narrower logits are padded with
            ``-inf`` (probability 0), so a draft with a smaller (or a target
            with a padded) embedding matrix works on the shared token ids and
            the target's law is unchanged.
        dtype: floating dtype of the returned scores and probabilities.
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

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """[N, V]: ``softmax(scores)``, or one-hot at ``argmax(scores)`` when not sampling."""
        if self.do_sample:
            return torch.softmax(scores, dim=-1)
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)

    def distribution(self, input_ids: torch.LongTensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Processed scores and probabilities, both [N, V], for rows sharing one length T."""
        scores = self(input_ids, logits)
        return scores, self.probabilities(scores)

    def ragged_distribution(
        self, contexts: torch.LongTensor, lengths: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`distribution` for rows of different lengths.

        Args:
            contexts: [N, T_max], row ``i``'s prefix is ``contexts[i, :lengths[i]]``.
            lengths: [N] prefix lengths.
            logits: [N, V'] raw next-token logits after each prefix.

        Returns:
            scores, probs: [N, V] each.
        """
        width = self.vocab_size or logits.shape[-1]
        scores = logits.new_empty((logits.shape[0], width), dtype=self.dtype)
        for length, rows in length_groups(lengths):
            scores[rows] = self(contexts[rows, :length], logits[rows])
        return scores, self.probabilities(scores)


__all__ = ["SpeculativeLogitsProcessor", "length_groups"]
