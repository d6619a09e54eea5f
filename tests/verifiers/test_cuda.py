"""The CUDA path: every rule stays lossless and on the device, and decoding on CUDA matches its CPU meaning.

Skipped without a CUDA device; ``eval/device_check.py`` runs these (``pytest -k cuda``) on an accelerator.
"""

from __future__ import annotations

import pytest
import torch

import hf_globalres
from hf_globalres import verifiers
from hf_globalres.reference import enumerate_law
from hf_globalres.verifiers._selection import FittedVerifier

from .cases import make_case, random_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ALL = verifiers.available()
EXACT = 1e-10
#: Closed-form rules and optimal's Newton solve agree across devices up to rounding; fitted rules solve to a
#: tolerance, so their laws may differ by it (they stay exact either way, see the first test).
AGREEMENT = 1e-9


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", ["random", "sparse", "q_zero_where_p"])
def test_cuda_law_is_exact(name: str, kind: str) -> None:
    """Averaged over every draft tuple, the output law computed on CUDA is q."""
    rule = verifiers.get(name)
    q, p = make_case(kind, 5, 3)
    for n in (1, 2, 3):
        if n > (rule.max_drafts or n):
            continue
        marginal, acceptance, _ = enumerate_law(rule, q.cuda(), p.cuda(), n)
        assert marginal.is_cuda
        assert torch.allclose(marginal.cpu(), q, rtol=0, atol=EXACT), (name, kind, n)
        assert 0 <= float(acceptance) <= 1 + EXACT


@pytest.mark.parametrize("name", [name for name in ALL if not isinstance(verifiers.get(name), FittedVerifier)])
def test_cuda_conditional_matches_cpu(name: str) -> None:
    rule = verifiers.get(name)
    q, p = random_batch(6, 300, seed=5)
    n = min(4, rule.max_drafts or 4)
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(p, n, replacement=rule.draft_scheme == "iid", generator=g)
    cpu = rule.conditional(q, p, drafts)
    cuda = rule.conditional(q.cuda(), p.cuda(), drafts.cuda())
    assert cuda.is_cuda
    assert float((cuda.cpu() - cpu).abs().max()) <= AGREEMENT


@pytest.mark.parametrize("name", ALL)
def test_cuda_verify_returns_valid_tokens_on_the_device(name: str) -> None:
    """float32 top-k rows, as generation hands them over: tokens on CUDA, in q's support, flags consistent."""
    rule = verifiers.get(name)
    q, p = random_batch(8, 2000, seed=9, dtype=torch.float32)
    for law in (q, p):
        law[law < law.topk(16, dim=-1).values[:, -1:]] = 0  # small enough for the fitted rules' enumeration
        law /= law.sum(-1, keepdim=True)
    q, p = q.cuda(), p.cuda()
    n = min(3, rule.max_drafts or 3)
    g = torch.Generator(device="cuda").manual_seed(0)
    drafts = torch.multinomial(p, n, replacement=rule.draft_scheme == "iid", generator=g)
    result = rule.verify(q, p, drafts, generator=g)
    assert result.token.is_cuda and result.token.dtype == torch.long and result.token.shape == (8,)
    assert bool((q.gather(1, result.token[:, None]) > 0).all())
    assert torch.equal(result.accepted, result.draft_index >= 0)
    matched = drafts.gather(1, result.draft_index.clamp_min(0)[:, None])[:, 0]
    assert torch.equal(matched[result.accepted], result.token[result.accepted])


def _tiny_pair_on_cuda() -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    from ..generation.conftest import tiny_llama
    from ..generation.test_generate import batch

    inputs = {key: value.cuda() for key, value in batch().items()}
    return tiny_llama(0).cuda(), tiny_llama(1, layers=1).cuda(), inputs


def test_cuda_greedy_multi_draft_equals_plain_generate() -> None:
    target, draft, inputs = _tiny_pair_on_cuda()
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=12)
    out = hf_globalres.generate(target, **inputs, assistant_model=draft, num_drafts=3, do_sample=False,
                                max_new_tokens=12)  # fmt: skip
    assert out.is_cuda and torch.equal(out, expected)


def test_cuda_sampling_is_reproducible_with_a_cuda_generator() -> None:
    target, draft, inputs = _tiny_pair_on_cuda()

    def run(seed: int) -> hf_globalres.generation.api.MultiDraftGenerateOutput:
        return hf_globalres.generate(
            target, **inputs, assistant_model=draft, num_drafts=4, do_sample=True, max_new_tokens=10,
            return_dict_in_generate=True, generator=torch.Generator(device="cuda").manual_seed(seed),
        )  # fmt: skip

    first, again = run(3), run(3)
    assert torch.equal(first.sequences, again.sequences)
    assert first.sequences.shape[1] <= inputs["input_ids"].shape[1] + 10
    assert first.timings["target_forward"] > 0 and first.timings["total"] >= first.timings["target_forward"]
