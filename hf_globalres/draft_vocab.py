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

A fixed S misses the words of the text at hand (a question's " cups" and
" bolts"), which the target then often wants. So each generate call adds its
prompt's tokens to S (:func:`prompt_vocabulary`): S = S_0 ∪ prompt, fixed before
the first draft is drawn and the same for every block of the call, so the draft
law is still one known p at every node and the output law stays the target's.
Their logits come from the rows of the input embedding when the draft ties its
weights (no copy), else from the original head's weight, kept for that purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .devices import PackedLinear

BUILTIN_RANKING_SIZE = 32_768
"""Ids in a shipped ranking: the most a draft keeps by default (see :func:`load_ranking`)."""
_RANKINGS = Path(__file__).parent / "vocabularies"


class VocabularyHead(torch.nn.Module):
    """LM head over S = ``token_ids`` ∪ the call's prompt tokens: logits [..., V], −∞ outside S (module docstring).

    Attributes:
        head: ``nn.Linear`` [in → K] holding the K kept rows of the original head (any
            later change of its numerics, such as :func:`~hf_globalres.devices.quantize_int8`, applies).
        token_ids: [K] the kept ids, ascending.
        rows: ``nn.Embedding`` [V, in] whose rows score the prompt's tokens: the draft's input
            embedding when its weights are tied (shared, not copied), else the original head's weight.
        bias: [V] the original head's bias, or None.
        vocab_size: V, the width of the logits (the original head's).
        prompt_ids, prompt_mask: [C] the columns a call scores besides ``token_ids`` and which of them are
            its prompt's tokens (the others keep their logits), or None outside a call.
    """

    def __init__(self, head: torch.nn.Linear | PackedLinear, token_ids: torch.Tensor, rows: torch.nn.Embedding) -> None:
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
        self.rows = rows
        self.register_buffer("bias", None if head.bias is None else head.bias.detach(), persistent=False)
        self.prompt_ids: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        self._prompt_weight: torch.Tensor | None = None

    def set_prompt(self, input_ids: torch.Tensor | None) -> None:
        """Score the tokens of ``input_ids`` (any shape) too until the next call; None: S = ``token_ids`` again.

        No host read (an accelerator keeps running): the columns scored are a fixed number, one per prompt
        position (at most V), the prompt's tokens outside ``token_ids`` first, then ids left as they are.
        """
        if input_ids is None:
            self.prompt_ids = self.prompt_mask = self._prompt_weight = None
            return
        ids = input_ids.flatten().to(self.token_ids.device)
        extra = torch.zeros(self.vocab_size, dtype=torch.bool, device=ids.device)
        extra[torch.where((ids >= 0) & (ids < self.vocab_size), ids, self.token_ids[0])] = True
        extra[self.token_ids] = False
        order = torch.sort(extra.to(torch.uint8), descending=True, stable=True).indices
        self.prompt_ids = order[: min(ids.numel(), self.vocab_size)]
        self.prompt_mask = extra[self.prompt_ids]
        self._prompt_weight = self.rows.weight.detach()[self.prompt_ids]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        kept = self.head(hidden)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        logits.index_copy_(-1, self.token_ids, kept)
        if self.prompt_ids is not None:
            prompt = hidden @ self._prompt_weight.to(hidden.dtype).T
            if self.bias is not None:
                prompt = prompt + self.bias[self.prompt_ids].to(hidden.dtype)
            as_is = logits.index_select(-1, self.prompt_ids)
            logits.index_copy_(-1, self.prompt_ids, torch.where(self.prompt_mask, prompt.to(logits.dtype), as_is))
        return logits

    def extra_repr(self) -> str:
        return f"kept={len(self.token_ids)}, vocab_size={self.vocab_size}"


@contextmanager
def prompt_vocabulary(model: torch.nn.Module, input_ids: torch.Tensor) -> Iterator[None]:
    """While open, a draft restricted by :func:`restrict_vocabulary` also scores the tokens of ``input_ids``.

    The generate loop opens it around each call, before any draft is drawn (module docstring);
    for any other draft it does nothing.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, VocabularyHead):
        yield
        return
    head.set_prompt(input_ids)
    try:
        yield
    finally:
        head.set_prompt(None)


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
    model.set_output_embeddings(VocabularyHead(head, kept, _prompt_rows(model, head)))
    return len(kept)


def _prompt_rows(model: torch.nn.Module, head: torch.nn.Linear | PackedLinear) -> torch.nn.Embedding:
    """The rows that score prompt tokens: the input embedding if it is the head's weight, else that weight."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, torch.nn.Embedding) and embedding.weight is getattr(head, "weight", None):
        return embedding
    weight = head.weight.detach()
    return torch.nn.Embedding.from_pretrained(weight, freeze=True)


def _eos_ids(model: torch.nn.Module) -> list[int]:
    """End-of-sequence ids of the model's generation config (kept in S so drafts can end a sequence)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return [] if eos is None else [int(i) for i in (eos if isinstance(eos, list | tuple) else [eos])]


def builtin_ranking_path(draft: str) -> Path:
    """Where the package keeps the ranking of the built-in draft ``draft`` (eval/calibrate_draft_vocab.py writes it)."""
    return _RANKINGS / f"{Path(draft).name}.txt"


def load_ranking(source: str | os.PathLike) -> torch.Tensor:
    """[K] token ids, most expected first, from a built-in draft's name or a ranking file.

    A ranking file holds ``#`` comment lines (the calibration's provenance) and one id per line.

    Raises:
        ValueError: no shipped ranking for that name and no such file.
    """
    path = Path(source)
    if not path.is_file():
        path = builtin_ranking_path(str(source))
    if not path.is_file():
        shipped = sorted(p.stem for p in _RANKINGS.glob("*.txt"))
        raise ValueError(
            f"no draft vocabulary ranking for {str(source)!r}: pass a ranking file "
            f"(eval/calibrate_draft_vocab.py writes one) or a draft with a shipped ranking: {shipped}"
        )
    lines = path.read_text().splitlines()
    return torch.tensor([int(line) for line in lines if line.strip() and not line.startswith("#")])


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


__all__ = [
    "BUILTIN_RANKING_SIZE",
    "VocabularyHead",
    "builtin_ranking_path",
    "frequent_tokens",
    "load_ranking",
    "prompt_vocabulary",
    "restrict_vocabulary",
]
