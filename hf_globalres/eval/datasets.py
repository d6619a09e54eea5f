"""Prompt sets: GSM8K (test) and MT-Bench (80 questions, two turns).

Each loader takes a local file (``.jsonl``, ``.json`` or ``.parquet``), else
finds the offline copy, else reads the Hub:

- GSM8K: ``--gsm8k-path``, the environment variable ``HF_GLOBALRES_GSM8K``,
  ``../shared/data/gsm8k/test.jsonl`` relative to the working directory or to
  the repository, else ``openai/gsm8k`` (config ``main``, split ``test``).
  When none of them can be read (offline, no copy) the run says so in one line
  and uses the package's own sample of original math word problems instead
  (``data/math_sample.jsonl``, uids ``math-sample-<i>``, never GSM8K's
  ``gsm8k-<i>``, so a run directory never mixes the two: :func:`prompt_source`).
- MT-Bench: ``--mtbench-path``, ``HF_GLOBALRES_MTBENCH``, the package's copy of
  FastChat's question file (``data/mt_bench_question.jsonl``, Apache-2.0), else
  ``HuggingFaceH4/mt_bench_prompts``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GSM8K_ENV = "HF_GLOBALRES_GSM8K"
MTBENCH_ENV = "HF_GLOBALRES_MTBENCH"
GSM8K_HUB = ("openai/gsm8k", "main", "test")
MTBENCH_HUB = ("HuggingFaceH4/mt_bench_prompts", None, "train")
_GSM8K_RELATIVE = Path("..") / "shared" / "data" / "gsm8k" / "test.jsonl"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_PACKAGE_DATA = Path(__file__).resolve().with_name("data")
#: Original grade-school math problems in GSM8K's layout, the fallback when GSM8K cannot be read (data/README.md).
MATH_SAMPLE_FILE = _PACKAGE_DATA / "math_sample.jsonl"
#: FastChat's 80 MT-Bench questions, unmodified (Apache-2.0, data/LICENSE-MT-Bench.txt).
MTBENCH_FILE = _PACKAGE_DATA / "mt_bench_question.jsonl"
#: The source :func:`prompt_source` names for the sample; its prompts' uids are ``math-sample-<i>``.
MATH_SAMPLE = "math-sample"

#: Appended to every GSM8K question so that the final answer is easy to find.
GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer on the last line as '#### <number>'."


@dataclass
class Prompt:
    """One evaluation item.

    Attributes:
        uid: stable identifier within its dataset (used to resume runs).
        dataset: "gsm8k" or "mtbench".
        turns: user messages; later turns are sent after the model's own answers.
        reference: the reference final answer (GSM8K), else None.
        category: MT-Bench category, else None.
        meta: extra facts; ``{"source": "math-sample"}`` on the embedded sample's prompts.
    """

    uid: str
    dataset: str
    turns: list[str]
    reference: str | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of objects")
        return data
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json or .parquet")


#: The offline alternative to each Hub dataset, for the message when the Hub cannot be reached.
_OFFLINE_HINT = {
    GSM8K_HUB[0]: f"pass --gsm8k-path with a local GSM8K test file (.jsonl/.json/.parquet) or set {GSM8K_ENV}",
    MTBENCH_HUB[0]: f"pass --mtbench-path with a local MT-Bench question file or set {MTBENCH_ENV} "
    f"(the package's own copy, {MTBENCH_FILE.name}, is missing: reinstall hf-globalres)",
}


class HubUnavailable(ValueError):
    """A Hub dataset could not be read; ``reason`` is the first line of the underlying error."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _hub_records(repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is part of the eval extra
        reason = '"datasets" is not installed (pip install "hf-globalres[eval]")'
        raise HubUnavailable(f"could not load {repo} from the Hub: {reason}", reason) from None
    try:
        return list(datasets.load_dataset(repo, config, split=split))
    except Exception as error:  # offline, unreachable, not found: datasets raises many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = _OFFLINE_HINT.get(repo, "pass a local file")
        raise HubUnavailable(f"could not load {repo} from the Hub ({reason}); offline, {hint}", reason) from error


def default_gsm8k_path() -> Path | None:
    """The offline GSM8K test file, if one is found (env var, then ``../shared/data`` from cwd or repo)."""
    override = os.environ.get(GSM8K_ENV)
    if override:
        return Path(override).expanduser()
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = (base / _GSM8K_RELATIVE).resolve()
        if candidate.is_file():
            return candidate
    return None


def default_mtbench_path() -> Path | None:
    """The offline MT-Bench question file: the env var, else the package's copy (None only if it was removed)."""
    override = os.environ.get(MTBENCH_ENV)
    if override:
        return Path(override).expanduser()
    return MTBENCH_FILE if MTBENCH_FILE.is_file() else None


def prompt_source(dataset: str, uid: str) -> str:
    """Where a prompt comes from, read off its uid: :data:`MATH_SAMPLE` for the embedded sample, else ``dataset``.

    Runs fingerprint their prompts by uid (:mod:`.fingerprint`); the sample's own uid prefix lets a
    resumed run tell its prompts from GSM8K's and refuse to mix the two in one run directory.
    """
    return MATH_SAMPLE if uid.startswith(f"{MATH_SAMPLE}-") else dataset


def gsm8k_final_answer(solution: str) -> str:
    """The reference answer of a GSM8K solution: the text after ``####``, without commas."""
    if "####" not in solution:
        raise ValueError("a GSM8K answer must end with '#### <number>'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k_prompts(rows: list[dict[str, Any]], limit: int | None, uid_prefix: str) -> list[Prompt]:
    """Prompts of GSM8K-layout rows (``question``, ``answer`` ending in ``#### <number>``), in order."""
    prompts = []
    for index, row in enumerate(rows[:limit] if limit is not None else rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"GSM8K row {index} needs 'question' and 'answer' fields, got {sorted(row)}")
        prompts.append(
            Prompt(
                uid=f"{uid_prefix}{index}",
                dataset="gsm8k",
                turns=[f"{row['question']}\n{GSM8K_INSTRUCTION}"],
                reference=gsm8k_final_answer(row["answer"]),
                meta={"source": MATH_SAMPLE} if uid_prefix.startswith(MATH_SAMPLE) else {},
            )
        )
    return prompts


def load_math_sample(limit: int | None = None) -> list[Prompt]:
    """The package's original math word problems (``data/math_sample.jsonl``) as prompts ``math-sample-<i>``.

    They run under the dataset name "gsm8k" (same instruction, same answer check), but their uids
    keep them apart from GSM8K's in every record and fingerprint.
    """
    return _gsm8k_prompts(read_records(MATH_SAMPLE_FILE), limit, f"{MATH_SAMPLE}-")


def load_gsm8k(path: str | os.PathLike | None = None, limit: int | None = None) -> list[Prompt]:
    """GSM8K test questions with their reference final answers, in file order.

    With no file given or found and the Hub unavailable, the embedded math sample runs instead,
    announced in one line on stderr (never silently: its results are not GSM8K results).
    """
    source = Path(path) if path is not None else default_gsm8k_path()
    if source is not None:
        return _gsm8k_prompts(read_records(source), limit, "gsm8k-")
    try:
        rows = _hub_records(*GSM8K_HUB)
    except HubUnavailable as error:
        prompts = load_math_sample(limit)
        total = len(read_records(MATH_SAMPLE_FILE))
        print(
            f"note: GSM8K could not be reached (no --gsm8k-path, no ${GSM8K_ENV}, no {_GSM8K_RELATIVE.as_posix()}; "
            f"the Hub: {error.reason[:160]}); running {len(prompts)} of the {total} embedded sample problems instead "
            f"(original math word problems, not GSM8K; uids {MATH_SAMPLE}-<i>). For GSM8K pass --gsm8k-path FILE, "
            f"set {GSM8K_ENV}=FILE, or run with network access to the Hub.",
            file=sys.stderr,
            flush=True,
        )
        return prompts
    return _gsm8k_prompts(rows, limit, "gsm8k-")


def load_mtbench(path: str | os.PathLike | None = None, limit: int | None = None) -> list[Prompt]:
    """MT-Bench questions, both turns (FastChat ``turns`` or Hub ``prompt`` fields)."""
    source = Path(path) if path is not None else default_mtbench_path()
    rows = read_records(source) if source is not None else _hub_records(*MTBENCH_HUB[:1], None, MTBENCH_HUB[2])
    prompts = []
    for index, row in enumerate(rows[:limit] if limit is not None else rows):
        turns = row.get("turns", row.get("prompt"))
        if turns is None or isinstance(turns, str) or len(turns) == 0:
            raise ValueError(f"MT-Bench row {index} needs a non-empty list of turns ('turns' or 'prompt')")
        uid = row.get("question_id", row.get("prompt_id", index))
        prompts.append(
            Prompt(uid=f"mtbench-{uid}", dataset="mtbench", turns=[str(t) for t in turns], category=row.get("category"))
        )
    return prompts


LOADERS: dict[str, Callable[..., list[Prompt]]] = {"gsm8k": load_gsm8k, "mtbench": load_mtbench}


def load_prompts(name: str, path: str | os.PathLike | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts of dataset ``name`` ("gsm8k" or "mtbench")."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(LOADERS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be ≥ 1, got {limit}")
    prompts = LOADERS[name](path, limit)
    if not prompts:
        raise ValueError(f"no {name} prompts in {str(path) if path else 'the default source'}: the file is empty")
    return prompts


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ready for the assistant's reply."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    # Models without a template get the turns as plain text.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])


__all__ = [
    "GSM8K_INSTRUCTION",
    "LOADERS",
    "MATH_SAMPLE",
    "MATH_SAMPLE_FILE",
    "MTBENCH_FILE",
    "HubUnavailable",
    "Prompt",
    "chat_ids",
    "default_gsm8k_path",
    "default_mtbench_path",
    "gsm8k_final_answer",
    "load_gsm8k",
    "load_math_sample",
    "load_mtbench",
    "load_prompts",
    "prompt_source",
    "read_records",
]
