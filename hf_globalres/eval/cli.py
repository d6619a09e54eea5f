"""``hf-globalres-eval``: run an evaluation grid and print the headline table.

hf-globalres-eval                                  # the default grid on the built-in pair
hf-globalres-eval --config gsm8k-grid              # hf_globalres/eval/configs/gsm8k-grid.json
hf-globalres-eval --datasets mtbench --limit 10 --verifiers single spectr:2,4 --lengths 4
accelerate launch -m hf_globalres.eval.cli --config gsm8k-grid   # shard prompts over processes/GPUs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..devices import DTYPE_CHOICES
from .runner import EvalConfig

#: The configs shipped with the package (a wheel install has no repository checkout beside it).
PACKAGE_CONFIGS = Path(__file__).resolve().with_name("configs")
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _words(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def find_config(spec: str) -> Path:
    """A config file from a path, or a name looked up in ./eval/configs (working directory), then the package's.

    A file of the same name in ./eval/configs shadows the packaged one, so a checkout can try an edited grid.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    for directory in (Path.cwd() / "eval" / "configs", PACKAGE_CONFIGS):
        for suffix in _CONFIG_SUFFIXES:
            candidate = directory / f"{spec}{suffix}"
            if candidate.is_file():
                return candidate
    names = ", ".join(sorted(p.stem for p in PACKAGE_CONFIGS.iterdir() if p.suffix in _CONFIG_SUFFIXES))
    raise ValueError(
        f"config {spec!r} not found: neither a file nor a name in ./eval/configs/ or the packaged configs "
        f"({names}); pass one of those names or a path to a JSON/YAML file"
    )


def read_config(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use JSON") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold one object of settings")
    data.pop("description", None)
    return data


def build_parser() -> argparse.ArgumentParser:
    """The command line: a few top-level options, then one argument group per concern."""
    parser = argparse.ArgumentParser(
        prog="hf-globalres-eval",
        description=(
            "Evaluate lossless multi-draft speculative sampling against autoregressive sampling and transformers' "
            "assisted generation: block efficiency, acceptance per depth next to the theoretical optimum, tokens/s, "
            "speedups, verifier time, GSM8K accuracy and peak memory. Without arguments it runs the default grid "
            "on the built-in Qwen2.5-Coder-1.5B/0.5B-Instruct pair (assembled on first use) and prints the headline "
            "table. Results are appended per prompt, so an interrupted run resumes where it stopped."
        ),
    )
    parser.add_argument(
        "--config",
        help="a config file, or a name in ./eval/configs or the packaged configs (default, floors, accuracy, "
        "gsm8k-grid, mtbench-grid)",
    )
    _add_model_arguments(parser.add_argument_group("models"))
    _add_data_arguments(parser.add_argument_group("data"))
    _add_grid_arguments(parser.add_argument_group("grid"))
    _add_output_arguments(parser.add_argument_group("output"))
    parser.add_argument("--list-verifiers", action="store_true", help="print the registered verifiers and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def _add_model_arguments(models: argparse._ArgumentGroup) -> None:
    """Which target and draft, and how they run (dtype, oneDNN linears, device, threads)."""
    models.add_argument("--target", help="built-in name, local directory, .gguf file or Hub id")
    models.add_argument("--draft", help="built-in name, local directory, .gguf file or Hub id (same tokenizer)")
    models.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="auto (default): bfloat16 on GPUs and on CPUs with AVX-512 BF16 or AMX, float32 elsewhere",
    )
    models.add_argument(
        "--onednn-linear",
        choices=["auto", "on", "off"],
        help="float32 CPU linear layers through oneDNN with weights packed for it, for every method "
        "(auto: on for float32 on a CPU)",
    )
    models.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    models.add_argument("--device-map", help='"auto" spreads a target too large for one GPU over all of them')
    models.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")


def _add_data_arguments(data: argparse._ArgumentGroup) -> None:
    """Which prompts: datasets, their files, how many, the seed."""
    data.add_argument("--datasets", type=_words, help="comma-separated: gsm8k, mtbench")
    data.add_argument(
        "--gsm8k-path", help="GSM8K test file (.jsonl/.json/.parquet); default $HF_GLOBALRES_GSM8K, "
        "../shared/data/gsm8k/test.jsonl, else openai/gsm8k from the Hub; offline, the package's own math "
        "sample runs instead (announced)",
    )  # fmt: skip
    data.add_argument(
        "--mtbench-path", help="MT-Bench question file; default $HF_GLOBALRES_MTBENCH, else the 80 questions "
        "packaged with hf_globalres",
    )  # fmt: skip
    data.add_argument("--limit", type=int, help="prompts per dataset (0 = all)")
    data.add_argument("--seed", type=int, help="base seed; every method gets the same seed per prompt and turn")


def _add_grid_arguments(grid: argparse._ArgumentGroup) -> None:
    """The grid of methods and the decoding settings they share."""
    grid.add_argument("--methods", type=_words, help="comma-separated: autoregressive, assisted, multidraft")
    grid.add_argument(
        "--verifiers", nargs="+", help='verifier entries: "name" (every --drafts n), "name:n1,n2" or "all"'
    )
    grid.add_argument("--drafts", type=_ints, dest="num_drafts", help="comma-separated n values")
    grid.add_argument("--lengths", type=_ints, help="comma-separated draft lengths L")
    grid.add_argument("--temperatures", type=_floats, help="comma-separated; 0 = greedy")
    grid.add_argument("--max-new-tokens", type=int)
    grid.add_argument("--tree-attention", choices=["auto", "on", "off"])
    grid.add_argument(
        "--confidence",
        type=float,
        dest="assistant_confidence_threshold",
        help="τ: drafts stop after a token the draft gave probability < τ (ours and transformers' assisted alike)",
    )
    grid.add_argument("--draft-shape", help="which draft nodes draft on: tree or spine")
    grid.add_argument(
        "--assistant-top-k",
        type=int,
        help="multi-draft runs draft from the draft law truncated to its top-k tokens (0: the whole law); lossless",
    )
    grid.add_argument(
        "--draft-int8",
        choices=["auto", "on", "off"],
        help="multi-draft runs use the draft with int8 linear layers (auto: on a CPU); lossless, the draft law "
        "is ours to choose",
    )
    grid.add_argument(
        "--draft-vocab",
        type=_draft_vocab,
        help="multi-draft runs use the draft's LM head over the first N ids of a ranking and each prompt's tokens "
        "(auto: a shipped ranking's first 32768 where the draft has one; off: the whole vocabulary); lossless",
    )
    grid.add_argument("--draft-vocab-ranking", help="ranking file for --draft-vocab (eval/calibrate_draft_vocab.py)")
    grid.add_argument("--no-acceptance", action="store_true", help="skip acceptance-per-depth measurement")
    grid.add_argument(
        "--verifier-option",
        action="append",
        type=_verifier_option,
        metavar="NAME.KEY=VALUE",
        help="an option of a verifier wherever the eval builds it, runs and same-tree scores alike "
        "(e.g. optimal_block.tilt=30); repeatable",
    )
    grid.add_argument(
        "--same-trees",
        nargs="?",
        const=True,
        default=None,
        type=_words,
        metavar="RULES",
        help="runs of optimal (n ≥ 2) also score every rule of their draft scheme that takes their n on their own "
        "draft trees (exact expected tokens per block, paired differences); RULES (e.g. optimal_block,spectr) "
        "scores only those",
    )


def _verifier_option(text: str) -> tuple[str, str, Any]:
    """``NAME.KEY=VALUE`` → (name, key, value); the value is read as JSON (a number, true/false), else kept as text."""
    target, equals, raw = text.partition("=")
    name, dot, key = target.partition(".")
    if not (equals and dot and name.strip() and key.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME.KEY=VALUE (e.g. optimal_block.tilt=30), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), key.strip(), value


def _add_output_arguments(out: argparse._ArgumentGroup) -> None:
    """Where results go and what the run writes or prints."""
    out.add_argument("--output-dir", help="parent of run directories")
    out.add_argument("--run-name", help="run directory name (reruns with the same name resume)")
    out.add_argument("--overwrite", action="store_true", help="discard existing results of this run first")
    out.add_argument("--report-only", action="store_true", help="rewrite the report from existing records")
    out.add_argument("--no-progress", action="store_true", help="hide progress bars")
    out.add_argument("--dump-config", action="store_true", help="print the resolved config as JSON and exit")


_OVERRIDES = (
    "target",
    "draft",
    "dtype",
    "device",
    "device_map",
    "threads",
    "datasets",
    "gsm8k_path",
    "mtbench_path",
    "limit",
    "seed",
    "methods",
    "verifiers",
    "num_drafts",
    "lengths",
    "temperatures",
    "max_new_tokens",
    "assistant_confidence_threshold",
    "draft_shape",
    "onednn_linear",
    "draft_int8",
    "draft_vocab",
    "draft_vocab_ranking",
    "output_dir",
    "run_name",
)


def _draft_vocab(value: str) -> str | int:
    if value in ("auto", "off"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a number of token ids, got {value!r}") from None


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    settings: dict[str, Any] = {}
    if args.config:
        path = find_config(args.config)
        settings.update(read_config(path))
        settings.setdefault("run_name", path.stem)
    for name in _OVERRIDES:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if settings.get("limit") == 0:
        settings["limit"] = None
    if args.tree_attention is not None:
        settings["tree_attention"] = {"auto": "auto", "on": True, "off": False}[args.tree_attention]
    if args.no_acceptance:
        settings["measure_acceptance"] = False
    if args.same_trees is not None:
        settings["same_trees"] = True
        if isinstance(args.same_trees, list):
            settings["same_tree_rules"] = args.same_trees
    if args.assistant_top_k is not None:
        settings["assistant_top_k"] = args.assistant_top_k or None
    for name, key, value in args.verifier_option or []:
        chosen = {**settings.get("verifier_options", {})}
        chosen[name] = {**chosen.get(name, {}), key: value}
        settings["verifier_options"] = chosen
    config = EvalConfig.from_dict(settings)
    config.validate()
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .. import verifiers

    if args.list_verifiers:
        print("\n".join(verifiers.available()))
        return 0
    try:
        config = config_from_args(args)
    except ValueError as error:
        if args.debug:
            raise
        print(f"hf-globalres-eval: error: {error}", file=sys.stderr)
        return 2
    if args.dump_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0

    from . import report, runner

    start = time.perf_counter()
    run_dir = config.run_dir()
    try:
        if args.report_only:
            records = runner.RecordStore(run_dir).records()
            if not records:
                raise ValueError(f"no records in {run_dir}")
        else:
            methods = ", ".join(m.name for m in config.grid())
            print(f"run {run_dir}: {', '.join(config.datasets)} × T={config.temperatures} × [{methods}]", flush=True)
            records = runner.run(config, progress=not args.no_progress, overwrite=args.overwrite)
    except ValueError as error:
        if args.debug:
            raise
        print(f"hf-globalres-eval: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if args.debug:
            raise  # an output directory that cannot be written, a full disk
        print(f"hf-globalres-eval: error: {error.strerror or error} ({error.filename or run_dir})", file=sys.stderr)
        return 2
    if not _is_main_process():
        return 0
    selected = runner.select(records, config)
    summary = report.write_report(config, selected)
    for note in runner.resume_notes(config, selected):
        print(f"note: {note}", file=sys.stderr)
    print()
    print(report.describe_setting(summary["rows"]))
    print(report.format_table(summary["rows"]))
    if summary["findings"]:
        print()
        print(report.format_findings(summary["findings"]))
    print(f"\nreport: {run_dir / 'report.md'} (JSON, CSV and plots beside it); {time.perf_counter() - start:.0f} s")
    return 0


def _is_main_process() -> bool:
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover
        return True
    return PartialState().is_main_process


if __name__ == "__main__":
    sys.exit(main())
