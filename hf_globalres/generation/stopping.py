"""Stopping criteria over a block's emitted tokens: every token at once where the criteria allow it.

Plain ``generate`` calls its stopping criteria after each token, on the whole
batch. The loop does the same, one call per emitted position of the block
(``loop._stop``), unless every criterion is one whose answer after token ``s``
is a function of that token and the prefix length alone (:data:`TOKEN_WISE`,
exact types): then :func:`first_stops` evaluates all of a block's positions in
a few tensor operations, with the answers the per-token calls would give.
"""

from __future__ import annotations

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

#: Criteria whose answer after a token depends only on that token (EOS) or on the prefix length (max length).
TOKEN_WISE: frozenset[type] = frozenset({EosTokenCriteria, MaxLengthCriteria})


def token_wise(criteria: StoppingCriteriaList) -> bool:
    """Every criterion is in :data:`TOKEN_WISE`: :func:`first_stops` gives the per-token calls' answers."""
    return all(type(criterion) in TOKEN_WISE for criterion in criteria)


def first_stops(
    criteria: StoppingCriteriaList, emitted: torch.Tensor, lengths: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """[R]: the first position s ≤ ``count`` after which a criterion stops the row (1-based), 0 for none.

    Args:
        criteria: :func:`token_wise` criteria.
        emitted: [R, S] the block's tokens; token s of row r is ``emitted[r, s − 1]``.
        lengths: [R] committed length of each row before the block.
        count: [R] tokens of each row to consider (≤ S).

    After token s the prefix is ``lengths + s`` long: ``MaxLengthCriteria`` stops
    it when that reaches its ``max_length``, ``EosTokenCriteria`` when token s is
    one of its ids (``StoppingCriteriaList`` ORs them).
    """
    position = torch.arange(1, emitted.shape[1] + 1, device=emitted.device)
    hit = torch.zeros(emitted.shape, dtype=torch.bool, device=emitted.device)
    for criterion in criteria:
        if isinstance(criterion, EosTokenCriteria):
            hit |= torch.isin(emitted, criterion.eos_token_id.to(emitted.device))
        else:
            hit |= (lengths[:, None] + position) >= criterion.max_length
    hit &= position <= count[:, None]
    return torch.where(hit.any(-1), hit.int().argmax(-1) + 1, 0)


__all__ = ["TOKEN_WISE", "first_stops", "token_wise"]
