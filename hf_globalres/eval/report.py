"""Summaries of a run: terminal table, JSON, CSV, PNG plots and a Markdown report.

One summary row per (dataset, temperature, method), aggregated over prompts:
block efficiency = Σ new tokens / Σ target forwards; tokens/s = Σ new tokens
/ Σ seconds; speedups divide tokens/s by the autoregressive row and by the
transformers assisted row of the same L; acceptance per depth and the
theoretical optimum come from the summed depth counts (see
:mod:`hf_globalres.eval.metrics` and docs/design.md §9). Rows of runs with
``same_trees`` carry each rule's expected tokens per block on that run's trees
and its paired difference to the run's own rule, with a standard error over
prompts. The plots' error bars are one standard error over prompts (block
efficiency: :func:`~.metrics.block_efficiency_stderr`; speedup:
:func:`~.metrics.speedup_stderr`). Every file is written atomically.

Inside, rows and findings are :class:`~.records.SummaryRow` and
:class:`~.records.Finding`; the public functions also take their JSON form
(dicts, as in summary.json) and :func:`summarize` and :func:`findings` return it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .datasets import MATH_SAMPLE, prompt_source
from .metrics import (
    DepthStats,
    answer_match,
    block_efficiency,
    block_efficiency_stderr,
    complete_block_efficiency,
    ratio_stderr,
    speedup,
    speedup_stderr,
    within_noise,
)
from .records import (
    BLOCK_VERIFIER,
    FIRST_BRANCH_SINGLE,
    DepthSummary,
    Finding,
    Record,
    SameTreeCounts,
    SameTreeSummary,
    Setting,
    SummaryRow,
    as_finding,
    as_record,
    as_row,
)
from .runner import EvalConfig, atomic_write

COLUMNS = (
    ("dataset", "dataset", "{}"),
    ("temperature", "T", "{:g}"),
    ("method", "method", "{}"),
    ("tokens_per_s", "tok/s", "{:.2f}"),
    ("speedup_vs_autoregressive", "vs AR", "{:.2f}x"),
    ("speedup_vs_assisted", "vs HF", "{:.2f}x"),
    ("prompts", "prompts", "{}"),
    ("new_tokens", "tokens", "{}"),
    ("block_efficiency", "blk eff", "{:.3f}"),
    ("block_efficiency_stderr", "± se", "{:.3f}"),
    ("complete_block_efficiency", "full blk", "{:.3f}"),
    ("acceptance", "accept", "{:.3f}"),
    ("optimal_acceptance", "optimum", "{:.3f}"),
    ("verifier_ms_per_token", "verif ms/tok", "{:.2f}"),
    ("accuracy", "GSM8K acc", "{:.3f}"),
    ("peak_memory_gb", "peak GB", "{:.2f}"),
)

RowLike = SummaryRow | Mapping[str, Any]
FindingLike = Finding | Mapping[str, Any]


# --- summary rows ---------------------------------------------------------------------------------------------------


def summary_rows(records: Iterable[Record | Mapping[str, Any]]) -> list[SummaryRow]:
    """One row per (dataset, temperature, method, setting), in the records' first-seen order.

    Records of one method made in different settings (a run resumed after a change of kernels) stay in
    separate rows, each compared with its own setting's baselines.
    """
    groups: dict[tuple[str, float, str, Setting], list[Record]] = defaultdict(list)
    for record in map(as_record, records):
        groups[(record.dataset, record.temperature, record.method.name, record.setting)].append(record)
    rows = [_row(group) for group in groups.values()]
    _add_speedups(rows)
    return rows


def summarize(records: Iterable[Record | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`summary_rows` in their JSON form (the ``rows`` of summary.json)."""
    return [row.to_dict() for row in summary_rows(records)]


def _row(group: list[Record]) -> SummaryRow:
    """The totals, rates and standard errors of one (dataset, temperature, method, setting) group of records."""
    first = group[0]
    tokens = [r.new_tokens for r in group]
    forwards = [r.target_forwards for r in group]
    seconds = sum(r.seconds for r in group)
    verifier_seconds = [r.verifier_seconds for r in group if r.verifier_seconds is not None]
    blocks = [t.accepted_lengths for r in group for t in r.turns if t.accepted_lengths]
    scored = [r.same_trees for r in group if r.same_trees is not None]
    row = SummaryRow(
        dataset=first.dataset,
        temperature=first.temperature,
        method=first.method,
        setting=first.setting,
        prompts=len(group),
        new_tokens=sum(tokens),
        target_forwards=sum(forwards),
        seconds=seconds,
        block_efficiency=block_efficiency(tokens, forwards),
        block_efficiency_stderr=block_efficiency_stderr(tokens, forwards),
        tokens_per_s=sum(tokens) / seconds if seconds > 0 else None,
        tokens_per_s_stderr=ratio_stderr(tokens, [r.seconds for r in group]) if seconds > 0 else None,
        peak_memory_gb=max((r.peak_memory_gb or 0.0 for r in group), default=0.0) or None,
        verifier_ms_per_token=1e3 * sum(verifier_seconds) / sum(tokens) if verifier_seconds and sum(tokens) else None,
        complete_block_efficiency=complete_block_efficiency(blocks) if blocks else None,
        depth=_depth_summary(group),
        same_trees=_same_trees(scored, first.method.verifier) if scored else None,
    )
    if all(r.grading is not None for r in group):
        texts = [r.texts[-1] for r in group]
        match = answer_match(texts, [f"#### {r.grading.reference}" for r in group if r.grading is not None])
        row.accuracy, row.accuracy_stderr = match["accuracy"], match["stderr"]
    return row


def _depth_summary(group: list[Record]) -> DepthSummary | None:
    """Acceptance from the depth counts summed over the group (None when no record measured any)."""
    counts = [r.depth for r in group if r.depth is not None]
    if not counts:
        return None
    stats = DepthStats()
    for depth in counts:
        stats.merge(depth)
    return DepthSummary.from_stats(stats)


def _same_trees(scored: list[SameTreeCounts], own: str | None) -> SameTreeSummary:
    """Expected tokens per block of each rule on the same trees, and ``own`` minus each, with SEs over prompts."""
    blocks = [s.blocks for s in scored]
    rules = [name for name in scored[0].tokens if all(name in s.tokens for s in scored)]
    per_block = {name: sum(s.tokens[name] for s in scored) / sum(blocks) for name in rules}
    difference, stderr = {}, {}
    for name in rules:
        if name == own or own is None:
            continue
        gaps = [s.tokens[own] - s.tokens[name] for s in scored]
        difference[name] = sum(gaps) / sum(blocks)
        stderr[name] = ratio_stderr(gaps, blocks)
    return SameTreeSummary(len(scored), sum(blocks), per_block, difference, stderr)


def _add_speedups(rows: list[SummaryRow]) -> None:
    """Each row's tokens/s over its setting's autoregressive row and over the assisted row of its L."""
    autoregressive = {(r.dataset, r.temperature): r for r in rows if r.method.kind == "autoregressive"}
    assisted = {(r.dataset, r.temperature, r.method.length): r for r in rows if r.method.kind == "assisted"}
    for row in rows:
        base = autoregressive.get((row.dataset, row.temperature))
        helper = assisted.get((row.dataset, row.temperature, row.method.length))
        row.speedup_vs_autoregressive = speedup(row.tokens_per_s, base.tokens_per_s if base else None)
        if base is not None:
            row.speedup_vs_autoregressive_stderr = speedup_stderr(
                row.tokens_per_s, row.tokens_per_s_stderr, base.tokens_per_s, base.tokens_per_s_stderr
            )
        if row.method.kind != "assisted":
            row.speedup_vs_assisted = speedup(row.tokens_per_s, helper.tokens_per_s if helper else None)


# --- findings -------------------------------------------------------------------------------------------------------


class _Where(NamedTuple):
    dataset: str
    temperature: float


def check_rows(rows: Sequence[SummaryRow]) -> list[Finding]:
    """The checks the suite exists for, per dataset and temperature, as :class:`~.records.Finding`.

    For every multi-draft row, in this order:

    1. ``gain_over_single``: block efficiency (n > 1) over ``single`` (n = 1) at the same L,
       also on complete blocks (``gain_over_single_complete_blocks``);
    2. ``best_verifier``: whether ``optimal`` has the highest block efficiency among the
       verifiers of its draft scheme (i.i.d. drafts) at its n and L (the difference to the
       best rival, with the standard error of that difference over prompts), ``optimal_block``
       (which spends ``optimal``'s acceptance for longer blocks) left out;
       ``other_draft_scheme``: the same difference to the best verifier that drafts otherwise
       (without replacement), with no verdict: those rules see other drafts, whose optimum
       ``α*_wor`` is not ``α*``;
    3. ``best_verifier_same_trees`` (runs with ``same_trees``): ``optimal``'s expected tokens
       per block minus the best other rule's on the same trees, with the paired standard
       error (``optimal_block`` left out); ``block_gain_same_trees``: ``optimal_block``'s minus
       ``optimal``'s, with no verdict; ``gain_over_single_same_trees``: ``optimal``'s ratio to
       ``single`` on each tree's first branch;
    4. ``acceptance_vs_optimum``: measured acceptance over the theoretical optimum on the same
       positions (the floor for ``optimal``: within 2 %), with a bound on its standard error.

    Then, per setting: ``accuracy_within_noise``, each method's GSM8K accuracy against
    autoregressive (two standard errors of the difference).
    """
    groups: dict[_Where, list[SummaryRow]] = defaultdict(list)
    for row in rows:
        groups[_Where(row.dataset, row.temperature)].append(row)
    out: list[Finding] = []
    for where, group in groups.items():
        for row in group:
            if row.method.kind == "multidraft":
                out += _gain_over_single(where, row, group)
                out += _best_verifier(where, row, group)
                out += _same_tree_findings(where, row)
                out += _acceptance_vs_optimum(where, row)
        out += _accuracy_within_noise(where, group)
    return out


def findings(rows: Iterable[RowLike]) -> list[dict[str, Any]]:
    """:func:`check_rows` in their JSON form (the ``findings`` of summary.json)."""
    return [finding.to_dict() for finding in check_rows([as_row(row) for row in rows])]


def _finding(where: _Where, check: str, row: SummaryRow, value: float, **extra: Any) -> Finding:
    return Finding(where.dataset, where.temperature, check, row.method.name, value, **extra)


def _gain_over_single(where: _Where, row: SummaryRow, group: list[SummaryRow]) -> list[Finding]:
    """Step 1 of :func:`check_rows`."""
    length = row.method.length
    single = next((r for r in group if r.method.is_baseline_rule and r.method.length == length), None)
    if single is None or row.method.num_drafts <= 1:
        return []
    against = single.method.name
    out = [_finding(where, "gain_over_single", row, row.block_efficiency / single.block_efficiency, against=against)]
    if row.complete_block_efficiency and single.complete_block_efficiency:
        gain = row.complete_block_efficiency / single.complete_block_efficiency
        out.append(_finding(where, "gain_over_single_complete_blocks", row, gain, against=against))
    return out


def _best_verifier(where: _Where, row: SummaryRow, group: list[SummaryRow]) -> list[Finding]:
    """Step 2 of :func:`check_rows`: ``optimal`` against the best rival of its own and of the other draft scheme."""
    method = row.method
    if not method.is_reference_rule:
        return []
    rivals = [
        r
        for r in group
        if r.method.kind == "multidraft"
        and (r.method.num_drafts, r.method.length) == (method.num_drafts, method.length)
        and r is not row
        and r.method.verifier != BLOCK_VERIFIER
    ]
    out = []
    for check, scheme_rivals in (
        ("best_verifier", [r for r in rivals if r.method.draft_scheme == method.draft_scheme]),
        ("other_draft_scheme", [r for r in rivals if r.method.draft_scheme != method.draft_scheme]),
    ):
        if not scheme_rivals:
            continue
        best = max(scheme_rivals, key=lambda r: r.block_efficiency)
        errors = [row.block_efficiency_stderr, best.block_efficiency_stderr]
        stderr = math.hypot(*errors) if None not in errors else None
        passed = row.block_efficiency >= best.block_efficiency if check == "best_verifier" else None
        value = row.block_efficiency - best.block_efficiency
        out.append(_finding(where, check, row, value, against=best.method.name, stderr=stderr, passed=passed))
    return out


def _same_tree_findings(where: _Where, row: SummaryRow) -> list[Finding]:
    """Step 3 of :func:`check_rows`: ``optimal`` against the other rules on its own draft trees."""
    same = row.same_trees
    if same is None or not row.method.is_reference_rule:
        return []
    out = []
    rivals = [name for name in same.difference if name not in (FIRST_BRANCH_SINGLE, BLOCK_VERIFIER)]
    if rivals:
        best = min(rivals, key=lambda name: same.difference[name])
        gap, stderr = same.difference[best], same.difference_stderr[best]
        out.append(_finding(where, "best_verifier_same_trees", row, gap, against=best, stderr=stderr, passed=gap >= 0))
    if BLOCK_VERIFIER in same.difference:
        gain, stderr = -same.difference[BLOCK_VERIFIER], same.difference_stderr[BLOCK_VERIFIER]
        out.append(_finding(where, "block_gain_same_trees", row, gain, against=BLOCK_VERIFIER, stderr=stderr))
    if FIRST_BRANCH_SINGLE in same.tokens_per_block and row.method.verifier is not None:
        gain = same.tokens_per_block[row.method.verifier] / same.tokens_per_block[FIRST_BRANCH_SINGLE]
        out.append(_finding(where, "gain_over_single_same_trees", row, gain, against=FIRST_BRANCH_SINGLE))
    return out


def _acceptance_vs_optimum(where: _Where, row: SummaryRow) -> list[Finding]:
    """Step 4 of :func:`check_rows`."""
    if row.depth is None or row.depth.ratio_to_optimal is None:
        return []
    ratio, stderr = row.depth.ratio_to_optimal, row.depth.ratio_to_optimal_stderr
    return [_finding(where, "acceptance_vs_optimum", row, ratio, stderr=stderr)]


def _accuracy_within_noise(where: _Where, group: list[SummaryRow]) -> list[Finding]:
    """The last check of :func:`check_rows`: every graded row's accuracy against the autoregressive row's."""
    base = next((r for r in group if r.method.kind == "autoregressive" and r.accuracy is not None), None)
    if base is None or base.accuracy is None:
        return []
    out = []
    for row in group:
        if row is not base and row.accuracy is not None:
            passed = within_noise(row.accuracy, row.prompts, base.accuracy, base.prompts)
            value = row.accuracy - base.accuracy
            out.append(_finding(where, "accuracy_within_noise", row, value, against=base.method.name, passed=passed))
    return out


# --- text -----------------------------------------------------------------------------------------------------------


def format_same_trees(rows: Iterable[RowLike]) -> str:
    """Markdown table of the ``same_trees`` scores: each rule next to the run's own, paired differences."""
    lines = [
        "| dataset | T | run | prompts | blocks | rule | tokens per block | run − rule | ± se |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in map(as_row, rows):
        same = row.same_trees
        if same is None:
            continue
        ranked = sorted(same.tokens_per_block.items(), key=lambda item: -item[1])
        for name, value in ranked:
            cells = [
                row.dataset,
                f"{row.temperature:g}",
                row.method.name,
                str(same.prompts),
                str(same.blocks),
                name,
                f"{value:.4f}",
                _cell(same.difference.get(name), "{:+.4f}"),
                _cell(same.difference_stderr.get(name), "{:.4f}"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_setting(rows: Iterable[RowLike]) -> str:
    """One line naming the device and dtype the rows ran in (each distinct setting, if they differ)."""
    seen = {as_row(row).setting for row in rows}
    if not seen or seen == {Setting()}:
        return "setting: not recorded"
    ordered = sorted(seen, key=lambda s: str((s.device, s.dtype, s.onednn_linear, s.packed_rows)))
    parts = [f"{s.device}, {s.dtype}" + _linears(s) for s in ordered]
    return "ran on " + "; ".join(parts)


def _linears(setting: Setting) -> str:
    if not setting.onednn_linear:
        return ""
    return ", oneDNN linears" + (f" packed for {setting.packed_rows} rows" if setting.packed_rows else "")


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def _json_row(row: RowLike) -> Mapping[str, Any]:
    return row.to_dict() if isinstance(row, SummaryRow) else row


def format_table(rows: Iterable[RowLike], markdown: bool = False) -> str:
    """The headline table: aligned text for the terminal, or a Markdown table."""
    header = [label for _, label, _ in COLUMNS]
    body = [[_cell(data.get(key), fmt) for key, _, fmt in COLUMNS] for data in map(_json_row, rows)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(h), *(len(cells[i]) for cells in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(lines)


def format_findings(items: Iterable[FindingLike]) -> str:
    """One line per check; accuracy checks fold into one line per setting (failures named)."""
    lines = []
    accuracy: dict[str, list[Finding]] = defaultdict(list)
    for f in map(as_finding, items):
        where = f"{f.dataset} T={f.temperature:g}"
        if f.check == "accuracy_within_noise":
            accuracy[where].append(f)
            continue
        against = f" vs {f.against}" if f.against is not None else ""
        verdict = "" if f.passed is None else ("  [ok]" if f.passed else "  [FAILED]")
        error = f" ± {f.stderr:.4f}" if f.stderr is not None else ""
        if f.passed is False and f.stderr is not None and f.value >= -2 * f.stderr:
            verdict = "  [below, within 2 standard errors]"
        lines.append(f"- {where}: {f.check} of {f.method}{against}: {f.value:.4f}{error}{verdict}")
    for where, checks in accuracy.items():
        failed = [f"{f.method} ({f.value:+.3f})" for f in checks if not f.passed]
        line = f"- {where}: GSM8K accuracy within noise of autoregressive for {len(checks) - len(failed)}/{len(checks)}"
        lines.append(line + (f"; outside: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: ";".join(_cell(v, "{:.6g}") for v in row[k]) if isinstance(row.get(k), list) else row.get(k)
                for k in keys
            }
        )
    return buffer.getvalue()


# --- plots ----------------------------------------------------------------------------------------------------------

_Setting = tuple[str, float]


def _nan(value: float | None) -> float:
    """Matplotlib draws nothing at NaN: a missing value or standard error."""
    return math.nan if value is None else value


def _label_points(ax: Any, xs: Sequence[float], ys: Sequence[float | None], fmt: str = "{:.2f}") -> None:
    for x, y in zip(xs, ys, strict=True):
        if y is not None and not math.isnan(y):
            ax.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=6)


def _integer_ticks(axis: Any) -> None:
    """Ticks on whole numbers only (n, depth), even when the axis spans a single one."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def draw_block_efficiency(ax: Any, rows: Sequence[SummaryRow], setting: _Setting) -> None:
    """Block efficiency against n, one line per (verifier, L), ± one standard error; assisted rows as levels."""
    here = [r for r in rows if (r.dataset, r.temperature) == setting]
    lines: dict[tuple[str, int], list[tuple[int, float, float]]] = defaultdict(list)
    baseline: set[tuple[str, int]] = set()
    for r in here:
        if r.method.kind == "multidraft" and r.method.verifier is not None:
            key = (r.method.verifier, r.method.length)
            lines[key].append((r.method.num_drafts, _nan(r.block_efficiency), _nan(r.block_efficiency_stderr)))
            if r.method.is_baseline_rule:
                baseline.add(key)
    for (verifier, length), own in sorted(lines.items()):
        points = own
        # With one draft every rule is the single-draft rule: its n = 1 point starts each line.
        if (verifier, length) not in baseline and all(n != 1 for n, _, _ in own):
            points = own + [p for key in baseline if key[1] == length for p in lines[key] if p[0] == 1]
        points = sorted(points, key=lambda p: p[:2])
        xs, ys, errors = ([p[i] for p in points] for i in range(3))
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{verifier} L={length}")
        _label_points(ax, [p[0] for p in own], [p[1] for p in own])  # a borrowed n = 1 point keeps its own label
    _integer_ticks(ax.xaxis)
    for r in here:
        if r.method.kind == "assisted" and r.block_efficiency is not None:
            ax.axhline(r.block_efficiency, linestyle="--", color="gray", linewidth=1)
            ax.annotate(r.method.name, (ax.get_xlim()[0], r.block_efficiency), fontsize=7, color="gray")
    dataset, temperature = setting
    ax.set(title=f"{dataset}, T={temperature:g}", xlabel="drafts n", ylabel="tokens per target forward")
    ax.legend(fontsize=7)


def draw_speedup(ax: Any, rows: Sequence[SummaryRow], settings: Sequence[_Setting]) -> None:
    """Speedup over autoregressive per method, one bar group per setting, ± one standard error, values on bars."""
    methods = list(dict.fromkeys(r.method.name for r in rows))
    width = 0.8 / max(len(settings), 1)
    for i, (dataset, temperature) in enumerate(settings):
        here = {r.method.name: r for r in rows if (r.dataset, r.temperature) == (dataset, temperature)}
        values = [here[m].speedup_vs_autoregressive if m in here else None for m in methods]
        errors = [here[m].speedup_vs_autoregressive_stderr if m in here else None for m in methods]
        bars = ax.bar(
            [j + i * width for j in range(len(methods))],
            [value or 0.0 for value in values],
            width,
            yerr=[_nan(e) for e in errors] if any(e is not None for e in errors) else None,
            capsize=3,
            label=f"{dataset} T={temperature:g}",
        )
        ax.bar_label(bars, labels=["" if value is None else f"{value:.2f}" for value in values], fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set(ylabel="speedup over autoregressive (tokens/s)")
    ax.legend(fontsize=7)


def draw_acceptance(ax: Any, rows: Sequence[SummaryRow], setting: _Setting) -> None:
    """Measured acceptance per tree depth (values on the points) next to the optimum on the same positions."""
    for r in rows:
        if (r.dataset, r.temperature) != setting or r.depth is None:
            continue
        depths = list(range(1, len(r.depth.per_depth) + 1))
        (line,) = ax.plot(depths, r.depth.per_depth, marker="o", label=f"{r.method.name} measured")
        ax.plot(
            depths, r.depth.optimal_per_depth, linestyle="--", color=line.get_color(), label=f"{r.method.name} optimum"
        )
        _label_points(ax, depths, r.depth.per_depth)
    _integer_ticks(ax.xaxis)
    dataset, temperature = setting
    ax.set(title=f"{dataset}, T={temperature:g}", xlabel="tree depth", ylabel="acceptance", ylim=(0, 1.02))
    ax.legend(fontsize=6)


def _panels(settings: Sequence[_Setting], draw: Callable[[Any, _Setting], None]) -> Any:
    """One figure with a panel per setting, each drawn by ``draw(ax, setting)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(settings), 4))
    for ax, setting in zip(fig.subplots(1, len(settings), squeeze=False)[0], settings, strict=True):
        draw(ax, setting)
    return fig


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())
    return path


def plot(rows: Iterable[RowLike], directory: Path) -> list[Path]:
    """PNG plots: block efficiency vs n per verifier, speedup per method and dataset, acceptance per depth."""
    from matplotlib.figure import Figure

    typed = [as_row(row) for row in rows]
    settings = list(dict.fromkeys((r.dataset, r.temperature) for r in typed))
    multi = [r for r in typed if r.method.kind == "multidraft"]
    with_speed = [r for r in typed if r.speedup_vs_autoregressive is not None and r.method.kind != "autoregressive"]
    with_depth = [r for r in multi if r.depth is not None and r.depth.per_depth]
    written: list[Path] = []
    if multi:
        fig = _panels(settings, lambda ax, setting: draw_block_efficiency(ax, typed, setting))
        written.append(_save(fig, directory / "block_efficiency_vs_n.png"))
    if with_speed:
        methods = len({r.method.name for r in with_speed})
        fig = Figure(figsize=(max(6, 0.8 * methods * len(settings)), 4))
        draw_speedup(fig.subplots(), with_speed, settings)
        written.append(_save(fig, directory / "speedup.png"))
    if with_depth:
        fig = _panels(settings, lambda ax, setting: draw_acceptance(ax, with_depth, setting))
        written.append(_save(fig, directory / "acceptance_per_depth.png"))
    return written


# --- files ----------------------------------------------------------------------------------------------------------


def prompt_sources_note(records: Iterable[Record]) -> str | None:
    """A line for report.md when GSM8K's prompts came from the package's own math sample (offline fallback)."""
    sample = {r.prompt for r in records if prompt_source(r.dataset, r.prompt) == MATH_SAMPLE}
    if not sample:
        return None
    return (
        f"The gsm8k rows ran on {len(sample)} problems of the package's embedded math sample (GSM8K could not be "
        "reached), not on GSM8K: pass --gsm8k-path or set HF_GLOBALRES_GSM8K for GSM8K itself."
    )


def _markdown(
    config: EvalConfig, rows: list[SummaryRow], checks: list[Finding], images: list[Path], note: str | None = None
) -> str:
    """report.md: the setting, the headline table, the findings, the same-tree table and the plots."""
    lines = [
        f"# Evaluation: {config.run_name}",
        "",
        f"Target `{config.target}`, draft `{config.draft}`, datasets {', '.join(config.datasets)}, "
        f"at most {config.limit or 'all'} prompts each, up to {config.max_new_tokens} new tokens per turn, "
        f"seed {config.seed}; {describe_setting(rows)}.",
        "Block efficiency is new tokens per target forward (full blk: mean tokens per block, each generation's",
        "last block, usually cut by the token limit, left out); acceptance is per verified position, next to the",
        "theoretical optimum for the same q, p and number of drafts. Speedups compare tokens/s.",
        "",
        *([note, ""] if note else []),
        format_table(rows, markdown=True),
        "",
    ]
    if checks:
        lines += ["## Findings", "", format_findings(checks), ""]
    if any(row.same_trees is not None for row in rows):
        lines += [
            "## Same draft trees",
            "",
            "Each rule's exact expected tokens per block on the draft trees and target laws of the run's own",
            "blocks (its sampling noise integrated out), and the run's rule minus it, with the standard error",
            "over prompts of that paired difference. `single (first branch)` scores each tree's first branch,",
            "which is drafted exactly as a single-draft chain.",
            "",
            format_same_trees(rows),
            "",
        ]
    for image in images:
        lines += [f"![{image.stem}]({image.name})", ""]
    return "\n".join(lines)


def write_report(
    config: EvalConfig, records: Iterable[Record | Mapping[str, Any]], directory: Path | None = None
) -> dict[str, Any]:
    """Write summary.json, summary.csv, the PNG plots and report.md; return the summary (JSON form)."""
    directory = Path(directory) if directory is not None else config.run_dir()
    records = [as_record(record) for record in records]
    rows = summary_rows(records)
    checks = check_rows(rows)
    row_data = [row.to_dict() for row in rows]
    summary = {"config": config.to_dict(), "rows": row_data, "findings": [f.to_dict() for f in checks]}
    atomic_write(directory / "summary.json", json.dumps(summary, indent=2))
    atomic_write(directory / "summary.csv", _csv(row_data))
    images = plot(rows, directory) if rows else []
    atomic_write(directory / "report.md", _markdown(config, rows, checks, images, prompt_sources_note(records)))
    return summary


__all__ = [
    "check_rows",
    "describe_setting",
    "draw_acceptance",
    "draw_block_efficiency",
    "draw_speedup",
    "findings",
    "format_findings",
    "format_same_trees",
    "format_table",
    "plot",
    "summarize",
    "summary_rows",
    "write_report",
]
