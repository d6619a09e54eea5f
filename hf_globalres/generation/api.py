"""Entry points: ``generate``, ``enable`` / ``disable`` and ``MultiDraftGenerationMixin``.

All of them end in :func:`generate`, which hands transformers' own
``generate`` a decoding callable (``custom_generate=``): transformers prepares
the generation config, the logits processors and warpers, the stopping
criteria and the attention mask exactly as for plain sampling, and the
callable runs :func:`hf_globalres.generation.loop.multi_draft_decode`. The
callable interface drops ``assistant_model`` and ``streamer``, so they are
bound to the callable instead. The same seed therefore gives the same tokens
through every entry point.

    >>> import hf_globalres
    >>> hf_globalres.enable(model)                       # doctest: +SKIP
    >>> model.generate(**inputs, assistant_model=draft, num_drafts=4, do_sample=True)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import types
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


def _check_options(
    num_drafts: Any,
    num_assistant_tokens: Any,
    confidence_threshold: Any,
    draft_shape: Any,
    assistant_top_k: Any,
    tree_attention: Any,
    rule: Verifier,
) -> None:
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


def _check_tokenizers(tokenizer: Any, assistant_tokenizer: Any) -> None:
    if assistant_tokenizer is None:
        return
    if tokenizer is None or tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
        raise ValueError(
            "assistant_tokenizer differs from the model's tokenizer: multi-draft generation verifies draft tokens "
            "by id and needs target and draft to share one tokenizer"
        )


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
    """``model.generate`` with lossless multi-draft speculative sampling.

    Args:
        model: the target, a decoder-only transformers model.
        inputs: [B, T0] prompt ids (left-padded for B > 1; pass ``attention_mask``).
        assistant_model: the draft model; it must share the target's tokenizer
            (logit widths may differ: both work on the common token ids).
        num_drafts: n ≥ 1 draft branches per block.
        num_assistant_tokens: L ≥ 1 draft tokens per branch (default 12); with a confidence threshold,
            the most a branch drafts.
        assistant_confidence_threshold: τ in [0, 1] (default 0.4), or None to draft L tokens always. A
            branch stops drafting after
            a token its draft gave probability below τ, and a block ends when every branch has
            stopped, so drafts run long where the draft is sure and short where it is not
            (transformers' assisted generation uses 0.4 with L = 20). The output law is unchanged:
            whether a node is extended depends on that node's prefix alone.
        draft_shape: "tree" (default): every branch drafts on; "spine": only one path drafts on
            (through the token most branches drew at each depth) and the other branches end where they
            leave it, so drafting costs one draft
            column per depth (as n = 1) and the extra branches are alternatives checked in the same
            target forward.
        assistant_top_k: draft from the draft model's law truncated to its ``assistant_top_k`` most
            likely tokens and renormalised (default 64; None: the whole law). The verifier is handed that same
            truncated law, so the output law is unchanged; verification then works on ``assistant_top_k``
            tokens instead of the whole vocabulary.
        verifier: a registered verifier name or instance (default: "optimal").
        tree_attention: True verifies all branches in one row with a tree mask; False uses n
            rows per sequence; "auto" picks the tree.
        verification_callback: called as ``callback(depth, q [R, V], p [R, V], drafts [R, n], result)``
            for the rows verified at each depth of each block.
        block_callback: called with each block's :class:`~hf_globalres.generation.loop.BlockTree`
            (drafts, and p and q at every node) before it is verified; score any rule on the same
            trees with :func:`~hf_globalres.generation.loop.expected_block_tokens`.
        generator: a ``torch.Generator`` on the model's device for every draw of the call (drafts,
            verification, bonus tokens), so a seeded generator reproduces a run without touching the
            global RNG (default: the global RNG).
        **kwargs: everything else ``generate`` accepts (``do_sample``, ``temperature``, ``top_k``,
            ``top_p``, ``max_new_tokens``, ``stop_strings`` with ``tokenizer``, ``attention_mask``,
            ``return_dict_in_generate``...).

    Returns:
        :class:`MultiDraftGenerateOutput` with ``return_dict_in_generate=True``, else the sequences [B, T].
    """
    rule = verifiers.get(verifier if verifier is not None else DEFAULT_VERIFIER)
    if num_assistant_tokens is None:
        num_assistant_tokens = DEFAULT_NUM_ASSISTANT_TOKENS
    _check_options(
        num_drafts,
        num_assistant_tokens,
        assistant_confidence_threshold,
        draft_shape,
        assistant_top_k,
        tree_attention,
        rule,
    )
    _check_models(model, assistant_model)
    tokenizer = kwargs.pop("tokenizer", None)
    _check_tokenizers(tokenizer, kwargs.pop("assistant_tokenizer", None))
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

    # Stop strings need the tokenizer, which transformers does not hand to decoding callables.
    stop_strings = kwargs.pop("stop_strings", None)
    if generation_config is not None and getattr(generation_config, "stop_strings", None) is not None:
        generation_config = generation_config.__class__.from_dict(generation_config.to_dict())
        stop_strings, generation_config.stop_strings = stop_strings or generation_config.stop_strings, None
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer: pass tokenizer=... to generate")
        stopping_criteria = StoppingCriteriaList(list(stopping_criteria or []))
        stopping_criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))

    decode = functools.partial(
        _decode,
        assistant_model=assistant_model,
        bound_streamer=streamer,
        num_drafts=num_drafts,
        num_assistant_tokens=num_assistant_tokens,
        confidence_threshold=assistant_confidence_threshold,
        draft_shape=draft_shape,
        assistant_top_k=assistant_top_k,
        verifier_rule=rule,
        use_tree=tree_attention in (True, "auto"),
        verification_callback=verification_callback,
        block_callback=block_callback,
        generator=generator,
    )
    return _ORIGINAL_GENERATE(
        model,
        inputs=inputs,
        generation_config=generation_config,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        synced_gpus=synced_gpus,
        custom_generate=decode,
        **kwargs,
    )


def _decode(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: StoppingCriteriaList,
    generation_config: Any,
    synced_gpus: bool = False,
    *,
    assistant_model: torch.nn.Module,
    bound_streamer: Any,
    num_drafts: int,
    num_assistant_tokens: int,
    confidence_threshold: float | None,
    draft_shape: DraftShape,
    assistant_top_k: int | None,
    verifier_rule: Verifier,
    use_tree: bool,
    verification_callback: VerificationCallback | None,
    block_callback: BlockCallback | None,
    generator: torch.Generator | None,
    **model_kwargs: Any,
) -> MultiDraftGenerateOutput | torch.LongTensor:
    """The decoding callable transformers runs after preparing config, processors and criteria."""
    unsupported = sorted(k for k, v in model_kwargs.items() if k not in _ACCEPTED_MODEL_KWARGS and v is not None)
    if unsupported:
        raise ValueError(f"multi-draft generation does not support these model inputs: {unsupported}")
    for name in _CACHE_KWARGS:
        past = model_kwargs.get(name)
        if past is not None and past.get_seq_length() > 0:
            raise ValueError(f"multi-draft generation starts from an empty cache; do not pass a filled {name}")
    if synced_gpus:
        raise ValueError("synced_gpus is not supported by multi-draft generation")
    _check_prompt_ids(input_ids, model_kwargs.get("attention_mask"), model, assistant_model)
    if generator is not None and torch.device(generator.device).type != input_ids.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the model runs on {input_ids.device}: "
            f"pass torch.Generator(device={str(input_ids.device)!r})"
        )
    pad = generation_config._pad_token_tensor
    if pad is None:
        eos = generation_config._eos_token_tensor
        pad = eos.flatten()[0] if eos is not None else torch.tensor(0)
    result = multi_draft_decode(
        model,
        assistant_model,
        input_ids,
        model_kwargs.get("attention_mask"),
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        do_sample=bool(generation_config.do_sample),
        max_length=int(generation_config.max_length),
        pad_token_id=int(pad),
        num_drafts=num_drafts,
        num_assistant_tokens=num_assistant_tokens,
        confidence_threshold=confidence_threshold,
        draft_shape=draft_shape,
        assistant_top_k=assistant_top_k,
        verifier=verifier_rule,
        tree_attention=use_tree,
        streamer=bound_streamer,
        verification_callback=verification_callback,
        block_callback=block_callback,
        generator=generator,
    )
    if not generation_config.return_dict_in_generate:
        return result.sequences
    return MultiDraftGenerateOutput(
        sequences=result.sequences,
        target_forwards=result.target_forwards,
        accepted_lengths=result.accepted_lengths,
        timings=result.timings,
    )


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


def _routed_generate(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate`` that switches to multi-draft decoding when a multi-draft keyword is given."""
    if _wants_multi_draft(kwargs):
        return generate(self, *args, **kwargs)
    return _ORIGINAL_GENERATE(self, *args, **kwargs)


def enable(model: torch.nn.Module | None = None) -> None:
    """Make ``model.generate`` (or, without a model, every model's) accept ``num_drafts`` and ``verifier``.

    Calls without any of :data:`MULTI_DRAFT_KWARGS` behave exactly as before.
    """
    if model is None:
        GenerationMixin.generate = _routed_generate
        return
    if not isinstance(model, GenerationMixin):
        raise ValueError(f"{type(model).__name__} is not a transformers generation model")
    model.generate = types.MethodType(_routed_generate, model)


def disable(model: torch.nn.Module | None = None) -> None:
    """Undo :func:`enable` for ``model`` (or, without a model, the global switch)."""
    if model is None:
        GenerationMixin.generate = _ORIGINAL_GENERATE
        return
    bound = model.__dict__.get("generate")
    if isinstance(bound, types.MethodType) and bound.__func__ is _routed_generate:
        del model.__dict__["generate"]


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
