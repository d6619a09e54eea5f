"""Multi-draft speculative decoding inside transformers' ``generate``.

drafting.py    n draft branches of L tokens, one batched assistant forward per depth
tree.py        tree layout, 4D additive masks, position ids, KV-cache surgery
processors.py  logits → q and p, once per prefix (a LogitsProcessor)
loop.py        the block loop: draft, verify in one target forward, walk, emit
api.py         generate / enable / disable / MultiDraftGenerationMixin
"""

from __future__ import annotations

from .api import MultiDraftGenerateOutput, MultiDraftGenerationMixin, default_verifier, disable, enable, generate
from .processors import SpeculativeLogitsProcessor

__all__ = [
    "MultiDraftGenerateOutput",
    "MultiDraftGenerationMixin",
    "SpeculativeLogitsProcessor",
    "default_verifier",
    "disable",
    "enable",
    "generate",
]
