"""Block efficiency of speculative decoding: tokens generated per target-model forward pass."""

import evaluate

from hf_globalres.eval.metrics import block_efficiency, evaluate_info

_DESCRIPTION = """
Block efficiency = Σ new tokens / Σ target forwards over a set of generations (a ratio of totals).
Autoregressive decoding scores exactly 1; speculative decoding with drafts of length L scores at most L + 1.
"""

_KWARGS_DESCRIPTION = """
Args:
    new_tokens: tokens generated per generation (list of int).
    target_forwards: target-model forward passes per generation, prefill included (list of int).
Returns:
    block_efficiency: float.
Examples:
    >>> metric = evaluate.load("path/to/block_efficiency")
    >>> metric.compute(new_tokens=[10, 6], target_forwards=[4, 4])
    {'block_efficiency': 2.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BlockEfficiency(evaluate.Metric):
    def _info(self):
        return evaluate_info(_DESCRIPTION, _KWARGS_DESCRIPTION, new_tokens="int64", target_forwards="int64")

    def _compute(self, new_tokens, target_forwards):
        return {"block_efficiency": block_efficiency(new_tokens, target_forwards)}
