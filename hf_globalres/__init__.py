"""hf_globalres: optimal, lossless multi-draft speculative sampling for transformers.

Layout:
    verifiers/   token-level verification rules (pure tensor math, one registry)
    rates.py     optimal and baseline acceptance rates
    reference.py enumeration and transport-LP references for small vocabularies
    generation/  drafting, tree verification and the transformers integration
    eval/        the evaluation suite behind ``hf-globalres-eval``

Importing the package imports neither transformers nor any model code; the
generation entry points load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import rates, verifiers

__version__ = "0.1.0"

_LAZY = {
    "generate": "hf_globalres.generation",
    "enable": "hf_globalres.generation",
    "disable": "hf_globalres.generation",
    "MultiDraftGenerationMixin": "hf_globalres.generation",
}

if TYPE_CHECKING:  # pragma: no cover
    from .generation import MultiDraftGenerationMixin, disable, enable, generate


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_globalres' has no attribute {name!r}")


__all__ = ["MultiDraftGenerationMixin", "__version__", "disable", "enable", "generate", "rates", "verifiers"]
