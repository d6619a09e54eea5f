"""enable() leaves every call without a multi-draft keyword exactly as transformers runs it.

Each case runs transformers' own generate behaviour on the tiny Llama and Qwen2 pairs with enable() off, then on
(for one model, then for every model), and compares every tensor of the outputs exactly; further tests compare
what introspection, warnings and transformers' auto classes see.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import torch
from transformers import Cache, GenerationMixin, LlamaForCausalLM
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

import hf_globalres

from .test_lossless import left_pad

ORIGINAL = GenerationMixin.__dict__["generate"]
SCOPES = ["model", "global"]
PROMPTS = [[1, 5, 7, 3], [1, 9], [1, 4, 4, 12, 6]]
# Prompt lookup and assisted generation take one row; the repeats give prompt lookup n-grams to find.
ONE_PROMPT = [[1, 5, 7, 3, 5, 7, 3, 5]]
# The output field holding the cache: ``cache`` from transformers 5.24, ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


@contextlib.contextmanager
def enabled(model: torch.nn.Module, scope: str | None) -> Iterator[None]:
    """enable() for ``model`` ("model"), for every model ("global"), or not at all (None)."""
    if scope is None:
        yield
        return
    switched = model if scope == "model" else None
    hf_globalres.enable(switched)
    try:
        switched_on = "generate" in model.__dict__ if scope == "model" else GenerationMixin.generate is not ORIGINAL
        assert switched_on
        yield
    finally:
        hf_globalres.disable(switched)
    assert "generate" not in model.__dict__ and GenerationMixin.__dict__["generate"] is ORIGINAL


@pytest.fixture(params=["llama", "qwen2"])
def pair(request) -> tuple[torch.nn.Module, torch.nn.Module]:
    if request.param == "llama":
        return request.getfixturevalue("target"), request.getfixturevalue("draft")
    return request.getfixturevalue("qwen_pair")


def inputs(prompts: list[list[int]] = PROMPTS) -> dict[str, torch.Tensor]:
    ids, mask = left_pad(prompts, 1)
    return {"input_ids": ids, "attention_mask": mask}


def seeded(seed: int, run: Callable[[], Any]) -> Any:
    torch.manual_seed(seed)
    return run()


def continue_from_cache(model: torch.nn.Module) -> tuple[Any, Any]:
    first = model.generate(**inputs(ONE_PROMPT), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    mask = torch.ones_like(first.sequences)
    second = model.generate(
        first.sequences, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
        **{CACHE_FIELD: first[CACHE_FIELD]},
    )  # fmt: skip
    return first, second


def scores_and_logits(model: torch.nn.Module) -> Any:
    return model.generate(
        **inputs(), max_new_tokens=4, do_sample=True, return_dict_in_generate=True, output_scores=True,
        output_logits=True,
    )  # fmt: skip


CASES: dict[str, Callable[[torch.nn.Module, torch.nn.Module], Any]] = {
    "greedy": lambda m, d: m.generate(**inputs(), max_new_tokens=6, do_sample=False),
    "sampling": lambda m, d: seeded(
        5, lambda: m.generate(**inputs(), max_new_tokens=6, do_sample=True, temperature=0.8, top_k=8, top_p=0.9)
    ),
    "beam search": lambda m, d: m.generate(
        **inputs(), max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False
    ),
    "assisted greedy": lambda m, d: m.generate(**inputs(ONE_PROMPT), assistant_model=d, max_new_tokens=6),
    "assisted sampling": lambda m, d: seeded(
        7, lambda: m.generate(**inputs(ONE_PROMPT), assistant_model=d, do_sample=True, max_new_tokens=6)
    ),
    "prompt lookup": lambda m, d: m.generate(**inputs(ONE_PROMPT), prompt_lookup_num_tokens=2, max_new_tokens=6),
    "static cache": lambda m, d: m.generate(**inputs(), cache_implementation="static", max_new_tokens=5),
    "continue from cache": lambda m, d: continue_from_cache(m),
    "scores and logits": lambda m, d: seeded(9, lambda: scores_and_logits(m)),
}


def assert_same(mine: Any, theirs: Any, where: str = "output") -> None:
    """Exact equality of nested outputs: tensors, tuples, ModelOutputs and caches (by their layers' tensors)."""
    assert type(mine) is type(theirs), f"{where}: {type(mine).__name__} vs {type(theirs).__name__}"
    if isinstance(mine, torch.Tensor):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs), f"{where} differs"
    elif isinstance(mine, Cache):
        assert len(mine.layers) == len(theirs.layers), f"{where}: layer counts differ"
        for i, (a, b) in enumerate(zip(mine.layers, theirs.layers, strict=True)):
            assert_same((a.keys, a.values), (b.keys, b.values), f"{where}.layers[{i}]")
    elif isinstance(mine, Mapping):
        assert list(mine.keys()) == list(theirs.keys()), f"{where}: fields differ"
        for key in mine:
            assert_same(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(mine, (tuple, list)):
        assert len(mine) == len(theirs), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert mine == theirs, f"{where}: {mine!r} vs {theirs!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_calls_without_multi_draft_keywords_are_transformers_own(pair, case):
    model, draft = pair
    run = CASES[case]
    reference = run(model, draft)
    assert_same(run(model, draft), reference)  # the case is deterministic, so a difference below is enable()'s
    for scope in SCOPES:
        with enabled(model, scope):
            assert_same(run(model, draft), reference, f"{case} with enable() for {scope}")


@pytest.mark.parametrize("scope", SCOPES)
def test_introspection_sees_transformers_generate(target, scope):
    plain = target.generate
    with enabled(target, scope):
        routed = target.generate
        assert routed.__func__ is not plain.__func__
        assert inspect.signature(routed) == inspect.signature(plain)
        assert "inputs" in inspect.signature(routed).parameters
        assert routed.__doc__ and routed.__doc__ == plain.__doc__
        for attribute in ("__name__", "__qualname__", "__module__", "__annotations__"):
            assert getattr(routed, attribute) == getattr(plain, attribute), attribute
        assert inspect.signature(routed.__wrapped__) == inspect.signature(plain.__wrapped__)
        assert inspect.unwrap(routed) is inspect.unwrap(plain)
        assert str(routed).split(" of ")[0] == str(plain).split(" of ")[0]  # "<bound method GenerationMixin.generate"


@pytest.mark.parametrize("scope", [None, *SCOPES])
def test_transformers_warnings_name_the_callers_line(target, scope):
    """transformers' keyword deprecation warns with stacklevel=2: the line that called generate."""
    with enabled(target, scope), pytest.warns(FutureWarning, match="past_key_values") as record:
        line = inspect.currentframe().f_lineno + 1
        target.generate(**inputs(), max_new_tokens=2, do_sample=False, past_key_values=None)
    [warning] = [w for w in record if "past_key_values" in str(w.message)]
    assert (warning.filename, warning.lineno) == (__file__, line)


class RemoteLlama(LlamaForCausalLM):
    """A class as ``trust_remote_code`` loads it: a subclass that neither names GenerationMixin nor overrides
    generate, so the auto classes keep it as it is."""


class RemoteLlamaWithGenerate(LlamaForCausalLM):
    """A class with its own generate, which counts its calls."""

    generate_calls = 0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.generate_calls += 1
        return super().generate(*args, **kwargs)


def test_auto_classes_leave_remote_classes_alone():
    assert add_generation_mixin_to_remote_model(RemoteLlama) is RemoteLlama
    # A class with its own generate is rebuilt: the check reads generate, so it would see a foreign wrapper.
    assert add_generation_mixin_to_remote_model(RemoteLlamaWithGenerate) is not RemoteLlamaWithGenerate
    hf_globalres.enable()
    try:
        assert "GenerationMixin" in str(RemoteLlama.generate)
        assert add_generation_mixin_to_remote_model(RemoteLlama) is RemoteLlama
    finally:
        hf_globalres.disable()


def test_enable_for_one_model_keeps_the_generate_it_ran(target):
    """Calls enable() does not handle run the model's own generate: its class's, or one set on the instance."""
    model = RemoteLlamaWithGenerate(target.config).eval()
    reference = model.generate(**inputs(), max_new_tokens=3, do_sample=False)
    with enabled(model, "model"):
        assert torch.equal(model.generate(**inputs(), max_new_tokens=3, do_sample=False), reference)
        assert model.generate_calls == 2

    seen: list[dict[str, Any]] = []

    def patched(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return type(self).generate(self, *args, **kwargs)

    model.generate = types.MethodType(patched, model)
    hf_globalres.enable(model)
    try:
        assert torch.equal(model.generate(**inputs(), max_new_tokens=3, do_sample=False), reference)
        assert len(seen) == 1 and model.generate_calls == 3
    finally:
        hf_globalres.disable(model)
    assert model.__dict__["generate"].__func__ is patched  # disable() puts the instance's method back


def test_enable_twice_then_disable_once_restores_transformers(target):
    for switched in (target, None):
        hf_globalres.enable(switched)
        first = target.generate
        hf_globalres.enable(switched)
        assert target.generate == first  # the second enable() changes nothing
        hf_globalres.disable(switched)
        assert "generate" not in target.__dict__ and GenerationMixin.__dict__["generate"] is ORIGINAL
        hf_globalres.disable(switched)  # disabling what is not enabled is a no-op
        assert GenerationMixin.__dict__["generate"] is ORIGINAL


def test_the_switch_for_one_model_and_the_global_one_undo_independently(target):
    hf_globalres.enable(target)
    hf_globalres.enable()
    try:
        hf_globalres.disable(target)
        assert "generate" not in target.__dict__  # the model follows the class again, which is still enabled
        assert GenerationMixin.generate is not ORIGINAL
        plain = target.generate(**inputs(), max_new_tokens=3, do_sample=False)
    finally:
        hf_globalres.disable()
    assert GenerationMixin.__dict__["generate"] is ORIGINAL
    assert torch.equal(target.generate(**inputs(), max_new_tokens=3, do_sample=False), plain)
