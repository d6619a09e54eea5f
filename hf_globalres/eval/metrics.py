"""Evaluation arithmetic: block efficiency, acceptance per tree depth, GSM8K answer match, speedups.

Definitions (docs/design.md §9):

- block efficiency = Σ new tokens / Σ target forwards over a set of
  generations (the prefill shares the first verification forward, so a
  perfect draft of length L gives L + 1);
- acceptance at depth d = accepted verifications / verifications at depth d
  (a verification is one row handed to the token-level rule), next to the
  theoretical optimum ``rates.optimal_acceptance(q, p, k)`` averaged over the
  same rows, k the number of drafts present in the row;
- answer match = share of GSM8K generations whose final number equals the
  reference, with its binomial standard error;
- speedup = tokens/s over a baseline's tokens/s, with a delta-method standard
  error from the two rates' standard errors (:func:`speedup_stderr`).

The ``evaluate`` modules in ``hf_globalres/eval/evaluate_modules/`` wrap these
functions. This module never imports transformers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import rates
from ..verifiers.base import DraftScheme, VerificationResult


def block_efficiency(new_tokens: Sequence[int], target_forwards: Sequence[int]) -> float:
    """``Σ new_tokens / Σ target_forwards`` over generations (a ratio of totals, not a mean of ratios)."""
    if len(new_tokens) != len(target_forwards):
        raise ValueError(f"{len(new_tokens)} token counts but {len(target_forwards)} forward counts")
    if any(t < 0 for t in new_tokens) or any(f < 0 for f in target_forwards):
        raise ValueError("token and forward counts must be non-negative")
    forwards = sum(target_forwards)
    if forwards == 0:
        raise ValueError("block efficiency needs at least one target forward")
    return sum(new_tokens) / forwards


def block_efficiency_stderr(new_tokens: Sequence[int], target_forwards: Sequence[int]) -> float | None:
    """Standard error of :func:`block_efficiency` over generations; see :func:`ratio_stderr`."""
    block_efficiency(new_tokens, target_forwards)  # validates the counts
    return ratio_stderr(new_tokens, target_forwards)


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Standard error of a ratio of totals ``R = Σx / Σy`` over m units (delta method).

    ``SE = sqrt(Σ (x_i − R y_i)² / (m (m − 1))) / ȳ``; ``None`` for m < 2 or Σy = 0.
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators")
    count, total = len(numerators), sum(denominators)
    if count < 2 or total == 0:
        return None
    ratio = sum(numerators) / total
    spread = sum((x - ratio * y) ** 2 for x, y in zip(numerators, denominators, strict=True))
    return math.sqrt(spread / (count * (count - 1))) / (total / count)


def complete_block_efficiency(accepted_lengths: Sequence[Sequence[int]]) -> float | None:
    """Mean tokens per block over every generation's blocks but its last.

    ``accepted_lengths``: per generation, the tokens emitted by each block.
    The last block of a generation is usually cut by the token limit, which
    caps :func:`block_efficiency` at about ``max_new_tokens / ceil(max_new_tokens / (L + 1))``
    on short generations; leaving it out removes that cap (with a slight
    downward bias, since long blocks are the likelier to be cut). ``None``
    when no generation has two blocks.
    """
    complete = [length for lengths in accepted_lengths for length in list(lengths)[:-1]]
    return sum(complete) / len(complete) if complete else None


@dataclass
class DepthStats:
    """Acceptance counts per tree depth, filled by :meth:`callback` during generation.

    Lists are indexed by depth − 1. ``optimal`` and ``single`` hold sums of
    ``rates.optimal_acceptance`` and ``rates.single_acceptance`` (1 − TV) over
    the verified rows; ``drafts`` the sum of drafts present per row.
    """

    scheme: DraftScheme = "iid"
    rows: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    optimal: list[float] = field(default_factory=list)
    single: list[float] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)

    def _grow(self, depth: int) -> None:
        while len(self.rows) < depth:
            for values, zero in (
                (self.rows, 0),
                (self.accepted, 0),
                (self.optimal, 0.0),
                (self.single, 0.0),
                (self.drafts, 0),
            ):
                values.append(zero)

    def callback(
        self,
        depth: int,
        target_probs: torch.Tensor,
        draft_probs: torch.Tensor,
        draft_tokens: torch.Tensor,
        result: VerificationResult,
    ) -> None:
        """``verification_callback`` of ``hf_globalres.generate``: q, p [R, V], drafts [R, k] (−1 absent)."""
        count = (draft_tokens >= 0).sum(-1)
        optimal = rates.optimal_acceptance(target_probs, draft_probs, count, scheme=self.scheme)
        single = rates.single_acceptance(target_probs, draft_probs)
        self._grow(depth)
        i = depth - 1
        self.rows[i] += int(draft_tokens.shape[0])
        self.accepted[i] += int(result.accepted.sum())
        self.optimal[i] += float(optimal.sum())
        self.single[i] += float(single.sum())
        self.drafts[i] += int(count.sum())

    def merge(self, other: DepthStats | dict[str, Any]) -> DepthStats:
        """Add another set of counts (a DepthStats or its :meth:`to_dict`) into this one."""
        data = other.to_dict() if isinstance(other, DepthStats) else other
        self._grow(len(data["rows"]))
        for name in ("rows", "accepted", "optimal", "single", "drafts"):
            values = getattr(self, name)
            for i, value in enumerate(data[name]):
                values[i] += value
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "accepted": list(self.accepted),
            "optimal": list(self.optimal),
            "single": list(self.single),
            "drafts": list(self.drafts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], scheme: DraftScheme = "iid") -> DepthStats:
        """The counts written by :meth:`to_dict` (lists of one entry per depth)."""
        names = ("rows", "accepted", "optimal", "single", "drafts")
        if len({len(data[name]) for name in names}) != 1:
            raise ValueError(f"depth counts need one entry per depth in each of {', '.join(names)}")
        return cls(scheme, *(list(data[name]) for name in names))

    def summary(self) -> dict[str, Any]:
        """Per-depth rates and their row-weighted totals (``None`` where no row was verified)."""
        return acceptance_summary(self.rows, self.accepted, self.optimal, self.single)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def acceptance_summary(
    rows: Sequence[int],
    accepted: Sequence[float],
    optimal: Sequence[float] | None = None,
    single: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Acceptance per depth (``accepted[d] / rows[d]``), the optimum and 1 − TV per depth, and overall.

    ``ratio_to_optimal`` = measured / optimal acceptance over all verified rows:
    1 for a rule that reaches the optimum, ≤ 1 in expectation for any rule.
    ``ratio_to_optimal_stderr`` bounds its standard error for a rule that
    reaches the optimum: row i is accepted with probability α_i, so the
    accepted count has variance Σ α_i (1 − α_i) ≤ N ᾱ (1 − ᾱ) (concavity),
    and the bound is ``sqrt(N ᾱ (1 − ᾱ)) / Σ α_i`` over N rows.
    """
    if len(accepted) != len(rows) or any(len(s) != len(rows) for s in (optimal or rows, single or rows)):
        raise ValueError("rows, accepted, optimal and single need one entry per depth")
    if any(a > r for a, r in zip(accepted, rows, strict=True)):
        raise ValueError("accepted counts cannot exceed the number of verified rows")
    total_rows, total_accepted = sum(rows), sum(accepted)
    out: dict[str, Any] = {
        "per_depth": [_ratio(a, r) for a, r in zip(accepted, rows, strict=True)],
        "rows_per_depth": list(rows),
        "acceptance": _ratio(total_accepted, total_rows),
    }
    if optimal is not None:
        out["optimal_per_depth"] = [_ratio(o, r) for o, r in zip(optimal, rows, strict=True)]
        out["optimal"] = _ratio(sum(optimal), total_rows)
        out["ratio_to_optimal"] = _ratio(total_accepted, sum(optimal))
        mean = _ratio(sum(optimal), total_rows)
        spread = total_rows * mean * (1 - mean) if mean is not None else 0.0
        out["ratio_to_optimal_stderr"] = _ratio(math.sqrt(max(spread, 0.0)), sum(optimal))
    if single is not None:
        out["single_per_depth"] = [_ratio(s, r) for s, r in zip(single, rows, strict=True)]
        out["single"] = _ratio(sum(single), total_rows)
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K solution, normalised (no commas, no trailing ``.0``).

    The first number after the last ``####`` if there is one, else the last
    number of the text; ``None`` when there is no number.
    """
    if "####" in text:
        numbers = _NUMBER.findall(text.rsplit("####", 1)[1])
        value = numbers[0] if numbers else None
    else:
        numbers = _NUMBER.findall(text)
        value = numbers[-1] if numbers else None
    if value is None:
        return None
    value = value.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return "0" if value in ("-0", "") else value


def answer_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """GSM8K accuracy of generated solutions against reference answers, with its standard error.

    Returns ``{"accuracy", "correct", "total", "stderr"}``; stderr =
    ``sqrt(acc (1 − acc) / total)``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("answer match needs at least one prediction")
    correct = sum(
        extract_final_answer(pred) == extract_final_answer(ref)
        for pred, ref in zip(predictions, references, strict=True)
    )
    total = len(predictions)
    accuracy = correct / total
    return {
        "accuracy": accuracy,
        "correct": float(correct),
        "total": float(total),
        "stderr": math.sqrt(accuracy * (1 - accuracy) / total),
    }


def within_noise(accuracy_a: float, total_a: int, accuracy_b: float, total_b: int, z: float = 2.0) -> bool:
    """Two accuracies agree within ``z`` standard errors of their difference (binomial).

    With both accuracies 0 or 1 the standard error vanishes and only equality passes.
    """
    pooled = (accuracy_a * total_a + accuracy_b * total_b) / (total_a + total_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / total_a + 1 / total_b))
    return abs(accuracy_a - accuracy_b) <= z * se + 1e-12


def speedup(tokens_per_s: float | None, baseline_tokens_per_s: float | None) -> float | None:
    """``tokens_per_s / baseline``, ``None`` when either is missing or the baseline is 0."""
    if tokens_per_s is None or not baseline_tokens_per_s:
        return None
    return tokens_per_s / baseline_tokens_per_s


def speedup_stderr(
    tokens_per_s: float | None,
    tokens_per_s_stderr: float | None,
    baseline_tokens_per_s: float | None,
    baseline_stderr: float | None,
) -> float | None:
    """Standard error of :func:`speedup` ``S = a / b`` from the standard errors of a and b (delta method).

    ``SE(S) = S · sqrt((SE(a) / a)² + (SE(b) / b)²)``, a and b treated as independent: the
    methods run on the same prompts, whose shared difficulty correlates a and b positively,
    so this overstates the spread of S rather than understating it. ``None`` when any input
    is missing or a rate is 0.
    """
    if not tokens_per_s or not baseline_tokens_per_s or tokens_per_s_stderr is None or baseline_stderr is None:
        return None
    value = tokens_per_s / baseline_tokens_per_s
    return value * math.hypot(tokens_per_s_stderr / tokens_per_s, baseline_stderr / baseline_tokens_per_s)


#: The metrics shipped as ``evaluate`` modules (folders beside this file).
EVALUATE_MODULES = ("acceptance_per_depth", "block_efficiency", "gsm8k_answer_match")


def evaluate_info(description: str, inputs_description: str, **features: str) -> Any:
    """The ``evaluate.MetricInfo`` of a shipped module: one ``datasets.Value(dtype)`` column per input."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=datasets.Features({name: datasets.Value(dtype) for name, dtype in features.items()}),
    )


def evaluate_module_path(name: str) -> str:
    """Folder of the ``evaluate`` module ``name``, for ``evaluate.load(evaluate_module_path(name))`` (offline)."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(EVALUATE_MODULES)}")
    return str(Path(__file__).with_name("evaluate_modules") / name)


__all__ = [
    "EVALUATE_MODULES",
    "DepthStats",
    "acceptance_summary",
    "answer_match",
    "block_efficiency",
    "block_efficiency_stderr",
    "complete_block_efficiency",
    "evaluate_info",
    "evaluate_module_path",
    "extract_final_answer",
    "ratio_stderr",
    "speedup",
    "speedup_stderr",
    "within_noise",
]
