"""The block loop: draft n branches, verify them in one target forward, walk the tree, emit.

One block for B sequences (SpecTr multi-step decoding, Sun et al. 2023, §4;
docs/design.md §7):

1. The assistant drafts n branches of L tokens (:mod:`.drafting`); a draft
   restricted to part of the vocabulary also scores the call's prompt tokens
   (:func:`~hf_globalres.draft_vocab.prompt_vocabulary`, opened once per call).
2. One target forward scores the not-yet-cached committed tokens (the prompt
   at the first block, so the prefill shares the first verification) and
   every distinct tree node, with a 4D additive mask (:mod:`.tree`); with
   ``tree_attention=False`` the target holds n rows per sequence, one branch
   per row, instead.
3. Walk the tree. At depth d the branches whose first d − 1 tokens equal the
   accepted prefix a_1..a_{d−1} are, given that prefix, draws from
   p(·|prefix) under the verifier's draft scheme; the verifier turns their
   depth-d tokens (absent branches −1) and q(·|prefix) into one token Y with
   law q(·|prefix). If Y is one of the drafts, it is accepted and the walk goes
   on along the branches carrying it; otherwise Y (the recovered token) ends
   the block. Where the accepted path has no drafts left (after L accepted
   tokens, or where its branches stopped drafting on low confidence) a bonus
   token is drawn from q(·|a_1..a_d). By induction over d the emitted tokens
   have exactly the target's joint law. A ``block_callback`` sees the whole
   tree first (:class:`BlockTree`), so other rules can be scored on the same
   drafts (:func:`expected_block_tokens`).
4. Stopping criteria (EOS, max length, stop strings, user criteria) run after
   every emitted token, on exactly the ``input_ids`` plain ``generate``
   would show them; tokens after a stop are dropped (truncating a sample of
   the joint law leaves the law of its prefix unchanged).
5. Both caches keep only the accepted path; finished rows leave the batch.

On an accelerator every read of a tensor value on the host stalls the device,
so the host keeps its own copy of each active row's length and cache fill
(:class:`_Known`) and reads back only what is data: at each depth of the walk
after the first, which rows walk on and which of them still have drafts (the
verifier's draws depend on how many rows it gets); where more than one branch
may differ, how many distinct draft nodes there are at each depth and in the
tree (the shapes of the forwards); and once per block, after the stopping
criteria, the emitted counts, the finished rows and the caches' kept lengths
in one read. Processors and stopping criteria are grouped by length from the
host's copy (:class:`~.processors.HostRows`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from .. import _sync
from ..draft_vocab import prompt_vocabulary
from ..verifiers.base import VerificationResult, Verifier, sample_categorical
from .drafting import DraftBlock, DraftSettings, DraftShape, draft_block
from .processors import BatchView, HostRows, SpeculativeLogitsProcessor
from .stopping import first_stops, token_wise
from .timing import PhaseTimer
from .tree import (
    KVState,
    PendingTokens,
    Tree,
    canonical_branches,
    forward_tokens,
    mask_to_front,
    new_state,
    pack_tree,
    select_positions,
    true_rows,
)

VerificationCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, VerificationResult], None]


@dataclass
class BlockTree:
    """One block's draft tree with the draft's and the target's law at every node, for B sequences.

    Node ``(i, d)`` is the context followed by branch ``i``'s first ``d``
    tokens (d = 0: the context alone); branches with equal prefixes share it.

    Attributes:
        tokens: [B, n, L] draft tokens; alive: [B, n, L] the branch holds a token at that depth.
        canonical: [B, n, L] smallest branch with the same first ``d`` tokens (see
            :func:`~.tree.canonical_branches`).
        draft_probs: L tensors [B, n, V]; ``draft_probs[d][b, i]`` is p at node ``(i, d)``,
            the law ``tokens[b, i, d]`` was drawn from.
        target_probs: L + 1 tensors [B, n, V]; ``target_probs[d][b, i]`` is q at node ``(i, d)``
            after the logits processors, exactly as the walk would see it.
    """

    tokens: torch.Tensor
    alive: torch.Tensor
    canonical: torch.Tensor
    draft_probs: list[torch.Tensor]
    target_probs: list[torch.Tensor]

    def first_branch(self) -> BlockTree:
        """The tree of branch 0 alone: with ``draft_shape="tree"``, a chain drafted as n = 1 would draft it."""
        return BlockTree(
            tokens=self.tokens[:, :1],
            alive=self.alive[:, :1],
            canonical=self.canonical[:, :1],
            draft_probs=[p[:, :1] for p in self.draft_probs],
            target_probs=[q[:, :1] for q in self.target_probs],
        )


BlockCallback = Callable[[BlockTree], None]


def draft_candidates(tokens: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafts a node hands its verifier: present branches first, in branch order, then −1.

    Args:
        tokens: [R, n] each branch's token at the node's depth; present: [R, n] the branch drafts there.

    Returns:
        candidates [R, n] and order [R, n], the branch of each candidate column.
    """
    order = mask_to_front(present)
    return torch.where(present, tokens, -1).gather(1, order), order


def expected_block_tokens(tree: BlockTree, verifier: Verifier) -> torch.Tensor:
    """[B] float64: tokens a block emits under ``verifier`` on this tree, its own randomness integrated out.

    The walk moves from node u to its child c exactly when the verifier's
    output at u is c's token, so with ``P(Y = y | drafts)`` from
    :meth:`~hf_globalres.verifiers.base.Verifier.conditional`:

        E[tokens] = 1 + Σ_{d=1..L} Σ_{nodes c at depth d} P(reach c),
        P(reach c) = P(reach parent(c)) · P(Y = token(c) | drafts at parent(c)),

    the 1 being the recovered or bonus token that ends every block. Averaged
    over the blocks of a run this is the rule's block efficiency on that
    run's trees, with the verifier's sampling noise removed, and rules scored
    on the same trees compare pairwise.
    """
    batch, n, depth = tree.tokens.shape
    device = tree.tokens.device
    branch = torch.arange(n, device=device)
    dtype = tree.target_probs[0].dtype
    reach = torch.ones(batch, n, dtype=dtype, device=device)  # reach[b, c]: node (c, d − 1), c canonical
    total = torch.ones(batch, dtype=dtype, device=device)
    for d in range(1, depth + 1):
        if d == 1:
            parent = torch.zeros(batch, n, dtype=torch.long, device=device)  # the root, held by branch 0
            is_node = (branch == 0).expand(batch, n)
        else:
            parent = tree.canonical[:, :, d - 2]
            is_node = tree.alive[:, :, d - 2] & (parent == branch)
        members = (parent[:, None, :] == branch[None, :, None]) & tree.alive[:, None, :, d - 1]  # [B, n(c), n(j)]
        node_b, node_c = (is_node & members.any(-1)).nonzero(as_tuple=True)
        if node_b.numel() == 0:
            break
        candidates, _ = draft_candidates(tree.tokens[node_b, :, d - 1], members[node_b, node_c])
        law = verifier.conditional(
            tree.target_probs[d - 1][node_b, node_c], tree.draft_probs[d - 1][node_b, node_c], candidates
        )
        emit = torch.zeros(batch, n, n, dtype=dtype, device=device)
        emit[node_b, node_c] = torch.where(
            members[node_b, node_c], law.gather(1, tree.tokens[node_b, :, d - 1]).to(dtype), 0
        )
        reach = torch.einsum("bc,bcj->bj", reach, emit)  # each branch has one parent node
        child = tree.alive[:, :, d - 1] & (tree.canonical[:, :, d - 1] == branch)
        total = total + (reach * child).sum(-1)
    return total


@dataclass
class DecodeResult:
    """Output of :func:`multi_draft_decode`.

    Attributes:
        sequences: [B, T] prompt plus generated tokens, ``pad_token_id`` after a row stops.
        target_forwards: [B] target forwards each row took part in (prefill included).
        accepted_lengths: per row, tokens emitted per block.
        timings: seconds per phase ("target_forward", "draft_forward", "verifier", "total", and the
            others of :meth:`~.timing.PhaseTimer.summary`).
    """

    sequences: torch.Tensor
    target_forwards: torch.Tensor
    accepted_lengths: list[list[int]]
    timings: dict[str, float]


def output_width(model: torch.nn.Module) -> int:
    """Width of ``model``'s logits (its embedding rows, padding included)."""
    head = model.get_output_embeddings()
    # out_features first: a packed head's weight is a copy out of its blocked layout (devices.PackedLinear).
    if head is not None and isinstance(getattr(head, "out_features", None), int):
        return head.out_features
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


@dataclass(frozen=True)
class DecodeSettings:
    """The settings of one :func:`multi_draft_decode` call, read by every block.

    Attributes:
        drafting: how the assistant drafts; its ``num_drafts`` is n, 1 when greedy (greedy drafts are
            deterministic: extra branches would be copies).
        num_assistant_tokens: L ≥ 1, the most draft tokens per branch.
        max_length: total length cap (prompt included).
        pad_token_id: written after a row stops.
        verifier: the token-level rule of the walk.
        tree_attention: the target holds one row per sequence with a tree mask (True) or n rows (False).
    """

    drafting: DraftSettings
    num_assistant_tokens: int
    max_length: int
    pad_token_id: int
    verifier: Verifier
    tree_attention: bool

    @property
    def num_drafts(self) -> int:
        """n, the branches per block."""
        return self.drafting.num_drafts

    @property
    def generator(self) -> torch.Generator | None:
        """Source of every draw of the call (None: the global RNG)."""
        return self.drafting.generator


@dataclass(frozen=True)
class _Call:
    """What every step of every block reads: models, settings, timer and the per-token hooks.

    Attributes:
        target, draft: the models; target_width, draft_width: their logits' widths (:func:`output_width`).
        processor: turns either model's logits into its law, once per prefix.
    """

    target: torch.nn.Module
    draft: torch.nn.Module
    processor: SpeculativeLogitsProcessor
    target_width: int
    draft_width: int
    settings: DecodeSettings
    timer: PhaseTimer
    stopping_criteria: StoppingCriteriaList
    verification_callback: VerificationCallback | None


@dataclass
class _Known:
    """What the host knows of the rows without reading the device; each block's one read keeps it current.

    Attributes:
        active: batch row of each active row (``_Decoding.active`` on the host).
        lengths: committed tokens of each active row.
        target_cached, draft_cached: committed tokens each cache holds, per active row.
        generated: tokens emitted per batch row.
    """

    active: list[int]
    lengths: list[int]
    target_cached: list[int]
    draft_cached: list[int]
    generated: list[int]


def _check_known(tensor: torch.Tensor, values: list) -> None:
    """Where reads are free, check that ``values`` is the host's copy of ``tensor`` (a wrong copy misshapes blocks)."""
    if _sync.reads_are_cheap(tensor) and tensor.tolist() != values:
        raise RuntimeError(f"internal error: the host holds {values}, the device {tensor.tolist()}")


@dataclass
class _Decoding:
    """What a call carries from block to block.

    Attributes:
        tokens: [B, C] the whole batch's prompts and emitted tokens, ``pad_token_id`` after a row stops;
            C = max_length + L + 1 leaves room for a block's tokens past the cap.
        mask: [B, C] the prompts' attention mask, 1 after them.
        prompt_len: T0.
        generated: [B] tokens emitted per row.
        target_forwards: [B] target forwards each row took part in.
        accepted_lengths: per row, tokens emitted per block.
        active: [R] batch rows still decoding, in the order of the caches' rows.
        target_state, draft_state: the caches (n target rows per active row without tree attention).
        target_cached, draft_cached: [R] committed tokens each cache holds.
        known: the host's copy of the row bookkeeping.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    generated: torch.Tensor
    target_forwards: torch.Tensor
    accepted_lengths: list[list[int]]
    active: torch.Tensor
    target_state: KVState
    draft_state: KVState
    target_cached: torch.Tensor
    draft_cached: torch.Tensor
    known: _Known


def _start(call: _Call, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> _Decoding:
    """The state before the first block: prompts in the token buffer, empty caches, every row active."""
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    settings = call.settings
    capacity = settings.max_length + settings.num_assistant_tokens + 1
    tokens = torch.full((batch, capacity), settings.pad_token_id, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = input_ids
    mask = torch.ones(batch, capacity, dtype=torch.long, device=device)
    if attention_mask is not None:
        mask[:, :prompt_len] = attention_mask.to(device).long()
    target_rows = 1 if settings.tree_attention else settings.num_drafts
    return _Decoding(
        tokens=tokens,
        mask=mask,
        prompt_len=prompt_len,
        generated=torch.zeros(batch, dtype=torch.long, device=device),
        target_forwards=torch.zeros(batch, dtype=torch.long, device=device),
        accepted_lengths=[[] for _ in range(batch)],
        active=torch.arange(batch, device=device),
        target_state=new_state(call.target, batch * target_rows, device),
        draft_state=new_state(call.draft, batch, device),
        target_cached=torch.zeros(batch, dtype=torch.long, device=device),
        draft_cached=torch.zeros(batch, dtype=torch.long, device=device),
        known=_Known(list(range(batch)), [prompt_len] * batch, [0] * batch, [0] * batch, [0] * batch),
    )


@dataclass
class _Block:
    """One block's rows: their committed tokens, attention masks and position ids, and the room left to draft.

    Attributes:
        view: the active rows; ``view.contexts`` is a copy of their tokens, into which the walk writes.
        mask: [R, C] their attention masks; cumulative: [R, C] its running sum (position id + 1).
        next_position: [R] position id of the first token after the committed ones.
        depth: draft depth the length cap leaves (≤ L; 0: no room for a draft).
        lengths: the rows' committed lengths, on the host.
    """

    view: BatchView
    mask: torch.Tensor
    cumulative: torch.Tensor
    next_position: torch.Tensor
    depth: int
    lengths: list[int]

    def pending(self, cached: torch.Tensor, cached_host: list[int]) -> PendingTokens:
        """Committed tokens ``contexts[r, cached_r:length_r]`` not yet in a cache, right-aligned.

        Each is [R, P] with P = max(length − cached), from the host's copy ``cached_host`` of ``cached``;
        left holes are invalid.
        """
        work, length = self.view.contexts, self.view.lengths
        width = max(total - held for total, held in zip(self.lengths, cached_host, strict=True))
        index = length[:, None] - width + torch.arange(width, device=work.device)
        valid = (index >= cached[:, None]) & self.mask.gather(1, index).bool()
        tokens = torch.where(valid, work.gather(1, index), 0)
        positions = (self.cumulative.gather(1, index) - 1).clamp_min(0)
        return PendingTokens(tokens, valid, positions)


def _next_block(decoding: _Decoding, settings: DecodeSettings) -> _Block:
    """The active rows at the start of a block."""
    known = decoding.known
    length = decoding.prompt_len + decoding.generated[decoding.active]
    _check_known(length, known.lengths)
    depth = min(settings.num_assistant_tokens, max(settings.max_length - total for total in known.lengths) - 1)
    work = decoding.tokens[decoding.active]  # a copy: the walk writes into it
    mask = decoding.mask[decoding.active]
    cumulative = mask.cumsum(-1)
    next_position = cumulative.gather(1, (length - 1)[:, None])[:, 0]
    view = BatchView(work, length, decoding.active, decoding.tokens, HostRows(known.lengths, known.active))
    return _Block(view, mask, cumulative, next_position, max(depth, 0), known.lengths)


def _feedable(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """Tokens outside a model's embedding rows are fed as 0; their outputs are never used."""
    return torch.where(tokens < width, tokens, 0)


def multi_draft_decode(
    model: torch.nn.Module,
    assistant_model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    do_sample: bool,
    max_length: int,
    pad_token_id: int,
    num_drafts: int,
    num_assistant_tokens: int,
    verifier: Verifier,
    tree_attention: bool,
    streamer=None,
    verification_callback: VerificationCallback | None = None,
    block_callback: BlockCallback | None = None,
    confidence_threshold: float | None = None,
    draft_shape: DraftShape = "tree",
    generator: torch.Generator | None = None,
    assistant_top_k: int | None = None,
) -> DecodeResult:
    """Generate with multi-draft speculative sampling; see the module docstring.

    Args:
        input_ids: [B, T0] left-padded prompts; attention_mask: [B, T0] or None.
        logits_processor: applied once per prefix to target and draft logits alike.
        stopping_criteria: evaluated after every emitted token.
        max_length: total length cap (prompt included).
        num_drafts: n ≥ 1 branches; num_assistant_tokens: L ≥ 1 draft tokens per branch (at most,
            with ``confidence_threshold``: a branch stops after a token its draft gave probability
            below the threshold, see :mod:`.drafting`).
        draft_shape: ``"tree"`` (every branch drafts on) or ``"spine"`` (only one path does, through
            the token most branches drew at each depth; the others end where they leave it), see :mod:`.drafting`.
        assistant_top_k: draft from p truncated to its top-k tokens (None: all of p), see :mod:`.drafting`.
        block_callback: called with each block's :class:`BlockTree` before it is verified (not
            for blocks without drafts); it costs a pass of the logits processors over every node.
    """
    drafting = DraftSettings(
        num_drafts=num_drafts if do_sample else 1,
        draft_scheme=verifier.draft_scheme,
        confidence_threshold=confidence_threshold,
        draft_shape=draft_shape,
        top_k=assistant_top_k,
        generator=generator,
    )
    # The loop makes every law a softmax and checks it itself (_Walk.check), for a pass over V instead of four.
    settings = DecodeSettings(
        drafting,
        num_assistant_tokens,
        max_length,
        pad_token_id,
        verifier.for_shape(draft_shape).unchecked(),
        tree_attention,
    )
    timer = PhaseTimer(input_ids.device)
    target_width, draft_width = output_width(model), output_width(assistant_model)
    processor = SpeculativeLogitsProcessor(
        logits_processor, do_sample=do_sample, vocab_size=max(target_width, draft_width)
    )
    call = _Call(model, assistant_model, processor, target_width, draft_width, settings, timer, stopping_criteria,
                 verification_callback)  # fmt: skip
    decoding = _start(call, input_ids, attention_mask)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with prompt_vocabulary(assistant_model, input_ids):
        while decoding.active.numel() > 0:
            _block(call, decoding, block_callback, streamer)
    if streamer is not None:
        streamer.end()
    return DecodeResult(
        sequences=decoding.tokens[:, : decoding.prompt_len + max(decoding.known.generated)],
        target_forwards=decoding.target_forwards,
        accepted_lengths=decoding.accepted_lengths,
        timings=timer.summary(),
    )


def _block(call: _Call, decoding: _Decoding, block_callback: BlockCallback | None, streamer) -> None:
    """One block, the steps of the module docstring."""
    block = _next_block(decoding, call.settings)
    drafts = _draft(call, decoding, block)  # 1.
    target = _target_forward(call, decoding, block, drafts)  # 2.
    if block_callback is not None and drafts is not None:
        block_callback(_block_tree(drafts, target, call.processor, block.view))
    walk = _walk(call, block.view, drafts, target)  # 3.
    count, finished = _stop(call, block.view, walk, block.lengths)  # 4.
    kept = _kept(call, decoding, drafts, target, walk)
    settled = _Settled.read(count, finished, kept, walk.invalid)  # the block's one read
    _commit(decoding, block.view, walk.emitted, count, settled, call.settings.pad_token_id, streamer)
    _keep_cache(call, decoding, block, target, walk, kept, finished, settled)  # 5.


def _draft(call: _Call, decoding: _Decoding, block: _Block) -> DraftBlock | None:
    """Step 1: the assistant drafts n branches of up to ``block.depth`` tokens (None: no room to draft).

    The draft cache grows by the pending tokens and the drafted nodes (``decoding.draft_state``).
    """
    if block.depth < 1:
        return None
    pending = block.pending(decoding.draft_cached, decoding.known.draft_cached)
    drafts = draft_block(
        call.draft,
        decoding.draft_state,
        call.processor,
        pending=replace(pending, tokens=_feedable(pending.tokens, call.draft_width)),
        next_position=block.next_position,
        view=block.view,
        depth=block.depth,
        settings=call.settings.drafting,
        timer=call.timer,
    )
    decoding.draft_state = drafts.state
    return drafts


@dataclass
class TargetBlock:
    """The target's verification forward of one block.

    Attributes:
        logits: [N, V_t] raw logits of every scored node.
        node_row: [B, n, L + 1], row of ``logits`` holding the target's logits
            after branch ``i``'s first ``d`` tokens (d = 0: after the context).
        keep: [R_t, S] positions to keep whatever is accepted (committed and
            pending tokens); the block's own positions follow, see :func:`_target_keep`.
        tree: the packed tree (None without drafts or in the rows layout).
        tree_layout: one row per sequence (True) or n (False).
    """

    logits: torch.Tensor
    node_row: torch.Tensor
    keep: torch.Tensor
    tree: Tree | None
    tree_layout: bool

    def logits_at(self, rows: torch.Tensor, branch: torch.Tensor, depth: int) -> torch.Tensor:
        """[R, V_t]: logits after the first ``depth`` tokens of branch ``branch[rows]``, for ``rows``."""
        return self.logits[self.node_row[rows, branch[rows], depth]]


def _target_forward(call: _Call, decoding: _Decoding, block: _Block, drafts: DraftBlock | None) -> TargetBlock:
    """Step 2: one target forward over the pending committed tokens and every draft node."""
    pending = block.pending(decoding.target_cached, decoding.known.target_cached)
    forward = _tree_forward if call.settings.tree_attention else _rows_forward
    with call.timer.phase("target_forward"):
        target = forward(
            call.target,
            decoding.target_state,
            pending,
            block.next_position,
            drafts,
            call.settings.num_drafts,
            call.target_width,
        )
    decoding.target_forwards[decoding.active] += 1
    return target


def _tree_forward(
    model: torch.nn.Module,
    state: KVState,
    pending: PendingTokens,
    next_position: torch.Tensor,
    drafts: DraftBlock | None,
    num_drafts: int,
    target_width: int,
) -> TargetBlock:
    """Tree layout: one row per sequence holding ``[pending | packed tree]``.

    Node ``j`` attends the valid pending tokens and its ancestors, at position
    ``next_position + depth_j − 1``.
    """
    batch, width = pending.tokens.shape
    device = pending.tokens.device
    depth = drafts.depth if drafts is not None else 0
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    pending_allowed = causal[None] & pending.valid[:, None, :]
    tree = pack_tree(drafts.tokens, drafts.alive, drafts.tree_width) if drafts is not None else None
    nodes = tree.tokens.shape[1] if tree is not None else 0
    new_allowed, fed, fed_positions = pending_allowed, pending.tokens, pending.positions
    if tree is not None:
        top = torch.cat([pending_allowed, pending_allowed.new_zeros(batch, width, nodes)], dim=-1)
        bottom = torch.cat([pending.valid[:, None, :].expand(-1, nodes, -1), tree.ancestors], dim=-1)
        new_allowed = torch.cat([top, bottom], dim=1)
        fed = torch.cat([pending.tokens, tree.tokens], dim=1)
        fed_positions = torch.cat([pending.positions, next_position[:, None] + tree.depth - 1], dim=1)
    logits = forward_tokens(
        model,
        state,
        _feedable(fed, target_width),
        past_allowed=state.valid[:, None, :].expand(-1, width + nodes, -1),
        new_allowed=new_allowed,
        positions=fed_positions,
        logits_to_keep=nodes + 1,
    )  # [B, nodes + 1, V_t]
    base = torch.arange(batch, device=device)[:, None, None] * (nodes + 1)
    node_row = base.expand(batch, num_drafts, depth + 1).clone()
    if tree is not None:
        node_row[:, :, 1:] += 1 + tree.column
    return TargetBlock(logits.flatten(0, 1), node_row, torch.cat([state.valid, pending.valid], dim=1), tree, True)


def _rows_forward(
    model: torch.nn.Module,
    state: KVState,
    pending: PendingTokens,
    next_position: torch.Tensor,
    drafts: DraftBlock | None,
    num_drafts: int,
    target_width: int,
) -> TargetBlock:
    """Rows layout: n rows per sequence, row ``b·n + i`` holding ``[pending | x_i1 .. x_iL]`` causally."""
    batch, width = pending.tokens.shape
    device = pending.tokens.device
    n = num_drafts
    depth = drafts.depth if drafts is not None else 0
    chain = drafts.tokens.flatten(0, 1) if drafts is not None else pending.tokens.new_zeros(batch * n, 0)
    fed = torch.cat([pending.tokens.repeat_interleave(n, 0), chain], dim=1)
    fed_valid = torch.cat([pending.valid, pending.valid.new_ones(batch, depth)], dim=1).repeat_interleave(n, 0)
    square = torch.ones(width + depth, width + depth, dtype=torch.bool, device=device).tril()
    chain_positions = next_position[:, None] + torch.arange(depth, device=device)
    logits = forward_tokens(
        model,
        state,
        _feedable(fed, target_width),
        past_allowed=state.valid[:, None, :].expand(-1, width + depth, -1),
        new_allowed=square[None] & fed_valid[:, None, :],
        positions=torch.cat([pending.positions, chain_positions], dim=1).repeat_interleave(n, 0),
        logits_to_keep=depth + 1,
    )  # [B·n, L + 1, V_t]
    node_row = torch.arange(batch * n * (depth + 1), device=device).view(batch, n, depth + 1)
    keep = torch.cat([state.valid, pending.valid.repeat_interleave(n, 0)], dim=1)
    return TargetBlock(logits.flatten(0, 1), node_row, keep, None, False)


def _block_tree(
    drafts: DraftBlock, target: TargetBlock, processor: SpeculativeLogitsProcessor, view: BatchView
) -> BlockTree:
    """The :class:`BlockTree` of a block: q at every node, processed on that node's own prefix."""
    batch, n, depth = drafts.tokens.shape
    device = view.contexts.device
    row = torch.arange(batch, device=device).repeat_interleave(n)
    branch = torch.arange(n, device=device).repeat(batch)
    # A copy of each row's tokens per branch, extended by its drafts below.
    nodes = view.select(row, host_entries=[b for b in range(batch) for _ in range(n)])
    entry = torch.arange(batch * n, device=device)
    target_probs = []
    for d in range(depth + 1):
        if d > 0:
            nodes.contexts[entry, nodes.lengths + d - 1] = drafts.tokens[row, branch, d - 1]
        logits = target.logits[target.node_row[row, branch, d]]
        _, q = processor.view_distribution(nodes, logits, d)
        target_probs.append(q.view(batch, n, -1))
    canonical = target.tree.canonical if target.tree is not None else canonical_branches(drafts.tokens, drafts.alive)
    return BlockTree(drafts.tokens, drafts.alive, canonical, drafts.probs, target_probs)


@dataclass
class _Walk:
    """The walk of one block (step 3), depth by depth.

    Attributes:
        emitted: [R, L + 1] accepted tokens, then the recovered or bonus one.
        accepted: [R] count of accepted drafts.
        branch: [R] canonical branch of the accepted path.
        scores: [R, L + 1, V] processed target scores per emitted token, for stopping criteria that read them
            (None when every criterion is token-wise, see :mod:`.stopping`).
        stopped: [R] the row's block has ended.
        surviving: [R, n] branches carrying the accepted path that draft at the next depth (None without drafts).
        walked: on the host, the depths each row has walked; ``accepted + 1`` once the walk is over.
        invalid: [R] a law the row drew from was not a probability row (NaN: see :meth:`check`).
    """

    emitted: torch.Tensor
    accepted: torch.Tensor
    branch: torch.Tensor
    scores: torch.Tensor | None
    stopped: torch.Tensor
    surviving: torch.Tensor | None
    walked: list[int]
    invalid: torch.Tensor

    def check(self, rows: torch.Tensor, laws: torch.Tensor) -> None:
        """Flag ``rows`` whose ``laws`` [R', K] (float64 softmaxes, or their support's entries) hold a NaN.

        A softmax row is a probability row unless its scores had no finite maximum (every token −inf, or a
        NaN or +inf score), and then its sum is NaN. The verifier skips its own input checks, so this is the
        check; it is read with the block's one read (:class:`_Settled`), before any token is committed.
        """
        self.invalid[rows] |= ~torch.isfinite(laws.sum(-1))

    def write(self, view: BatchView, rows: torch.Tensor, index: int, token: torch.Tensor, scores: torch.Tensor) -> None:
        """Emit ``token`` [R'] as token ``index`` of the block for ``rows``, into ``view.contexts`` too."""
        view.contexts[rows, view.lengths[rows] + index] = token
        self.emitted[rows, index] = token
        if self.scores is not None:
            self.scores[rows, index] = scores

    def next_rows(self, drafting: bool) -> tuple[list[int], list[int]]:
        """The rows that walk at the next depth, and those of them with drafts there (``drafting``): one read."""
        walking = ~self.stopped
        has_drafts = self.surviving.any(-1) if drafting and self.surviving is not None else torch.zeros_like(walking)
        drafted = walking & has_drafts
        flags = torch.stack([walking, drafted]).tolist()
        return [r for r, go in enumerate(flags[0]) if go], [r for r, go in enumerate(flags[1]) if go]


def _walk(call: _Call, view: BatchView, drafts: DraftBlock | None, target: TargetBlock) -> _Walk:
    """Step 3: token-level verification depth by depth; the emitted tokens go into ``view.contexts``.

    Depth L + 1 has no drafts: the paths that accepted all theirs end there with a bonus token from q.
    Every row walks at depth 1 and has drafts there (the first branch always draws a token); before each
    later depth one read tells the host which rows walk on and which of them have drafts.
    """
    batch = view.contexts.shape[0]
    device = view.contexts.device
    depth = drafts.depth if drafts is not None else 0
    processor = call.processor
    walk = _Walk(
        emitted=torch.zeros(batch, depth + 1, dtype=torch.long, device=device),
        accepted=torch.zeros(batch, dtype=torch.long, device=device),
        branch=torch.zeros(batch, dtype=torch.long, device=device),
        # Entry (r, s) is read (by the stopping criteria) only after row r emitted token s: no fill needed.
        scores=None
        if token_wise(call.stopping_criteria)
        else torch.empty(batch, depth + 1, processor.vocab_size, dtype=processor.dtype, device=device),
        stopped=torch.zeros(batch, dtype=torch.bool, device=device),
        surviving=drafts.alive[:, :, 0].clone() if drafts is not None else None,
        walked=[0] * batch,
        invalid=torch.zeros(batch, dtype=torch.bool, device=device),
    )
    walking = list(range(batch))
    drafted = walking if drafts is not None else []
    if walk.surviving is not None:
        _check_known(walk.surviving.any(-1), [True] * batch)
    for d in range(1, depth + 2):
        if d > 1:
            walking, drafted = walk.next_rows(d <= depth)
            if not walking:
                break
        if not _walk_depth(call, walk, d, view, drafts, target, walking, drafted):
            break
    return walk


def _walk_depth(
    call: _Call,
    walk: _Walk,
    d: int,
    view: BatchView,
    drafts: DraftBlock | None,
    target: TargetBlock,
    walking: list[int],
    drafted: list[int],
) -> bool:
    """Depth ``d`` of the walk: verify the drafts at the node of each row in ``drafted``.

    ``walking`` (host) are the rows still walking, ``drafted`` those of them whose path has drafts at
    depth d; the others end here with a token from q. False once no row walks on.
    """
    generator = call.settings.generator
    rows_walking = true_rows(~walk.stopped, len(walking))
    for row in walking:
        walk.walked[row] += 1
    with call.timer.phase("target_probs"):
        step_scores, q = call.processor.view_distribution(
            view.select(rows_walking, host_entries=walking), target.logits_at(rows_walking, walk.branch, d - 1), d - 1
        )
    walk.check(rows_walking, q)
    # A path whose branches all stopped drafting before depth d (or that accepted them all) ends with a token from q.
    has_drafts = walk.surviving[rows_walking].any(-1) if drafted else torch.zeros_like(rows_walking, dtype=torch.bool)
    if len(drafted) < len(walking):
        local = true_rows(~has_drafts, len(walking) - len(drafted))
        ended = rows_walking[local]
        walk.write(view, ended, d - 1, sample_categorical(q[local], generator), step_scores[local])
        walk.stopped[ended] = True
    if not drafted:
        return False
    local = true_rows(has_drafts, len(drafted))
    rows = rows_walking[local]
    q, step_scores = q[local], step_scores[local]
    branch = walk.branch[rows]
    law = drafts.laws[d - 1].map(lambda t: t[rows, branch])
    walk.check(rows, law.entries)
    p = law.rows()
    present = walk.surviving[rows]
    candidates, order = draft_candidates(drafts.tokens[rows, :, d - 1], present)
    with call.timer.phase("verifier"):
        result = call.settings.verifier.verify(q, p, candidates, generator)
    if call.verification_callback is not None:
        call.verification_callback(d, q, law.probs, candidates, result)
    token = result.token
    chosen = order.gather(1, result.draft_index.clamp_min(0)[:, None])[:, 0]  # the branch of the output
    walk.write(view, rows, d - 1, token, step_scores)
    walk.accepted[rows] += result.accepted.long()
    walk.branch[rows] = torch.where(result.accepted, chosen, walk.branch[rows])
    walk.stopped[rows] = ~result.accepted
    carries = drafts.tokens[rows, :, d - 1] == token[:, None]
    next_alive = drafts.alive[rows, :, d] if d < drafts.depth else present
    walk.surviving[rows] = present & carries & next_alive
    return True


def _stop(call: _Call, view: BatchView, walk: _Walk, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: how many of each row's emitted tokens stand [R], and which rows are finished [R].

    The stopping criteria see each emitted token in turn, exactly as plain ``generate`` would; a row's
    tokens after its first stop are dropped. Criteria that look at nothing but the token and the length
    (EOS, max length: :mod:`.stopping`) are evaluated for every token at once.
    """
    max_length = call.settings.max_length
    emitted = [min(walked, max_length - total) for walked, total in zip(walk.walked, lengths, strict=True)]
    count = torch.minimum(walk.accepted + 1, max_length - view.lengths)
    _check_known(count, emitted)
    finished = view.lengths + count >= max_length
    with call.timer.phase("stopping"):
        if token_wise(call.stopping_criteria):
            stop_at = first_stops(call.stopping_criteria, walk.emitted, view.lengths, count)
        else:
            stop_at = _stops_token_by_token(call.stopping_criteria, view, walk, emitted, count)
    finished |= stop_at > 0
    return torch.where(stop_at > 0, stop_at, count), finished


def _stops_token_by_token(
    criteria: StoppingCriteriaList, view: BatchView, walk: _Walk, emitted: list[int], count: torch.Tensor
) -> torch.Tensor:
    """[R]: the first emitted token after which ``criteria`` stop each row (1-based), 0 for none.

    The host knows how many tokens each row emitted (``emitted``, capped by ``max_length``), so at
    token s it calls the criteria on the rows that have one; a row that stopped before is shown there
    as its committed tokens and its answer ignored.
    """
    stop_at = torch.zeros_like(count)
    for s in range(1, max(emitted, default=0) + 1):
        members = [r for r, tokens in enumerate(emitted) if tokens >= s]
        rows = true_rows(count >= s, len(members))
        going = stop_at[rows] == 0
        candidates = view.select(rows, host_entries=members)
        assert walk.scores is not None  # kept for criteria that are not token-wise
        for entries, done in candidates.call(criteria, walk.scores[rows, s - 1], s, going):
            hit = rows[entries]
            stop_at[hit] = torch.where(done.to(count.device) & going[entries], s, stop_at[hit])
    return stop_at


@dataclass
class _Kept:
    """The positions each cache keeps of the block's rows (step 5), before the finished rows leave.

    Attributes:
        target_keep: [R_t, S_t] per target row; target_sums: [R] kept positions per sequence.
        draft_keep: [R, S_d] per draft row.
        path_cached: [R] accepted tokens the draft cache now holds (None without drafts: unchanged).
    """

    target_keep: torch.Tensor
    target_sums: torch.Tensor
    draft_keep: torch.Tensor
    path_cached: torch.Tensor | None


def _kept(call: _Call, decoding: _Decoding, drafts: DraftBlock | None, target: TargetBlock, walk: _Walk) -> _Kept:
    """What both caches keep of the accepted paths (``walk.branch``, ``walk.accepted``)."""
    n = call.settings.num_drafts
    with call.timer.phase("cache"):
        target_keep = _target_keep(target, walk.accepted, walk.branch, n)
        # Without tree attention the n rows of a sequence hold the same positions.
        target_sums = (target_keep if target.tree_layout else target_keep[::n]).sum(-1)
        if drafts is None:
            return _Kept(target_keep, target_sums, decoding.draft_state.valid, None)
        draft_keep, path_cached = drafts.keep_path(walk.accepted, walk.branch)
    return _Kept(target_keep, target_sums, draft_keep, path_cached)


@dataclass
class _Settled:
    """The block's one host read, per row: emitted counts, finished flags, kept lengths of both caches.

    Attributes:
        counts: tokens that stand; finished: the row leaves the batch.
        target_kept, draft_kept: positions each cache keeps; path_cached: accepted tokens in the draft cache.
    """

    counts: list[int]
    finished: list[int]
    target_kept: list[int]
    draft_kept: list[int]
    path_cached: list[int]

    @classmethod
    def read(cls, count: torch.Tensor, finished: torch.Tensor, kept: _Kept, invalid: torch.Tensor) -> _Settled:
        """Read ``count`` [R], ``finished`` [R] and what ``kept`` sums per row, stacked into one read.

        Raises ValueError, before anything is committed, when a row drew from an ``invalid`` [R] law.
        """
        path = kept.path_cached if kept.path_cached is not None else torch.zeros_like(count)
        values = [count, finished.long(), kept.target_sums, kept.draft_keep.sum(-1), path, invalid.long()]
        *read, flags = torch.stack(values).tolist()
        if any(flags):
            raise ValueError(
                "a row's next-token scores have no finite maximum after the logits "
                "processors (every token −inf, or a NaN or +inf score), so they are no distribution to sample: "
                "check the logits processors and the models' outputs"
            )
        return cls(*read)

    @property
    def staying(self) -> list[int]:
        """The rows that stay in the batch."""
        return [r for r, done in enumerate(self.finished) if not done]


def _commit(
    decoding: _Decoding,
    view: BatchView,
    emitted: torch.Tensor,
    count: torch.Tensor,
    settled: _Settled,
    pad_token_id: int,
    streamer,
) -> None:
    """Write each row's first ``count`` emitted tokens into the batch's token buffer and stream them."""
    position = torch.arange(decoding.tokens.shape[1], device=count.device)
    keep_token = position[None, :] < (view.lengths + count)[:, None]
    decoding.tokens[decoding.active] = torch.where(keep_token, view.contexts, pad_token_id)
    decoding.generated[decoding.active] += count
    for row, emitted_count in zip(decoding.known.active, settled.counts, strict=True):
        decoding.accepted_lengths[row].append(emitted_count)
        decoding.known.generated[row] += emitted_count
    if streamer is not None:
        _stream(streamer, emitted, count, settled.counts, pad_token_id)


def _keep_cache(
    call: _Call,
    decoding: _Decoding,
    block: _Block,
    target: TargetBlock,
    walk: _Walk,
    kept: _Kept,
    finished: torch.Tensor,
    settled: _Settled,
) -> None:
    """Step 5: both caches keep only the accepted path; finished rows leave the batch."""
    staying = settled.staying
    survivors = true_rows(~finished, len(staying))
    with call.timer.phase("cache"):
        source = _target_source(target, walk.branch, survivors, call.settings.num_drafts)
        width = max((settled.target_kept[r] for r in staying), default=0)
        decoding.target_state = select_positions(decoding.target_state, kept.target_keep, source, width)
        width = max((settled.draft_kept[r] for r in staying), default=0)
        decoding.draft_state = select_positions(decoding.draft_state, kept.draft_keep, survivors, width)
    known, lengths = decoding.known, block.lengths
    if kept.path_cached is not None:
        decoding.draft_cached = (block.view.lengths + kept.path_cached)[survivors]
        known.draft_cached = [lengths[r] + settled.path_cached[r] for r in staying]
    else:
        decoding.draft_cached = decoding.draft_cached[survivors]
        known.draft_cached = [known.draft_cached[r] for r in staying]
    decoding.target_cached = (block.view.lengths + walk.accepted)[survivors]
    decoding.active = decoding.active[survivors]
    known.target_cached = [lengths[r] + walk.walked[r] - 1 for r in staying]
    known.lengths = [lengths[r] + settled.counts[r] for r in staying]
    known.active = [known.active[r] for r in staying]


def _target_keep(target: TargetBlock, accepted: torch.Tensor, branch: torch.Tensor, num_drafts: int) -> torch.Tensor:
    """keep [R_t, S'] for :func:`select_positions`: the positions kept before the block, then its accepted path.

    The path is branch ``branch`` [R]'s first ``accepted`` [R] tokens; the rows are those of ``target``
    (n per sequence without tree attention).
    """
    batch = accepted.shape[0]
    device = accepted.device
    depth = target.node_row.shape[2] - 1
    on_path = torch.arange(depth, device=device)[None, :] < accepted[:, None]  # [B, L]
    if not target.tree_layout:
        return torch.cat([target.keep, on_path.repeat_interleave(num_drafts, 0)], dim=1)
    nodes = target.tree.tokens.shape[1] if target.tree is not None else 0
    block_keep = torch.zeros(batch, nodes + 1, dtype=torch.bool, device=device)  # the last column takes the rest
    if target.tree is not None:
        path = target.tree.column[torch.arange(batch, device=device), branch]  # [B, L]
        block_keep.scatter_(1, torch.where(on_path, path, nodes), on_path)
    return torch.cat([target.keep, block_keep[:, :nodes]], dim=1)


def _target_source(target: TargetBlock, branch: torch.Tensor, survivors: torch.Tensor, num_drafts: int) -> torch.Tensor:
    """The source row of each new target row: a survivor's own row, or n copies of its accepted branch's row."""
    if target.tree_layout:
        return survivors
    return (survivors * num_drafts + branch[survivors]).repeat_interleave(num_drafts)


def _stream(streamer, emitted: torch.Tensor, count: torch.Tensor, counts: list[int], pad_token_id: int) -> None:
    """Send a block's emitted tokens: one call per block for one row, per token position for a batch.

    ``counts`` is the host's copy of ``count``; the tokens themselves go to the host, a read per call.
    """
    if emitted.shape[0] == 1:
        streamer.put(emitted[0, : counts[0]].cpu())
        return
    for s in range(max(counts)):
        streamer.put(torch.where(count > s, emitted[:, s], pad_token_id).cpu())


__all__ = [
    "BlockCallback",
    "BlockTree",
    "DecodeResult",
    "VerificationCallback",
    "draft_candidates",
    "expected_block_tokens",
    "multi_draft_decode",
    "output_width",
]
