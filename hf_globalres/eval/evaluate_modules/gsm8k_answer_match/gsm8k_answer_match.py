"""GSM8K final-answer accuracy: the last number of a generated solution against the reference answer."""

import evaluate

from hf_globalres.eval.metrics import answer_match, evaluate_info

_DESCRIPTION = """
Compares the final numeric answer of each prediction with the reference. The answer is the first number after the
last '####' when present, else the last number of the text; commas and trailing '.0' are ignored. References may be
full GSM8K solutions ('... #### 72') or bare answers ('72').
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated solutions (list of str).
    references: reference solutions or answers (list of str).
Returns:
    accuracy, correct, total and stderr = sqrt(accuracy (1 - accuracy) / total).
Examples:
    >>> metric = evaluate.load("path/to/gsm8k_answer_match")
    >>> predictions = ["so 3 + 4 = 7\\n#### 7", "it is 1,000"]
    >>> metric.compute(predictions=predictions, references=["#### 7", "1000.0"])["accuracy"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Gsm8kAnswerMatch(evaluate.Metric):
    def _info(self):
        return evaluate_info(_DESCRIPTION, _KWARGS_DESCRIPTION, predictions="string", references="string")

    def _compute(self, predictions, references):
        return answer_match(predictions, references)
