"""The verifier interface shared by every token-level verification rule.

Notation (used across the package): target distribution ``q``, draft
distribution ``p``, vocabulary size ``V``, ``n`` drafts per row, batch ``B``.

A verifier maps drafts ``x_1..x_n`` (drawn from ``p`` under its
``draft_scheme``) and its own randomness to one output token ``Y``. It is
lossless when ``P(Y = y) = q(y)`` for every ``y`` after averaging over the
drafts. Every rule in this package is described by an :class:`EmissionPlan`:

    P(Y = y | x) = Σ_i emit_i · 1[x_i = y] + (1 − Σ_i emit_i) · residual(y)

``emit_i`` is the probability that the rule outputs draft ``i`` by accepting
it, and ``residual`` is the law of the recovered token when every draft is
rejected. ``conditional`` returns that law; ``verify`` samples from it (first
which branch, then, for the residual branch, the recovered token).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch

from .. import _sync
from ..rates import DraftScheme

#: Largest tolerated ``|Σ_y probs(y) − 1|`` for an input row (or the dtype's eps, if larger).
ROW_SUM_TOLERANCE = 1e-4

#: Which nodes of a block's draft tree draft on (:mod:`hf_globalres.generation.drafting`): every
#: branch ("tree"), or only the spine through each node's :func:`heaviest_child` ("spine").
DraftShape = Literal["tree", "spine"]
DRAFT_SHAPES: tuple[DraftShape, ...] = ("tree", "spine")


def check_draft_shape(draft_shape: object) -> DraftShape:
    """``draft_shape`` itself if it is one of ``DRAFT_SHAPES``; else ValueError naming them."""
    if draft_shape not in DRAFT_SHAPES:
        raise ValueError(f"draft_shape must be one of {DRAFT_SHAPES}, got {draft_shape!r}")
    return draft_shape  # type: ignore[return-value]


@dataclass
class VerificationResult:
    """Outcome of one batched verification step.

    Attributes:
        token: LongTensor [B], the output token of each row.
        accepted: BoolTensor [B], ``token`` equals one of the row's drafts.
        draft_index: LongTensor [B], column of the first draft equal to
            ``token``, or −1 when no draft equals it.
    """

    token: torch.Tensor
    accepted: torch.Tensor
    draft_index: torch.Tensor


class EmissionPlan:
    """The law of the output given the drafts, in accept/recover form.

    Attributes:
        draft_emit: [B, n], probability that the output is draft ``i`` by
            acceptance (0 for absent drafts); rows sum to at most 1.
        residual: [B, V], law of the recovered token when no draft is
            accepted; a probability row wherever ``1 − Σ_i draft_emit > 0``.
            A rule may pass ``recover`` instead, a function computing it: it
            runs on first access, which sampling makes only when some row
            rejects every draft.
    """

    def __init__(
        self,
        draft_emit: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        recover: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if (residual is None) == (recover is None):
            raise ValueError("an EmissionPlan takes either the residual or a function that computes it")
        self.draft_emit = draft_emit
        self._residual, self._recover = residual, recover

    @property
    def residual(self) -> torch.Tensor:
        if self._residual is None:
            assert self._recover is not None
            self._residual, self._recover = self._recover(), None
        return self._residual

    @property
    def reject_prob(self) -> torch.Tensor:
        """[B]: probability that every draft is rejected."""
        return (1 - self.draft_emit.sum(-1)).clamp_min(0)


class Verifier(ABC):
    """A lossless token-level verification rule.

    Subclasses set ``name`` and ``draft_scheme`` and implement :meth:`plan`.
    ``max_drafts`` bounds the number of draft columns a rule accepts
    (``None``: any). With ``validate=False`` the input checks are skipped,
    which avoids host-device synchronisation in hot loops. :meth:`prepare`
    renormalises q and p (two passes over V) unless ``normalizes_inputs`` is
    False, for rules whose :meth:`plan` is invariant to the rows' scale.
    :meth:`verify` and :meth:`conditional` hand :meth:`plan` the rows on the
    support of p when that support is narrow (:class:`SupportRows`).
    """

    name: ClassVar[str]
    draft_scheme: ClassVar[DraftScheme] = "iid"
    max_drafts: ClassVar[int | None] = None
    normalizes_inputs: ClassVar[bool] = True

    def __init__(self, *, validate: bool = True) -> None:
        self.validate = validate

    def for_shape(self, draft_shape: DraftShape) -> Verifier:
        """This rule for the nodes of ``draft_shape`` trees; itself, for a rule that verifies every node alike.

        ``generate`` verifies with ``verifier.for_shape(draft_shape)``.
        """
        return self

    def unchecked(self) -> Verifier:
        """This rule with ``validate=False``, for a caller whose inputs are valid by construction."""
        rule = copy.copy(self)
        rule.validate = False
        return rule

    @abstractmethod
    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        """The emission plan for these drafts.

        Args:
            target_probs: q, [B, V], rows sum to 1 (already checked).
            draft_probs: p, [B, V], same dtype and device as q.
            draft_tokens: [B, n] LongTensor, −1 marks an absent draft.
        """

    def conditional(
        self, target_probs: torch.Tensor, draft_probs: torch.Tensor | SparseRows, draft_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Exact law of the output token given the drafts: FloatTensor [B, V].

        The verifier's own randomness is integrated out; averaging this over
        draft tuples drawn under ``draft_scheme`` gives q for a lossless rule.
        ``draft_probs`` as in :meth:`verify`.
        """
        q, p, x = self.prepare(target_probs, draft_probs, draft_tokens)
        if x.shape[0] == 0:  # an empty batch has an empty law
            return q.new_zeros(q.shape)
        support = SupportRows.of(q, p, x)
        if support is None:
            return self._law(q, dense(p), x)
        return support.expand_law(self._law(support.q, support.p, support.drafts), q)

    def _law(self, q: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, V]: the plan's law of the output, ``(1 − Σ emit) · residual`` plus each draft's ``emit``."""
        plan = self.shared_plan(q, p, x)
        law = plan.reject_prob[:, None] * plan.residual
        return law.scatter_add(1, x.clamp_min(0), plan.draft_emit)

    def verify(
        self,
        target_probs: torch.Tensor,
        draft_probs: torch.Tensor | SparseRows,
        draft_tokens: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> VerificationResult:
        """Accept one of the drafts or recover a token from the residual.

        Args:
            target_probs: q, [B, V].
            draft_probs: p, [B, V]; or :class:`SparseRows` holding p on k tokens per row (a
                truncated draft law), which the rule then reads without a pass over V.
            draft_tokens: [B, n] LongTensor, −1 marks an absent draft; a row
                with no drafts samples q.
            generator: optional ``torch.Generator`` on the tensors' device.
        """
        q, p, x = self.prepare(target_probs, draft_probs, draft_tokens)
        if x.shape[0] == 0:  # an empty batch verifies to an empty result
            empty = x.new_zeros(0)
            return VerificationResult(token=empty, accepted=empty.bool(), draft_index=empty)
        support = SupportRows.of(q, p, x)
        if support is None:
            token = self._sample(q, dense(p), x, generator)
        else:
            token = support.expand_tokens(self._sample(support.q, support.p, support.drafts, generator), q, generator)
        draft_index = first_match(token, x)
        return VerificationResult(token=token, accepted=draft_index >= 0, draft_index=draft_index)

    def _sample(
        self, q: torch.Tensor, p: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """[B]: one output column per row, drawn from the plan's law (the steps of :meth:`verify`)."""
        plan = self.shared_plan(q, p, x)
        n = x.shape[1]
        branch_probs = torch.cat([plan.draft_emit, plan.reject_prob[:, None]], dim=1)
        branch = sample_categorical(branch_probs, generator)
        token = x.gather(1, branch.clamp_max(n - 1)[:, None])[:, 0]
        # Only the rows that rejected every draft draw from the residual (a pass over its columns each).
        rejected = (branch == n).nonzero()[:, 0]
        if rejected.numel() > 0:
            token[rejected] = sample_categorical(plan.residual[rejected], generator)
        return token

    def shared_plan(
        self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor
    ) -> EmissionPlan:
        """:meth:`plan`, computed once per distinct row when rows repeat exactly (same q, p and drafts)."""
        repeats = distinct_rows(target_probs, draft_probs, draft_tokens)
        if repeats is None:
            return self.plan(target_probs, draft_probs, draft_tokens)
        first, inverse = repeats
        plan = self.plan(target_probs[first], draft_probs[first], draft_tokens[first])
        return EmissionPlan(plan.draft_emit[inverse], recover=lambda: plan.residual[inverse])

    def prepare(
        self, target_probs: torch.Tensor, draft_probs: torch.Tensor | SparseRows, draft_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | SparseRows, torch.Tensor]:
        """Validate (unless disabled), promote to one float dtype, renormalise rows."""
        if self.validate:
            check_inputs(
                target_probs,
                draft_probs,
                draft_tokens,
                max_drafts=self.max_drafts,
                distinct=self.draft_scheme == "without_replacement",
            )
        dtype = torch.promote_types(target_probs.dtype, draft_probs.dtype)
        if not dtype.is_floating_point or dtype.itemsize < 4:
            dtype = torch.float32
        q = target_probs.to(dtype)
        values = draft_probs.values if isinstance(draft_probs, SparseRows) else draft_probs
        values = values.to(dtype)
        if self.normalizes_inputs:
            q = q / q.sum(-1, keepdim=True)
            values = values / values.sum(-1, keepdim=True)
        p = replace(draft_probs, values=values) if isinstance(draft_probs, SparseRows) else values
        return q, p, draft_tokens.long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, draft_scheme={self.draft_scheme!r})"


@dataclass(frozen=True)
class SparseRows:
    """Probability rows [..., V] held on k tokens each: ``values`` at ``tokens``, 0 at every other token.

    A truncated draft law (64 of 152k tokens) handed to a verifier this way ([B, k])
    costs it no pass over V for p (:class:`SupportRows`), and no [B, V] tensor for p is built.

    Attributes:
        tokens: [..., k] LongTensor, distinct within each row.
        values: [..., k] floating, the rows' entries at ``tokens``.
        vocab_size: V.
    """

    tokens: torch.Tensor
    values: torch.Tensor
    vocab_size: int

    @property
    def shape(self) -> torch.Size:
        """[..., V], the rows' dense shape."""
        return torch.Size((*self.values.shape[:-1], self.vocab_size))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def dense(self) -> torch.Tensor:
        """[..., V]: the rows over the whole vocabulary."""
        rows = self.values.new_zeros(self.shape)
        return rows.scatter_(-1, self.tokens, self.values)

    def at(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., m]: the rows' entries at ``tokens`` [..., m] (ids in [0, V))."""
        match = self.tokens[..., None, :] == tokens[..., :, None]
        return torch.where(match, self.values[..., None, :], 0).sum(-1)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SparseRows:
        """The rows with ``fn`` applied to ``tokens`` and ``values`` (an index or expansion of leading dimensions)."""
        return SparseRows(fn(self.tokens), fn(self.values), self.vocab_size)


def dense(probs: torch.Tensor | SparseRows) -> torch.Tensor:
    """[B, V]: ``probs`` over the whole vocabulary."""
    return probs.dense() if isinstance(probs, SparseRows) else probs


#: A row verifies on the support of p (:class:`SupportRows`) when that support spans at most this
#: share of the vocabulary (a truncated draft law: top 64 of 152k tokens).
SUPPORT_SHARE = 0.25


@dataclass
class SupportRows:
    """The rows restricted to ``supp p`` plus one column for the rest of the vocabulary.

    A draft never lands off ``supp p``, so every rule sees the same problem on
    the columns ``[supp p (padded to the widest row), rest]``: q there and the
    mass q puts off ``supp p``, p there and 0. Whatever a lossless rule
    outputs on these columns has the law ``[q(supp p), q(rest)]``; an output
    in the last column is then drawn from q restricted to the rest, so the
    token has the law q (docs/design.md §5). The rules' work scales with the
    support, not V, and the pass over V happens only for the rows that land
    in the last column.

    Attributes:
        index: [B, W] token of each column, ascending, V on padding columns.
        q, p: [B, W + 1] the rows on those columns, the rest of q last (padding: 0).
        drafts: [B, n] the drafts' columns, −1 for absent drafts.
    """

    index: torch.Tensor
    q: torch.Tensor
    p: torch.Tensor
    drafts: torch.Tensor

    @classmethod
    def of(cls, q: torch.Tensor, p: torch.Tensor | SparseRows, draft_tokens: torch.Tensor) -> SupportRows | None:
        """The support rows of ``q``, ``p`` [B, V], or None when supports are wide or host reads are costly.

        A :class:`SparseRows` p names its columns; a dense one is searched for its nonzero entries.
        """
        vocab = q.shape[1]
        if isinstance(p, SparseRows):
            if p.tokens.shape[1] > SUPPORT_SHARE * vocab:
                return None
            index, order = p.tokens.sort(-1)
            p_on = p.values.gather(1, order)
        else:
            if not _sync.reads_are_cheap(p):  # finding the supports reads them back
                return None
            supported = p > 0
            count = supported.sum(-1)
            width = int(count.max())
            if width > SUPPORT_SHARE * vocab:
                return None
            index = support_index(supported, count, width)
            p_on = torch.where(index < vocab, p.gather(1, index.clamp_max(vocab - 1)), 0)
        on = index < vocab
        q_on = torch.where(on, q.gather(1, index.clamp_max(vocab - 1)), 0)
        rest = (q.sum(-1, keepdim=True) - q_on.sum(-1, keepdim=True)).clamp_min(0)
        column = torch.searchsorted(index, draft_tokens.clamp_min(0))
        drafts = torch.where(draft_tokens >= 0, column, -1)
        return cls(index, torch.cat([q_on, rest], -1), torch.cat([p_on, torch.zeros_like(rest)], -1), drafts)

    def off_support(self, q: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, V]: q [R, V] of ``rows`` (all by default) with ``supp p`` zeroed (padding writes to a spare column)."""
        index = self.index if rows is None else self.index[rows]
        spare = torch.cat([q, q.new_zeros(q.shape[0], 1)], -1)
        return spare.scatter(1, index, 0)[:, : q.shape[1]]

    def expand_tokens(self, columns: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """[B]: the token of each output column; the last column draws from q off ``supp p``."""
        width = self.index.shape[1]
        token = self.index.gather(1, columns.clamp_max(width - 1)[:, None])[:, 0]
        rest = (columns == width).nonzero()[:, 0]
        if rest.numel() > 0:
            token[rest] = sample_categorical(self.off_support(q[rest], rest), generator)
        return token

    def expand_law(self, law: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """[B, V]: a law over the columns [B, W + 1] as a law over tokens (the last column spread as q off supp p)."""
        width = self.index.shape[1]
        off = self.off_support(q)
        spread = off * (law[:, width:] / off.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny))
        spare = torch.cat([spread, spread.new_zeros(q.shape[0], 1)], -1)
        return spare.scatter_add(1, self.index, law[:, :width])[:, : q.shape[1]]


def support_index(supported: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width]: the tokens where ``supported`` [B, V] holds, ascending per row, then V (padding).

    ``count`` [B] = ``supported.sum(-1)``, ``width`` ≥ its maximum. On a CPU from one ``nonzero``
    (row-major, so tokens ascend within a row); elsewhere the ``width`` smallest of the keys
    "token if supported, else V", with no host read.
    """
    batch, vocab = supported.shape
    if not _sync.reads_are_cheap(supported):
        keys = torch.where(supported, torch.arange(vocab, device=supported.device), vocab)
        return keys.topk(width, dim=-1, largest=False, sorted=True).values
    rows, tokens = supported.nonzero(as_tuple=True)
    index = torch.full((batch, width), vocab, dtype=torch.long, device=supported.device)
    index[rows, torch.arange(rows.shape[0], device=rows.device) - (count.cumsum(0) - count)[rows]] = tokens
    return index


def check_inputs(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | SparseRows,
    draft_tokens: torch.Tensor,
    *,
    max_drafts: int | None = None,
    distinct: bool = False,
) -> None:
    """Raise ``ValueError`` naming the problem if the inputs are not a valid case.

    ``distinct``: drafts were drawn without replacement, so a row cannot repeat a token.
    Every check on values is computed on the device and read back at once (one host read).
    """
    _check_probs_layout(target_probs, "target_probs")
    sparse = isinstance(draft_probs, SparseRows)
    _check_sparse_layout(draft_probs) if sparse else _check_probs_layout(draft_probs, "draft_probs")
    if target_probs.shape != draft_probs.shape:
        raise ValueError(
            f"target_probs {tuple(target_probs.shape)} and draft_probs "
            f"{tuple(draft_probs.shape)} differ in shape: target and draft must share "
            "the batch size and vocabulary"
        )
    if target_probs.device != draft_probs.device or draft_tokens.device != target_probs.device:
        raise ValueError("target_probs, draft_probs and draft_tokens must be on one device")
    batch, vocab = target_probs.shape
    if draft_tokens.dim() != 2 or draft_tokens.shape[0] != batch:
        raise ValueError(f"draft_tokens must have shape [B, n] = [{batch}, n], got {tuple(draft_tokens.shape)}")
    if draft_tokens.dtype.is_floating_point or draft_tokens.dtype == torch.bool:
        raise ValueError(f"draft_tokens must be an integer tensor, got {draft_tokens.dtype}")
    n = draft_tokens.shape[1]
    if n == 0:
        raise ValueError("draft_tokens has n = 0 columns: pass at least one column (−1 marks absent drafts)")
    if max_drafts is not None and n > max_drafts:
        raise ValueError(
            f"this verifier takes at most {max_drafts} draft(s) per row, got n = {n}; "
            "optimal, spectr and rrs take any number"
        )
    # Failure flags in the order their errors are reported; the first raised flag names the problem.
    failures = [*_probs_failures(target_probs, "target_probs")]
    if sparse:
        failures += [*_sparse_failures(draft_probs), *_probs_failures(draft_probs.values, "draft_probs")]
    else:
        failures += _probs_failures(draft_probs, "draft_probs")
    if draft_tokens.numel():
        tokens = draft_tokens.long()
        present = tokens >= 0
        failures.append(
            (
                ((tokens < -1) | (tokens >= vocab)).any(),
                lambda: f"draft_tokens must lie in [0, {vocab}) or be −1 (absent)",
            )
        )
        # Clamped into range, so that the gather runs even when the range check fails.
        draft_mass = gather_draft_probs(draft_probs, tokens.clamp(0, vocab - 1))
        failures.append(
            (
                (present & (draft_mass <= 0)).any(),
                lambda: "a draft token has zero draft probability: drafts must be sampled from draft_probs",
            )
        )
        if distinct and n > 1:
            ordered = tokens.sort(-1).values
            failures.append(
                (
                    ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(),
                    lambda: "a row repeats a draft token, but this verifier needs drafts drawn without replacement",
                )
            )
    _raise_first(failures)


def _check_sparse_layout(probs: SparseRows) -> None:
    """The checks of a :class:`SparseRows` that need no values: shapes, dtypes, devices."""
    _check_probs_layout(probs.values, "draft_probs.values")
    if probs.tokens.shape != probs.values.shape or probs.tokens.dtype != torch.long:
        raise ValueError(
            f"draft_probs.tokens must be a LongTensor shaped like its values {tuple(probs.values.shape)}, "
            f"got {probs.tokens.dtype} {tuple(probs.tokens.shape)}"
        )
    if probs.tokens.device != probs.values.device:
        raise ValueError("draft_probs.tokens and draft_probs.values must be on one device")


def _sparse_failures(probs: SparseRows) -> list[Failure]:
    """Flags of a :class:`SparseRows` whose tokens repeat within a row or lie outside the vocabulary."""
    ordered = probs.tokens.sort(-1).values
    out_of_range = (ordered[:, 0] < 0).any() | (ordered[:, -1] >= probs.vocab_size).any()
    return [
        (out_of_range, lambda: f"draft_probs.tokens must lie in [0, {probs.vocab_size})"),
        ((ordered.diff(dim=-1) == 0).any(), lambda: "draft_probs.tokens repeats a token within a row"),
    ]


def check_probs(probs: torch.Tensor, label: str) -> None:
    """Raise ``ValueError`` unless ``probs`` is a [B, V] batch of probability rows (one host read)."""
    _check_probs_layout(probs, label)
    _raise_first(_probs_failures(probs, label))


def _check_probs_layout(probs: torch.Tensor, label: str) -> None:
    """The checks of :func:`check_probs` that need no values: shape and dtype."""
    if probs.dim() != 2:
        raise ValueError(f"{label} must have shape [B, V], got {tuple(probs.shape)}")
    if not probs.dtype.is_floating_point:
        raise ValueError(f"{label} must be a floating-point tensor, got {probs.dtype}")
    if probs.shape[1] == 0:
        raise ValueError(f"{label} has an empty vocabulary")


Failure = tuple[torch.Tensor, Callable[[], str]]


def _probs_failures(probs: torch.Tensor, label: str) -> list[Failure]:
    """Flags (0-d bool tensors) of what makes ``probs`` invalid, each with the message naming it."""
    sums = probs.sum(-1, dtype=torch.float64)  # NaN and ±inf propagate into the sums
    # Half-precision rows carry rounding of order eps; the verifiers renormalise them anyway.
    tolerance = max(ROW_SUM_TOLERANCE, torch.finfo(probs.dtype).eps)
    bad = (sums - 1).abs() > tolerance

    def unnormalised() -> str:
        row = int(bad.nonzero()[0, 0])
        return f"{label} rows must sum to 1 (±{tolerance:g}); row {row} sums to {float(sums[row]):.6g}"

    failures: list[Failure] = [(~torch.isfinite(sums).all(), lambda: f"{label} contains NaN or infinite values")]
    if probs.numel():
        failures.append((probs.amin() < 0, lambda: f"{label} contains negative probabilities"))
    failures.append((bad.any(), unnormalised))
    return failures


def _raise_first(failures: list[Failure]) -> None:
    """Read every flag back in one host read; raise the first raised flag's ``ValueError``."""
    if not failures:
        return
    for failed, (_, message) in zip(torch.stack([flag for flag, _ in failures]).tolist(), failures, strict=True):
        if failed:
            raise ValueError(message())


def distinct_rows(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first [U], inverse [B])`` when rows repeat exactly (same q, p and integer ``keys`` [B, m]), else None.

    Rows are grouped by a cheap signature (two dot products and the keys) and
    each group is then checked entry by entry against its first row, so
    equal-looking rows that differ are never merged (then no rows are merged).
    Only on a CPU: the grouping takes three host reads, which on an accelerator
    cost more than solving the repeated rows along with the others.
    """
    batch, vocab = target_probs.shape
    if batch < 2 or not _sync.reads_are_cheap(target_probs):
        return None
    probe = torch.linspace(1, 2, vocab, dtype=target_probs.dtype, device=target_probs.device)
    signature = torch.cat([(target_probs @ probe)[:, None], (draft_probs @ probe)[:, None], keys.to(probe.dtype)], -1)
    _, inverse = torch.unique(signature, dim=0, return_inverse=True)
    groups = int(inverse.max()) + 1
    if groups == batch:
        return None
    rows = torch.arange(batch, device=inverse.device)
    first = torch.full((groups,), batch, device=inverse.device).scatter_reduce(0, inverse, rows, "amin")
    head = first[inverse]
    same = (target_probs == target_probs[head]).all(-1) & (draft_probs == draft_probs[head]).all(-1)
    if not bool((same & (keys == keys[head]).all(-1)).all()):
        return None
    return first, inverse


def sample_categorical(
    probs: torch.Tensor, generator: torch.Generator | None = None, draws: int | None = None
) -> torch.Tensor:
    """One index per row of ``probs`` [B, K] (rows need not be normalised) → [B]; ``draws`` i.i.d. → [B, draws].

    Inverse-CDF sampling with one uniform per draw: the first index whose
    cumulative mass exceeds ``x = u · total``. Keeping ``x`` strictly below
    ``total`` (``u · total`` can round up to it) means the cumulative mass
    rises at the returned index, so a zero-probability entry is never
    returned; all-zero rows return an arbitrary index. The uniforms are drawn
    row by row, so ``draws`` draws from a row are the indices that ``draws``
    copies of the row would give, from one cumulative sum.
    """
    if generator is not None and torch.device(generator.device).type != probs.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the probabilities are on {probs.device}: "
            f"pass torch.Generator(device={str(probs.device)!r})"
        )
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand((probs.shape[0], draws or 1), dtype=probs.dtype, device=probs.device, generator=generator)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, x, right=True).clamp_max(probs.shape[-1] - 1)
    return index if draws is not None else index.squeeze(-1)


def first_match(token: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
    """[B]: column of the first draft equal to ``token`` [B], −1 if none."""
    match = draft_tokens == token[:, None]
    columns = torch.arange(draft_tokens.shape[1], device=token.device).expand_as(match)
    sentinel = torch.full_like(columns, draft_tokens.shape[1])
    index = torch.where(match, columns, sentinel).amin(-1)
    return torch.where(index == draft_tokens.shape[1], -1, index)


def normalize_rows(mass: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``mass / Σ mass`` row-wise; rows with no mass take ``fallback`` instead.

    Used for residuals: a row with no residual mass is only reached with
    probability 0, and ``fallback`` keeps it a valid distribution.
    """
    total = mass.sum(-1, keepdim=True)
    return torch.where(total > 0, mass / torch.where(total > 0, total, 1), fallback)


def gather_draft_probs(probs: torch.Tensor | SparseRows, draft_tokens: torch.Tensor) -> torch.Tensor:
    """[B, n]: ``probs`` at each draft token, 0 for absent drafts."""
    index = draft_tokens.clamp_min(0)
    values = probs.at(index) if isinstance(probs, SparseRows) else probs.gather(1, index)
    return torch.where(draft_tokens >= 0, values, 0)


def heaviest_child(tokens: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """[B, n]: the ``members`` whose token is the one most of them drew (ties: the lowest branch's).

    Args:
        tokens: [B, n] tokens the branches just drew; members: [B, n] branches on the spine so far.
    """
    same = (tokens[:, :, None] == tokens[:, None, :]) & members[:, :, None] & members[:, None, :]
    votes = same.sum(-1)  # [B, n], 0 for non-members
    # The earliest branch holding the largest vote count names the spine's token.
    leader = (votes * (tokens.shape[1] + 1) - torch.arange(tokens.shape[1], device=tokens.device)).argmax(-1)
    chosen = tokens.gather(1, leader[:, None])
    return members & (tokens == chosen)


__all__ = [
    "DRAFT_SHAPES",
    "ROW_SUM_TOLERANCE",
    "SUPPORT_SHARE",
    "DraftScheme",
    "DraftShape",
    "EmissionPlan",
    "SparseRows",
    "SupportRows",
    "VerificationResult",
    "Verifier",
    "check_draft_shape",
    "check_inputs",
    "check_probs",
    "distinct_rows",
    "first_match",
    "gather_draft_probs",
    "heaviest_child",
    "normalize_rows",
    "sample_categorical",
    "support_index",
]
