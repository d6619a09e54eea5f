"""eval/calibrate_draft_vocab.py on a tiny draft: the ranking file it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hf_globalres import draft_vocab

CALIBRATE = Path(__file__).resolve().parents[2] / "eval" / "calibrate_draft_vocab.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("calibrate_draft_vocab", CALIBRATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_script_writes_a_ranking_from_a_small_budget(script, tiny_pair_dirs, tmp_path):
    output = tmp_path / "ranking.txt"
    script.main(["--draft", str(tiny_pair_dirs[1]), "--tokens", "1100", "--keep", "12", "--output", str(output)])
    header = json.loads(output.read_text().splitlines()[0].removeprefix("# "))
    ranked = draft_vocab.load_ranking(output)
    assert header["calibration_tokens"] == 1100 and len(ranked) == 12 == len(ranked.unique())
    assert {"README.md", "argparse"} <= set(header["sources"])  # 512-token windows of every kind, in turns


def test_calibration_script_refuses_an_empty_budget(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--tokens", "0", "--output", str(tmp_path / "ranking.txt")])
    assert exit_info.value.code == 2 and "--tokens must be ≥ 2" in capsys.readouterr().err
    assert not (tmp_path / "ranking.txt").exists()
