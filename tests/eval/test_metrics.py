"""Metric arithmetic: block efficiency, acceptance per depth and its optimum, answer match; evaluate modules."""

from __future__ import annotations

import math

import pytest
import torch

from hf_globalres import rates
from hf_globalres.eval import metrics
from hf_globalres.verifiers import VerificationResult


def test_block_efficiency_is_a_ratio_of_totals():
    assert metrics.block_efficiency([10, 6], [4, 4]) == 2.0
    assert metrics.block_efficiency([9, 1], [3, 1]) == 2.5  # not the mean of 3 and 1
    with pytest.raises(ValueError, match="2 token counts but 1 forward counts"):
        metrics.block_efficiency([1, 2], [1])
    with pytest.raises(ValueError, match="at least one target forward"):
        metrics.block_efficiency([0], [0])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.block_efficiency([-1], [1])


def test_block_efficiency_stderr_of_a_ratio_of_totals():
    # Every generation at the same ratio: no spread.
    assert metrics.block_efficiency_stderr([8, 4, 12], [2, 1, 3]) == 0.0
    # x = (6, 2), y = (2, 2): R = 2, residuals (2, −2), SE = sqrt(8 / 2) / 2 = 1.
    assert metrics.block_efficiency_stderr([6, 2], [2, 2]) == pytest.approx(1.0)
    assert metrics.block_efficiency_stderr([5], [2]) is None


def test_complete_block_efficiency_leaves_out_each_last_block():
    assert metrics.complete_block_efficiency([[5, 5, 2], [3, 1], [4]]) == pytest.approx((5 + 5 + 3) / 3)
    assert metrics.complete_block_efficiency([[4], [2]]) is None


def test_acceptance_summary_arithmetic():
    out = metrics.acceptance_summary([4, 2, 0], [3, 1, 0], [3.5, 1.5, 0.0], [2.0, 1.0, 0.0])
    assert out["per_depth"] == [0.75, 0.5, None]
    assert out["acceptance"] == pytest.approx(4 / 6)
    assert out["optimal_per_depth"] == [0.875, 0.75, None]
    assert out["ratio_to_optimal"] == pytest.approx(4 / 5)
    # 6 rows with mean optimum 5/6: sqrt(6 · 5/6 · 1/6) / 5.
    assert out["ratio_to_optimal_stderr"] == pytest.approx((5 / 6) ** 0.5 / 5)
    assert out["single"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cannot exceed"):
        metrics.acceptance_summary([1], [2])
    with pytest.raises(ValueError, match="one entry per depth"):
        metrics.acceptance_summary([1, 1], [1])


def test_depth_stats_callback_sums_the_rates_of_the_verified_rows(generator):
    q = torch.softmax(torch.randn(5, 12, generator=generator, dtype=torch.float64), -1)
    p = torch.softmax(torch.randn(5, 12, generator=generator, dtype=torch.float64), -1)
    drafts = torch.multinomial(p, 3, replacement=True, generator=generator)
    drafts[1, 2] = -1  # a row with two drafts present
    drafts[3, 1:] = -1
    accepted = torch.tensor([True, False, True, True, False])
    result = VerificationResult(token=drafts[:, 0], accepted=accepted, draft_index=torch.zeros(5, dtype=torch.long))
    stats = metrics.DepthStats()
    stats.callback(2, q, p, drafts, result)
    counts = torch.tensor([3, 2, 3, 1, 3])
    assert stats.rows == [0, 5] and stats.accepted == [0, 3] and stats.drafts == [0, 12]
    assert stats.optimal[1] == pytest.approx(float(rates.optimal_acceptance(q, p, counts).sum()), abs=1e-12)
    assert stats.single[1] == pytest.approx(float(rates.single_acceptance(q, p).sum()), abs=1e-12)
    # The optimum with k ≥ 1 drafts is never below single-draft acceptance (1 − TV).
    assert stats.optimal[1] >= stats.single[1] - 1e-12
    merged = metrics.DepthStats().merge(stats).merge(stats.to_dict())
    assert merged.rows == [0, 10] and merged.accepted == [0, 6]
    assert merged.summary()["acceptance"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### $1,250.00 in total", "1250"),
        ("The answer is 18.", "18"),
        ("we get -3 and then 2.50", "2.5"),
        ("#### 12 apples, not 13", "12"),
        ("no number here", None),
        ("#### -0", "0"),
    ],
)
def test_extract_final_answer(text, answer):
    assert metrics.extract_final_answer(text) == answer


def test_answer_match_and_noise():
    out = metrics.answer_match(["#### 5", "it is 7", "x"], ["#### 5", "8", "#### 1"])
    assert out == {
        "accuracy": pytest.approx(1 / 3),
        "correct": 1.0,
        "total": 3.0,
        "stderr": pytest.approx(math.sqrt(2 / 27)),
    }
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.answer_match(["1", "2"], ["1"])
    assert metrics.within_noise(0.5, 20, 0.6, 20)
    assert not metrics.within_noise(0.1, 200, 0.6, 200)
    assert metrics.within_noise(1.0, 5, 1.0, 5) and not metrics.within_noise(1.0, 5, 0.0, 5)
    assert (
        metrics.speedup(3.0, 2.0) == 1.5 and metrics.speedup(3.0, None) is None and metrics.speedup(None, 1.0) is None
    )


def test_evaluate_modules_load_offline_and_agree(monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    block = evaluate.load(metrics.evaluate_module_path("block_efficiency"))
    assert block.compute(new_tokens=[9, 1], target_forwards=[3, 1]) == {"block_efficiency": 2.5}
    depth = evaluate.load(metrics.evaluate_module_path("acceptance_per_depth"))
    out = depth.compute(depths=[1, 1, 2, 1], accepted=[1, 0, 1, 1], optimal=[0.9, 0.8, 0.7, 0.6])
    assert out == metrics.acceptance_summary([3, 1], [2, 1], [0.9 + 0.8 + 0.6, 0.7])
    match = evaluate.load(metrics.evaluate_module_path("gsm8k_answer_match"))
    assert match.compute(predictions=["#### 1,000", "2"], references=["#### 1000", "3"])["accuracy"] == 0.5
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.evaluate_module_path("bleu")


def test_best_verifier_finding_names_a_shortfall_within_noise():
    from hf_globalres.eval.report import format_findings

    base = {"dataset": "gsm8k", "temperature": 1.0, "check": "best_verifier", "method": "optimal n=4 L=4"}
    within = {**base, "against": "spectr n=4 L=4", "value": -0.1, "stderr": 0.2, "passed": False}
    beyond = {**within, "value": -0.5}
    assert "within 2 standard errors" in format_findings([within])
    assert "[FAILED]" in format_findings([beyond])
    assert "[ok]" in format_findings([{**within, "value": 0.1, "passed": True}])


def test_best_verifier_compares_within_the_draft_scheme():
    from hf_globalres.eval.report import findings

    def row(verifier: str, efficiency: float) -> dict:
        return {
            "dataset": "gsm8k",
            "temperature": 1.0,
            "kind": "multidraft",
            "method": f"{verifier} n=4 L=4",
            "verifier": verifier,
            "num_drafts": 4,
            "length": 4,
            "block_efficiency": efficiency,
            "block_efficiency_stderr": 0.1,
        }

    rows = [row("optimal", 4.3), row("spectr", 4.1), row("optimal_without_replacement", 4.6), row("rrs", 4.4)]
    checks = {f["check"]: f for f in findings(rows)}
    best = checks["best_verifier"]
    assert best["against"] == "rrs n=4 L=4" and not best["passed"]
    assert best["value"] == pytest.approx(-0.1)
    other = checks["other_draft_scheme"]
    assert other["against"] == "optimal_without_replacement n=4 L=4" and "passed" not in other
    assert other["value"] == pytest.approx(-0.3) and other["stderr"] == pytest.approx(0.1 * 2**0.5)
    # Without rivals of its own scheme there is no verdict at all.
    assert [f["check"] for f in findings([rows[0], rows[2]])] == ["other_draft_scheme"]


def test_speedup_stderr_adds_relative_errors_in_quadrature():
    # S = 4 / 2 = 2 with 10 % relative error on each rate: SE = 2 · sqrt(0.1² + 0.1²).
    assert metrics.speedup_stderr(4.0, 0.4, 2.0, 0.2) == pytest.approx(2 * math.sqrt(0.02))
    assert metrics.speedup_stderr(4.0, 0.0, 2.0, 0.0) == 0.0
    assert metrics.speedup_stderr(4.0, None, 2.0, 0.2) is None
    assert metrics.speedup_stderr(4.0, 0.4, 0.0, 0.2) is None and metrics.speedup_stderr(None, 0.4, 2.0, 0.2) is None


def test_depth_stats_read_back_from_their_dict():
    counts = {"rows": [4, 2], "accepted": [3, 1], "optimal": [3.5, 1.5], "single": [2.0, 1.0], "drafts": [8, 4]}
    stats = metrics.DepthStats.from_dict(counts, scheme="without_replacement")
    assert stats.to_dict() == counts and stats.scheme == "without_replacement"
    assert stats.summary() == metrics.acceptance_summary([4, 2], [3, 1], [3.5, 1.5], [2.0, 1.0])
    with pytest.raises(ValueError, match="one entry per depth"):
        metrics.DepthStats.from_dict({**counts, "drafts": [8]})
