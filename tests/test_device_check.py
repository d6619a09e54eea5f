"""eval/device_check.py, run end to end with --device cpu (tiny sizes), so the GPU check is known to work."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from hf_globalres import verifiers

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "device_check.py"
SECTIONS = ["pytest", "agreement", "verify_timing", "profile", "block_loop", "projection"]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("device_check", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def cpu_run(script: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], str]:
    """The whole script on the CPU: (exit status, the JSON it wrote, what it printed)."""
    path = tmp_path_factory.mktemp("device") / "device_check.json"
    args = ["--device", "cpu", "--quick", "--budget", "300", "--json", str(path)]
    args += ["--pytest-args", "tests/test_devices.py -k cuda -q -p no:cacheprovider"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = script.main(args)
    return status, json.loads(path.read_text()), printed.getvalue()


def test_every_section_runs_and_passes(cpu_run) -> None:
    status, report, printed = cpu_run
    assert list(report["sections"]) == SECTIONS
    failed = {name: entry.get("error") for name, entry in report["sections"].items() if entry["status"] != "ok"}
    assert failed == {}
    assert status == 0
    assert report["meta"]["device"] == "cpu" and report["meta"]["sizes"]["vocab"] == 500
    assert 0 < report["meta"]["elapsed_s"] < 300
    assert "PROJECTED" in printed and "verify_timing" in printed


def test_pytest_section_counts_the_selected_tests(cpu_run) -> None:
    result = cpu_run[1]["sections"]["pytest"]["result"]
    assert result["returncode"] == 0
    assert result["counts"]["passed"] >= 1 and result["counts"].get("failed", 0) == 0
    assert "-k cuda" in result["command"]


def test_agreement_covers_every_rule_at_both_vocabularies(cpu_run) -> None:
    result = cpu_run[1]["sections"]["agreement"]["result"]
    pairs = {(row["verifier"], row["vocab"]) for row in result["rows"]}
    assert pairs == {(name, vocab) for name in verifiers.available() for vocab in (50, 200)}
    for row in result["rows"]:
        assert 0 <= row["max_abs_diff"] <= result["tolerance"], row
        assert row["n"] == (1 if row["verifier"] == "single" else 4)
    optimal = [row for row in result["rows"] if row["verifier"] == "optimal"]
    assert all(row["options"]["bins"] == 16 for row in optimal)  # V = 200 > 2 · 16: the grouped path


def test_verify_timing_has_a_row_for_every_rule_batch_and_support(cpu_run) -> None:
    result = cpu_run[1]["sections"]["verify_timing"]["result"]
    cases = {(row["verifier"], row["batch"], row["support"]) for row in result["rows"]}
    expected = {(name, b, k) for name in verifiers.available() for b in (1, 4) for k in (500, 16, 64)}
    assert cases == expected
    for row in result["rows"]:
        assert "error" not in row, row
        if "skipped" in row:
            assert row["skipped"]
            continue
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
        assert row["repeats"] >= 1 and isinstance(row["host_reads"], int) and row["host_reads"] >= 0
        assert row["sync_warnings"] is None and row["peak_memory_mib"] is None  # CUDA-only measures
    assert result["timed"] == sum("median_ms" in row for row in result["rows"]) > 0


def test_profile_summarises_optimal(cpu_run) -> None:
    result = cpu_run[1]["sections"]["profile"]["result"]
    assert (result["verifier"], result["batch"], result["support"]) == ("optimal", 4, 64)
    assert result["aten_ops_per_call"] > 0 and result["kernel_launches_per_call"] == 0
    assert len(result["top_kernels"]) == 10 and all(row["cpu_us"] >= 0 for row in result["top_kernels"])


def test_block_loop_records_phases_and_forward_costs(cpu_run) -> None:
    result = cpu_run[1]["sections"]["block_loop"]["result"]
    assert set(result["batches"]) == {"1", "4"}
    for row in result["batches"].values():
        assert row["new_tokens_per_row"] == 6  # --quick on a CPU; random weights never stop early
        assert row["block_efficiency"] >= 1 and row["blocks"] >= 1
        for phase in ("target_forward", "draft_forward", "verifier", "total"):
            assert row["timings"][phase] > 0
        assert set(row["costs"]["target_forward_s"]) == {"1", "5", "9", "49"}
        assert set(row["costs"]["draft_step_s"]) == {"1", "4"}
        assert all(v > 0 for costs in row["costs"].values() for v in costs.values())


def test_projection_reads_the_cpu_block_efficiencies(cpu_run, script) -> None:
    result = cpu_run[1]["sections"]["projection"]["result"]
    assert "PROJECTED" in result["label"]
    records = json.loads(Path(script.BENCH_REPORT).read_text())["results"]
    methods = [r["method"] for r in records if r.get("draft_forwards")]
    for rows in result["batches"].values():
        assert [row["method"] for row in rows] == methods
        assert all(math.isfinite(row["projected_speedup"]) and row["projected_speedup"] > 0 for row in rows)


def test_a_failing_section_is_recorded_and_the_others_still_run(script, monkeypatch, tmp_path) -> None:
    def broken(ctx: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    def fine(ctx: Any) -> dict[str, Any]:
        return {"ok": True, "value": 1}

    monkeypatch.setattr(script, "SECTIONS", (("first", broken, False, 0.0), ("second", fine, True, 0.0)))
    ctx = script.Context(torch.device("cpu"), script.sizes_for(torch.device("cpu"), True), script.Budget(60.0),
                         "", script.BENCH_REPORT)  # fmt: skip
    report = script.run(ctx, tmp_path / "out.json", quick=True)
    assert report["sections"]["first"]["status"] == "error" and "boom" in report["sections"]["first"]["error"]
    assert report["sections"]["second"] == {"status": "ok", "result": {"value": 1}, "seconds": pytest.approx(0, abs=1)}
    assert json.loads((tmp_path / "out.json").read_text())["sections"]["second"]["status"] == "ok"


def test_the_budget_skips_optional_sections(script, monkeypatch, tmp_path) -> None:
    def fine(ctx: Any) -> dict[str, Any]:
        return {}

    monkeypatch.setattr(script, "SECTIONS", (("required", fine, False, 0.0), ("optional", fine, True, 0.5)))
    ctx = script.Context(torch.device("cpu"), script.sizes_for(torch.device("cpu"), True), script.Budget(1.0),
                         "", script.BENCH_REPORT)  # fmt: skip
    report = script.run(ctx, tmp_path / "out.json", quick=True)
    assert report["sections"]["required"]["status"] == "ok"
    assert report["sections"]["optional"]["status"] == "skipped"


def test_interpolation_and_projection_formula(script) -> None:
    costs = {"target_forward_s": {"1": 1.0, "5": 2.0, "9": 4.0}, "draft_step_s": {"1": 0.1, "4": 0.2}}
    assert script.interpolate(3, costs["target_forward_s"]) == pytest.approx(1.5)
    assert script.interpolate(13, costs["target_forward_s"]) == pytest.approx(6.0)  # linear past the last point
    record = {"method": "m", "n": 4, "draft_forwards": 20, "target_forwards": 10, "block_efficiency": 3.0}
    row = script.project_method(record, costs, overhead_s=0.5)
    # 2 steps of 4 tokens (0.2 s each), a target forward over 1 + 8 tokens (4 s), 0.5 s overhead.
    assert row["projected_block_s"] == pytest.approx(2 * 0.2 + 4.0 + 0.5)
    assert row["projected_speedup"] == pytest.approx(3.0 * 1.0 / 4.9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no CUDA device exists")
def test_a_missing_device_is_a_clear_error(script, capsys) -> None:
    assert script.main(["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().out


def test_a_case_predicted_too_slow_is_skipped_with_its_reason(script) -> None:
    cpu = torch.device("cpu")
    ctx = script.Context(cpu, script.sizes_for(cpu, True), script.Budget(300.0), "", script.BENCH_REPORT)
    assert script.budget_skip(ctx, None, 4) is None
    assert script.budget_skip(ctx, (1, 0.01), 4) is None
    reason = script.budget_skip(ctx, (1, 2.0), 4)  # 8 s predicted, over the CPU limit of 5 s
    assert reason is not None and "8.0 s" in reason and "B = 1" in reason
    spent = script.Context(cpu, script.sizes_for(cpu, True), script.Budget(5.0), "", script.BENCH_REPORT)
    assert script.budget_skip(spent, None, 1) == "time budget: kept for later sections"
