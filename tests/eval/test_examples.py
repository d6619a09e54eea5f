"""The scripts in examples/ run end to end on the tiny pair (the Hub upload against a recording stand-in)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import huggingface_hub
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_quickstart_streams_and_reports_tokens_per_forward(tiny_pair_dirs, monkeypatch, capsys):
    target, draft = tiny_pair_dirs
    run_example(
        "quickstart.py", monkeypatch,
        "--target", str(target), "--draft", str(draft), "--max-new-tokens", "8", "--num-drafts", "2", "--prompt", "hi",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "--- streaming, n=2 drafts" in out and "tokens per forward" in out and "tokens per block:" in out


def test_compare_verifiers_tabulates_every_rule(tiny_pair_dirs, monkeypatch, capsys, tmp_path):
    target, draft = tiny_pair_dirs
    run_example(
        "compare_verifiers.py", monkeypatch,
        "what is 2 + 3?", "say hi.", "--target", str(target), "--draft", str(draft), "--verifiers", "optimal,spectr",
        "--drafts", "2", "--length", "2", "--max-new-tokens", "6", "--output-dir", str(tmp_path),
    )  # fmt: skip
    out = capsys.readouterr().out
    assert all(method in out for method in ("autoregressive", "optimal n=2 L=2", "spectr n=2 L=2"))
    records = (tmp_path / "compare-verifiers" / "records.0.jsonl").read_text().splitlines()
    assert len(records) == 2 * 3  # two prompts × three methods


def test_reproduce_headline_prints_the_markdown_table(tiny_pair_dirs, data_files, monkeypatch, capsys, tmp_path):
    target, draft = tiny_pair_dirs
    config = tmp_path / "tiny.json"
    settings = {
        "target": str(target), "draft": str(draft), "datasets": ["gsm8k"], "gsm8k_path": str(data_files["gsm8k"]),
        "limit": 1, "max_new_tokens": 4, "methods": ["autoregressive", "multidraft"], "verifiers": ["optimal:2"],
        "num_drafts": [2], "lengths": [2], "output_dir": str(tmp_path / "reports"),
    }  # fmt: skip
    config.write_text(json.dumps(settings))
    run_example("reproduce_headline.py", monkeypatch, "--config", str(config), "--device", "cpu")
    out = capsys.readouterr().out
    assert "| gsm8k | 1 | optimal n=2 L=2 |" in out
    assert (tmp_path / "reports" / "tiny" / "report.md").is_file()


def test_push_custom_generate_uploads_the_recipe_layout(monkeypatch, capsys):
    uploads: list[tuple[str, str]] = []

    class RecordingApi:
        def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False) -> None:
            assert repo_id == "user/recipe" and exist_ok

        def upload_file(self, *, path_or_fileobj: str, path_in_repo: str, repo_id: str) -> None:
            assert Path(path_or_fileobj).is_file(), path_or_fileobj
            uploads.append((Path(path_or_fileobj).name, path_in_repo))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    run_example("push_custom_generate.py", monkeypatch, "user/recipe")
    assert uploads == [
        ("README.md", "README.md"),
        ("generate.py", "custom_generate/generate.py"),
        ("requirements.txt", "custom_generate/requirements.txt"),
    ]
    assert "custom_generate='user/recipe'" in capsys.readouterr().out
