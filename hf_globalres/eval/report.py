"""Summaries of a run: terminal table, JSON, CSV, PNG plots and a Markdown report.

One summary row per (dataset, temperature, method), aggregated over prompts:
block efficiency = Σ new tokens / Σ target forwards; tokens/s = Σ new tokens
/ Σ seconds; speedups divide tokens/s by the autoregressive row and by the
transformers assisted row of the same L; acceptance per depth and the
theoretical optimum come from the summed depth counts (see
:mod:`hf_globalres.eval.metrics`). Rows of runs with ``same_trees`` carry
each rule's expected tokens per block on that run's trees and its paired
difference to the run's own rule, with a standard error over prompts. Every
file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .. import verifiers
from .metrics import (
    DepthStats,
    answer_match,
    block_efficiency,
    block_efficiency_stderr,
    complete_block_efficiency,
    ratio_stderr,
    speedup,
    within_noise,
)
from .runner import BASELINE_VERIFIER, FIRST_BRANCH_SINGLE, REFERENCE_VERIFIER, EvalConfig, atomic_write

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


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, temperature, method), in the records' first-seen order."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["dataset"], record["temperature"], record["method"])].append(record)
    rows = [_row(group) for group in groups.values()]
    by_key = {(r["dataset"], r["temperature"], r["method"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["dataset"], row["temperature"], "autoregressive"))
        assisted = by_key.get((row["dataset"], row["temperature"], f"hf-assisted L={row['length']}"))
        row["speedup_vs_autoregressive"] = speedup(row["tokens_per_s"], base and base["tokens_per_s"])
        row["speedup_vs_assisted"] = (
            speedup(row["tokens_per_s"], assisted and assisted["tokens_per_s"]) if row["kind"] != "assisted" else None
        )
    return rows


def _row(group: list[dict[str, Any]]) -> dict[str, Any]:
    first = group[0]
    tokens = [r["new_tokens"] for r in group]
    seconds = sum(r["seconds"] for r in group)
    row: dict[str, Any] = {
        key: first[key] for key in ("dataset", "temperature", "method", "kind", "verifier", "num_drafts", "length")
    }
    # Records written before the setting was recorded carry none of it.
    row.update((key, first[key]) for key in SETTING_KEYS if key in first)
    row.update(
        prompts=len(group),
        new_tokens=sum(tokens),
        target_forwards=sum(r["target_forwards"] for r in group),
        seconds=seconds,
        block_efficiency=block_efficiency(tokens, [r["target_forwards"] for r in group]),
        block_efficiency_stderr=block_efficiency_stderr(tokens, [r["target_forwards"] for r in group]),
        tokens_per_s=sum(tokens) / seconds if seconds > 0 else None,
        peak_memory_gb=max((r["peak_memory_gb"] or 0.0 for r in group), default=0.0) or None,
    )
    verifier_seconds = [r["verifier_seconds"] for r in group if r.get("verifier_seconds") is not None]
    row["verifier_ms_per_token"] = (
        1e3 * sum(verifier_seconds) / sum(tokens) if verifier_seconds and sum(tokens) else None
    )
    blocks = [t["accepted_lengths"] for r in group for t in r["turns"] if t.get("accepted_lengths")]
    row["complete_block_efficiency"] = complete_block_efficiency(blocks) if blocks else None
    depth = [r["depth"] for r in group if r.get("depth")]
    if depth:
        stats = DepthStats()
        for counts in depth:
            stats.merge(counts)
        summary = stats.summary()
        row.update(
            acceptance=summary["acceptance"],
            optimal_acceptance=summary["optimal"],
            single_acceptance=summary["single"],
            ratio_to_optimal=summary["ratio_to_optimal"],
            ratio_to_optimal_stderr=summary["ratio_to_optimal_stderr"],
            acceptance_per_depth=summary["per_depth"],
            optimal_per_depth=summary["optimal_per_depth"],
            rows_per_depth=summary["rows_per_depth"],
        )
    scored = [r["same_trees"] for r in group if r.get("same_trees")]
    if scored:
        row["same_trees"] = _same_trees(scored, first["verifier"])
    if all("correct" in r for r in group):
        match = answer_match([r["texts"][-1] for r in group], [f"#### {r['reference']}" for r in group])
        row.update(accuracy=match["accuracy"], accuracy_stderr=match["stderr"])
    return row


def _same_trees(scored: list[dict[str, Any]], own: str) -> dict[str, Any]:
    """Expected tokens per block of each rule on the same trees, and ``own`` minus each, with SEs over prompts."""
    blocks = [s["blocks"] for s in scored]
    rules = [name for name in scored[0]["tokens"] if all(name in s["tokens"] for s in scored)]
    per_block = {name: sum(s["tokens"][name] for s in scored) / sum(blocks) for name in rules}
    difference, stderr = {}, {}
    for name in rules:
        if name == own:
            continue
        gaps = [s["tokens"][own] - s["tokens"][name] for s in scored]
        difference[name] = sum(gaps) / sum(blocks)
        stderr[name] = ratio_stderr(gaps, blocks)
    return {
        "prompts": len(scored),
        "blocks": sum(blocks),
        "tokens_per_block": per_block,
        "difference": difference,
        "difference_stderr": stderr,
    }


def findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks the suite exists for, per dataset and temperature, as data.

    - ``gain_over_single``: block efficiency of each multi-draft row (n > 1)
      over ``single`` (n = 1) at the same L, also on complete blocks;
    - ``best_verifier``: whether ``optimal`` has the highest block efficiency
      among the verifiers of its draft scheme (i.i.d. drafts) at its n and L
      (the difference to the best rival, with the standard error of that
      difference over prompts);
    - ``other_draft_scheme``: the same difference to the best verifier that
      drafts otherwise (without replacement), with no verdict: those rules
      see other drafts, whose optimum ``α*_wor`` is not ``α*``;
    - ``best_verifier_same_trees`` (runs with ``same_trees``): ``optimal``'s
      expected tokens per block minus the best other rule's on the same
      trees, with the paired standard error; ``gain_over_single_same_trees``:
      its ratio to ``single`` on each tree's first branch;
    - ``acceptance_vs_optimum``: measured acceptance of each multi-draft row
      over the theoretical optimum on the same positions (the floor for
      ``optimal``: within 2 %), with a bound on its standard error;
    - ``accuracy_within_noise``: each method's GSM8K accuracy against
      autoregressive (two standard errors of the difference).
    """
    out: list[dict[str, Any]] = []
    by_setting: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_setting[(row["dataset"], row["temperature"])].append(row)
    for (dataset, temperature), group in by_setting.items():
        where = {"dataset": dataset, "temperature": temperature}
        for row in group:
            if row["kind"] != "multidraft":
                continue
            n, L = row["num_drafts"], row["length"]
            single = next((r for r in group if r["verifier"] == BASELINE_VERIFIER and r["length"] == L), None)
            if single is not None and n > 1:
                out.append(
                    {
                        **where,
                        "check": "gain_over_single",
                        "method": row["method"],
                        "against": single["method"],
                        "value": row["block_efficiency"] / single["block_efficiency"],
                    }
                )
                if row.get("complete_block_efficiency") and single.get("complete_block_efficiency"):
                    out.append(
                        {
                            **where,
                            "check": "gain_over_single_complete_blocks",
                            "method": row["method"],
                            "against": single["method"],
                            "value": row["complete_block_efficiency"] / single["complete_block_efficiency"],
                        }
                    )
            rivals = [
                r
                for r in group
                if r["kind"] == "multidraft" and r["num_drafts"] == n and r["length"] == L and r is not row
            ]
            if rivals and row["verifier"] == REFERENCE_VERIFIER:
                scheme = _draft_scheme(row["verifier"])
                for check, scheme_rivals in (
                    ("best_verifier", [r for r in rivals if _draft_scheme(r["verifier"]) == scheme]),
                    ("other_draft_scheme", [r for r in rivals if _draft_scheme(r["verifier"]) != scheme]),
                ):
                    if not scheme_rivals:
                        continue
                    best = max(scheme_rivals, key=lambda r: r["block_efficiency"])
                    errors = [r.get("block_efficiency_stderr") for r in (row, best)]
                    finding = {
                        **where,
                        "check": check,
                        "method": row["method"],
                        "against": best["method"],
                        "value": row["block_efficiency"] - best["block_efficiency"],
                        "stderr": math.hypot(*errors) if None not in errors else None,
                    }
                    if check == "best_verifier":
                        finding["passed"] = row["block_efficiency"] >= best["block_efficiency"]
                    out.append(finding)
            if row.get("same_trees") and row["verifier"] == REFERENCE_VERIFIER:
                out += _same_tree_findings(row, where)
            if row.get("ratio_to_optimal") is not None:
                out.append(
                    {
                        **where,
                        "check": "acceptance_vs_optimum",
                        "method": row["method"],
                        "value": row["ratio_to_optimal"],
                        "stderr": row.get("ratio_to_optimal_stderr"),
                    }
                )
        base = next((r for r in group if r["kind"] == "autoregressive" and "accuracy" in r), None)
        for row in group:
            if base is not None and row is not base and "accuracy" in row:
                out.append(
                    {
                        **where,
                        "check": "accuracy_within_noise",
                        "method": row["method"],
                        "against": base["method"],
                        "value": row["accuracy"] - base["accuracy"],
                        "passed": within_noise(row["accuracy"], row["prompts"], base["accuracy"], base["prompts"]),
                    }
                )
    return out


def _same_tree_findings(row: dict[str, Any], where: dict[str, Any]) -> list[dict[str, Any]]:
    same = row["same_trees"]
    out = []
    rivals = [name for name in same["difference"] if name != FIRST_BRANCH_SINGLE]
    if rivals:
        best = min(rivals, key=lambda name: same["difference"][name])
        out.append(
            {
                **where,
                "check": "best_verifier_same_trees",
                "method": row["method"],
                "against": best,
                "value": same["difference"][best],
                "stderr": same["difference_stderr"][best],
                "passed": same["difference"][best] >= 0,
            }
        )
    if FIRST_BRANCH_SINGLE in same["tokens_per_block"]:
        out.append(
            {
                **where,
                "check": "gain_over_single_same_trees",
                "method": row["method"],
                "against": FIRST_BRANCH_SINGLE,
                "value": same["tokens_per_block"][row["verifier"]] / same["tokens_per_block"][FIRST_BRANCH_SINGLE],
            }
        )
    return out


def format_same_trees(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the ``same_trees`` scores: each rule next to the run's own, paired differences."""
    lines = [
        "| dataset | T | run | prompts | blocks | rule | tokens per block | run − rule | ± se |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = row.get("same_trees")
        if not same:
            continue
        ranked = sorted(same["tokens_per_block"].items(), key=lambda item: -item[1])
        for name, value in ranked:
            cells = [
                row["dataset"],
                f"{row['temperature']:g}",
                row["method"],
                str(same["prompts"]),
                str(same["blocks"]),
                name,
                f"{value:.4f}",
                _cell(same["difference"].get(name), "{:+.4f}"),
                _cell(same["difference_stderr"].get(name), "{:.4f}"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _draft_scheme(verifier: str) -> str:
    """The draft scheme of a registered verifier; names the registry does not know count as i.i.d."""
    return verifiers.get(verifier).draft_scheme if verifier in verifiers.available() else "iid"


#: What ran, recorded with every result: the models' device, dtype and whether oneDNN ran their linears.
SETTING_KEYS = ("device", "dtype", "onednn_linear")


def describe_setting(rows: list[dict[str, Any]]) -> str:
    """One line naming the device and dtype the rows ran in (each distinct setting, if they differ)."""
    seen = {tuple(row.get(key) for key in SETTING_KEYS) for row in rows}
    if not seen or seen == {(None, None, None)}:
        return "setting: not recorded"
    parts = [
        f"{device}, {dtype}" + (", oneDNN linears" if onednn else "") for device, dtype, onednn in sorted(seen, key=str)
    ]
    return "ran on " + "; ".join(parts)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The headline table: aligned text for the terminal, or a Markdown table."""
    header = [label for _, label, _ in COLUMNS]
    body = [[_cell(row.get(key), fmt) for key, _, fmt in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(h), *(len(cells[i]) for cells in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(lines)


def format_findings(items: list[dict[str, Any]]) -> str:
    """One line per check; accuracy checks fold into one line per setting (failures named)."""
    lines = []
    accuracy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in items:
        where = f"{f['dataset']} T={f['temperature']:g}"
        if f["check"] == "accuracy_within_noise":
            accuracy[where].append(f)
            continue
        against = f" vs {f['against']}" if "against" in f else ""
        verdict = "" if "passed" not in f else ("  [ok]" if f["passed"] else "  [FAILED]")
        error = f" ± {f['stderr']:.4f}" if f.get("stderr") is not None else ""
        if not f.get("passed", True) and f.get("stderr") is not None and f["value"] >= -2 * f["stderr"]:
            verdict = "  [below, within 2 standard errors]"
        lines.append(f"- {where}: {f['check']} of {f['method']}{against}: {f['value']:.4f}{error}{verdict}")
    for where, checks in accuracy.items():
        failed = [f"{f['method']} ({f['value']:+.3f})" for f in checks if not f["passed"]]
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


def plot(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """PNG plots: block efficiency vs n per verifier, speedup per method and dataset, acceptance per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        atomic_write(directory / name, buffer.getvalue())
        written.append(directory / name)

    settings = list(dict.fromkeys((r["dataset"], r["temperature"]) for r in rows))
    multi = [r for r in rows if r["kind"] == "multidraft"]
    if multi:
        fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
        for ax, (dataset, temperature) in zip(axes[0], settings, strict=True):
            lines = defaultdict(list)
            for r in multi:
                if (r["dataset"], r["temperature"]) == (dataset, temperature):
                    lines[(r["verifier"], r["length"])].append((r["num_drafts"], r["block_efficiency"]))
            for (verifier, L), points in sorted(lines.items()):
                single = lines.get((BASELINE_VERIFIER, L), [])
                # With one draft every rule is the single-draft rule: its n = 1 point starts each line.
                if verifier != BASELINE_VERIFIER and all(n != 1 for n, _ in points):
                    points = points + [p for p in single if p[0] == 1]
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{verifier} L={L}")
            ax.xaxis.get_major_locator().set_params(integer=True)
            for r in rows:
                if r["kind"] == "assisted" and (r["dataset"], r["temperature"]) == (dataset, temperature):
                    ax.axhline(r["block_efficiency"], linestyle="--", color="gray", linewidth=1)
                    ax.annotate(r["method"], (ax.get_xlim()[0], r["block_efficiency"]), fontsize=7, color="gray")
            ax.set(title=f"{dataset}, T={temperature:g}", xlabel="drafts n", ylabel="tokens per target forward")
            ax.legend(fontsize=7)
        save(fig, "block_efficiency_vs_n.png")

    with_speed = [r for r in rows if r.get("speedup_vs_autoregressive") is not None and r["kind"] != "autoregressive"]
    if with_speed:
        methods = list(dict.fromkeys(r["method"] for r in with_speed))
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(methods) * len(settings)), 4))
        width = 0.8 / max(len(settings), 1)
        for i, (dataset, temperature) in enumerate(settings):
            values = {
                r["method"]: r["speedup_vs_autoregressive"]
                for r in with_speed
                if (r["dataset"], r["temperature"]) == (dataset, temperature)
            }
            ax.bar(
                [j + i * width for j in range(len(methods))],
                [values.get(m, 0.0) for m in methods],
                width,
                label=f"{dataset} T={temperature:g}",
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(
            [j + width * (len(settings) - 1) / 2 for j in range(len(methods))], methods, rotation=30, ha="right"
        )
        ax.set(ylabel="speedup over autoregressive (tokens/s)")
        ax.legend(fontsize=7)
        save(fig, "speedup.png")

    with_depth = [r for r in multi if r.get("acceptance_per_depth")]
    if with_depth:
        fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
        for ax, (dataset, temperature) in zip(axes[0], settings, strict=True):
            for r in with_depth:
                if (r["dataset"], r["temperature"]) != (dataset, temperature):
                    continue
                depths = range(1, len(r["acceptance_per_depth"]) + 1)
                (line,) = ax.plot(depths, r["acceptance_per_depth"], marker="o", label=f"{r['method']} measured")
                ax.plot(
                    depths,
                    r["optimal_per_depth"],
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{r['method']} optimum",
                )
            ax.set(title=f"{dataset}, T={temperature:g}", xlabel="tree depth", ylabel="acceptance", ylim=(0, 1.02))
            ax.legend(fontsize=6)
        save(fig, "acceptance_per_depth.png")
    return written


def write_report(config: EvalConfig, records: list[dict[str, Any]], directory: Path | None = None) -> dict[str, Any]:
    """Write summary.json, summary.csv, the PNG plots and report.md; return the summary."""
    directory = Path(directory) if directory is not None else config.run_dir()
    rows = summarize(records)
    checks = findings(rows)
    summary = {"config": config.to_dict(), "rows": rows, "findings": checks}
    atomic_write(directory / "summary.json", json.dumps(summary, indent=2))
    atomic_write(directory / "summary.csv", _csv(rows))
    images = plot(rows, directory) if rows else []
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
        format_table(rows, markdown=True),
        "",
    ]
    if checks:
        lines += ["## Findings", "", format_findings(checks), ""]
    if any(row.get("same_trees") for row in rows):
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
    atomic_write(directory / "report.md", "\n".join(lines))
    return summary


__all__ = [
    "describe_setting",
    "findings",
    "format_findings",
    "format_same_trees",
    "format_table",
    "plot",
    "summarize",
    "write_report",
]
