"""Entry points: ``generate``, ``enable`` / ``disable`` and ``MultiDraftGenerationMixin``.

All of them end in :func:`generate`, which hands transformers' own
``generate`` a decoding callable (``custom_generate=``): transformers prepares
the generation config, the logits processors and warpers, the stopping
criteria and the attention mask exactly as for plain sampling, and the
callable runs :func:`hf_globalres.generation.loop.multi_draft_decode`. The
callable interface drops ``assistant_model`` and ``streamer``, so they are
bound to the callable instead. The same seed therefore gives the same tokens
through every entry point.

:func:`enable` leaves calls without a multi-draft keyword to transformers
untouched: same signature, docstring and name (which transformers' auto
classes read), and warnings still name the caller's line (see :func:`_route`).

    >>> import hf_globalres
    >>> hf_globalres.enable(model)                       # doctest: +SKIP
    >>> model.generate(**inputs, assistant_model=draft, num_drafts=4, do_sample=True)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria
from transformers.utils import ModelOutput

from .. import verifiers
from ..verifiers.base import Verifier
from .defaults import DEFAULT_ASSISTANT_TOP_K, DEFAULT_CONFIDENCE_THRESHOLD, DEFAULT_NUM_ASSISTANT_TOKENS
from .drafting import DraftShape, check_drafting_options
from .loop import BlockCallback, VerificationCallback, multi_draft_decode

_ORIGINAL_GENERATE = GenerationMixin.generate

#: Keyword arguments that route ``model.generate`` to multi-draft decoding once enabled.
MULTI_DRAFT_KWARGS = (
    "num_drafts",
    "verifier",
    "draft_shape",
    "assistant_top_k",
    "tree_attention",
    "verification_callback",
    "block_callback",
)

SUPPORTED_ATTENTION = ("eager", "sdpa")
_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
# The cache is ``cache`` from transformers 5.24 and ``past_key_values`` before; both start empty here.
_CACHE_KWARGS = ("cache", "past_key_values")
_ACCEPTED_MODEL_KWARGS = {"attention_mask", "position_ids", "use_cache", "logits_to_keep", *_CACHE_KWARGS}


@dataclass
class MultiDraftGenerateOutput(ModelOutput):
    """Output of multi-draft generation with ``return_dict_in_generate=True``.

    Attributes:
        sequences: LongTensor [B, T], prompt plus generated tokens (``pad_token_id`` after a row stops).
        target_forwards: LongTensor [B], target forwards per row, prefill included (it shares the
            first verification forward, so a perfect draft gives L + 1 tokens per forward).
        accepted_lengths: per row, the tokens emitted in each block (accepted drafts plus the
            recovered or bonus token; the last block counts only tokens kept before a stop).
        timings: seconds per phase of the block loop: "target_forward", "draft_forward", "verifier",
            "draft_sampling", "target_probs", "stopping", "cache" and "total"
            (see :meth:`hf_globalres.generation.timing.PhaseTimer.summary`).
    """

    sequences: torch.LongTensor | None = None
    target_forwards: torch.LongTensor | None = None
    accepted_lengths: list[list[int]] | None = None
    timings: dict[str, float] | None = None


#: The verification rule used when ``verifier`` is not given: the optimal transport for i.i.d. drafts.
DEFAULT_VERIFIER = "optimal"


@dataclass(frozen=True)
class _MultiDraftOptions:
    """The checked multi-draft options of one call, bound to the decoding callable (its interface drops
    ``assistant_model`` and ``streamer``, so they travel here too)."""

    assistant_model: torch.nn.Module
    streamer: Any
    num_drafts: int
    num_assistant_tokens: int
    confidence_threshold: float | None
    draft_shape: DraftShape
    assistant_top_k: int | None
    verifier: Verifier
    tree_attention: bool
    verification_callback: VerificationCallback | None
    block_callback: BlockCallback | None
    generator: torch.Generator | None


def generate(
    model: torch.nn.Module,
    inputs: torch.Tensor | None = None,
    generation_config: Any = None,
    logits_processor: Any = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    prefix_allowed_tokens_fn: Any = None,
    synced_gpus: bool | None = None,
    assistant_model: torch.nn.Module | None = None,
    streamer: Any = None,
    negative_prompt_ids: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    *,
    num_drafts: int = 4,
    num_assistant_tokens: int | None = None,
    assistant_confidence_threshold: float | None = DEFAULT_CONFIDENCE_THRESHOLD,
    draft_shape: str = "tree",
    assistant_top_k: int | None = DEFAULT_ASSISTANT_TOP_K,
    verifier: str | Verifier | None = None,
    tree_attention: bool | str = "auto",
    verification_callback: VerificationCallback | None = None,
    block_callback: BlockCallback | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> MultiDraftGenerateOutput | torch.LongTensor:
    """``model.generate`` with lossless multi-draft speculative sampling (docs/design.md §7).

    Args:
        model: the target, a decoder-only transformers model (eager or sdpa attention).
        inputs: [B, T0] prompt ids (left-padded for B > 1; pass ``attention_mask``).
        assistant_model: the draft model; it must share the target's tokenizer (logit widths may differ).
        num_drafts: n ≥ 1 draft branches per block (default 4).
        num_assistant_tokens: L ≥ 1 draft tokens per branch, the most a branch drafts (None: 12).
        assistant_confidence_threshold: τ in [0, 1] (default 0.4), or None to draft L tokens always: a branch
            stops after a token its draft gave probability below τ; a block ends when every branch has stopped.
            Whether a node is extended depends on its prefix alone, so the output law is unchanged.
        draft_shape: "tree" (default): every branch drafts on; "spine": only the path through the token most
            branches drew drafts on (one draft column per depth), the other branches end where they leave it.
        assistant_top_k: draft from the draft law truncated to its k most likely tokens, renormalised (default
            64; None: the whole law); the verifier gets that same law, so the output law is unchanged.
        verifier: a registered verifier name or instance (None: "optimal").
        tree_attention: True: all branches in one row with a tree mask; False: n rows per sequence; "auto"
            (default): the tree.
        verification_callback: ``callback(depth, q [R, V], p [R, V], drafts [R, n], result)`` for the rows
            verified at each depth of each block.
        block_callback: called with each block's :class:`~hf_globalres.generation.loop.BlockTree` before it is
            verified (score any rule on it with :func:`~hf_globalres.generation.loop.expected_block_tokens`).
        generator: a ``torch.Generator`` on the model's device for every draw of the call (None: global RNG).
        **kwargs: transformers' ``generate`` options (``do_sample``, ``temperature``, ``max_new_tokens``,
            ``stop_strings`` with ``tokenizer``, ``attention_mask``, ``return_dict_in_generate``...).

    Returns:
        :class:`MultiDraftGenerateOutput` with ``return_dict_in_generate=True``, else the sequences [B, T].

    Raises:
        ValueError: an option out of range, or what multi-draft decoding does not serve: beam search, prompt
            lookup, classifier-free guidance, ``synced_gpus``, a filled cache, ``output_*`` flags.
    """
    # 1. Resolve the defaults of the multi-draft options and check them.
    options = _resolve_options(
        model, assistant_model=assistant_model, streamer=streamer, num_drafts=num_drafts,
        num_assistant_tokens=num_assistant_tokens, confidence_threshold=assistant_confidence_threshold,
        draft_shape=draft_shape, assistant_top_k=assistant_top_k, verifier=verifier, tree_attention=tree_attention,
        verification_callback=verification_callback, block_callback=block_callback, generator=generator,
    )  # fmt: skip
    # 2. Refuse the transformers options that multi-draft decoding cannot serve.
    tokenizer = _check_generate_kwargs(synced_gpus, negative_prompt_ids, kwargs)
    # 3. Stop strings need the tokenizer, which transformers does not hand to decoding callables.
    generation_config, stopping_criteria = _stop_strings(generation_config, stopping_criteria, tokenizer, kwargs)
    # 4. transformers' generate prepares config, processors and criteria, then runs the decoding callable,
    #    which (5.) packages the output.
    decode = functools.partial(_decode, multi_draft=options)
    return _ORIGINAL_GENERATE(
        model, inputs=inputs, generation_config=generation_config, logits_processor=logits_processor,
        stopping_criteria=stopping_criteria, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        synced_gpus=synced_gpus, custom_generate=decode, **kwargs,
    )  # fmt: skip


def _resolve_options(
    model: torch.nn.Module,
    *,
    assistant_model: torch.nn.Module | None,
    streamer: Any,
    num_drafts: Any,
    num_assistant_tokens: Any,
    confidence_threshold: Any,
    draft_shape: Any,
    assistant_top_k: Any,
    verifier: str | Verifier | None,
    tree_attention: Any,
    verification_callback: VerificationCallback | None,
    block_callback: BlockCallback | None,
    generator: torch.Generator | None,
) -> _MultiDraftOptions:
    """Check the multi-draft arguments of :func:`generate` and fill in their defaults."""
    rule = verifiers.get(verifier if verifier is not None else DEFAULT_VERIFIER)
    if num_assistant_tokens is None:
        num_assistant_tokens = DEFAULT_NUM_ASSISTANT_TOKENS
    for label, value in (("num_drafts", num_drafts), ("num_assistant_tokens", num_assistant_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer ≥ 1, got {value!r}")
    check_drafting_options(confidence_threshold, draft_shape, assistant_top_k)
    if tree_attention not in (True, False, "auto"):
        raise ValueError(f"tree_attention must be True, False or 'auto', got {tree_attention!r}")
    if rule.max_drafts is not None and num_drafts > rule.max_drafts:
        raise ValueError(
            f"verifier {rule.name!r} takes at most {rule.max_drafts} draft(s) per position, got num_drafts={num_drafts}"
        )
    _check_models(model, assistant_model)
    assert assistant_model is not None  # _check_models refuses None
    return _MultiDraftOptions(
        assistant_model=assistant_model,
        streamer=streamer,
        num_drafts=num_drafts,
        num_assistant_tokens=num_assistant_tokens,
        confidence_threshold=confidence_threshold,
        draft_shape=draft_shape,
        assistant_top_k=assistant_top_k,
        verifier=rule,
        tree_attention=tree_attention in (True, "auto"),
        verification_callback=verification_callback,
        block_callback=block_callback,
        generator=generator,
    )


def _check_models(model: torch.nn.Module, assistant_model: torch.nn.Module | None) -> None:
    if assistant_model is None:
        raise ValueError("multi-draft generation needs an assistant_model (the draft model)")
    for label, m in (("model", model), ("assistant_model", assistant_model)):
        if getattr(m.config, "is_encoder_decoder", False):
            raise ValueError(
                f"{label} is an encoder-decoder model; multi-draft generation supports decoder-only models"
            )
        implementation = getattr(m.config, "_attn_implementation", None) or "eager"
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"{label} uses attn_implementation={implementation!r}; multi-draft generation passes explicit 4D "
                f"attention masks and supports {SUPPORTED_ATTENTION}"
            )
    target_text, draft_text = model.config.get_text_config(), assistant_model.config.get_text_config()
    for attribute in ("bos_token_id", "eos_token_id"):
        mine, theirs = getattr(target_text, attribute, None), getattr(draft_text, attribute, None)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(
                f"model and assistant_model disagree on {attribute} ({mine} vs {theirs}): they appear to use "
                "different tokenizers; multi-draft generation needs one shared tokenizer"
            )


def _check_generate_kwargs(
    synced_gpus: bool | None, negative_prompt_ids: torch.Tensor | None, kwargs: dict[str, Any]
) -> Any:
    """Refuse transformers options that multi-draft decoding cannot serve; pop and return the tokenizer."""
    tokenizer = kwargs.pop("tokenizer", None)
    _check_tokenizers(tokenizer, kwargs.pop("assistant_tokenizer", None))
    # transformers does not hand synced_gpus to decoding callables (5.24), so it is refused here.
    if synced_gpus:
        raise ValueError("synced_gpus is not supported by multi-draft generation")
    if negative_prompt_ids is not None or kwargs.get("guidance_scale") not in (None, 1, 1.0):
        raise ValueError("classifier-free guidance runs the target inside a logits processor; it is not supported")
    for name in _UNSUPPORTED_OUTPUTS:
        if kwargs.get(name):
            raise ValueError(f"{name}=True is not supported by multi-draft generation")
    if kwargs.get("prompt_lookup_num_tokens") is not None:
        raise ValueError(
            "prompt_lookup_num_tokens asks for prompt-lookup decoding, which cannot run beside an assistant_model; "
            "drop it to use multi-draft decoding with the assistant, or drop the multi-draft keywords"
        )
    if kwargs.get("num_beams", 1) != 1:
        raise ValueError("beam search cannot be combined with multi-draft speculative sampling (num_beams must be 1)")
    return tokenizer


def _check_tokenizers(tokenizer: Any, assistant_tokenizer: Any) -> None:
    if assistant_tokenizer is None:
        return
    if tokenizer is None or tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
        raise ValueError(
            "assistant_tokenizer differs from the model's tokenizer: multi-draft generation verifies draft tokens "
            "by id and needs target and draft to share one tokenizer"
        )


def _stop_strings(
    generation_config: Any, stopping_criteria: StoppingCriteriaList | None, tokenizer: Any, kwargs: dict[str, Any]
) -> tuple[Any, StoppingCriteriaList | None]:
    """Move ``stop_strings`` (from ``kwargs`` or a copy of ``generation_config``) into the stopping criteria."""
    stop_strings = kwargs.pop("stop_strings", None)
    if generation_config is not None and getattr(generation_config, "stop_strings", None) is not None:
        generation_config = generation_config.__class__.from_dict(generation_config.to_dict())
        stop_strings, generation_config.stop_strings = stop_strings or generation_config.stop_strings, None
    if stop_strings is None:
        return generation_config, stopping_criteria
    if tokenizer is None:
        raise ValueError("stop_strings need the model's tokenizer: pass tokenizer=... to generate")
    stopping_criteria = StoppingCriteriaList(list(stopping_criteria or []))
    stopping_criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    return generation_config, stopping_criteria


def _decode(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: StoppingCriteriaList,
    generation_config: Any,
    synced_gpus: bool = False,
    *,
    multi_draft: _MultiDraftOptions,
    **model_kwargs: Any,
) -> MultiDraftGenerateOutput | torch.LongTensor:
    """The decoding callable transformers runs after preparing config, processors and criteria."""
    options = multi_draft
    _check_model_inputs(model, input_ids, model_kwargs, synced_gpus, options)
    result = multi_draft_decode(
        model,
        options.assistant_model,
        input_ids,
        model_kwargs.get("attention_mask"),
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        do_sample=bool(generation_config.do_sample),
        max_length=int(generation_config.max_length),
        pad_token_id=_pad_token_id(generation_config),
        num_drafts=options.num_drafts,
        num_assistant_tokens=options.num_assistant_tokens,
        confidence_threshold=options.confidence_threshold,
        draft_shape=options.draft_shape,
        assistant_top_k=options.assistant_top_k,
        verifier=options.verifier,
        tree_attention=options.tree_attention,
        streamer=options.streamer,
        verification_callback=options.verification_callback,
        block_callback=options.block_callback,
        generator=options.generator,
    )
    # 5. Package the output as transformers would: the sequences, or a dict with the block statistics.
    if not generation_config.return_dict_in_generate:
        return result.sequences
    return MultiDraftGenerateOutput(
        sequences=result.sequences,
        target_forwards=result.target_forwards,
        accepted_lengths=result.accepted_lengths,
        timings=result.timings,
    )


def _check_model_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    model_kwargs: dict[str, Any],
    synced_gpus: bool,
    options: _MultiDraftOptions,
) -> None:
    """Refuse model inputs, caches, prompts and generators that multi-draft decoding cannot start from."""
    unsupported = sorted(k for k, v in model_kwargs.items() if k not in _ACCEPTED_MODEL_KWARGS and v is not None)
    if unsupported:
        raise ValueError(f"multi-draft generation does not support these model inputs: {unsupported}")
    for name in _CACHE_KWARGS:
        past = model_kwargs.get(name)
        if past is not None and past.get_seq_length() > 0:
            raise ValueError(f"multi-draft generation starts from an empty cache; do not pass a filled {name}")
    if synced_gpus:
        raise ValueError("synced_gpus is not supported by multi-draft generation")
    _check_prompt_ids(input_ids, model_kwargs.get("attention_mask"), model, options.assistant_model)
    generator = options.generator
    if generator is not None and torch.device(generator.device).type != input_ids.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the model runs on {input_ids.device}: "
            f"pass torch.Generator(device={str(input_ids.device)!r})"
        )


def _pad_token_id(generation_config: Any) -> int:
    """The id written after a row stops: the pad token, else the first EOS token, else 0."""
    pad = generation_config._pad_token_tensor
    if pad is None:
        eos = generation_config._eos_token_tensor
        pad = eos.flatten()[0] if eos is not None else torch.tensor(0)
    return int(pad)


def _check_prompt_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, model: torch.nn.Module, assistant: torch.nn.Module
) -> None:
    """Raise ValueError for an empty prompt, or a prompt token (padding aside) outside either model's embedding rows."""
    rows = {
        label: m.get_input_embeddings().num_embeddings
        for label, m in (("model", model), ("assistant_model", assistant))
        if m.get_input_embeddings() is not None
    }
    ids = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    lengths = (
        input_ids.new_full(input_ids.shape[:1], input_ids.shape[1])
        if attention_mask is None
        else attention_mask.sum(-1)
    )
    if input_ids.shape[0] > 0 and bool((lengths == 0).any()):
        raise ValueError(
            "a prompt is empty: every row of input_ids needs at least one token under its attention mask "
            "(start it with the tokenizer's BOS token or a chat template)"
        )
    if not rows or ids.numel() == 0:
        return
    limit = min(rows.values())
    bad = ids[(ids < 0) | (ids >= limit)]
    if bad.numel() > 0:
        sizes = ", ".join(f"{label} {count}" for label, count in rows.items())
        raise ValueError(
            f"input_ids hold token id {int(bad[0])}, outside the embedding rows of the models ({sizes}); "
            "encode prompts with the models' shared tokenizer"
        )


def _wants_multi_draft(kwargs: dict[str, Any]) -> bool:
    return any(key in kwargs for key in MULTI_DRAFT_KWARGS)


#: Attribute of an enabled ``generate``: the function :func:`disable` puts back (None: the class's, by deleting
#: the instance's ``generate``).
_REPLACED = "_multi_draft_replaced"


def _route(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with a switch to :func:`generate` for calls that pass a multi-draft keyword.

    transformers' ``generate`` is a stack of decorators (renames of deprecated keywords, ``torch.no_grad``)
    around its body. A decorator's warning with ``stacklevel=2`` names the frame that called it, and the auto
    classes decide whether a remote class needs ``GenerationMixin`` from ``str(cls.generate)``. A wrapper on top
    would be that frame and that name, so the switch goes beneath the stack instead: each layer that is a closure
    over its ``__wrapped__`` function is copied with that function replaced by its own routed copy, and the switch
    wraps the innermost function. The function the caller reaches is then a copy of transformers' outermost
    layer (same name, qualified name, docstring, signature and frame depth). A layer of any other kind ends the
    descent and the switch wraps it.
    """
    inner = getattr(method, "__wrapped__", None)
    cells = getattr(method, "__closure__", None) or ()
    wraps_by_closure = inner is not None and any(_cell_contents(cell) is inner for cell in cells)
    if not isinstance(method, types.FunctionType) or not wraps_by_closure:
        return _switch(method)
    routed_inner = _route(inner)
    closure = tuple(types.CellType(routed_inner) if _cell_contents(c) is inner else c for c in cells)
    layer = types.FunctionType(method.__code__, method.__globals__, method.__name__, method.__defaults__, closure)
    layer.__kwdefaults__ = method.__kwdefaults__
    functools.update_wrapper(layer, method)
    layer.__wrapped__ = routed_inner
    return layer


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not bound yet
        return None


def _switch(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def generate_or_multi_draft(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if _wants_multi_draft(kwargs):
            return generate(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return generate_or_multi_draft


def _is_routed(method: Any) -> bool:
    return hasattr(getattr(method, "__func__", method), _REPLACED)


def _enabled(method: Callable[..., Any], replaced: Callable[..., Any] | None) -> Callable[..., Any]:
    routed = _route(method)
    setattr(routed, _REPLACED, replaced)
    return routed


def enable(model: torch.nn.Module | None = None) -> None:
    """Make ``model.generate`` (or, without a model, every model's) accept the multi-draft keywords.

    A call with any of :data:`MULTI_DRAFT_KWARGS` runs :func:`generate`; every other call runs the ``generate``
    it ran before, with the same signature, docstring and name, and warnings that name the caller's line.
    Enabling twice changes nothing.
    """
    if model is None:
        current = GenerationMixin.__dict__["generate"]
        if not _is_routed(current):
            GenerationMixin.generate = _enabled(current, current)
        return
    if not isinstance(model, GenerationMixin):
        raise ValueError(f"{type(model).__name__} is not a transformers generation model")
    current = model.__dict__.get("generate")
    if _is_routed(current):
        return
    # A method already set on this instance is what its calls run, so it is the one to route (and to restore).
    if isinstance(current, types.MethodType) and current.__self__ is model:
        routed = _enabled(current.__func__, current.__func__)
    else:
        routed = _enabled(type(model).generate, None)
    model.generate = types.MethodType(routed, model)


def disable(model: torch.nn.Module | None = None) -> None:
    """Undo :func:`enable` for ``model`` (or, without a model, the global switch); a no-op where not enabled."""
    if model is None:
        current = GenerationMixin.__dict__["generate"]
        if _is_routed(current):
            GenerationMixin.generate = getattr(current, _REPLACED)
        return
    current = model.__dict__.get("generate")
    if not (isinstance(current, types.MethodType) and _is_routed(current)):
        return
    replaced = getattr(current.__func__, _REPLACED)
    if replaced is None:
        del model.__dict__["generate"]
    else:
        model.generate = types.MethodType(replaced, model)


class MultiDraftGenerationMixin:
    """Mixin for model classes: ``class MyLM(MultiDraftGenerationMixin, LlamaForCausalLM)``.

    Its ``generate`` accepts the multi-draft keywords and defers to the next
    ``generate`` in the MRO otherwise.
    """

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if _wants_multi_draft(kwargs):
            return generate(self, *args, **kwargs)
        return super().generate(*args, **kwargs)


__all__ = [
    "DEFAULT_VERIFIER",
    "MULTI_DRAFT_KWARGS",
    "MultiDraftGenerateOutput",
    "MultiDraftGenerationMixin",
    "disable",
    "enable",
    "generate",
]
