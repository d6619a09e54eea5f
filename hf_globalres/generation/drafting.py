"""Drafting: n branches of L tokens from the assistant, one batched forward per depth.

Depth 1 feeds the tokens the draft cache has not seen yet (the prompt at the
first block, then the last one or two committed tokens) on one row per
sequence; every branch then samples its first token from that one
distribution p(·|context). Depth d ≥ 2 feeds the distinct depth-(d − 1)
nodes that still draft (branches sharing a prefix share one node) as columns
of the same row, each attending to the committed context and to its own
ancestors (a tree layout over the draft cache, so the cache is never copied
per branch, and a confident draft whose branches agree costs one column, not
n). Sampling follows the verifier's ``draft_scheme``:

- ``"iid"``: each branch draws its next token independently from
  p(·|its prefix). Given the prefix, branches that share it are i.i.d. from it.
- ``"without_replacement"``: the branches leaving one tree node draw distinct
  tokens, as ordered sequential draws without replacement (Gumbel-top-k:
  the ranks of ``log p + G`` with i.i.d. Gumbel ``G``). A branch whose rank
  exceeds the support of p dies (``alive`` false); it drafts nothing further.

The draft law p is ours to choose: every verifier is exact for whatever p
it is handed, as long as the drafts are drawn from that same p. With
``top_k`` the drafts come from p truncated to its ``top_k`` most likely
tokens and renormalised, and that truncated law is what the verifier sees.
The output law stays the target's; the draft's support shrinks from V to
``top_k`` tokens, which makes verification cheap (its cost scales with the
draft's support) at a small cost in acceptance: on the built-in pair p puts
1.1 % of its mass outside its top 64 tokens, and the optimal acceptance at
n = 4 drops by 0.11 % (``eval/bench_draft_law.py``).

Branches sharing a prefix are sampled from the distribution computed for the
smallest such branch (its canonical copy), so the p handed to the verifier is
exactly the law the drafts were drawn from, bit for bit.

With a ``confidence_threshold`` τ a branch stops drafting after a token the
draft itself found unlikely: after x_d it drafts x_{d+1} only if
p(x_d | x_1..x_{d−1}) ≥ τ (in greedy mode p is the softmax of the processed
scores), and the block ends at the first depth where no branch goes on. The
decision to draft at a node depends only on the node's own prefix, so every
branch through a node stops or goes on together, and the drafts the verifier
sees at a node are still draws from p(·|node) under the draft scheme: the
output law is unchanged. Drafting stops where the draft's tokens stop paying
for the target tokens they cost.

Which nodes draft at depth d is data the host needs for the shape of the
depth-d forward. It reads their count per sequence back once per depth, unless
it knows it: without a threshold, a single branch, or the spine, drafts
through exactly one node per sequence at every depth (the first branch leaving
a node always draws a token in the support of p).

The draft shape (``draft_shape``) says which nodes draft on:

- ``"tree"``: every branch drafts on (while confident), so the tree can be n
  nodes wide at every depth.
- ``"spine"``: only one path drafts on: at each depth, the spine continues
  through the child of the current spine node that most of its branches drew
  (ties: the lowest branch's), and a branch that leaves the spine ends at the
  depth where it leaves it. Each depth then costs one draft column, as n = 1
  does, while the verifier still sees, at each spine node, every branch that
  stayed on the spine so far. Which nodes draft on is again decided before
  their children are drawn, from earlier draws only, so the output law is
  unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _sync
from ..verifiers.base import (
    DRAFT_SHAPES,
    DraftScheme,
    DraftShape,
    check_draft_shape,
    heaviest_child,
    sample_categorical,
)
from .processors import BatchView, DraftLaw, SpeculativeLogitsProcessor
from .timing import PhaseTimer
from .tree import KVState, PendingTokens, canonical_branches, forward_tokens, mask_to_front, true_rows


@dataclass(frozen=True)
class DraftSettings:
    """How the assistant drafts every block of a call (module docstring).

    Attributes:
        num_drafts: n ≥ 1 branches.
        draft_scheme: the verifier's ``draft_scheme`` (see :func:`sample_children`).
        confidence_threshold: τ (None: every branch drafts the block's full depth).
        draft_shape: ``"tree"`` or ``"spine"``, which nodes draft on.
        top_k: draft from p truncated to its ``top_k`` most likely tokens and renormalised (None: all of p).
        generator: source of every draw (None: the global RNG).
    """

    num_drafts: int
    draft_scheme: DraftScheme
    confidence_threshold: float | None = None
    draft_shape: DraftShape = "tree"
    top_k: int | None = None
    generator: torch.Generator | None = None


@dataclass
class DraftBlock:
    """The drafts of one block.

    Attributes:
        tokens: [B, n, L] draft tokens (0 where not alive).
        alive: [B, n, L] the branch holds a token at that depth.
        laws: L laws over [B, n, ·]; ``laws[d − 1]`` at ``[b, i]`` is the law branch
            ``i`` drew its depth-d token from.
        state: the draft cache after the block: ``committed`` positions, then
            the block's node columns.
        committed: [B, S_c] validity of the positions before the block's node columns.
        columns: [B, n, L − 1] block column (0-based, after ``committed``) holding the
            key/values of token ``x[i, d]``, −1 where that token was never fed
            (the branch stopped drafting there, or it is the last depth).
        tree_width: most distinct nodes of one sequence's tree, when the host knows it
            without a read (one branch drafting every depth), else None.
    """

    tokens: torch.Tensor
    alive: torch.Tensor
    laws: list[DraftLaw]
    state: KVState
    committed: torch.Tensor
    columns: torch.Tensor
    tree_width: int | None = None

    @property
    def probs(self) -> list[torch.Tensor]:
        """L tensors [B, n, V]: ``probs[d − 1][b, i]`` is the law branch ``i`` drew its depth-d token from."""
        return [law.probs for law in self.laws]

    @property
    def depth(self) -> int:
        """Depth L of the drafts: the block's depth, or less when every branch stopped on low confidence."""
        return self.tokens.shape[2]

    def keep_path(self, accepted: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the draft cache keeps when branch ``branch`` [B] had its first ``accepted`` [B] tokens accepted.

        Returns:
            keep [B, S]: committed positions and the fed tokens of the accepted path;
            cached [B]: how many accepted tokens are now in the cache (a prefix of them).
        """
        batch, _, fed_depth = self.columns.shape
        path = self.columns[torch.arange(batch, device=branch.device), branch]  # [B, L − 1]
        depth_index = torch.arange(fed_depth, device=branch.device)
        on_path = (path >= 0) & (depth_index[None, :] < accepted[:, None])
        block = torch.zeros(batch, self.state.valid.shape[1] - self.committed.shape[1] + 1, dtype=torch.bool,
                            device=branch.device)  # fmt: skip
        block.scatter_(1, torch.where(on_path, path, block.shape[1] - 1), on_path)
        return torch.cat([self.committed, block[:, :-1]], dim=1), on_path.sum(-1)


def check_drafting_options(confidence_threshold: object, draft_shape: object, top_k: object = None) -> None:
    """Raise ValueError naming a confidence threshold outside [0, 1], an unknown draft shape or a bad top-k."""
    if confidence_threshold is not None and (
        isinstance(confidence_threshold, bool)
        or not isinstance(confidence_threshold, int | float)
        or not 0 <= confidence_threshold <= 1
    ):
        raise ValueError(
            f"assistant_confidence_threshold must be a number in [0, 1] or None, got {confidence_threshold!r}"
        )
    check_draft_shape(draft_shape)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"assistant_top_k must be an integer ≥ 1 or None (the whole draft law), got {top_k!r}")


def keeps_drafting(
    processor: SpeculativeLogitsProcessor,
    scores: torch.Tensor,
    node: torch.Tensor,
    law: DraftLaw,
    tokens: torch.Tensor,
    alive: torch.Tensor,
    threshold: float | None,
) -> torch.Tensor:
    """[B, n]: branches that draft another token after ``tokens`` [B, n].

    A branch goes on while it is ``alive`` and, with a ``threshold`` τ, the
    draft gave its last token probability ≥ τ under ``law`` over [B, n, ·]
    (sampling) or, in greedy mode where ``law`` is one-hot, under
    ``softmax(scores[node])``: ``scores`` [N, V] are the processed scores of
    the N distinct nodes and ``node`` [B, n] each branch's row among them
    (gathered only then, so sampling never copies scores per branch).
    """
    if threshold is None:
        return alive
    if processor.do_sample:
        confidence = law.at(tokens)
    else:
        confidence = torch.softmax(scores[node], dim=-1, dtype=torch.float64).gather(-1, tokens[..., None])[..., 0]
    return alive & (confidence >= threshold)


def sample_children(
    law: DraftLaw,
    parent: torch.Tensor,
    alive: torch.Tensor,
    scheme: DraftScheme,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token of each branch.

    Args:
        law: over [B, n, ·], the law of branch ``i``'s next token, equal across branches
            with the same ``parent``. I.i.d. draws read its support when it has one
            (k entries instead of V; the same values, so the same law).
        parent: [B, n] canonical branch of each branch's current node.
        alive: [B, n] branches that are still drafting.
        scheme: ``"iid"`` or ``"without_replacement"`` (children of one node distinct).

    Returns:
        tokens [B, n] (0 for dead branches) and alive [B, n].
    """
    if scheme == "iid":
        tokens = _iid_draws(law.entries, generator)
        tokens = tokens if law.sparse is None else law.sparse.tokens.gather(-1, tokens[..., None])[..., 0]
        return torch.where(alive, tokens, 0), alive
    probs = law.probs
    _, n, vocab = probs.shape
    # Rank of each branch among the live branches leaving the same node.
    same_node = (parent[:, :, None] == parent[:, None, :]) & alive[:, None, :]
    earlier = torch.ones(n, n, dtype=torch.bool, device=probs.device).tril(-1)
    rank = (same_node & earlier).sum(-1)  # [B, n]
    uniform = torch.rand(probs.shape, dtype=torch.float64, device=probs.device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
    # One Gumbel vector per node: the canonical branch's.
    gumbel = gumbel.gather(1, parent[:, :, None].expand(-1, -1, vocab))
    keys = probs.double().log() + gumbel
    top = keys.topk(min(n, vocab), dim=-1)
    rank_ok = rank < top.indices.shape[-1]
    pick = rank.clamp_max(top.indices.shape[-1] - 1)[..., None]
    tokens = top.indices.gather(-1, pick)[..., 0]
    in_support = top.values.gather(-1, pick)[..., 0] > float("-inf")
    alive = alive & rank_ok & in_support
    return torch.where(alive, tokens, 0), alive


def _iid_draws(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[B, n]: one independent draw from each row ``probs[b, i]`` [B, n, K] (its column)."""
    batch, n, width = probs.shape
    if probs.stride(1) == 0:  # one law per row, expanded over its branches: one cumulative sum per row
        return sample_categorical(probs[:, 0], generator, draws=n)
    return sample_categorical(probs.reshape(batch * n, width), generator).view(batch, n)


@dataclass
class _Growth:
    """The drafts of one block as they grow, depth by depth.

    Attributes:
        state: the draft cache: ``committed`` positions, then the node columns fed so far.
        committed: [B, S_c] validity of the positions before the block's node columns.
        tokens, alive: one [B, n] tensor per drafted depth; laws: one law over [B, n, ·] per drafted depth.
        columns: [B, n, L − 1] as in :class:`DraftBlock`.
        going: [B, n] branches that draft another token.
        on_spine: [B, n] branches whose path is the spine (see :func:`heaviest_child`).
        rows, branch: ``arange(B)`` and ``arange(n)``, made once per block.
    """

    state: KVState
    committed: torch.Tensor
    tokens: list[torch.Tensor]
    alive: list[torch.Tensor]
    laws: list[DraftLaw]
    columns: torch.Tensor
    going: torch.Tensor
    on_spine: torch.Tensor
    rows: torch.Tensor
    branch: torch.Tensor

    def extend(
        self,
        tokens: torch.Tensor,
        alive: torch.Tensor,
        law: DraftLaw,
        going: torch.Tensor,
        spine_members: torch.Tensor,
        draft_shape: DraftShape,
    ) -> None:
        """Append one depth's draws; with ``draft_shape="spine"`` only the spine drafts on."""
        self.on_spine = heaviest_child(tokens, spine_members)
        self.going = going & self.on_spine if draft_shape == "spine" else going
        self.tokens.append(tokens)
        self.alive.append(alive)
        self.laws.append(law)


def _draw(
    processor: SpeculativeLogitsProcessor,
    law: DraftLaw,
    parent: torch.Tensor,
    drafting: torch.Tensor,
    scores: torch.Tensor,
    node: torch.Tensor,
    settings: DraftSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [B, n], alive [B, n] and going [B, n] of the children of the ``drafting`` branches.

    See :func:`sample_children` (``law``, ``parent``) and :func:`keeps_drafting` (``scores``, ``node``).
    """
    tokens, alive = sample_children(law, parent, drafting, settings.draft_scheme, settings.generator)
    going = keeps_drafting(processor, scores, node, law, tokens, alive, settings.confidence_threshold)
    return tokens, alive, going


def draft_block(
    model: torch.nn.Module,
    state: KVState,
    processor: SpeculativeLogitsProcessor,
    *,
    pending: PendingTokens,
    next_position: torch.Tensor,
    view: BatchView,
    depth: int,
    settings: DraftSettings,
    timer: PhaseTimer,
) -> DraftBlock:
    """Draw ``settings.num_drafts`` branches of at most ``depth`` ≥ 1 tokens.

    Args:
        state: draft cache with B rows (committed context minus ``pending``).
        pending: [B, P] committed tokens not yet in the cache (left holes allowed) and their position ids.
        next_position: [B] position id of the first draft token.
        view: the B rows' committed tokens and lengths, for the processors (see ``call_as_batch``).
        settings: number of branches, draft scheme, τ, draft shape, top-k and generator (module docstring).

    Returns:
        the drafts, ``tokens.shape[2]`` ≤ ``depth`` deep (shallower when every branch stopped early).
    """
    growth = _draft_root(model, state, processor, pending, view, depth, settings, timer)
    for d in range(2, depth + 1):
        if not _draft_depth(model, processor, growth, d, next_position, view, settings, timer):
            break
    drafted = len(growth.tokens)
    return DraftBlock(
        tokens=torch.stack(growth.tokens, dim=-1),
        alive=torch.stack(growth.alive, dim=-1),
        laws=growth.laws,
        state=growth.state,
        committed=growth.committed,
        columns=growth.columns[:, :, : drafted - 1],
        tree_width=drafted if _one_node_per_depth(settings) and settings.num_drafts == 1 else None,
    )


def _one_node_per_depth(settings: DraftSettings) -> bool:
    """Every sequence drafts through exactly one node at every depth, known without a read.

    Without a threshold every node that holds a branch drafts on, and the first branch leaving a
    node always draws a token (rank 0 of a draw without replacement lies in the support of p); a
    single branch, or the spine, is then one node per depth.
    """
    return settings.confidence_threshold is None and (settings.num_drafts == 1 or settings.draft_shape == "spine")


def _node_counts(is_node: torch.Tensor, settings: DraftSettings) -> list[int]:
    """Per sequence, how many distinct depth-(d − 1) nodes draft on (``is_node`` [B, n] marks them).

    One host read, unless :func:`_one_node_per_depth` says every count is 1 (checked where reads are free).
    """
    if not _one_node_per_depth(settings):
        return is_node.sum(-1).tolist()
    counts = [1] * is_node.shape[0]
    if _sync.reads_are_cheap(is_node) and is_node.sum(-1).tolist() != counts:
        raise RuntimeError("internal error: a sequence drafts through other than one node")
    return counts


def _draft_root(
    model: torch.nn.Module,
    state: KVState,
    processor: SpeculativeLogitsProcessor,
    pending: PendingTokens,
    view: BatchView,
    depth: int,
    settings: DraftSettings,
    timer: PhaseTimer,
) -> _Growth:
    """Depth 1: feed the pending tokens on one row per sequence; every branch draws from p(·|context)."""
    batch, width = pending.tokens.shape
    n = settings.num_drafts
    device = pending.tokens.device
    prompt_causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    with timer.phase("draft_forward"):
        logits = forward_tokens(
            model,
            state,
            pending.tokens,
            past_allowed=state.valid[:, None, :].expand(-1, width, -1),
            new_allowed=prompt_causal[None] & pending.valid[:, None, :],
            positions=pending.positions,
            logits_to_keep=1,
        )[:, -1]
    state = KVState(cache=state.cache, valid=torch.cat([state.valid, pending.valid], dim=1))
    rows = torch.arange(batch, device=device)
    with timer.phase("draft_sampling"):
        root_scores = processor.view_scores(view, logits)
        law = processor.draft_law(root_scores, settings.top_k).map(lambda t: t[:, None].expand(-1, n, -1))
        parent = torch.zeros(batch, n, dtype=torch.long, device=device)
        alive = torch.ones(batch, n, dtype=torch.bool, device=device)
        node = rows[:, None].expand(-1, n)  # every branch leaves the root, scored in its row
        tokens_d, alive_d, going = _draw(processor, law, parent, alive, root_scores, node, settings)
    columns = torch.full((batch, n, max(depth - 1, 0)), -1, dtype=torch.long, device=device)
    branch = torch.arange(n, device=device)
    growth = _Growth(
        state=state, committed=state.valid, tokens=[], alive=[], laws=[], columns=columns, going=going,
        on_spine=alive, rows=rows, branch=branch,
    )  # fmt: skip
    growth.extend(tokens_d, alive_d, law, going, alive_d, settings.draft_shape)  # on_spine & alive_d = alive_d
    return growth


def _draft_depth(
    model: torch.nn.Module,
    processor: SpeculativeLogitsProcessor,
    growth: _Growth,
    d: int,
    next_position: torch.Tensor,
    view: BatchView,
    settings: DraftSettings,
    timer: PhaseTimer,
) -> bool:
    """Depth d ≥ 2: feed the distinct depth-(d − 1) nodes that draft on and draw their children into ``growth``.

    Returns False, drafting nothing, when no branch drafts on.
    """
    batch, n = growth.going.shape
    device = growth.going.device
    fed = torch.stack(growth.tokens, dim=-1)  # [B, n, d − 1]
    parent = canonical_branches(fed, torch.stack(growth.alive, dim=-1))[:, :, -1]
    # A branch that drafts on does so from its node, which its canonical branch holds: is_node.any() ⇔ going.any().
    is_node = (parent == growth.branch) & growth.going
    counts = _node_counts(is_node, settings)
    if max(counts) == 0:
        return False
    carrier, fed_valid, logits = _feed_nodes(model, growth, fed, parent, is_node, max(counts), d, next_position, timer)
    # Distributions for fed nodes only: processors run once per distinct prefix.
    flat = true_rows(fed_valid.flatten(), sum(counts))  # the nodes, row by row (columns are left-packed)
    node_b, node_j = flat // fed_valid.shape[1], flat % fed_valid.shape[1]
    node_i = carrier[node_b, node_j]
    node_contexts = view.contexts[node_b]  # a copy (tensor index), extended by each node's drafts
    offsets = view.lengths[node_b, None] + torch.arange(d - 1, device=device)
    node_contexts.scatter_(1, offsets, fed[node_b, node_i])
    nodes = view.select(node_b, node_contexts, [b for b, count in enumerate(counts) for _ in range(count)])
    with timer.phase("draft_sampling"):
        node_scores = processor.view_scores(nodes, logits[node_b, node_j], d - 1)
        node_law = processor.draft_law(node_scores, settings.top_k)
        node_of = torch.zeros(batch, n, dtype=torch.long, device=device)
        node_of[node_b, node_i] = torch.arange(node_b.shape[0], device=device)
        branch_node = node_of[growth.rows[:, None], parent]
        # [B, n, V]; rows of stopped branches are never read. With one node per sequence (the spine, one
        # branch, or branches that all agree) node b is row b's: a view instead of n copies of its law.
        if counts == [1] * batch:
            law = node_law.map(lambda t: t[:, None].expand(-1, n, -1))
        else:
            law = node_law.map(lambda t: t[branch_node])
        tokens_d, alive_d, going = _draw(processor, law, parent, growth.going, node_scores, branch_node, settings)
    growth.extend(tokens_d, alive_d, law, going, growth.on_spine & alive_d, settings.draft_shape)
    return True


def _feed_nodes(
    model: torch.nn.Module,
    growth: _Growth,
    fed: torch.Tensor,
    parent: torch.Tensor,
    is_node: torch.Tensor,
    width: int,
    d: int,
    next_position: torch.Tensor,
    timer: PhaseTimer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed one column per distinct depth-(d − 1) node that drafts on, carried by its canonical branch.

    ``parent`` [B, n] is each branch's canonical branch at depth d − 1, ``is_node`` [B, n] marks the
    canonical branches of the nodes that draft on, and ``width`` = m is the most of them in one sequence.
    Each column attends the committed context and its own ancestors' columns. Records the columns in
    ``growth.columns[:, :, d − 2]`` and grows ``growth.state``.

    Returns:
        carrier [B, m] (the branch each column carries), fed_valid [B, m] (the column holds a node),
        logits [B, m, V_d] after each column.
    """
    batch, n = is_node.shape
    device = is_node.device
    state, committed = growth.state, growth.committed
    carrier = mask_to_front(is_node)[:, :width]  # [B, m]
    fed_valid = is_node.gather(1, carrier)
    start = state.valid.shape[1] - committed.shape[1]
    slot = torch.full((batch, n), -1, dtype=torch.long, device=device)
    slot.scatter_(1, carrier, torch.where(fed_valid, start + torch.arange(width, device=device), -1))
    growth.columns[:, :, d - 2] = torch.where(growth.going, slot.gather(1, parent), -1)
    ancestors = growth.columns[growth.rows[:, None], carrier, : d - 2]  # [B, m, d − 2]
    block_allowed = (ancestors[..., None] == torch.arange(start, device=device)).any(-2)
    with timer.phase("draft_forward"):
        logits = forward_tokens(
            model,
            state,
            fed[:, :, -1].gather(1, carrier),
            past_allowed=torch.cat([committed[:, None, :].expand(-1, width, -1), block_allowed], dim=-1),
            new_allowed=torch.zeros(batch, width, width, dtype=torch.bool, device=device),
            positions=(next_position + d - 2)[:, None].expand(-1, width),
            logits_to_keep=width,
        )
    growth.state = KVState(cache=state.cache, valid=torch.cat([state.valid, fed_valid], dim=1))
    return carrier, fed_valid, logits


__all__ = [
    "DRAFT_SHAPES",
    "DraftBlock",
    "DraftSettings",
    "DraftShape",
    "check_drafting_options",
    "draft_block",
    "heaviest_child",
    "keeps_drafting",
    "sample_children",
]
