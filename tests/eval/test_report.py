"""The report from typed rows: speedups found by method kind, error bars, integer ticks and value labels on plots."""

from __future__ import annotations

import math

import pytest

from hf_globalres.eval import report
from hf_globalres.eval.records import DepthSummary, Method, Record, Setting, SummaryRow, Turn

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SETTING = ("gsm8k", 1.0)


def _record(method: Method, uid: str, tokens: int, forwards: int, seconds: float) -> Record:
    turn = Turn(new_tokens=tokens, target_forwards=forwards, seconds=seconds, peak_memory_gb=0.5, prompt_tokens=9)
    return Record.from_turns(
        key=f"gsm8k|T=1|{method.name}|{uid}", dataset="gsm8k", prompt=uid, category=None, temperature=1.0,
        method=method, setting=Setting("cpu", "float32", False), turns=[turn], texts=["#### 5"], depth=None,
        same_trees=None, grading=None,
    )  # fmt: skip


def _records() -> list[Record]:
    """Three prompts of different speed (tokens/s has a spread) for four methods at one setting."""
    methods = [
        (Method("autoregressive"), 1.0),
        (Method("assisted", num_drafts=1, length=4), 0.8),
        (Method("multidraft", "single", 1, 4), 0.7),
        (Method("multidraft", "optimal", 4, 4), 0.5),
    ]
    out = []
    for i, spread in enumerate((0.8, 1.0, 1.3)):
        for method, seconds in methods:
            forwards = {"autoregressive": 20, "assisted": 10}.get(method.kind, 8 - i if method.num_drafts > 1 else 9)
            out.append(
                _record(method, f"p{i}", 20, forwards, seconds * spread * (1 + 0.1 * i * (method.num_drafts == 1)))
            )
    return out


def _rows() -> list[SummaryRow]:
    return report.summary_rows(_records())


def test_speedups_use_the_rows_of_the_same_kind_and_length():
    rows = {row.method.name: row for row in _rows()}
    base, assisted, optimal = rows["autoregressive"], rows["hf-assisted L=4"], rows["optimal n=4 L=4"]
    assert optimal.speedup_vs_autoregressive == pytest.approx(optimal.tokens_per_s / base.tokens_per_s)
    assert optimal.speedup_vs_assisted == pytest.approx(optimal.tokens_per_s / assisted.tokens_per_s)
    assert assisted.speedup_vs_assisted is None and base.speedup_vs_autoregressive == 1.0
    # Records in their JSON form summarise to the same rows.
    assert report.summarize([r.to_dict() for r in _records()]) == [row.to_dict() for row in rows.values()]
    # Spread over prompts gives a standard error of the speedup (SE(S) = S·sqrt(Σ relative SE²)).
    relative = math.hypot(
        optimal.tokens_per_s_stderr / optimal.tokens_per_s, base.tokens_per_s_stderr / base.tokens_per_s
    )
    assert optimal.speedup_vs_autoregressive_stderr == pytest.approx(optimal.speedup_vs_autoregressive * relative)
    assert optimal.speedup_vs_autoregressive_stderr > 0
    assert "speedup_vs_autoregressive_stderr" not in optimal.to_dict()  # summary.json keeps its keys


def _texts(ax) -> list[str]:
    return [text.get_text() for text in ax.texts]


def _integer_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    return ticks


def test_speedup_bars_carry_error_bars_and_values():
    rows = [r for r in _rows() if r.method.kind != "autoregressive"]
    ax = Figure().subplots()
    report.draw_speedup(ax, rows, [SETTING])
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    assert bars.errorbar is not None  # the spread over prompts is drawn
    heights = [bar.get_height() for bar in bars]
    assert heights == pytest.approx([r.speedup_vs_autoregressive for r in rows])
    assert _texts(ax) == [f"{r.speedup_vs_autoregressive:.2f}" for r in rows]


def test_speedup_bars_without_a_spread_have_no_error_bars():
    rows = [SummaryRow("gsm8k", 1.0, Method("multidraft", "optimal", 4, 4), speedup_vs_autoregressive=1.25)]
    ax = Figure().subplots()
    report.draw_speedup(ax, rows, [SETTING])
    assert next(c for c in ax.containers if isinstance(c, BarContainer)).errorbar is None
    assert _texts(ax) == ["1.25"]


def test_block_efficiency_plot_has_error_bars_integer_ticks_and_values():
    rows = _rows()
    ax = Figure().subplots()
    report.draw_block_efficiency(ax, rows, SETTING)
    lines = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(lines) == 2  # optimal (starting from single's n = 1 point) and single
    assert _integer_ticks(ax) == [1.0, 2.0, 3.0, 4.0]
    multi = [r for r in rows if r.method.kind == "multidraft"]
    assert sorted(t for t in _texts(ax) if t[0].isdigit()) == sorted(f"{r.block_efficiency:.2f}" for r in multi)
    assert "hf-assisted L=4" in _texts(ax)


def test_acceptance_plot_ticks_whole_depths_and_labels_points():
    # Depth 4 saw no verification: no point, no label.
    depth = DepthSummary(0.5, 0.6, 0.4, 0.8, 0.05, [0.75, 0.5, 0.25, None], [0.8, 0.6, 0.3, None], [8, 4, 2, 0])
    row = SummaryRow("gsm8k", 1.0, Method("multidraft", "optimal", 4, 4), depth=depth)
    ax = Figure().subplots()
    report.draw_acceptance(ax, [row], SETTING)
    assert _integer_ticks(ax) == [1.0, 2.0, 3.0]
    assert _texts(ax) == ["0.75", "0.50", "0.25"]
    one_depth = SummaryRow("gsm8k", 1.0, row.method, depth=DepthSummary(0, 0, 0, None, None, [0.0], [0.1], [3]))
    ax = Figure().subplots()
    report.draw_acceptance(ax, [one_depth], SETTING)
    assert _integer_ticks(ax) == [1.0]  # a single depth still gets a whole-number tick


def test_plot_writes_the_three_pngs(tmp_path):
    rows = _rows()
    rows[-1].depth = DepthSummary(0.5, 0.6, 0.4, 0.8, 0.05, [0.75, 0.5], [0.8, 0.6], [8, 4])
    written = report.plot([row.to_dict() for row in rows[:-1]] + [rows[-1]], tmp_path)
    assert [p.name for p in written] == ["block_efficiency_vs_n.png", "speedup.png", "acceptance_per_depth.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_report_names_the_embedded_math_sample_when_gsm8k_rows_ran_on_it():
    gsm8k = _records()
    sample = [_record(Method("autoregressive"), f"math-sample-{i}", 20, 20, 1.0) for i in range(2)]
    assert report.prompt_sources_note(gsm8k) is None
    note = report.prompt_sources_note(gsm8k + sample)
    assert note is not None and "2 problems of the package's embedded math sample" in note and "--gsm8k-path" in note


def test_the_setting_line_names_packed_linears_and_keeps_settings_apart():
    unpacked, packed = _records(), _records()
    for record in packed:
        record.setting = Setting("cpu", "float32", True, 32)
    rows = report.summary_rows(unpacked + packed)
    assert len(rows) == 2 * len(report.summary_rows(unpacked))  # one row per method and setting, never merged
    line = report.describe_setting(rows)
    assert line == "ran on cpu, float32; cpu, float32, oneDNN linears packed for 32 rows"
    assert Setting.from_dict(Setting("cpu", "float32", True, 32).to_dict()) == Setting("cpu", "float32", True, 32)
