"""Typed records read and write the run directory's JSON byte for byte, so existing runs resume and report alike."""

from __future__ import annotations

import json

import pytest

from hf_globalres.eval import records
from hf_globalres.eval.metrics import DepthStats
from hf_globalres.eval.records import Finding, Method, Record, SummaryRow

#: A multi-draft record line as records.<rank>.jsonl holds it (two MT-Bench turns, same-tree scores).
MULTIDRAFT_LINE = (
    '{"key":"mtbench|T=1|optimal n=2 L=2|mtbench-1","dataset":"mtbench","prompt":"mtbench-1","category":"x",'
    '"temperature":1.0,"method":"optimal n=2 L=2","kind":"multidraft","verifier":"optimal","num_drafts":2,'
    '"length":2,"device":"cpu","dtype":"float32","onednn_linear":true,"new_tokens":16,"target_forwards":11,'
    '"seconds":0.25558353099404485,"verifier_seconds":0.02665022400105954,"peak_memory_gb":0.43196868896484375,'
    '"turns":[{"new_tokens":8,"target_forwards":6,"seconds":0.15220353299810085,"timings":{"target_forward":'
    '0.054642027000227245,"verifier":0.012606094000148005,"total":0.15000002699889592},"peak_memory_gb":'
    '0.43183135986328125,"reported_target_forwards":6,"accepted_lengths":[2,1,1,2,1,1],"prompt_tokens":8},'
    '{"new_tokens":8,"target_forwards":5,"seconds":0.103379997995944,"timings":{"target_forward":'
    '0.037932997998723295,"verifier":0.014044130000911537,"total":0.10156999699393054},"peak_memory_gb":'
    '0.43196868896484375,"reported_target_forwards":5,"accepted_lengths":[3,1,2,1,1],"prompt_tokens":24}],'
    '"texts":["1/9chim","1/9chim"],"depth":{"rows":[11,5],"accepted":[5,2],"optimal":[6.25,2.5],'
    '"single":[4.0,1.75],"drafts":[22,10]},"same_trees":{"blocks":11,"tokens":{"optimal":16.5,"spectr":15.25,'
    '"single (first branch)":14.0}}}'
)
#: A GSM8K autoregressive record line: no timings, no depth, graded (its answer matched no number).
GRADED_LINE = (
    '{"key":"gsm8k|T=0|autoregressive|gsm8k-0","dataset":"gsm8k","prompt":"gsm8k-0","category":null,'
    '"temperature":0.0,"method":"autoregressive","kind":"autoregressive","verifier":null,"num_drafts":0,'
    '"length":0,"device":"cpu","dtype":"float32","onednn_linear":true,"new_tokens":8,"target_forwards":8,'
    '"seconds":0.10624075699888635,"verifier_seconds":null,"peak_memory_gb":0.4050025939941406,"turns":'
    '[{"new_tokens":8,"target_forwards":8,"seconds":0.10624075699888635,"timings":null,"peak_memory_gb":'
    '0.4050025939941406,"prompt_tokens":86}],"texts":["dak:ak:a"],"depth":null,"same_trees":null,'
    '"reference":"5","answer":null,"correct":false}'
)


def _line(record: Record) -> str:
    return json.dumps(record.to_dict(), separators=(",", ":"))


@pytest.mark.parametrize("line", [MULTIDRAFT_LINE, GRADED_LINE], ids=["multidraft", "graded"])
def test_an_existing_record_line_round_trips_byte_for_byte(line):
    record = Record.from_dict(json.loads(line))
    assert _line(record) == line
    assert Record.from_dict(record.to_dict()) == record


def test_records_of_earlier_versions_keep_the_keys_they_lack():
    """Before the setting and same-tree scores were recorded a line had neither key; it is written without them."""
    data = json.loads(MULTIDRAFT_LINE)
    for key in ("device", "dtype", "onednn_linear", "same_trees"):
        del data[key]
    line = json.dumps(data, separators=(",", ":"))
    record = Record.from_dict(data)
    assert record.setting == records.Setting() and not record.setting.recorded and record.same_trees is None
    assert _line(record) == line


def test_record_fields_are_typed():
    record = Record.from_dict(json.loads(MULTIDRAFT_LINE))
    assert record.method == Method("multidraft", "optimal", 2, 2) and record.method.scores_same_trees
    assert record.method.is_reference_rule and not record.method.is_baseline_rule
    assert record.setting == records.Setting("cpu", "float32", True)
    assert isinstance(record.depth, DepthStats) and record.depth.rows == [11, 5]
    assert record.same_trees is not None and record.same_trees.tokens["spectr"] == 15.25
    assert [t.accepted_lengths for t in record.turns] == [[2, 1, 1, 2, 1, 1], [3, 1, 2, 1, 1]]
    assert record.turns[1].prompt_tokens == 24 and record.grading is None
    graded = Record.from_dict(json.loads(GRADED_LINE))
    assert graded.grading == records.Grading("5", None, False) and graded.turns[0].accepted_lengths is None


def test_a_record_built_from_turns_sums_them():
    turns = [records.Turn.from_dict(turn) for turn in json.loads(MULTIDRAFT_LINE)["turns"]]
    original = Record.from_dict(json.loads(MULTIDRAFT_LINE))
    built = Record.from_turns(
        key=original.key, dataset="mtbench", prompt="mtbench-1", category="x", temperature=1.0,
        method=original.method, setting=original.setting, turns=turns, texts=original.texts,
        depth=original.depth, same_trees=original.same_trees, grading=None,
    )  # fmt: skip
    assert _line(built) == MULTIDRAFT_LINE
    assert built.verifier_seconds == pytest.approx(0.012606094000148005 + 0.014044130000911537)


def test_same_tree_counts_add_rule_by_rule():
    a = records.SameTreeCounts(3, {"optimal": 4.0, "spectr": 3.5})
    b = records.SameTreeCounts(2, {"optimal": 2.5, "rrs": 2.0})
    total = a.plus(b)
    assert total == records.SameTreeCounts(5, {"optimal": 6.5, "spectr": 3.5, "rrs": 2.0})
    assert a.plus(None) is a and a.tokens == {"optimal": 4.0, "spectr": 3.5}  # the parts stay as they were


def test_method_names_and_kinds():
    assert Method("autoregressive").name == "autoregressive"
    assert Method("assisted", num_drafts=1, length=4).name == "hf-assisted L=4"
    assert Method("multidraft", "single", 1, 4).is_baseline_rule
    assert not Method("multidraft", "optimal", 1, 4).scores_same_trees  # one draft: nothing to compare
    assert Method("multidraft", "no-such-rule", 2, 4).draft_scheme == "iid"
    assert Method("multidraft", "optimal_without_replacement", 2, 4).draft_scheme != "iid"


def test_summary_rows_and_findings_round_trip():
    row = {
        "dataset": "gsm8k", "temperature": 1.0, "method": "optimal n=2 L=2", "kind": "multidraft",
        "verifier": "optimal", "num_drafts": 2, "length": 2, "device": "cpu", "dtype": "float32",
        "onednn_linear": False, "prompts": 2, "new_tokens": 30, "target_forwards": 12, "seconds": 1.5,
        "block_efficiency": 2.5, "block_efficiency_stderr": 0.1, "tokens_per_s": 20.0, "peak_memory_gb": 0.5,
        "verifier_ms_per_token": 1.25, "complete_block_efficiency": 2.75, "acceptance": 0.5,
        "optimal_acceptance": 0.6, "single_acceptance": 0.4, "ratio_to_optimal": 0.8333,
        "ratio_to_optimal_stderr": 0.05, "acceptance_per_depth": [0.6, None], "optimal_per_depth": [0.7, None],
        "rows_per_depth": [10, 0], "same_trees": {"prompts": 2, "blocks": 12, "tokens_per_block":
        {"optimal": 2.5, "spectr": 2.25}, "difference": {"spectr": 0.25}, "difference_stderr": {"spectr": None}},
        "accuracy": 0.5, "accuracy_stderr": 0.35, "speedup_vs_autoregressive": 1.5, "speedup_vs_assisted": None,
    }  # fmt: skip
    typed = SummaryRow.from_dict(row)
    assert json.dumps(typed.to_dict()) == json.dumps(row)
    assert typed.depth is not None and typed.depth.optimal == 0.6 and typed.method.is_reference_rule
    bare = SummaryRow.from_dict({key: row[key] for key in list(row)[:7]}).to_dict()
    assert not {"device", "acceptance", "same_trees", "accuracy"} & set(bare)  # keys that apply only when recorded
    assert list(bare)[:7] == list(row)[:7] and bare["speedup_vs_assisted"] is None
    for finding in (
        {"dataset": "gsm8k", "temperature": 1.0, "check": "gain_over_single", "method": "m", "against": "s",
         "value": 1.2},
        {"dataset": "gsm8k", "temperature": 1.0, "check": "acceptance_vs_optimum", "method": "m", "value": 0.99,
         "stderr": None},
        {"dataset": "gsm8k", "temperature": 1.0, "check": "best_verifier", "method": "m", "against": "r",
         "value": -0.1, "stderr": 0.2, "passed": False},
    ):  # fmt: skip
        assert json.dumps(Finding.from_dict(finding).to_dict()) == json.dumps(finding)
