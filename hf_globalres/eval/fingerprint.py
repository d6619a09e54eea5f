"""Fingerprints of what a run's results depend on, so a resumed run never mixes two runs' results.

A run directory's ``config.json`` keeps, beside the settings, a fingerprint of

- every prompt it used, by uid: a hash of its turns and reference answer (a run
  may grow its ``--limit``; a prompt it already used must not change). A uid
  also names its source (:func:`.datasets.prompt_source`): the embedded math
  sample that stands in for an unreachable GSM8K never joins GSM8K's prompts;
- each model: a built-in model's packaged sha256; for a directory or a
  ``.gguf`` file, a hash of its config and tokenizer files and, per weight
  file, its name, size, header and first and last MiB (cheap enough to compute
  on every run, and changed by any re-save or fine-tune); a Hub id as given;
- the package version.

:func:`differences` names what changed between two fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .datasets import prompt_source

_SAMPLE = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def prompt_hash(turns: list[str], reference: str | None) -> str:
    return hashlib.sha256(json.dumps([turns, reference], ensure_ascii=False).encode()).hexdigest()[:16]


def _file_sample(path: Path) -> str:
    """sha256 of a file's size, first and last MiB (whole files up to 2 MiB)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            handle.seek(size - _SAMPLE)
        digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()[:16]


def model_fingerprint(spec: str) -> str:
    """A short string that changes whenever the model ``spec`` names changes (module docstring)."""
    from .. import models

    text = os.fspath(spec)
    if text in models.BUILTIN:
        return f"builtin:{text}:{models.BUILTIN[text].sha256[:16]}"
    path = Path(text).expanduser()
    if path.is_file():
        return f"file:{_file_sample(path)}"
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(path).as_posix()
            if file.suffix in _WEIGHT_SUFFIXES or file.suffix == ".json" or file.name.startswith("tokenizer"):
                digest.update(f"{relative}:{_file_sample(file)};".encode())
        return f"dir:{digest.hexdigest()[:16]}"
    return f"hub:{text}"


def run_fingerprint(config: Any, prompts: dict[str, list[Any]]) -> dict[str, Any]:
    """The fingerprint of a run about to start: models, package version, prompts used by uid."""
    from .. import __version__

    return {
        "package": __version__,
        "target": model_fingerprint(config.target),
        "draft": model_fingerprint(config.draft),
        "prompts": {
            f"{name}|{prompt.uid}": prompt_hash(list(prompt.turns), prompt.reference)
            for name, items in prompts.items()
            for prompt in items
        },
    }


def _sources(prompts: dict[str, str]) -> dict[str, set[str]]:
    """The sources of each dataset's prompts, keyed ``dataset|uid`` as in :func:`run_fingerprint`."""
    sources: dict[str, set[str]] = {}
    for key in prompts:
        dataset, _, uid = key.partition("|")
        sources.setdefault(dataset, set()).add(prompt_source(dataset, uid))
    return sources


def differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between two fingerprints, in words; prompts new to ``current`` are no change.

    New prompts from another source than the recorded ones (the embedded math sample instead of
    GSM8K, or back) are a change: their results would be reported as one dataset.
    """
    changed = [key for key in ("package", "target", "draft") if previous.get(key) != current.get(key)]
    old = previous.get("prompts", {})
    edited = sorted(uid for uid, digest in current.get("prompts", {}).items() if uid in old and old[uid] != digest)
    if edited:
        shown = ", ".join(edited[:3]) + (f" and {len(edited) - 3} more" if len(edited) > 3 else "")
        changed.append(f"prompt texts ({shown})")
    before, now = _sources(old), _sources(current.get("prompts", {}))
    for dataset in sorted(set(before) & set(now)):
        if before[dataset] != now[dataset]:
            was, new = (" and ".join(sorted(s)) for s in (before[dataset], now[dataset]))
            changed.append(f"{dataset} prompt sources (recorded: {was}; now: {new})")
    names = {"package": "package version", "target": "target model files", "draft": "draft model files"}
    return [names.get(item, item) for item in changed]


__all__ = ["differences", "model_fingerprint", "prompt_hash", "run_fingerprint"]
