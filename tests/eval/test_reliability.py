"""The eval never deletes, mixes or duplicates results, and bad input gets one clear line (exit 2)."""

from __future__ import annotations

import pytest
import torch

from hf_globalres.eval import cli, runner

from .test_runner import _args


@pytest.fixture
def one_prompt(tmp_path):
    files = {"gsm8k": tmp_path / "gsm8k.jsonl", "mtbench": tmp_path / "mt.jsonl"}
    files["gsm8k"].write_text('{"question": "what is 2 + 3?", "answer": "#### 5"}\n')
    files["mtbench"].write_text('{"question_id": 1, "category": "x", "turns": ["say hi."]}\n')
    return files


def _small(pair, files, out, *extra):
    args = _args(pair, files, out, "--datasets", "gsm8k", "--temperatures", "1", "--methods", "multidraft")
    return [*args, "--verifiers", "spectr:2", *extra]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x"])
def test_run_names_are_plain_names(tiny_pair_dirs, one_prompt, tmp_path, capsys, name):
    keep = tmp_path / "out" / "other-run" / "records.0.jsonl"
    keep.parent.mkdir(parents=True)
    keep.write_text("{}\n")
    args = _small(tiny_pair_dirs, one_prompt, tmp_path / "out" / "a")
    assert cli.main([*args, "--run-name", name, "--overwrite"]) == 2
    assert "run name must be a plain directory name" in capsys.readouterr().err
    assert keep.read_text() == "{}\n"


def test_overwrite_deletes_only_run_directories_after_checking_inputs(tiny_pair_dirs, one_prompt, tmp_path, capsys):
    out = tmp_path / "out"
    foreign = out / "tiny" / "notes.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine")
    assert cli.main([*_small(tiny_pair_dirs, one_prompt, out), "--overwrite"]) == 2
    assert "not a run directory" in capsys.readouterr().err and foreign.read_text() == "mine"
    foreign.unlink()
    assert cli.main(_small(tiny_pair_dirs, one_prompt, out)) == 0
    records = (out / "tiny" / "records.0.jsonl").read_text()
    missing = _small(tiny_pair_dirs, {**one_prompt, "gsm8k": tmp_path / "no-such.jsonl"}, out)
    assert cli.main([*missing, "--overwrite"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (out / "tiny" / "records.0.jsonl").read_text() == records  # nothing deleted before the inputs held
    absent_model = _small((tmp_path / "no-model", tiny_pair_dirs[1]), one_prompt, out)
    assert cli.main([*absent_model, "--overwrite"]) == 2
    assert (out / "tiny" / "records.0.jsonl").read_text() == records
    assert cli.main([*_small(tiny_pair_dirs, one_prompt, out), "--overwrite"]) == 0
    assert len((out / "tiny" / "records.0.jsonl").read_text().splitlines()) == 1


def test_a_second_concurrent_run_is_refused(tiny_pair_dirs, one_prompt, tmp_path, capsys):
    out = tmp_path / "out"
    with runner.RunLock(out / "tiny"):
        assert cli.main(_small(tiny_pair_dirs, one_prompt, out)) == 2
        assert "another hf-globalres-eval run is writing" in capsys.readouterr().err
        assert cli.main([*_small(tiny_pair_dirs, one_prompt, out), "--overwrite"]) == 2
    assert not (out / "tiny" / "records.0.jsonl").exists()
    assert cli.main(_small(tiny_pair_dirs, one_prompt, out)) == 0


def test_clear_errors_for_bad_input(tiny_pair_dirs, one_prompt, tmp_path, capsys):
    out = tmp_path / "out"
    base = _small(tiny_pair_dirs, one_prompt, out)
    assert cli.main([*base, "--threads", "-3"]) == 2
    assert "threads must be a whole number" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(_small(tiny_pair_dirs, {**one_prompt, "gsm8k": empty}, out)) == 2
    assert "no gsm8k prompts" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"limit": 2,')
    assert cli.main(["--config", str(broken)]) == 2
    assert f"{broken}: not valid JSON" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main([*base, "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert cli.main(_small(tiny_pair_dirs, one_prompt, blocked)) == 2  # the output directory is a file
    assert "hf-globalres-eval: error" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threads"):
        cli.main([*base, "--threads", "-3", "--debug"])


def test_resume_refuses_changed_data_and_models_and_accepts_the_same_files(
    tiny_pair_dirs, one_prompt, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    assert cli.main(_small(tiny_pair_dirs, one_prompt, out)) == 0
    records = (out / "tiny" / "records.0.jsonl").read_text()
    # The same files under other spellings of their paths: a resume, nothing generated.
    monkeypatch.chdir(tmp_path)
    relative = {**one_prompt, "gsm8k": one_prompt["gsm8k"].relative_to(tmp_path)}
    assert cli.main(_small(tiny_pair_dirs, relative, out.relative_to(tmp_path))) == 0
    assert (out / "tiny" / "records.0.jsonl").read_text() == records
    # New contents at the same data path, with a larger limit: refused.
    one_prompt["gsm8k"].write_text('{"question": "what is 9 - 1?", "answer": "#### 8"}\n' * 2)
    assert cli.main([*_small(tiny_pair_dirs, one_prompt, out), "--limit", "2"]) == 2
    assert "different prompt texts (gsm8k|" in capsys.readouterr().err
    one_prompt["gsm8k"].write_text('{"question": "what is 2 + 3?", "answer": "#### 5"}\n')
    # New weights in the same model directory: refused.
    target_dir = tiny_pair_dirs[0]
    weights = next(target_dir.glob("*.safetensors"))
    saved = weights.read_bytes()
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(target_dir)
        with torch.no_grad():
            model.lm_head.weight.mul_(1.01)
        model.save_pretrained(target_dir)
        assert cli.main(_small(tiny_pair_dirs, one_prompt, out)) == 2
        assert "different target model files" in capsys.readouterr().err
    finally:
        weights.write_bytes(saved)
    assert cli.main(_small(tiny_pair_dirs, one_prompt, out)) == 0
    assert (out / "tiny" / "records.0.jsonl").read_text() == records


def test_records_count_once_per_key(tmp_path):
    store = runner.RecordStore(tmp_path / "run")
    store.append({"key": "a", "value": 1})
    store.append({"key": "b", "value": 2})
    runner.RecordStore(tmp_path / "run", rank=1).append({"key": "a", "value": 3})
    assert sorted((r["key"], r["value"]) for r in store.records()) == [("a", 1), ("b", 2)]


def test_a_resume_says_what_it_does_not_recompute(tiny_pair_dirs, one_prompt, tmp_path, capsys):
    out = tmp_path / "out"
    one_prompt["gsm8k"].write_text('{"question": "what is 2 + 3?", "answer": "#### 5"}\n' * 2)
    args = _small(tiny_pair_dirs, one_prompt, out, "--verifiers", "optimal:2")
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main([*args, "--limit", "1", "--same-trees"]) == 0
    err = capsys.readouterr().err
    assert "holds 2 gsm8k prompts" in err and "--limit 1 drops no recorded result" in err
    assert "made without it and are not regenerated" in err


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_records(tiny_pair_dirs, data_files, tmp_path):
    """A run killed (SIGKILL) after a random number of records, at a random instant, resumes to the same set."""
    import json
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    def args(run_name):
        return [
            *_args(tiny_pair_dirs, data_files, tmp_path, "--datasets", "gsm8k", "--limit", "3"),
            "--methods", "autoregressive,multidraft", "--verifiers", "spectr:2", "optimal:2",
            "--run-name", run_name, "--device", "cpu",
        ]  # fmt: skip

    started = time.monotonic()
    assert cli.main(args("whole")) == 0
    whole = {r["key"]: r["texts"] for r in runner.RecordStore(tmp_path / "whole").records()}
    per_record = (time.monotonic() - started) / len(whole)  # an upper bound: the run's loading is in it
    records = tmp_path / "killed" / "records.0.jsonl"

    def written() -> int:
        return len(records.read_text().splitlines()) if records.exists() else 0

    chance = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    interrupted = []
    for _ in range(3):
        before = written()
        if before == len(whole):
            break
        wanted = before + chance.randrange(len(whole) - before)  # at least one record left to write
        process = subprocess.Popen(
            [sys.executable, "-m", "hf_globalres.eval.cli", *args("killed")], env=env, cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline and written() < wanted:
            time.sleep(0.005)
        time.sleep(chance.uniform(0, per_record))  # somewhere inside the next generation or write
        interrupted.append(process.poll() is None and written() < len(whole))
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert any(interrupted), "no kill landed while records were still being written"
    assert cli.main(args("killed")) == 0
    resumed = runner.RecordStore(tmp_path / "killed").records()
    assert {r["key"]: r["texts"] for r in resumed} == whole
    lines = records.read_text().splitlines()
    assert len(lines) == len({json.loads(line)["key"] for line in lines}) == len(whole)
