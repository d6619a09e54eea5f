"""The eval grid end to end on tiny random models: records, report, consistency, resumption, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from hf_globalres import verifiers
from hf_globalres.eval import cli, runner


def _args(pair, data_files, out, *extra):
    target, draft = pair
    return [
        "--target", str(target), "--draft", str(draft),
        "--gsm8k-path", str(data_files["gsm8k"]), "--mtbench-path", str(data_files["mtbench"]),
        "--datasets", "gsm8k,mtbench", "--limit", "2", "--temperatures", "0,1", "--max-new-tokens", "6",
        "--verifiers", "single", "spectr:2", "rrs_without_replacement:2", "--lengths", "2",
        "--output-dir", str(out), "--run-name", "tiny", "--no-progress", "--threads", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tiny_pair_dirs, tmp_path_factory):
    """One CLI run of the tiny grid; returns its directory and records."""
    root = tmp_path_factory.mktemp("eval_run")
    files = {"gsm8k": root / "gsm8k.jsonl", "mtbench": root / "mt.jsonl"}
    files["gsm8k"].write_text(
        '{"question": "what is 2 + 3?", "answer": "#### 5"}\n{"question": "what is 6 * 7?", "answer": "#### 42"}\n'
    )
    files["mtbench"].write_text('{"question_id": 1, "category": "x", "turns": ["say hi.", "again."]}\n')
    assert cli.main(_args(tiny_pair_dirs, files, root / "out")) == 0
    run_dir = root / "out" / "tiny"
    return run_dir, runner.RecordStore(run_dir).records(), files


def test_every_method_prompt_and_temperature_is_recorded_once(tiny_run):
    _, records, _ = tiny_run
    methods = [
        "autoregressive",
        "hf-assisted L=2",
        "single n=1 L=2",
        "spectr n=2 L=2",
        "rrs_without_replacement n=2 L=2",
    ]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == (2 + 1) * 2 * len(methods)
    assert {r["method"] for r in records} == set(methods)
    assert all(len(r["turns"]) == (2 if r["dataset"] == "mtbench" else 1) for r in records)


def test_counts_are_consistent(tiny_run):
    _, records, _ = tiny_run
    for r in records:
        for turn in r["turns"]:
            assert 1 <= turn["new_tokens"] <= 6
            if r["kind"] == "autoregressive":
                assert turn["target_forwards"] == turn["new_tokens"]  # one forward per token
            if r["kind"] == "multidraft":
                # The forward hook agrees with the generate output, and blocks add up to the new tokens.
                assert turn["target_forwards"] == turn["reported_target_forwards"]
                assert sum(turn["accepted_lengths"]) == turn["new_tokens"]
                assert turn["target_forwards"] == len(turn["accepted_lengths"])
        if r["kind"] == "multidraft":
            depth = r["depth"]
            assert all(a <= n for a, n in zip(depth["accepted"], depth["rows"], strict=True))
            assert sum(o - s for o, s in zip(depth["optimal"], depth["single"], strict=True)) >= -1e-9
            accepted_tokens = sum(sum(length - 1 for length in t["accepted_lengths"]) for t in r["turns"])
            # Accepted drafts per block = emitted − 1, except a block cut by the token limit.
            assert abs(sum(depth["accepted"]) - accepted_tokens) <= len(r["turns"])


def test_greedy_outputs_are_identical_across_methods(tiny_run):
    _, records, _ = tiny_run
    texts = defaultdict(set)
    for r in records:
        if r["temperature"] == 0:
            texts[r["prompt"]].add(tuple(r["texts"]))
    assert texts and all(len(v) == 1 for v in texts.values())


def test_report_files_and_summary(tiny_run):
    run_dir, records, _ = tiny_run
    for name in ("summary.json", "summary.csv", "report.md", "block_efficiency_vs_n.png", "speedup.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "acceptance_per_depth.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(run_dir.glob(".*.tmp"))
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {(r["dataset"], r["temperature"], r["method"]): r for r in summary["rows"]}
    assert len(rows) == 2 * 2 * 5
    for (dataset, temperature, method), row in rows.items():
        mine = [r for r in records if (r["dataset"], r["temperature"], r["method"]) == (dataset, temperature, method)]
        assert row["new_tokens"] == sum(r["new_tokens"] for r in mine)
        assert row["block_efficiency"] == pytest.approx(row["new_tokens"] / sum(r["target_forwards"] for r in mine))
        if method == "autoregressive":
            assert row["block_efficiency"] == 1.0 and row["speedup_vs_autoregressive"] == 1.0
            assert row["complete_block_efficiency"] is None
        elif row["kind"] == "multidraft":
            blocks = [b for r in mine for t in r["turns"] for b in t["accepted_lengths"][:-1]]
            assert row["complete_block_efficiency"] == (sum(blocks) / len(blocks) if blocks else None)
        if dataset == "gsm8k":
            assert row["accuracy"] == sum(r["correct"] for r in mine) / len(mine)
    report = (run_dir / "report.md").read_text()
    assert "| gsm8k | 1 | spectr n=2 L=2 |" in report and "![speedup](speedup.png)" in report


def test_rerun_resumes_without_generating(tiny_run, tiny_pair_dirs, monkeypatch, capsys):
    run_dir, records, files = tiny_run

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished prompt was generated again")

    monkeypatch.setattr(runner, "run_prompt", forbidden)
    assert cli.main(_args(tiny_pair_dirs, files, run_dir.parent)) == 0
    assert runner.RecordStore(run_dir).records() == records
    assert "autoregressive" in capsys.readouterr().out
    assert cli.main([*_args(tiny_pair_dirs, files, run_dir.parent), "--report-only"]) == 0


def test_changed_settings_refuse_to_mix_into_a_run(tiny_run, tiny_pair_dirs, capsys):
    run_dir, _, files = tiny_run
    assert cli.main([*_args(tiny_pair_dirs, files, run_dir.parent), "--max-new-tokens", "7"]) == 2
    assert "different max_new_tokens" in capsys.readouterr().err


def test_a_run_from_before_a_setting_existed_resumes_only_as_it_ran(tiny_run, tiny_pair_dirs, tmp_path, capsys):
    """A config.json without draft_vocab ran the whole vocabulary: the new default must not mix into it."""
    run_dir, records, files = tiny_run
    older = tmp_path / "tiny"
    shutil.copytree(run_dir, older)
    manifest = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "draft_vocab"}))
    assert cli.main(_args(tiny_pair_dirs, files, tmp_path)) == 2
    assert "different draft_vocab" in capsys.readouterr().err
    assert cli.main([*_args(tiny_pair_dirs, files, tmp_path), "--draft-vocab", "off", "--report-only"]) == 0
    assert runner.RecordStore(older).records() == records


def test_interrupted_run_resumes_to_the_same_set(tiny_pair_dirs, data_files, tmp_path, monkeypatch):
    config = runner.EvalConfig(
        target=str(tiny_pair_dirs[0]), draft=str(tiny_pair_dirs[1]), datasets=["gsm8k"],
        gsm8k_path=str(data_files["gsm8k"]), limit=3, max_new_tokens=4, methods=["autoregressive", "multidraft"],
        verifiers=["spectr:2"], lengths=[2], output_dir=str(tmp_path), run_name="r",
    )  # fmt: skip
    real, calls = runner.run_prompt, []

    def interrupted(*args, **kwargs):
        calls.append(args[2].uid)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_prompt", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, progress=False)
    store = runner.RecordStore(config.run_dir())
    assert len(store.records()) == 3
    # A torn last line, as left by a kill during a write, is dropped on the next open.
    with open(store.path, "ab") as handle:
        handle.write(b'{"key": "gsm8k|T=1|autoregres')
    calls.clear()
    records = runner.run(config, progress=False)
    assert len(calls) == 3  # only the unfinished work
    assert sorted(r["key"] for r in records) == sorted(
        runner.record_key("gsm8k", 1.0, m, f"gsm8k-{i}") for m in config.grid() for i in range(3)
    )
    assert store.path.read_bytes().endswith(b"\n")


def test_records_of_another_setting_refuse_to_mix_into_a_run(tiny_pair_dirs, data_files, tmp_path):
    """A run directory whose records ran other kernels (here: before linears were packed) is not resumed."""
    config = runner.EvalConfig(
        target=str(tiny_pair_dirs[0]), draft=str(tiny_pair_dirs[1]), datasets=["gsm8k"],
        gsm8k_path=str(data_files["gsm8k"]), limit=1, max_new_tokens=3, methods=["autoregressive"],
        output_dir=str(tmp_path), run_name="r", dtype="float32", onednn_linear="on",
    )  # fmt: skip
    records = runner.run(config, progress=False)
    if not records[0].get("packed_rows"):
        pytest.skip("this torch build has no oneDNN")
    store = runner.RecordStore(config.run_dir())
    older = [{k: v for k, v in r.items() if k != "packed_rows"} for r in records]
    store.path.write_text("".join(json.dumps(r) + "\n" for r in older))
    with pytest.raises(ValueError, match="another setting"):
        runner.run(dataclasses.replace(config, limit=2), progress=False)
    assert runner.RecordStore(config.run_dir()).records() == older


def test_sharded_run_splits_prompts_and_gathers_records(tiny_run, tiny_pair_dirs, tmp_path):
    """Two CPU processes (torchrun, accelerate's process state) split the prompts and reproduce the one-process run."""
    run_dir, records, files = tiny_run
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "hf_globalres.eval.cli", *_args(tiny_pair_dirs, files, tmp_path), "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = tmp_path / "tiny"
    ranks = [runner.RecordStore(sharded, rank).path for rank in (0, 1)]
    prompts_per_rank = [{json.loads(line)["prompt"] for line in path.read_text().splitlines()} for path in ranks]
    assert all(prompts_per_rank) and not prompts_per_rank[0] & prompts_per_rank[1]
    gathered = runner.RecordStore(sharded).records()
    # Seeds depend on (dataset, temperature, method, prompt) only, so sharding changes no sample.
    assert {r["key"]: r["texts"] for r in gathered} == {r["key"]: r["texts"] for r in records}
    summary = json.loads((sharded / "summary.json").read_text())
    single = json.loads((run_dir / "summary.json").read_text())
    assert [(r["method"], r["new_tokens"]) for r in summary["rows"]] == [
        (r["method"], r["new_tokens"]) for r in single["rows"]
    ]


def test_seeds_are_shared_by_methods_and_distinct_per_prompt():
    seeds = {runner.prompt_seed(0, f"gsm8k-{i}", 1.0, 0) for i in range(50)}
    assert len(seeds) == 50
    assert (
        runner.prompt_seed(0, "a", 1.0, 0) == runner.prompt_seed(0, "a", 1.0, 0) != runner.prompt_seed(0, "a", 1.0, 1)
    )


def test_grid_and_config_errors():
    config = runner.EvalConfig(verifiers=["single", "spectr:2,4", "rrs"], num_drafts=[1, 3], lengths=[2, 4])
    names = [m.name for m in config.grid()]
    assert names[:3] == ["autoregressive", "hf-assisted L=2", "hf-assisted L=4"]
    assert "single n=3 L=2" not in names and "rrs n=3 L=4" in names and "spectr n=4 L=2" in names
    for settings, message in (
        ({"verifiers": ["nope"]}, "unknown verifier 'nope'"),
        ({"verifiers": ["single:2"]}, "single takes 1..1 drafts"),
        ({"verifiers": ["spectr:x"]}, "expected 'name:n1,n2"),
        ({"datasets": ["squad"]}, "unknown dataset"),
        ({"methods": ["beam"]}, "unknown method"),
        ({"temperatures": [-1.0]}, "temperatures"),
        ({"lengths": [0]}, "must be ≥ 1"),
        ({"assistant_confidence_threshold": 1.5}, "assistant_confidence_threshold"),
        ({"draft_shape": "bush"}, "draft_shape"),
        ({"draft_vocab": 0}, "draft_vocab must be auto, off or a number"),
        ({"draft_vocab": "some"}, "draft_vocab must be auto, off or a number"),
        ({"same_tree_rules": ["spectr"]}, "set same_trees too"),
        ({"same_trees": True, "same_tree_rules": ["nope"]}, "choose from: .*optimal_block"),
        ({"same_trees": True, "same_tree_rules": ["optimal_without_replacement"]}, "read iid drafts"),
        ({"same_trees": True, "same_tree_rules": []}, "same_tree_rules must name"),
        ({"verifier_options": {"nope": {}}}, "verifier_options names unknown verifier 'nope'"),
        ({"verifier_options": {"optimal_block": {"tilt": 0.5}}}, r"verifier_options\['optimal_block'\].*tilt must"),
        ({"verifier_options": {"optimal_block": {"colour": 1}}}, r"verifier_options\['optimal_block'\].*colour"),
        ({"verifier_options": {"optimal_block": 30}}, "must be a mapping of options"),
        ({"verifier_options": ["optimal_block"]}, "verifier_options must map verifier names"),
    ):
        with pytest.raises(ValueError, match=message):
            runner.EvalConfig(**settings).validate()
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        runner.EvalConfig.from_dict({"colour": 1})


def test_cli_help_dump_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "hf-globalres-eval" in capsys.readouterr().out
    assert cli.main(["--dump-config", "--limit", "7", "--verifiers", "spectr:2"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["limit"] == 7 and dumped["verifiers"] == ["spectr:2"]
    assert dumped["assistant_confidence_threshold"] == 0.4 and dumped["draft_shape"] == "tree"
    assert dumped["assistant_top_k"] == 64 and dumped["dtype"] == "auto" and dumped["lengths"] == [12]
    assert cli.main(["--dump-config", "--confidence", "0.2", "--draft-shape", "spine", "--assistant-top-k", "0"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["assistant_confidence_threshold"] == 0.2 and dumped["draft_shape"] == "spine"
    assert dumped["assistant_top_k"] is None
    assert cli.main(["--config", "no-such-config"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["--target", "./no/such/dir", "--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "model './no/such/dir' not found" in capsys.readouterr().err


def test_confidence_stopped_spine_run(tiny_pair_dirs, tmp_path):
    """τ and the spine shape reach both drafting methods; a rerun under another τ is refused."""
    files = {"gsm8k": tmp_path / "gsm8k.jsonl", "mtbench": tmp_path / "mt.jsonl"}
    files["gsm8k"].write_text('{"question": "what is 2 + 3?", "answer": "#### 5"}\n')
    files["mtbench"].write_text('{"question_id": 1, "category": "x", "turns": ["say hi.", "again."]}\n')
    args = _args(tiny_pair_dirs, files, tmp_path / "out", "--datasets", "gsm8k", "--temperatures", "1")
    args += ["--methods", "assisted,multidraft", "--verifiers", "spectr:3", "--lengths", "4"]
    assert cli.main([*args, "--confidence", "0.1", "--draft-shape", "spine"]) == 0
    records = runner.RecordStore(tmp_path / "out" / "tiny").records()
    assert {r["method"] for r in records} == {"hf-assisted L=4", "spectr n=3 L=4"}
    assert all(1 <= turn["new_tokens"] <= 6 for r in records for turn in r["turns"])
    assert cli.main([*args, "--confidence", "0.2", "--draft-shape", "spine"]) == 2


def test_draft_vocab_keeps_the_first_ids_of_a_ranking(tiny_pair_dirs, tmp_path):
    assert runner.EvalConfig(draft="qwen2.5-coder-0.5b-instruct", draft_vocab="auto").draft_vocab_size() == 32_768
    assert runner.EvalConfig(draft=str(tiny_pair_dirs[1]), draft_vocab="auto").draft_vocab_size() is None
    assert runner.EvalConfig(draft_vocab="off").draft_vocab_size() is None
    ranking = tmp_path / "ranking.txt"
    ranking.write_text("# calibrated on nothing\n7\n3\n9\n")
    config = runner.EvalConfig(draft=str(tiny_pair_dirs[1]), draft_vocab=2, draft_vocab_ranking=str(ranking))
    config.validate(datasets=False)
    head = runner.load_models(config, torch.device("cpu")).multidraft_draft.get_output_embeddings()
    assert set(head.token_ids.tolist()) - set(_eos_ids(tiny_pair_dirs[1])) == {3, 7}


def _eos_ids(directory) -> list[int]:
    eos = json.loads((directory / "config.json").read_text()).get("eos_token_id")
    return [] if eos is None else eos if isinstance(eos, list) else [eos]


def test_truncated_int8_draft_run_records_its_setting(tiny_pair_dirs, tmp_path, capsys):
    """assistant_top_k, the int8 draft and the draft vocabulary reach multi-draft runs; records and table name
    device and dtype."""
    files = {"gsm8k": tmp_path / "gsm8k.jsonl", "mtbench": tmp_path / "mt.jsonl"}
    files["gsm8k"].write_text('{"question": "what is 2 + 3?", "answer": "#### 5"}\n')
    files["mtbench"].write_text('{"question_id": 1, "category": "x", "turns": ["say hi."]}\n')
    ranking = tmp_path / "ranking.txt"
    ranking.write_text("\n".join(map(str, range(0, 40, 3))) + "\n")
    args = _args(tiny_pair_dirs, files, tmp_path / "out", "--datasets", "gsm8k", "--temperatures", "0,1")
    args += ["--draft-vocab", "8", "--draft-vocab-ranking", str(ranking)]
    args += ["--verifiers", "optimal:3", "--assistant-top-k", "4", "--draft-int8", "on", "--dtype", "float32"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    records = runner.RecordStore(tmp_path / "out" / "tiny").records()
    assert {(r["device"], r["dtype"]) for r in records} == {("cpu", "float32")}
    assert "ran on cpu, float32" in out
    greedy = {r["method"]: r["texts"] for r in records if r["temperature"] == 0}
    assert len({json.dumps(texts) for texts in greedy.values()}) == 1  # an int8 draft changes no greedy token
    changed = [
        *args[:-8],
        "--verifiers",
        "optimal:3",
        "--assistant-top-k",
        "8",
        "--draft-int8",
        "on",
        "--dtype",
        "float32",
    ]
    assert cli.main(changed) == 2
    assert "assistant_top_k" in capsys.readouterr().err


def test_same_tree_scores_take_each_rule_in_the_form_for_the_runs_draft_shape():
    for shape in ("tree", "spine"):
        scores = runner.SameTreeScores("iid", 4, shape)
        assert scores.rules["optimal_block"].draft_shape == shape
        assert (scores.first_branch is None) == (shape == "spine")


def test_same_tree_scores_keep_the_named_rules_only():
    scores = runner.SameTreeScores("iid", 4, "tree", ["optimal", "optimal_block", "optimal"])
    assert list(scores.rules) == ["optimal", "optimal_block"] and scores.first_branch is None
    assert set(scores.counts().tokens) == {"optimal", "optimal_block"}
    with_single = runner.SameTreeScores("iid", 4, "tree", ["optimal", "single"])
    assert list(with_single.rules) == ["optimal"] and with_single.first_branch is not None


def test_same_trees_takes_a_list_of_rules_on_the_command_line(tmp_path):
    def dump(*extra: str) -> runner.EvalConfig:
        return cli.config_from_args(cli.build_parser().parse_args(["--output-dir", str(tmp_path), *extra]))

    assert dump("--same-trees").same_tree_rules is None and dump("--same-trees").same_trees
    chosen = dump("--same-trees", "optimal_block, spectr")
    assert chosen.same_trees and chosen.same_tree_rules == ["optimal_block", "spectr"]
    assert not dump().same_trees and dump().same_tree_rules is None


def test_verifier_options_reach_every_rule_the_eval_builds(tmp_path, capsys):
    def dump(*extra: str) -> runner.EvalConfig:
        return cli.config_from_args(cli.build_parser().parse_args(["--output-dir", str(tmp_path), *extra]))

    config = dump("--verifier-option", "optimal_block.tilt=30", "--verifier-option", "optimal_block.tol=1e-9")
    assert config.verifier_options == {"optimal_block": {"tilt": 30, "tol": 1e-9}}
    assert config.rule("optimal_block").tilt == 30.0 and config.rule("optimal").name == "optimal"
    scores = runner.SameTreeScores("iid", 4, "spine", ["optimal", "optimal_block"], config.verifier_options)
    assert scores.rules["optimal_block"].tilt == 30.0 and scores.rules["optimal_block"].draft_shape == "spine"
    assert "verifier_options" in runner.EvalConfig.RESULT_FIELDS  # a run directory refuses other options
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--output-dir", str(tmp_path), "--verifier-option", "optimal_block.tilt", "--dump-config"])
    assert exit_info.value.code == 2 and "expected NAME.KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["--output-dir", str(tmp_path), "--verifier-option", "nope.tilt=3", "--dump-config"]) == 2
    assert "unknown verifier 'nope'" in capsys.readouterr().err


def test_verifier_options_reach_the_runs_and_the_same_tree_scores(tiny_pair_dirs, tmp_path, monkeypatch):
    """A tiny run of optimal_block with ``--verifier-option optimal_block.tilt=30``: the run's rule and the
    same-tree scorer both solve with θ = 30, and the run directory refuses to resume without it."""
    from hf_globalres.verifiers.optimal_block import OptimalBlock

    seen = []
    original = OptimalBlock._solve_block
    monkeypatch.setattr(OptimalBlock, "_solve_block", lambda self, *a: seen.append(self.tilt) or original(self, *a))
    files = {"gsm8k": tmp_path / "gsm8k.jsonl", "mtbench": tmp_path / "mt.jsonl"}
    files["gsm8k"].write_text('{"question": "what is 2 + 3?", "answer": "#### 5"}\n')
    files["mtbench"].write_text('{"question_id": 1, "category": "x", "turns": ["say hi."]}\n')
    args = _args(tiny_pair_dirs, files, tmp_path / "out", "--datasets", "gsm8k", "--temperatures", "1")
    args += ["--methods", "multidraft", "--verifiers", "optimal_block:4", "optimal:4", "--lengths", "3"]
    tilted = [*args, "--same-trees", "optimal_block", "--verifier-option", "optimal_block.tilt=30"]
    assert cli.main(tilted) == 0
    assert seen and set(seen) == {30.0}
    assert cli.main([*args, "--same-trees", "optimal_block"]) == 2  # other options, same run directory


def test_same_tree_scores(tiny_pair_dirs, tmp_path):
    """optimal's runs score every i.i.d. rule and the first-branch chain on their own trees; the report pairs them."""
    files = {"gsm8k": tmp_path / "gsm8k.jsonl", "mtbench": tmp_path / "mt.jsonl"}
    files["gsm8k"].write_text(
        '{"question": "what is 2 + 3?", "answer": "#### 5"}\n{"question": "what is 6 * 7?", "answer": "#### 42"}\n'
    )
    files["mtbench"].write_text('{"question_id": 1, "category": "x", "turns": ["say hi.", "again."]}\n')
    args = _args(tiny_pair_dirs, files, tmp_path / "out", "--datasets", "gsm8k", "--temperatures", "1")
    args += ["--methods", "multidraft", "--verifiers", "single", "optimal:3", "spectr:3", "--lengths", "3"]
    assert cli.main([*args, "--same-trees"]) == 0
    run_dir = tmp_path / "out" / "tiny"
    records = runner.RecordStore(run_dir).records()
    assert all(r["same_trees"] is None for r in records if r["verifier"] != "optimal")
    optimal = [r for r in records if r["verifier"] == "optimal"]
    iid = {name for name in verifiers.available() if verifiers.get(name).draft_scheme == "iid" and name != "single"}
    for record in optimal:
        scored = record["same_trees"]
        assert set(scored["tokens"]) == iid | {runner.FIRST_BRANCH_SINGLE}
        # Every block with drafts is scored once; at most one block per turn (the last, one token left) has none.
        blocks = [len(t["accepted_lengths"]) for t in record["turns"]]
        assert sum(blocks) - len(blocks) <= scored["blocks"] <= sum(blocks)
        for value in scored["tokens"].values():
            assert scored["blocks"] <= value <= 4 * scored["blocks"]  # 1 to L + 1 tokens per block

    summary = json.loads((run_dir / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["method"] == "optimal n=3 L=3")
    same = row["same_trees"]
    total = {name: sum(r["same_trees"]["tokens"][name] for r in optimal) for name in iid}
    assert same["tokens_per_block"]["spectr"] == pytest.approx(total["spectr"] / same["blocks"])
    assert same["difference"]["rrs"] == pytest.approx((total["optimal"] - total["rrs"]) / same["blocks"])
    assert same["prompts"] == 2 and same["difference_stderr"]["rrs"] is not None
    checks = {f["check"]: f for f in summary["findings"] if f["method"] == "optimal n=3 L=3"}
    best = max(iid - {"optimal", "optimal_block"}, key=lambda name: same["tokens_per_block"][name])
    assert checks["best_verifier_same_trees"]["against"] == best
    assert checks["best_verifier_same_trees"]["passed"] == (same["difference"][best] >= 0)
    block = checks["block_gain_same_trees"]
    assert block["against"] == "optimal_block" and block["value"] == pytest.approx(-same["difference"]["optimal_block"])
    assert block["stderr"] is not None and block.get("passed") is None
    assert "gain_over_single_same_trees" in checks
    report = (run_dir / "report.md").read_text()
    assert "## Same draft trees" in report and "single (first branch)" in report


def test_records_and_summary_round_trip_through_their_types(tiny_run):
    """Every record line and summary row of a run reads into its dataclass and writes back to the same bytes."""
    from hf_globalres.eval import records, report

    run_dir, _, _ = tiny_run
    lines = (run_dir / "records.0.jsonl").read_text().splitlines()
    typed = [records.Record.from_dict(json.loads(line)) for line in lines]
    assert [json.dumps(r.to_dict(), separators=(",", ":")) for r in typed] == lines
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [records.SummaryRow.from_dict(row).to_dict() for row in summary["rows"]] == summary["rows"]
    assert [records.Finding.from_dict(f).to_dict() for f in summary["findings"]] == summary["findings"]
    # The typed records summarise to the rows their JSON form gave.
    assert report.summarize(typed) == summary["rows"]


def test_an_eval_run_logs_no_generation_config_deprecation(tiny_pair_dirs, data_files, tmp_path):
    """transformers' assisted generation logs that ``generation_config`` came with generation arguments; not here."""
    import logging
    import warnings

    message = "Passing `generation_config` together with generation-related arguments"
    logging.Logger.warning_once.cache_clear()  # transformers logs it once per process: let it log again
    seen: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    recorder = Recorder(logging.WARNING)
    library = logging.getLogger("transformers")
    library.addHandler(recorder)
    config = runner.EvalConfig(
        target=str(tiny_pair_dirs[0]), draft=str(tiny_pair_dirs[1]), datasets=["gsm8k"],
        gsm8k_path=str(data_files["gsm8k"]), limit=1, max_new_tokens=6, temperatures=[0.0, 1.0],
        verifiers=["spectr:2"], lengths=[2], output_dir=str(tmp_path), run_name="quiet",
    )  # fmt: skip
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = runner.run(config, progress=False)
        # The recorder sees the message when transformers logs it outside the eval's generate calls.
        logging.getLogger("transformers.generation.utils").warning(f"{message}=(...) is deprecated")
    finally:
        library.removeHandler(recorder)
    assert {r["kind"] for r in records} == {"autoregressive", "assisted", "multidraft"}
    assert not [w for w in caught if message in str(w.message)]
    assert [line for line in seen if message in line] == [f"{message}=(...) is deprecated"]
