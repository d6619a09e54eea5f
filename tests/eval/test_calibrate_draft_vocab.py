"""eval/calibrate_draft_vocab.py on a tiny draft: the ranking file it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hf_globalres import draft_vocab

CALIBRATE = Path(__file__).resolve().parents[2] / "eval" / "calibrate_draft_vocab.py"


def test_calibration_script_writes_a_ranking_from_a_small_budget(tiny_pair_dirs, tmp_path):
    spec = importlib.util.spec_from_file_location("calibrate_draft_vocab", CALIBRATE)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "ranking.txt"
    script.main(["--draft", str(tiny_pair_dirs[1]), "--tokens", "1100", "--keep", "12", "--output", str(output)])
    header = json.loads(output.read_text().splitlines()[0].removeprefix("# "))
    ranked = draft_vocab.load_ranking(output)
    assert header["calibration_tokens"] == 1100 and len(ranked) == 12 == len(ranked.unique())
    assert {"README.md", "argparse"} <= set(header["sources"])  # 512-token windows of every kind, in turns
