"""Typed records of an evaluation run and their JSON form.

The run directory's files are the format; these classes are how the code
reads and writes them:

- :class:`Method`: one decoding method of the grid (its name keys the records);
- :class:`Record`: one (dataset, temperature, method, prompt) result, one line
  of ``records.<rank>.jsonl``, with one :class:`Turn` per generation;
- :class:`SummaryRow`: one (dataset, temperature, method) row of
  ``summary.json`` / ``summary.csv``;
- :class:`Finding`: one check of the report (``summary.json`` ``findings``).

Every class reads with ``from_dict`` and writes with ``to_dict``, which emits
the keys in the order the files have always had, so existing run directories
resume and an unchanged run writes byte-identical files. Keys that records of
earlier versions lack read as ``None`` and are left out again on writing, so
a record round-trips to the same line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .. import verifiers
from .metrics import DepthStats

MethodKind = Literal["autoregressive", "assisted", "multidraft"]
METHOD_KINDS: tuple[MethodKind, ...] = ("autoregressive", "assisted", "multidraft")

#: The rule the suite's checks are about, and the single-draft rule it is measured against.
REFERENCE_VERIFIER = "optimal"
#: ``optimal`` spending its acceptance for longer blocks (docs/design.md §4.7): the checks that ask
#: whether ``optimal`` makes blocks as long as any rule leave it out; ``block_gain_same_trees`` measures it.
BLOCK_VERIFIER = "optimal_block"
BASELINE_VERIFIER = "single"
#: The ``same_trees`` entry of ``single`` scored on each tree's first branch (a chain drafted as n = 1).
FIRST_BRANCH_SINGLE = "single (first branch)"


def _present(**values: Any) -> dict[str, Any]:
    """The entries whose value is not None: keys a file holds only when they apply."""
    return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class Method:
    """One decoding method of the grid.

    Attributes:
        kind: "autoregressive", "assisted" or "multidraft".
        verifier: registered verifier name (multidraft only).
        num_drafts: n (1 for assisted, 0 for autoregressive).
        length: L, draft tokens per block (0 for autoregressive).
    """

    kind: MethodKind
    verifier: str | None = None
    num_drafts: int = 0
    length: int = 0

    @property
    def name(self) -> str:
        if self.kind == "autoregressive":
            return "autoregressive"
        if self.kind == "assisted":
            return f"hf-assisted L={self.length}"
        return f"{self.verifier} n={self.num_drafts} L={self.length}"

    @property
    def is_reference_rule(self) -> bool:
        """Multi-draft decoding with the rule the suite's checks are about (``optimal``)."""
        return self.kind == "multidraft" and self.verifier == REFERENCE_VERIFIER

    @property
    def is_baseline_rule(self) -> bool:
        """Multi-draft decoding with the single-draft rule the others are measured against."""
        return self.kind == "multidraft" and self.verifier == BASELINE_VERIFIER

    @property
    def scores_same_trees(self) -> bool:
        """Runs that, with ``same_trees``, score every rule of their draft scheme on their own trees."""
        return self.is_reference_rule and self.num_drafts > 1

    @property
    def draft_scheme(self) -> str:
        """The draft scheme of the verifier; names the registry does not know count as i.i.d."""
        if self.verifier is not None and self.verifier in verifiers.available():
            return verifiers.get(self.verifier).draft_scheme
        return "iid"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "kind": self.kind,
            "verifier": self.verifier,
            "num_drafts": self.num_drafts,
            "length": self.length,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Method:
        return cls(data["kind"], data["verifier"], data["num_drafts"], data["length"])


@dataclass(frozen=True)
class Setting:
    """What a result ran on: device, dtype, whether oneDNN ran the float32 linears and the rows its
    packed weights were laid out for (None: not recorded, or unpacked)."""

    device: str | None = None
    dtype: str | None = None
    onednn_linear: bool | None = None
    packed_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _present(
            device=self.device, dtype=self.dtype, onednn_linear=self.onednn_linear, packed_rows=self.packed_rows
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Setting:
        return cls(data.get("device"), data.get("dtype"), data.get("onednn_linear"), data.get("packed_rows"))

    @property
    def recorded(self) -> bool:
        return self != Setting()


@dataclass
class SameTreeCounts:
    """Summed exact expected tokens per rule over the blocks of one or more generations (``same_trees``)."""

    blocks: int
    tokens: dict[str, float]

    def plus(self, other: SameTreeCounts | None) -> SameTreeCounts:
        """The sum of both counts (rules of either, a rule missing on one side counting 0)."""
        if other is None:
            return self
        tokens = dict(self.tokens)
        for name, value in other.tokens.items():
            tokens[name] = tokens.get(name, 0.0) + value
        return SameTreeCounts(self.blocks + other.blocks, tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "tokens": dict(self.tokens)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SameTreeCounts:
        return cls(data["blocks"], dict(data["tokens"]))


@dataclass
class Turn:
    """One generation of a record (one user turn).

    ``timings``: seconds per phase of multi-draft decoding (None for other methods);
    ``reported_target_forwards`` and ``accepted_lengths`` (tokens per block): what
    multi-draft decoding reports about itself (None for other methods).
    """

    new_tokens: int
    target_forwards: int
    seconds: float
    timings: dict[str, float] | None = None
    peak_memory_gb: float | None = None
    reported_target_forwards: int | None = None
    accepted_lengths: list[int] | None = None
    prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "seconds": self.seconds,
            "timings": self.timings,
            "peak_memory_gb": self.peak_memory_gb,
            **_present(reported_target_forwards=self.reported_target_forwards, accepted_lengths=self.accepted_lengths),
            "prompt_tokens": self.prompt_tokens,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Turn:
        return cls(
            new_tokens=data["new_tokens"],
            target_forwards=data["target_forwards"],
            seconds=data["seconds"],
            timings=data.get("timings"),
            peak_memory_gb=data.get("peak_memory_gb"),
            reported_target_forwards=data.get("reported_target_forwards"),
            accepted_lengths=data.get("accepted_lengths"),
            prompt_tokens=data.get("prompt_tokens", 0),
        )


@dataclass(frozen=True)
class Grading:
    """A GSM8K record's reference answer, the final number of its last text, and whether they match."""

    reference: str
    answer: str | None
    correct: bool


@dataclass
class Record:
    """One (dataset, temperature, method, prompt) result: every turn of the prompt with one method.

    The totals (``new_tokens``, ``target_forwards``, ``seconds``, ``verifier_seconds``,
    ``peak_memory_gb``) are stored as written; :meth:`from_turns` computes them.
    ``missing``: the keys of :data:`Record.OPTIONAL_KEYS` its line lacked (records of
    earlier versions), left out again by :meth:`to_dict`.
    """

    #: Keys a record line may lack; they read as None. (``same_trees`` came after the first records.)
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = ("category", "verifier_seconds", "peak_memory_gb", "depth", "same_trees")

    key: str
    dataset: str
    prompt: str
    category: str | None
    temperature: float
    method: Method
    setting: Setting
    new_tokens: int
    target_forwards: int
    seconds: float
    verifier_seconds: float | None
    peak_memory_gb: float | None
    turns: list[Turn]
    texts: list[str]
    depth: DepthStats | None = None
    same_trees: SameTreeCounts | None = None
    grading: Grading | None = None
    missing: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_turns(
        cls,
        *,
        key: str,
        dataset: str,
        prompt: str,
        category: str | None,
        temperature: float,
        method: Method,
        setting: Setting,
        turns: list[Turn],
        texts: list[str],
        depth: DepthStats | None,
        same_trees: SameTreeCounts | None,
        grading: Grading | None,
    ) -> Record:
        """A record whose totals sum its turns (verifier seconds from the turns that report timings)."""
        timings = [t.timings for t in turns if t.timings]
        return cls(
            key=key,
            dataset=dataset,
            prompt=prompt,
            category=category,
            temperature=temperature,
            method=method,
            setting=setting,
            new_tokens=sum(t.new_tokens for t in turns),
            target_forwards=sum(t.target_forwards for t in turns),
            seconds=sum(t.seconds for t in turns),
            verifier_seconds=sum(t["verifier"] for t in timings) if timings else None,
            peak_memory_gb=max((t.peak_memory_gb or 0.0) for t in turns) or None,
            turns=turns,
            texts=texts,
            depth=depth,
            same_trees=same_trees,
            grading=grading,
        )

    def to_dict(self) -> dict[str, Any]:
        grading = self.grading
        data = {
            "key": self.key,
            "dataset": self.dataset,
            "prompt": self.prompt,
            "category": self.category,
            "temperature": self.temperature,
            **self.method.to_dict(),
            **self.setting.to_dict(),
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "seconds": self.seconds,
            "verifier_seconds": self.verifier_seconds,
            "peak_memory_gb": self.peak_memory_gb,
            "turns": [turn.to_dict() for turn in self.turns],
            "texts": list(self.texts),
            "depth": self.depth.to_dict() if self.depth is not None else None,
            "same_trees": self.same_trees.to_dict() if self.same_trees is not None else None,
            **({} if grading is None else dataclasses.asdict(grading)),
        }
        return {key: value for key, value in data.items() if key not in self.missing}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        depth, same_trees = data.get("depth"), data.get("same_trees")
        graded = "correct" in data
        return cls(
            key=data["key"],
            dataset=data["dataset"],
            prompt=data["prompt"],
            category=data.get("category"),
            temperature=data["temperature"],
            method=Method.from_dict(data),
            setting=Setting.from_dict(data),
            new_tokens=data["new_tokens"],
            target_forwards=data["target_forwards"],
            seconds=data["seconds"],
            verifier_seconds=data.get("verifier_seconds"),
            peak_memory_gb=data.get("peak_memory_gb"),
            turns=[Turn.from_dict(turn) for turn in data["turns"]],
            texts=list(data["texts"]),
            depth=DepthStats.from_dict(depth) if depth else None,
            same_trees=SameTreeCounts.from_dict(same_trees) if same_trees else None,
            grading=Grading(data["reference"], data.get("answer"), data["correct"]) if graded else None,
            missing=frozenset(key for key in cls.OPTIONAL_KEYS if key not in data),
        )


def as_record(record: Record | Mapping[str, Any]) -> Record:
    """A record read from its JSON form (a :class:`Record` is returned as it is)."""
    return record if isinstance(record, Record) else Record.from_dict(record)


@dataclass
class DepthSummary:
    """Acceptance of a summary row: overall and per depth, next to the optimum and 1 − TV (docs/design.md §9)."""

    acceptance: float | None
    optimal: float | None
    single: float | None
    ratio_to_optimal: float | None
    ratio_to_optimal_stderr: float | None
    per_depth: list[float | None]
    optimal_per_depth: list[float | None]
    rows_per_depth: list[int]

    @classmethod
    def from_stats(cls, stats: DepthStats) -> DepthSummary:
        summary = stats.summary()
        return cls(
            acceptance=summary["acceptance"],
            optimal=summary["optimal"],
            single=summary["single"],
            ratio_to_optimal=summary["ratio_to_optimal"],
            ratio_to_optimal_stderr=summary["ratio_to_optimal_stderr"],
            per_depth=summary["per_depth"],
            optimal_per_depth=summary["optimal_per_depth"],
            rows_per_depth=summary["rows_per_depth"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "acceptance": self.acceptance,
            "optimal_acceptance": self.optimal,
            "single_acceptance": self.single,
            "ratio_to_optimal": self.ratio_to_optimal,
            "ratio_to_optimal_stderr": self.ratio_to_optimal_stderr,
            "acceptance_per_depth": self.per_depth,
            "optimal_per_depth": self.optimal_per_depth,
            "rows_per_depth": self.rows_per_depth,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DepthSummary | None:
        """The acceptance keys of a row, or None for a row without them."""
        if data.get("acceptance_per_depth") is None:
            return None
        return cls(
            acceptance=data.get("acceptance"),
            optimal=data.get("optimal_acceptance"),
            single=data.get("single_acceptance"),
            ratio_to_optimal=data.get("ratio_to_optimal"),
            ratio_to_optimal_stderr=data.get("ratio_to_optimal_stderr"),
            per_depth=data["acceptance_per_depth"],
            optimal_per_depth=data.get("optimal_per_depth") or [],
            rows_per_depth=data.get("rows_per_depth") or [],
        )


@dataclass
class SameTreeSummary:
    """Each rule's expected tokens per block on a row's trees, and the row's rule minus each, with SEs."""

    prompts: int
    blocks: int
    tokens_per_block: dict[str, float]
    difference: dict[str, float]
    difference_stderr: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "blocks": self.blocks,
            "tokens_per_block": self.tokens_per_block,
            "difference": self.difference,
            "difference_stderr": self.difference_stderr,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SameTreeSummary:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


@dataclass
class SummaryRow:
    """One (dataset, temperature, method) row, aggregated over prompts (see :mod:`.report`).

    ``tokens_per_s_stderr`` and ``speedup_vs_autoregressive_stderr`` feed the plots'
    error bars only: summary.json keeps the keys it has always had.
    """

    dataset: str
    temperature: float
    method: Method
    setting: Setting = field(default_factory=Setting)
    prompts: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    seconds: float = 0.0
    block_efficiency: float | None = None
    block_efficiency_stderr: float | None = None
    tokens_per_s: float | None = None
    peak_memory_gb: float | None = None
    verifier_ms_per_token: float | None = None
    complete_block_efficiency: float | None = None
    depth: DepthSummary | None = None
    same_trees: SameTreeSummary | None = None
    accuracy: float | None = None
    accuracy_stderr: float | None = None
    speedup_vs_autoregressive: float | None = None
    speedup_vs_assisted: float | None = None
    tokens_per_s_stderr: float | None = None
    speedup_vs_autoregressive_stderr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        accuracy = {} if self.accuracy is None else {"accuracy": self.accuracy, "accuracy_stderr": self.accuracy_stderr}
        return {
            "dataset": self.dataset,
            "temperature": self.temperature,
            **self.method.to_dict(),
            **self.setting.to_dict(),
            "prompts": self.prompts,
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "seconds": self.seconds,
            "block_efficiency": self.block_efficiency,
            "block_efficiency_stderr": self.block_efficiency_stderr,
            "tokens_per_s": self.tokens_per_s,
            "peak_memory_gb": self.peak_memory_gb,
            "verifier_ms_per_token": self.verifier_ms_per_token,
            "complete_block_efficiency": self.complete_block_efficiency,
            **(self.depth.to_dict() if self.depth is not None else {}),
            **({"same_trees": self.same_trees.to_dict()} if self.same_trees is not None else {}),
            **accuracy,
            "speedup_vs_autoregressive": self.speedup_vs_autoregressive,
            "speedup_vs_assisted": self.speedup_vs_assisted,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SummaryRow:
        """A row from its JSON form; keys it lacks read as empty (0 counts, None values)."""
        same_trees = data.get("same_trees")
        return cls(
            dataset=data["dataset"],
            temperature=data["temperature"],
            method=Method.from_dict(data),
            setting=Setting.from_dict(data),
            prompts=data.get("prompts", 0),
            new_tokens=data.get("new_tokens", 0),
            target_forwards=data.get("target_forwards", 0),
            seconds=data.get("seconds", 0.0),
            block_efficiency=data.get("block_efficiency"),
            block_efficiency_stderr=data.get("block_efficiency_stderr"),
            tokens_per_s=data.get("tokens_per_s"),
            peak_memory_gb=data.get("peak_memory_gb"),
            verifier_ms_per_token=data.get("verifier_ms_per_token"),
            complete_block_efficiency=data.get("complete_block_efficiency"),
            depth=DepthSummary.from_dict(data),
            same_trees=SameTreeSummary.from_dict(same_trees) if same_trees else None,
            accuracy=data.get("accuracy"),
            accuracy_stderr=data.get("accuracy_stderr"),
            speedup_vs_autoregressive=data.get("speedup_vs_autoregressive"),
            speedup_vs_assisted=data.get("speedup_vs_assisted"),
        )


def as_row(row: SummaryRow | Mapping[str, Any]) -> SummaryRow:
    """A summary row read from its JSON form (a :class:`SummaryRow` is returned as it is)."""
    return row if isinstance(row, SummaryRow) else SummaryRow.from_dict(row)


#: Checks that estimate the standard error of their value: their JSON always carries "stderr" (null where
#: it cannot be estimated); the other checks carry none.
CHECKS_WITH_STDERR = frozenset(
    {
        "best_verifier",
        "other_draft_scheme",
        "best_verifier_same_trees",
        "block_gain_same_trees",
        "acceptance_vs_optimum",
    }
)


@dataclass
class Finding:
    """One check of the report (see :func:`.report.findings`).

    Attributes:
        check: what is checked ("gain_over_single", "best_verifier", ...).
        method: the row checked; against: the row or rule it is compared with (None: no comparison).
        value: the measured ratio or difference; stderr: its standard error (see :data:`CHECKS_WITH_STDERR`).
        passed: the verdict (None: the check reports a value only).
    """

    dataset: str
    temperature: float
    check: str
    method: str
    value: float
    against: str | None = None
    stderr: float | None = None
    passed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "temperature": self.temperature,
            "check": self.check,
            "method": self.method,
            **_present(against=self.against),
            "value": self.value,
            **({"stderr": self.stderr} if self.check in CHECKS_WITH_STDERR else {}),
            **_present(passed=self.passed),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(
            dataset=data["dataset"],
            temperature=data["temperature"],
            check=data["check"],
            method=data["method"],
            value=data["value"],
            against=data.get("against"),
            stderr=data.get("stderr"),
            passed=data.get("passed"),
        )


def as_finding(finding: Finding | Mapping[str, Any]) -> Finding:
    """A finding read from its JSON form (a :class:`Finding` is returned as it is)."""
    return finding if isinstance(finding, Finding) else Finding.from_dict(finding)


__all__ = [
    "BASELINE_VERIFIER",
    "BLOCK_VERIFIER",
    "CHECKS_WITH_STDERR",
    "FIRST_BRANCH_SINGLE",
    "METHOD_KINDS",
    "REFERENCE_VERIFIER",
    "DepthSummary",
    "Finding",
    "Grading",
    "Method",
    "MethodKind",
    "Record",
    "SameTreeCounts",
    "SameTreeSummary",
    "Setting",
    "SummaryRow",
    "Turn",
    "as_finding",
    "as_record",
    "as_row",
]
