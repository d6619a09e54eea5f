"""A draft that scores part of the vocabulary: its LM head over a subset S of token ids.

The draft law is ours to choose (docs/design.md §8): every verifier is exact
for the p it is handed, as long as the drafts are drawn from that same p. So
the draft may score only the tokens of S. Its logits become

    z_v = h · w_v (+ b_v) for v ∈ S,   z_v = −∞ for v ∉ S,

and its law p(v) = exp z_v / Σ_{u ∈ S} exp z_u is the draft's law restricted
to S and renormalised. Drafts are drawn from that p and the verifier is handed
that same p, so the output law stays the target's. A token outside S is never
drafted; where the target wants one, that node rejects (and recovers it from
the target), which is the whole cost. The saving is the head's product: on
the built-in 0.5B draft the head holds 136 M of the model's 494 M weights.

S is best made of the tokens the draft itself expects: :func:`frequent_tokens`
ranks the vocabulary by the draft's summed probability over positions of
calibration text (E_text[p(v)]), and :func:`restrict_vocabulary` keeps the
first ``size`` of them (and the end-of-sequence tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .devices import PackedLinear


class VocabularyHead(torch.nn.Module):
    """LM head over ``token_ids`` only: logits [..., V] with −∞ outside them (module docstring).

    Attributes:
        head: ``nn.Linear`` [in → K] holding the K kept rows of the original head (any
            later change of its numerics, such as :func:`~hf_globalres.devices.quantize_int8`, applies).
        token_ids: [K] the kept ids, ascending.
        vocab_size: V, the width of the logits (the original head's).
    """

    def __init__(self, head: torch.nn.Linear | PackedLinear, token_ids: torch.Tensor) -> None:
        super().__init__()
        weight = head.weight.detach()
        self.vocab_size = head.out_features
        self.register_buffer("token_ids", token_ids.to(weight.device))
        self.head = torch.nn.Linear(head.in_features, len(token_ids), bias=head.bias is not None,
                                    device=weight.device, dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            self.head.weight.copy_(weight[self.token_ids])
            if head.bias is not None:
                self.head.bias.copy_(head.bias.detach()[self.token_ids])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        kept = self.head(hidden)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.token_ids, kept)

    def extra_repr(self) -> str:
        return f"kept={len(self.token_ids)}, vocab_size={self.vocab_size}"


def restrict_vocabulary(model: torch.nn.Module, ranked_ids: Sequence[int] | torch.Tensor, size: int) -> int:
    """Make ``model`` (the draft) score only the first ``size`` of ``ranked_ids`` and its EOS tokens, in place.

    Replaces its output embeddings by a :class:`VocabularyHead` (apply it before
    :func:`~hf_globalres.devices.quantize_int8`, which then quantizes the smaller head). Lossless for
    every verifier (module docstring). Returns the number of kept ids.

    Raises:
        ValueError: ``size`` < 1, ids outside the head, or a head that is not a linear layer
            (already restricted or quantized).
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear | PackedLinear):
        raise ValueError(
            f"restrict_vocabulary needs the draft's LM head as a linear layer, got {type(head).__name__}; "
            "restrict a freshly loaded draft, before quantize_int8"
        )
    ranked = torch.as_tensor(ranked_ids, dtype=torch.long).flatten()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the number of kept draft tokens must be an integer ≥ 1, got {size!r}")
    if ranked.numel() and (int(ranked.min()) < 0 or int(ranked.max()) >= head.out_features):
        raise ValueError(f"token ids must lie in [0, {head.out_features}), the draft's LM head")
    keep = torch.zeros(head.out_features, dtype=torch.bool)
    keep[ranked[:size]] = True
    keep[[i for i in _eos_ids(model) if i < head.out_features]] = True
    kept = keep.nonzero()[:, 0]
    model.set_output_embeddings(VocabularyHead(head, kept))
    return len(kept)


def _eos_ids(model: torch.nn.Module) -> list[int]:
    """End-of-sequence ids of the model's generation config (kept in S so drafts can end a sequence)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return [] if eos is None else [int(i) for i in (eos if isinstance(eos, list | tuple) else [eos])]


@torch.no_grad()
def frequent_tokens(model: torch.nn.Module, token_ids: Iterable[torch.Tensor], chunk: int = 512) -> torch.Tensor:
    """All ids of ``model``'s LM head, ranked by its summed next-token probability over ``token_ids``.

    ``token_ids`` are 1-D tensors of tokenized calibration text; each is run in
    windows of ``chunk`` tokens and every position adds p(· | its window) to the tally.

    Returns:
        [V] token ids, the most expected first.
    """
    tally: torch.Tensor | None = None
    for ids in token_ids:
        for start in range(0, len(ids), chunk):
            logits = model(ids[None, start : start + chunk].to(model.device)).logits[0]
            probs = torch.softmax(logits, dim=-1, dtype=torch.float64).sum(0).cpu()
            tally = probs if tally is None else tally + probs
    if tally is None:
        raise ValueError("frequent_tokens needs some calibration text")
    return tally.argsort(descending=True, stable=True)


__all__ = ["VocabularyHead", "frequent_tokens", "restrict_vocabulary"]
