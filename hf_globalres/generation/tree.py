"""Tree layout, 4D additive masks, position ids and KV-cache surgery.

Every forward in the decoding loop goes through :func:`forward_tokens`, which
gives the model an explicit 4D additive float mask (0 where a query may attend,
``finfo(dtype).min`` elsewhere; a bool 4D mask is silently wrong under eager
attention) and explicit ``position_ids``. With explicit masks the cache may
hold *holes*: positions no later token attends to (left padding, rejected
draft tokens, padding added to align rows that accepted different numbers of
tokens). :class:`KVState` pairs a ``DynamicCache`` with the per-row validity of
its positions, and :func:`select_positions` compacts it after each block:

    keys'[r, :, s', :] = keys[rows[r], :, idx[r, s'], :]

where ``idx[r]`` lists the kept positions of row ``rows[r]`` in order,
right-aligned (holes first), so every row keeps the same storage length.

The verification tree of one block (:func:`pack_tree`): draft branch ``i``
carries tokens ``x[i, 1..L]``. Branches with equal prefixes share nodes, so
node ``(i, d)`` exists once, under its canonical branch — the smallest ``i'``
with ``x[i', 1..d] = x[i, 1..d]``. Each distinct node attends to the committed
context and to its ancestors; its position id is ``context length + d − 1``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from .. import _sync


@dataclass
class KVState:
    """A model's KV cache and which of its stored positions are real tokens.

    Attributes:
        cache: ``DynamicCache`` with R rows and S stored positions.
        valid: BoolTensor [R, S], position ``s`` of row ``r`` holds a committed token.
    """

    cache: DynamicCache
    valid: torch.Tensor


@dataclass
class PendingTokens:
    """Committed tokens a cache has not seen yet, right-aligned, as one forward feeds them.

    Attributes:
        tokens: [R, P] token ids (0 in holes).
        valid: [R, P] the entry is a real token (left holes are not).
        positions: [R, P] position ids.
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor


def mask_to_front(mask: torch.Tensor) -> torch.Tensor:
    """[..., N] LongTensor: the indices along the last dim with ``mask``'s True entries first, each group in order.

    A stable sort of ``~mask``: the same indices as ``nonzero`` (then the rest) without reading a count back.
    """
    return torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices


def true_rows(mask: torch.Tensor, count: int) -> torch.Tensor:
    """[count] LongTensor: the indices where ``mask`` [N] holds, ascending, when the host knows there are ``count``.

    ``nonzero`` would read the count back; a stable sort of ``~mask`` puts the same indices first
    without a read. On a CPU the read is free, so ``nonzero`` runs there and checks ``count``.
    """
    if _sync.reads_are_cheap(mask):
        rows = mask.nonzero()[:, 0]
        if rows.shape[0] != count:
            raise RuntimeError(f"internal error: {rows.shape[0]} rows hold, the host counted {count}")
        return rows
    return mask_to_front(mask)[:count]


def new_state(model: torch.nn.Module, rows: int, device: torch.device) -> KVState:
    """An empty :class:`KVState` for ``model``; raises unless every layer is a full-attention layer."""
    cache = DynamicCache(config=model.config)
    sliding = [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_sliding", False)]
    if sliding or getattr(model.config, "use_sliding_window", False):
        raise ValueError(
            f"{type(model).__name__} uses sliding-window attention (layers {sliding}): multi-draft decoding "
            "needs full-attention caches, because its explicit 4D masks replace the sliding window"
        )
    return KVState(cache=cache, valid=torch.zeros(rows, 0, dtype=torch.bool, device=device))


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` (transformers ≥ 5.24) or ``past_key_values``."""
    return _cache_argument_of(type(model))


@functools.cache
def _cache_argument_of(model_class: type) -> str:
    # Once per class: the name belongs to the architecture, and every forward of the loop asks for it.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, m, K] float mask: 0 where ``allowed`` [R, m, K] is True, ``finfo(dtype).min`` elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)[:, None]


def forward_tokens(
    model: torch.nn.Module,
    state: KVState,
    tokens: torch.Tensor,
    past_allowed: torch.Tensor,
    new_allowed: torch.Tensor,
    positions: torch.Tensor,
    logits_to_keep: int,
) -> torch.Tensor:
    """Run ``model`` on new tokens against the cache; the cache grows by m positions (not yet valid).

    Args:
        tokens: [R, m] token ids.
        past_allowed: [R, m, S] query ``j`` may attend stored position ``s``.
        new_allowed: [R, m, m] query ``j`` may attend new token ``k`` (the
            diagonal is always allowed, so no query row is fully masked).
        positions: [R, m] position ids.
        logits_to_keep: number of trailing positions whose logits are returned.

    Returns:
        logits: [R, logits_to_keep, V_model], float32 or wider.
    """
    m = tokens.shape[1]
    eye = torch.eye(m, dtype=torch.bool, device=tokens.device)
    allowed = torch.cat([past_allowed, new_allowed | eye], dim=-1)
    mask = additive_mask(allowed, model.dtype)
    kwargs = {"logits_to_keep": logits_to_keep} if model._supports_logits_to_keep() else {}
    out = model(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{cache_argument(model): state.cache},
        **kwargs,
    )
    logits = out.logits[:, -logits_to_keep:]
    return logits if logits.dtype.itemsize >= 4 else logits.float()


def select_positions(
    state: KVState, keep: torch.Tensor, rows: torch.Tensor | None = None, width: int | None = None
) -> KVState:
    """Keep only the positions ``keep`` [R, S] marks, for source rows ``rows`` [R'] (default: all).

    Returns a state with R' rows and ``width = max_r Σ_s keep[rows[r], s]`` positions (read back
    unless given), each row's kept positions in order and right-aligned.
    """
    if rows is not None:
        keep = keep[rows]
    stored = keep.shape[1]
    if width is None:
        width = int(keep.sum(-1).max()) if keep.numel() else 0
    # Holes first and kept positions after, each in storage order.
    order = mask_to_front(~keep)[:, stored - width :]
    valid = keep.gather(1, order)
    # Positions that stay where they are (usually the whole committed context) are not copied.
    head = _in_place_head(order) if _sync.reads_are_cheap(order) else 0
    for layer in state.cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
            continue
        index = order[:, head:].to(layer.keys.device)
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            if rows is not None:
                tensor = tensor.index_select(0, rows.to(tensor.device))
            expanded = index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
            if head:
                # The kept positions past the head all lie past it, so gathering before writing is safe.
                tensor[:, :, head:width] = tensor.gather(2, expanded)
                tensor = tensor[:, :, :width]
            else:
                tensor = tensor.gather(2, expanded)
            setattr(layer, name, tensor)
    return KVState(cache=state.cache, valid=valid)


def _in_place_head(order: torch.Tensor) -> int:
    """How many leading columns of ``order`` [R, W] hold their own index in every row (one read)."""
    if order.numel() == 0:
        return 0
    fixed = (order == torch.arange(order.shape[1], device=order.device)).all(0)
    return int(fixed.cumprod(0).sum())


@dataclass
class Tree:
    """The deduplicated verification tree of one block, for B sequences.

    Attributes:
        tokens: [B, M] token of each packed node (0 for padding columns).
        valid: [B, M] the column holds a node.
        depth: [B, M] node depth, 1..L (0 for padding).
        ancestors: [B, M, M] node ``j`` attends node ``k`` (ancestor or self).
        column: [B, n, L] packed column of node ``(i, d)``'s canonical copy.
        canonical: [B, n, L] canonical branch of node ``(i, d)``.
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    depth: torch.Tensor
    ancestors: torch.Tensor
    column: torch.Tensor
    canonical: torch.Tensor


def canonical_branches(tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """[B, n, L]: smallest branch ``i'`` whose first ``d`` tokens equal branch ``i``'s.

    Args:
        tokens: [B, n, L] draft tokens of each branch.
        alive: [B, n, L] the branch has a token at that depth (a branch dies when
            sampling without replacement runs out of support); dead nodes map to themselves.
    """
    same = (tokens[:, :, None, :] == tokens[:, None, :, :]) & alive[:, :, None, :] & alive[:, None, :, :]
    same_prefix = same.to(torch.int8).cumprod(dim=-1).bool()  # [B, n, n', L]
    first = same_prefix.to(torch.int8).argmax(dim=2)  # first True along n'
    own = torch.arange(tokens.shape[1], device=tokens.device)[None, :, None]
    return torch.where(alive, first, own)


def pack_tree(tokens: torch.Tensor, alive: torch.Tensor, width: int | None = None) -> Tree:
    """Deduplicate the n branches of each sequence into a packed tree.

    Args:
        tokens: [B, n, L] draft tokens; alive: [B, n, L].
        width: M, the most distinct nodes of a sequence, when the host knows it (None: read back;
            checked where reads are free).
    """
    batch, n, depth_max = tokens.shape
    device = tokens.device
    canonical = canonical_branches(tokens, alive)
    branch = torch.arange(n, device=device)
    distinct = alive & (canonical == branch[None, :, None])  # [B, n, L]
    # Flat node index f = (d − 1)·n + i, so packing keeps nodes sorted by depth.
    flat_distinct = distinct.transpose(1, 2).reshape(batch, depth_max * n)
    if width is None or _sync.reads_are_cheap(flat_distinct):
        counted = int(flat_distinct.sum(-1).max()) if flat_distinct.numel() else 0
        if width is not None and width != counted:
            raise RuntimeError(f"internal error: the host expected {width} tree nodes, there are {counted}")
        width = counted
    order = mask_to_front(flat_distinct)[:, :width]  # [B, M]
    column_of_flat = torch.zeros(batch, depth_max * n, dtype=torch.long, device=device)
    column_of_flat.scatter_(1, order, torch.arange(width, device=device).expand(batch, width))
    depth_index = torch.arange(depth_max, device=device)
    flat_of_node = depth_index[None, None, :] * n + canonical  # [B, n, L]
    column = column_of_flat.gather(1, flat_of_node.reshape(batch, -1)).reshape(batch, n, depth_max)
    # ancestors over flat nodes: (d, i) attends (d', i') iff d' ≤ d and canonical[i, d'] = i'.
    upper = depth_index[:, None] >= depth_index[None, :]  # [L(d), L(d')]
    same_branch = canonical[:, None, :, :, None] == branch[None, None, None, None, :]  # [B, 1, n(i), L(d'), n(i')]
    flat_anc = upper[None, :, None, :, None] & same_branch
    flat_anc = flat_anc.reshape(batch, depth_max * n, depth_max * n)
    ancestors = flat_anc.gather(1, order[:, :, None].expand(-1, -1, depth_max * n))
    ancestors = ancestors.gather(2, order[:, None, :].expand(-1, width, -1))
    valid = flat_distinct.gather(1, order)
    flat_tokens = tokens.transpose(1, 2).reshape(batch, depth_max * n)
    packed_tokens = torch.where(valid, flat_tokens.gather(1, order), 0)
    packed_depth = torch.where(valid, order // n + 1, 0)
    ancestors = ancestors & valid[:, :, None] & valid[:, None, :]
    return Tree(
        tokens=packed_tokens,
        valid=valid,
        depth=packed_depth,
        ancestors=ancestors,
        column=column,
        canonical=canonical,
    )


__all__ = [
    "KVState",
    "PendingTokens",
    "Tree",
    "additive_mask",
    "canonical_branches",
    "forward_tokens",
    "mask_to_front",
    "new_state",
    "pack_tree",
    "select_positions",
    "true_rows",
]
