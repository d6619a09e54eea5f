"""Drafting defaults of ``generate`` and of the eval's default grid.

Chosen from measurements on the built-in Qwen2.5-Coder 1.5B/0.5B pair (README, "Speed";
``eval/bench_generate.py`` and ``eval/bench_draft_law.py``).
"""

from __future__ import annotations

#: Branches draft up to 12 tokens, stop after a token their draft gave probability below 0.4 (so blocks run
#: long where the draft is sure), and draft from the draft law truncated to its 64 most likely tokens (which
#: costs 0.1–0.2 % of acceptance and makes verification work on 64 tokens instead of the vocabulary).
DEFAULT_NUM_ASSISTANT_TOKENS = 12
DEFAULT_CONFIDENCE_THRESHOLD = 0.4
DEFAULT_ASSISTANT_TOP_K = 64

__all__ = ["DEFAULT_ASSISTANT_TOP_K", "DEFAULT_CONFIDENCE_THRESHOLD", "DEFAULT_NUM_ASSISTANT_TOKENS"]
