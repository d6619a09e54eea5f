"""The block loop: draft n branches, verify them in one target forward, walk the tree, emit.

One block for B sequences (SpecTr multi-step decoding, Sun et al. 2023, §4;
docs/design.md §7):

1. The assistant drafts n branches of L tokens (:mod:`.drafting`).
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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from ..verifiers.base import VerificationResult, Verifier, sample_categorical
from .drafting import DraftBlock, DraftShape, draft_block
from .processors import SpeculativeLogitsProcessor, call_as_batch
from .timing import PhaseTimer
from .tree import KVState, Tree, canonical_branches, forward_tokens, new_state, pack_tree, select_positions

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
    order = torch.sort((~present).to(torch.int8), dim=-1, stable=True).indices
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
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    if head is not None and isinstance(getattr(head, "out_features", None), int):
        return head.out_features
    return int(model.config.get_text_config().vocab_size)


def _pending(
    work: torch.Tensor, work_mask: torch.Tensor, cumulative: torch.Tensor, length: torch.Tensor, cached: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Committed tokens ``work[b, cached_b:length_b]`` not yet in a cache, right-aligned.

    Returns tokens, valid and position ids, each [B, P] with P = max(length − cached);
    left holes are invalid.
    """
    width = int((length - cached).max())
    index = length[:, None] - width + torch.arange(width, device=work.device)
    valid = (index >= cached[:, None]) & work_mask.gather(1, index).bool()
    tokens = torch.where(valid, work.gather(1, index), 0)
    positions = (cumulative.gather(1, index) - 1).clamp_min(0)
    return tokens, valid, positions


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
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    n = num_drafts if do_sample else 1  # greedy drafts are deterministic: extra branches would be copies
    timer = PhaseTimer(device)
    target_width, draft_width = output_width(model), output_width(assistant_model)
    processor = SpeculativeLogitsProcessor(
        logits_processor, do_sample=do_sample, vocab_size=max(target_width, draft_width)
    )
    capacity = max_length + num_assistant_tokens + 1
    buf = torch.full((batch, capacity), pad_token_id, dtype=torch.long, device=device)
    buf[:, :prompt_len] = input_ids
    buf_mask = torch.ones(batch, capacity, dtype=torch.long, device=device)
    if attention_mask is not None:
        buf_mask[:, :prompt_len] = attention_mask.to(device).long()
    gen_len = torch.zeros(batch, dtype=torch.long, device=device)
    target_forwards = torch.zeros(batch, dtype=torch.long, device=device)
    accepted_lengths: list[list[int]] = [[] for _ in range(batch)]

    active = torch.arange(batch, device=device)
    target_rows = 1 if tree_attention else n
    target_state = new_state(model, batch * target_rows, device)
    draft_state = new_state(assistant_model, batch, device)
    target_cached = torch.zeros(batch, dtype=torch.long, device=device)
    draft_cached = torch.zeros(batch, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    while active.numel() > 0:
        length = prompt_len + gen_len[active]
        depth = int(min(num_assistant_tokens, int((max_length - length).max()) - 1))
        depth = max(depth, 0)
        work = buf[active].clone()
        work_mask = buf_mask[active]
        cumulative = work_mask.cumsum(-1)
        next_position = cumulative.gather(1, (length - 1)[:, None])[:, 0]

        # 1. Draft.
        drafts: DraftBlock | None = None
        if depth >= 1:
            tokens, valid, positions = _pending(work, work_mask, cumulative, length, draft_cached)
            drafts = draft_block(
                assistant_model,
                draft_state,
                processor,
                pending=_feedable(tokens, draft_width),
                pending_valid=valid,
                pending_positions=positions,
                next_position=next_position,
                contexts=work,
                lengths=length,
                batch_rows=active,
                background=buf,
                num_drafts=n,
                depth=depth,
                scheme=verifier.draft_scheme,
                timer=timer,
                confidence_threshold=confidence_threshold,
                shape=draft_shape,
                generator=generator,
                top_k=assistant_top_k,
            )
            draft_state = drafts.state
            depth = drafts.tokens.shape[2]  # shallower when every branch stopped on low confidence

        # 2. One target forward over the pending tokens and the tree.
        tokens, valid, positions = _pending(work, work_mask, cumulative, length, target_cached)
        with timer.phase("target_forward"):
            target = _target_forward(
                model, target_state, tokens, valid, positions, next_position, drafts, n, tree_attention, target_width
            )
        target_forwards[active] += 1
        if block_callback is not None and drafts is not None:
            block_callback(_block_tree(drafts, target, processor, work, length, active, buf))

        # 3. Walk the tree.
        emitted, accepted, cur, step_scores = _walk(
            drafts,
            depth,
            target,
            processor,
            verifier,
            work=work,
            length=length,
            batch_rows=active,
            background=buf,
            timer=timer,
            callback=verification_callback,
            generator=generator,
        )

        # 4. Stop after any emitted token, exactly as plain generate would.
        count = torch.minimum(accepted + 1, max_length - length)
        finished = length + count >= max_length
        stop_at = torch.zeros_like(count)
        with timer.phase("stopping"):
            for s in range(1, int(count.max()) + 1):
                rows = ((count >= s) & (stop_at == 0)).nonzero()[:, 0]
                checks = call_as_batch(
                    stopping_criteria, work[rows], length[rows] + s, step_scores[rows, s - 1], active[rows], buf
                )
                for entries, done in checks:
                    members = rows[entries]
                    stop_at[members[done.to(device)]] = s
        finished |= stop_at > 0
        count = torch.where(stop_at > 0, stop_at, count)
        position = torch.arange(capacity, device=device)
        keep_token = position[None, :] < (length + count)[:, None]
        buf[active] = torch.where(keep_token, work, pad_token_id)
        gen_len[active] += count
        for row, emitted_count in zip(active.tolist(), count.tolist(), strict=True):
            accepted_lengths[row].append(emitted_count)
        if streamer is not None:
            _stream(streamer, emitted, count, pad_token_id)

        # 5. Keep the accepted path in both caches; drop finished rows.
        survivors = (~finished).nonzero()[:, 0]
        with timer.phase("cache"):
            target_state = select_positions(target_state, *_target_keep(target, accepted, cur, survivors, n))
            if drafts is not None:
                draft_keep, path_cached = drafts.keep_path(accepted, cur)
                draft_state = select_positions(draft_state, draft_keep, survivors)
                draft_cached = (length + path_cached)[survivors]
            else:
                draft_state = select_positions(draft_state, draft_state.valid, survivors)
                draft_cached = draft_cached[survivors]
        target_cached = (length + accepted)[survivors]
        active = active[survivors]

    if streamer is not None:
        streamer.end()
    sequences = buf[:, : prompt_len + int(gen_len.max())]
    return DecodeResult(
        sequences=sequences,
        target_forwards=target_forwards,
        accepted_lengths=accepted_lengths,
        timings=timer.summary(),
    )


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

    def logits_at(self, rows: torch.Tensor, cur: torch.Tensor, depth: int) -> torch.Tensor:
        """[R, V_t]: logits after the first ``depth`` tokens of branch ``cur[rows]``, for ``rows``."""
        return self.logits[self.node_row[rows, cur[rows], depth]]


def _block_tree(
    drafts: DraftBlock,
    target: TargetBlock,
    processor: SpeculativeLogitsProcessor,
    work: torch.Tensor,
    length: torch.Tensor,
    batch_rows: torch.Tensor,
    background: torch.Tensor,
) -> BlockTree:
    """The :class:`BlockTree` of a block: q at every node, processed on that node's own prefix."""
    batch, n, depth = drafts.tokens.shape
    device = work.device
    row = torch.arange(batch, device=device).repeat_interleave(n)
    branch = torch.arange(n, device=device).repeat(batch)
    contexts = work[row].clone()
    target_probs = []
    for d in range(depth + 1):
        if d > 0:
            contexts[torch.arange(batch * n, device=device), length[row] + d - 1] = drafts.tokens[row, branch, d - 1]
        logits = target.logits[target.node_row[row, branch, d]]
        _, q = processor.ragged_distribution(contexts, length[row] + d, logits, batch_rows[row], background)
        target_probs.append(q.view(batch, n, -1))
    canonical = target.tree.canonical if target.tree is not None else canonical_branches(drafts.tokens, drafts.alive)
    return BlockTree(drafts.tokens, drafts.alive, canonical, drafts.probs, target_probs)


def _target_forward(
    model: torch.nn.Module,
    state: KVState,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    next_position: torch.Tensor,
    drafts: DraftBlock | None,
    n: int,
    tree_attention: bool,
    target_width: int,
) -> TargetBlock:
    """Score the pending tokens [B, P] and every draft node in one forward.

    Tree layout: one row per sequence holding ``[pending | packed tree]``;
    node ``j`` attends the valid pending tokens and its ancestors, at position
    ``next_position + depth_j − 1``. Rows layout: n rows per sequence, row
    ``b·n + i`` holding ``[pending | x_i1 .. x_iL]`` causally.
    """
    batch, width = tokens.shape
    device = tokens.device
    depth = drafts.tokens.shape[2] if drafts is not None else 0
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    pending_allowed = causal[None] & valid[:, None, :]
    if tree_attention:
        tree = pack_tree(drafts.tokens, drafts.alive) if drafts is not None else None
        nodes = tree.tokens.shape[1] if tree is not None else 0
        new_allowed, fed, fed_positions = pending_allowed, tokens, positions
        if tree is not None:
            top = torch.cat([pending_allowed, pending_allowed.new_zeros(batch, width, nodes)], dim=-1)
            bottom = torch.cat([valid[:, None, :].expand(-1, nodes, -1), tree.ancestors], dim=-1)
            new_allowed = torch.cat([top, bottom], dim=1)
            fed = torch.cat([tokens, tree.tokens], dim=1)
            fed_positions = torch.cat([positions, next_position[:, None] + tree.depth - 1], dim=1)
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
        node_row = base.expand(batch, n, depth + 1).clone()
        if tree is not None:
            node_row[:, :, 1:] += 1 + tree.column
        return TargetBlock(logits.flatten(0, 1), node_row, torch.cat([state.valid, valid], dim=1), tree, True)
    chain = drafts.tokens.flatten(0, 1) if drafts is not None else tokens.new_zeros(batch * n, 0)
    fed = torch.cat([tokens.repeat_interleave(n, 0), chain], dim=1)
    fed_valid = torch.cat([valid, valid.new_ones(batch, depth)], dim=1).repeat_interleave(n, 0)
    square = torch.ones(width + depth, width + depth, dtype=torch.bool, device=device).tril()
    chain_positions = next_position[:, None] + torch.arange(depth, device=device)
    logits = forward_tokens(
        model,
        state,
        _feedable(fed, target_width),
        past_allowed=state.valid[:, None, :].expand(-1, width + depth, -1),
        new_allowed=square[None] & fed_valid[:, None, :],
        positions=torch.cat([positions, chain_positions], dim=1).repeat_interleave(n, 0),
        logits_to_keep=depth + 1,
    )  # [B·n, L + 1, V_t]
    node_row = torch.arange(batch * n * (depth + 1), device=device).view(batch, n, depth + 1)
    keep = torch.cat([state.valid, valid.repeat_interleave(n, 0)], dim=1)
    return TargetBlock(logits.flatten(0, 1), node_row, keep, None, False)


def _target_keep(
    target: TargetBlock, accepted: torch.Tensor, cur: torch.Tensor, survivors: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments for :func:`select_positions` that keep the accepted path of the surviving rows.

    Returns keep [R_t, S'] over every stored position and the source row of each new row.
    """
    batch = accepted.shape[0]
    device = accepted.device
    depth = target.node_row.shape[2] - 1
    on_path = torch.arange(depth, device=device)[None, :] < accepted[:, None]  # [B, L]
    if target.tree_layout:
        nodes = target.tree.tokens.shape[1] if target.tree is not None else 0
        block_keep = torch.zeros(batch, nodes, dtype=torch.bool, device=device)
        if target.tree is not None:
            path_rows, path_depth = on_path.nonzero(as_tuple=True)
            block_keep[path_rows, target.tree.column[path_rows, cur[path_rows], path_depth]] = True
        return torch.cat([target.keep, block_keep], dim=1), survivors
    block_keep = on_path.repeat_interleave(n, 0)
    source = (survivors * n + cur[survivors]).repeat_interleave(n)
    return torch.cat([target.keep, block_keep], dim=1), source


def _walk(
    drafts: DraftBlock | None,
    depth: int,
    target: TargetBlock,
    processor: SpeculativeLogitsProcessor,
    verifier: Verifier,
    *,
    work: torch.Tensor,
    length: torch.Tensor,
    batch_rows: torch.Tensor,
    background: torch.Tensor,
    timer: PhaseTimer,
    callback: VerificationCallback | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-level verification depth by depth; writes emitted tokens into ``work`` [B, T] at ``length``.

    Returns:
        emitted [B, L + 1] (accepted tokens, then the recovered or bonus one),
        accepted [B] count of accepted drafts, cur [B] canonical branch of the
        accepted path, scores [B, L + 1, V] processed target scores per emitted token.
    """
    batch = work.shape[0]
    device = work.device
    cur = torch.zeros(batch, dtype=torch.long, device=device)
    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    emitted = torch.zeros(batch, depth + 1, dtype=torch.long, device=device)
    vocab = processor.vocab_size
    scores = torch.zeros(batch, depth + 1, vocab, dtype=processor.dtype, device=device)
    all_rows = torch.arange(batch, device=device)
    surviving = drafts.alive[:, :, 0].clone() if drafts is not None else None
    for d in range(1, depth + 1):
        walking = (~stopped).nonzero()[:, 0]
        if walking.numel() == 0:
            break
        with timer.phase("target_probs"):
            step_scores, q = processor.ragged_distribution(
                work[walking],
                length[walking] + d - 1,
                target.logits_at(walking, cur, d - 1),
                batch_rows[walking],
                background,
            )
        # A path whose branches all stopped drafting before depth d ends with a bonus token from q.
        drafted = surviving[walking].any(-1)
        ended = walking[~drafted]
        if ended.numel() > 0:
            token = sample_categorical(q[~drafted], generator)
            work[ended, length[ended] + d - 1] = token
            emitted[ended, d - 1] = token
            scores[ended, d - 1] = step_scores[~drafted]
            stopped[ended] = True
        rows, q, step_scores = walking[drafted], q[drafted], step_scores[drafted]
        if rows.numel() == 0:
            break
        p = drafts.probs[d - 1][rows, cur[rows]]
        present = surviving[rows]
        candidates, order = draft_candidates(drafts.tokens[rows, :, d - 1], present)
        with timer.phase("verifier"):
            result = verifier.verify(q, p, candidates, generator)
        if callback is not None:
            callback(d, q, p, candidates, result)
        token = result.token
        branch = order.gather(1, result.draft_index.clamp_min(0)[:, None])[:, 0]
        work[rows, length[rows] + d - 1] = token
        emitted[rows, d - 1] = token
        scores[rows, d - 1] = step_scores
        accepted[rows] += result.accepted.long()
        cur[rows] = torch.where(result.accepted, branch, cur[rows])
        stopped[rows] = ~result.accepted
        carries = drafts.tokens[rows, :, d - 1] == token[:, None]
        next_alive = drafts.alive[rows, :, d] if d < depth else present
        surviving[rows] = present & carries & next_alive
    rows = all_rows[~stopped]
    if rows.numel() > 0:
        with timer.phase("target_probs"):
            step_scores, q = processor.ragged_distribution(
                work[rows], length[rows] + depth, target.logits_at(rows, cur, depth), batch_rows[rows], background
            )
        token = sample_categorical(q, generator)
        work[rows, length[rows] + depth] = token
        emitted[rows, depth] = token
        scores[rows, depth] = step_scores
    return emitted, accepted, cur, scores


def _stream(streamer, emitted: torch.Tensor, count: torch.Tensor, pad_token_id: int) -> None:
    """Send a block's emitted tokens: one call per block for one row, per token position for a batch."""
    if emitted.shape[0] == 1:
        streamer.put(emitted[0, : int(count[0])].cpu())
        return
    for s in range(int(count.max())):
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
