"""Exact law of the first three new tokens of plain sampling, and a chi-square comparison."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

NEW_TOKENS = 3


def reference_processors(sampling: dict) -> LogitsProcessorList:
    """The processors plain ``generate`` builds for these options, in its order."""
    processors = LogitsProcessorList()
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling["repetition_penalty"]))
    if sampling.get("temperature", 1.0) != 1.0:
        processors.append(TemperatureLogitsWarper(sampling["temperature"]))
    if sampling.get("top_k"):
        processors.append(TopKLogitsWarper(sampling["top_k"]))
    if sampling.get("top_p", 1.0) < 1.0:
        processors.append(TopPLogitsWarper(sampling["top_p"]))
    if sampling.get("min_p") is not None:
        processors.append(MinPLogitsWarper(sampling["min_p"]))
    return processors


@torch.no_grad()
def exact_law(model: torch.nn.Module, prompt: list[int], sampling: dict, eos: int, pad: int) -> torch.Tensor:
    """[V, V, V] float64: P(first three new tokens = (t1, t2, t3)) under plain sampling from ``model``.

    After EOS a row is padded, so mass that stops at t1 = EOS sits on (EOS, pad, pad)
    and mass stopping at t2 = EOS on (t1, EOS, pad).
    """
    vocab = model.config.vocab_size
    processors = reference_processors(sampling)
    grid = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # [V², 2]
    ids = torch.cat([torch.tensor(prompt).expand(vocab * vocab, -1), grid], dim=1)  # [V², T0 + 2]
    logits = model(ids).logits.double()
    t0 = len(prompt)

    def law_after(width: int, rows: torch.Tensor) -> torch.Tensor:
        scores = processors(ids[rows, :width], logits[rows, width - 1].float()).double()
        return torch.softmax(scores, dim=-1)

    q1 = law_after(t0, torch.tensor([0]))[0]  # [V]
    q2 = law_after(t0 + 1, torch.arange(vocab) * vocab)  # [V(t1), V]
    q3 = law_after(t0 + 2, torch.arange(vocab * vocab)).view(vocab, vocab, vocab)
    law = q1[:, None, None] * q2[:, :, None] * q3
    law[eos] = 0
    law[:, eos] = 0
    law[eos, pad, pad] += q1[eos]
    stop_second = q1 * q2[:, eos]
    stop_second[eos] = 0
    law[:, eos, pad] += stop_second
    return law


def chi_square(law: torch.Tensor, samples: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom of ``samples`` [N, 3] against ``law`` [V, V, V].

    Cells with expected count below ``min_expected`` are pooled into one cell.
    A sample in a zero-probability cell gives an infinite statistic.
    """
    vocab = law.shape[0]
    flat = law.flatten().numpy()
    index = (samples[:, 0] * vocab * vocab + samples[:, 1] * vocab + samples[:, 2]).numpy()
    observed = np.bincount(index, minlength=flat.size).astype(float)
    if observed[flat <= 0].sum() > 0:
        return float("inf"), 1
    expected = flat / flat.sum() * len(index)
    big = expected >= min_expected
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum() - 1)


def pvalue(parts: list[tuple[float, int]]) -> float:
    """p-value of the sum of independent chi-square statistics."""
    statistic = sum(s for s, _ in parts)
    dof = sum(d for _, d in parts)
    return float(stats.chi2.sf(statistic, dof))
