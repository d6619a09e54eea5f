"""The processors component and the tree / cache utilities, checked against direct computation."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from hf_globalres.generation import SpeculativeLogitsProcessor
from hf_globalres.generation.drafting import DraftSettings, draft_block, sample_children
from hf_globalres.generation.processors import BatchView, DraftLaw, call_as_batch, top_k_indices, truncated_softmax
from hf_globalres.generation.timing import PhaseTimer
from hf_globalres.generation.tree import (
    PendingTokens,
    additive_mask,
    forward_tokens,
    new_state,
    pack_tree,
    select_positions,
)

from .conftest import VOCAB


def test_processor_is_a_logits_processor(generator):
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(5)])
    ids = torch.randint(0, 16, (3, 6), generator=generator)
    logits = torch.randn(3, 16, generator=generator)
    component = SpeculativeLogitsProcessor(processors)
    scores, probs = component.distribution(ids, logits)
    assert torch.equal(scores, processors(ids, logits.clone()))
    assert torch.allclose(probs, torch.softmax(scores.double(), -1))
    assert ((probs > 0).sum(-1) == 5).all()
    greedy = SpeculativeLogitsProcessor(processors, do_sample=False).distribution(ids, logits)[1]
    assert torch.equal(greedy, torch.nn.functional.one_hot(logits.argmax(-1), 16).double())


def test_truncated_probabilities_renormalise_the_top_k(generator):
    logits = torch.randn(4, 16, generator=generator)
    full = torch.softmax(logits.double(), -1)
    truncated = SpeculativeLogitsProcessor().probabilities(logits, top_k=5)
    top = logits.topk(5, dim=-1).indices
    kept = torch.zeros_like(full).scatter(1, top, full.gather(1, top))
    assert torch.allclose(truncated, kept / kept.sum(-1, keepdim=True), atol=1e-15)
    assert ((truncated > 0).sum(-1) == 5).all()
    assert torch.equal(SpeculativeLogitsProcessor().probabilities(logits, top_k=16), full)
    greedy = SpeculativeLogitsProcessor(do_sample=False).probabilities(logits, top_k=5)
    assert torch.equal(greedy, torch.nn.functional.one_hot(logits.argmax(-1), 16).double())


@pytest.mark.parametrize("vocab", [1000, 151_936, 70_001])
def test_top_k_indices_are_the_rows_largest_scores(vocab, generator):
    """The two-stage search (wide rows) finds the same entries as one ``topk``, ties and −inf included."""
    scores = torch.randn(3, vocab, generator=generator).round(decimals=1)  # many ties
    scores[1, 5000:] = float("-inf")
    scores[2] = float("-inf")
    scores[2, torch.randint(0, vocab, (20,), generator=generator)] = 1.0  # fewer finite entries than k
    found = top_k_indices(scores, 64)
    expected = scores.topk(64, dim=-1).values
    assert found.shape == (3, 64) and (found.sort(-1).values.diff(dim=-1) > 0).all()  # distinct columns
    assert torch.equal(scores.gather(1, found).sort(-1, descending=True).values, expected)


def test_truncated_law_holds_the_same_values_on_its_support(generator):
    scores = torch.randn(5, 151_936, generator=generator)
    law = truncated_softmax(scores, 64)
    assert torch.equal(law.probs.gather(1, law.sparse.tokens), law.sparse.values)
    assert ((law.probs > 0).sum(-1) == 64).all() and torch.allclose(
        law.sparse.values.sum(-1), torch.ones(5, dtype=torch.float64)
    )
    tokens = torch.cat([law.sparse.tokens[:, :2], scores.argmin(-1, keepdim=True)], dim=1)  # two held, one not
    for rows in (law, DraftLaw(dense=law.probs)):
        assert torch.equal(rows.map(lambda t: t[:, None].expand(-1, 3, -1)).at(tokens), law.probs.gather(1, tokens))
        assert torch.equal(rows.rows() if rows.dense is not None else rows.rows().dense(), law.probs)
    greedy = SpeculativeLogitsProcessor(do_sample=False).draft_law(scores, 64)
    assert torch.equal(greedy.sparse.tokens[:, 0], scores.argmax(-1)) and torch.equal(
        greedy.probs.sum(-1), torch.ones(5, dtype=torch.float64)
    )


def test_iid_children_from_the_support_follow_the_law():
    """Draws read from a truncated law's support have the dense law (chi-square over the support)."""
    scores = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    law = truncated_softmax(scores, 6).map(lambda t: t[:, None].expand(-1, 4, -1))
    parent, alive = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    generator = torch.Generator().manual_seed(2)
    draws = torch.cat([sample_children(law, parent, alive, "iid", generator)[0].flatten() for _ in range(5000)])
    counts = torch.bincount(draws, minlength=VOCAB).double()
    expected = law.probs[0, 0] * draws.numel()
    assert (counts[expected == 0] == 0).all()
    kept = expected > 0
    chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    assert chi2 < 25.7  # 99.9th percentile of chi-square with 5 degrees of freedom


def test_processor_pads_narrow_logits_with_zero_probability(generator):
    component = SpeculativeLogitsProcessor(vocab_size=16)
    _, probs = component.distribution(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 12, generator=generator))
    assert probs.shape == (2, 16) and (probs[:, 12:] == 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="width 20"):
        component.distribution(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 20))


def test_ragged_processing_matches_full_batch_calls(generator):
    """Entries of different lengths and batch rows equal plain full-batch calls at each length."""
    padding = torch.tensor([2, 0, 1])
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.8, prompt_ignore_length=padding),
            MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=3, eos_token_id=2),
        ]
    )
    component = SpeculativeLogitsProcessor(processors)
    background = torch.randint(0, 16, (3, 10), generator=generator)
    contexts = torch.randint(0, 16, (4, 10), generator=generator)
    lengths = torch.tensor([5, 7, 5, 9])
    rows = torch.tensor([0, 2, 0, 1])  # two entries in row 0: separate calls
    logits = torch.randn(4, 16, generator=generator)
    scores = component.ragged_scores(contexts, lengths, logits, rows, background)
    for i in range(4):
        ids = background[:, : lengths[i]].clone()
        ids[rows[i]] = contexts[i, : lengths[i]]
        full = torch.zeros(3, 16)
        full[rows[i]] = logits[i]
        assert torch.equal(scores[i], processors(ids, full)[rows[i]])
    # EOS is banned below 4 + 3 tokens only
    assert scores[0, 2] == float("-inf") and scores[3, 2] > float("-inf")


def test_call_as_batch_never_puts_two_entries_in_one_row():
    seen = []

    def record(ids, values):
        seen.append(ids.shape)
        return values

    contexts = torch.zeros(3, 4, dtype=torch.long)
    out = list(
        call_as_batch(record, contexts, torch.tensor([3, 3, 3]), torch.ones(3, 2), torch.tensor([1, 1, 0]), contexts)
    )
    assert len(out) == 2 and all(shape == (3, 3) for shape in seen)
    assert sorted(int(i) for entries, _ in out for i in entries) == [0, 1, 2]


def test_pack_tree_merges_shared_prefixes():
    tokens = torch.tensor([[[4, 5], [4, 6], [7, 8], [4, 5]]])  # branches 0 and 3 identical
    alive = torch.ones_like(tokens, dtype=torch.bool)
    tree = pack_tree(tokens, alive)
    assert tree.valid.sum() == 5  # 4, 7 at depth 1; 5, 6, 8 at depth 2
    nodes = tree.tokens[0].tolist()
    assert sorted(zip(tree.depth[0].tolist(), nodes, strict=True)) == [(1, 4), (1, 7), (2, 5), (2, 6), (2, 8)]
    assert tree.canonical[0, :, 0].tolist() == [0, 0, 2, 0] and tree.canonical[0, :, 1].tolist() == [0, 1, 2, 0]
    column = tree.column[0]
    assert torch.equal(column[3], column[0])
    assert tree.tokens[0, column[1, 1]] == 6
    anc = tree.ancestors[0]
    assert anc[column[1, 1], column[1, 0]] and anc[column[1, 1], column[1, 1]]
    assert not anc[column[1, 1], column[2, 0]] and not anc[column[1, 0], column[1, 1]]


def test_additive_mask_values():
    mask = additive_mask(torch.tensor([[[True, False]]]), torch.float16)
    assert mask.shape == (1, 1, 1, 2) and mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 1] == torch.finfo(torch.float16).min


@torch.no_grad()
def test_tree_forward_and_compaction_match_plain_forwards(target):
    """Tree-masked logits with a left-padded context equal separate plain forwards; so do logits after compaction."""
    context = torch.tensor([[0, 0, 1, 5, 7]])
    valid = context != 0
    state = new_state(target, 1, context.device)
    positions = (valid.cumsum(-1) - 1).clamp_min(0)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    forward_tokens(
        target, state, context, state.valid[:, None].expand(-1, 5, -1), causal & valid[:, None], positions, 1
    )
    assert state.cache.get_seq_length() == 5, "the forward must write into the state's cache"
    branches = torch.tensor([[[3, 9], [3, 4], [11, 12]]])
    tree = pack_tree(branches, torch.ones_like(branches, dtype=torch.bool))
    committed = valid
    nodes = tree.tokens.shape[1]
    logits = forward_tokens(
        target,
        state,
        tree.tokens,
        committed[:, None].expand(-1, nodes, -1),
        tree.ancestors,
        3 + tree.depth - 1,
        nodes,
    )[0]
    for i in range(3):
        for d in range(2):
            plain = target(torch.cat([context[:, 2:], branches[:, i, : d + 1]], dim=1)).logits[0, -1]
            assert torch.allclose(logits[tree.column[0, i, d]], plain, atol=1e-5)
    # keep the path of branch 1 (3, 4) and continue with one token
    keep = torch.cat([committed, torch.zeros(1, nodes, dtype=torch.bool)], dim=1)
    keep[0, 5 + tree.column[0, 1, 0]] = keep[0, 5 + tree.column[0, 1, 1]] = True
    state = select_positions(state, keep)
    assert state.valid.shape[1] == 5 and state.valid.sum() == 5
    after = forward_tokens(
        target, state, torch.tensor([[6]]), state.valid[:, None], torch.zeros(1, 1, 1, dtype=torch.bool),
        torch.tensor([[5]]), 1,
    )[0, -1]  # fmt: skip
    plain = target(torch.tensor([[1, 5, 7, 3, 4, 6]])).logits[0, -1]
    assert torch.allclose(after, plain, atol=1e-5)


def _draft(draft, prompt, *, n, depth, threshold, scheme="iid", draft_shape="tree", do_sample=True, seed=0, **warpers):
    """One :func:`draft_block` call on a fresh cache for one prompt."""
    ids = torch.tensor([prompt])
    width = len(prompt)
    contexts = torch.nn.functional.pad(ids, (0, depth + 1))
    processors = LogitsProcessorList([TopKLogitsWarper(warpers["top_k"])]) if "top_k" in warpers else None
    return draft_block(
        draft,
        new_state(draft, 1, ids.device),
        SpeculativeLogitsProcessor(processors, do_sample=do_sample, vocab_size=VOCAB),
        pending=PendingTokens(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(width)[None]),
        next_position=torch.tensor([width]),
        view=BatchView(contexts, torch.tensor([width]), torch.tensor([0]), contexts),
        depth=depth,
        settings=DraftSettings(
            num_drafts=n,
            draft_scheme=scheme,
            confidence_threshold=threshold,
            draft_shape=draft_shape,
            generator=torch.Generator().manual_seed(seed),
        ),
        timer=PhaseTimer(ids.device),
    )


@torch.no_grad()
@pytest.mark.parametrize(
    ("n", "threshold", "scheme", "warpers"),
    [
        (4, 0.09, "iid", {}),
        (2, 0.14, "iid", {"top_k": 8}),
        (4, 0.35, "without_replacement", {"top_k": 3}),
        (1, 0.09, "iid", {}),
    ],
)
def test_confidence_stop_follows_the_rule(draft, n, threshold, scheme, warpers):
    """A branch drafts depth d + 1 only after a depth-d token of draft probability ≥ τ; both outcomes occur."""
    depth, stops, goes = 3, 0, 0
    for seed in range(40):
        block = _draft(draft, [1, 5, 7, 3], n=n, depth=depth, threshold=threshold, scheme=scheme, seed=seed, **warpers)
        drafted = block.tokens.shape[2]
        assert 1 <= drafted <= depth
        for d in range(drafted):
            confidence = block.probs[d][0].gather(-1, block.tokens[0, :, d, None])[:, 0]
            going = block.alive[0, :, d] & (confidence >= threshold)
            if d + 1 < drafted:
                following = block.alive[0, :, d + 1]
                # i.i.d. branches all go on; without replacement a going branch may still die (rank beyond support)
                assert torch.equal(following, going) if scheme == "iid" else not (following & ~going).any()
            elif drafted < depth:
                assert not going.any(), "drafting ended while a branch was still confident"
            if d + 1 < depth:
                goes += int(going.sum())
                stops += int((block.alive[0, :, d] & ~going).sum())
    assert stops > 0 and goes > 0


@torch.no_grad()
def test_confidence_stop_extremes(draft):
    assert _draft(draft, [1, 9], n=3, depth=4, threshold=0.0).tokens.shape[2] == 4
    assert _draft(draft, [1, 9], n=3, depth=4, threshold=1.0).tokens.shape[2] == 1
    greedy = _draft(draft, [1, 9], n=1, depth=4, threshold=1.0, do_sample=False)
    assert greedy.tokens.shape[2] == 1  # greedy confidence is the softmax, not the one-hot law


@torch.no_grad()
@pytest.mark.parametrize(
    ("n", "threshold", "scheme"), [(4, None, "iid"), (4, 0.09, "iid"), (3, None, "without_replacement")]
)
def test_draft_laws_match_plain_forwards(draft, n, threshold, scheme):
    """Every branch's law at every depth equals a plain forward over its own prefix (tree masks and node columns)."""
    prompt = [1, 5, 7, 3]
    for seed in range(4):
        block = _draft(draft, prompt, n=n, depth=4, threshold=threshold, scheme=scheme, seed=seed)
        for i in range(n):
            for d in range(block.tokens.shape[2]):
                if block.alive[0, i, d]:
                    ids = torch.tensor([prompt + block.tokens[0, i, :d].tolist()])
                    expected = torch.softmax(draft(ids).logits[0, -1].double(), dim=-1)
                    assert torch.allclose(block.probs[d][0, i], expected, atol=1e-5)


@torch.no_grad()
def test_agreeing_branches_share_draft_columns(draft):
    """With top_k = 1 all n branches carry the same tokens: one draft column per depth, not n."""
    block = _draft(draft, [1, 9], n=4, depth=5, threshold=None, top_k=1)
    assert (block.tokens == block.tokens[:, :1]).all()
    assert block.state.valid.shape[1] - block.committed.shape[1] == 4
    assert (block.columns == torch.arange(4)).all()


def spine_members(tokens: list[int], members: list[bool]) -> list[bool]:
    """The members that drew the token most members drew (ties: the lowest branch's), by counting."""
    counts = {}
    for token, member in zip(tokens, members, strict=True):
        if member:
            counts[token] = counts.get(token, 0) + 1
    if not counts:
        return [False] * len(tokens)
    best = max(counts.values())
    chosen = next(t for t, m in zip(tokens, members, strict=True) if m and counts[t] == best)
    return [m and t == chosen for t, m in zip(tokens, members, strict=True)]


@torch.no_grad()
@pytest.mark.parametrize("threshold", [None, 0.09])
def test_spine_drafts_on_along_the_heaviest_child_only(draft, threshold):
    """ "spine": a branch holds a depth-(d + 1) token only if it stayed on the spine (the child most spine
    branches drew, at every depth) and is confident; one draft column per depth; laws match plain forwards."""
    prompt = [1, 5, 7, 3]
    widths, off_first = [], 0
    for seed in range(30):
        block = _draft(draft, prompt, n=4, depth=4, threshold=threshold, draft_shape="spine", seed=seed, top_k=4)
        tokens, alive = block.tokens[0], block.alive[0]
        members = alive[:, 0].tolist()
        for d in range(1, tokens.shape[1]):
            members = spine_members(tokens[:, d - 1].tolist(), members)
            on_spine = torch.tensor(members)
            assert not (alive[:, d] & ~on_spine).any()
            if threshold is None:
                assert torch.equal(alive[:, d], on_spine)
            off_first += int(not on_spine[0])
            members = [m and bool(a) for m, a in zip(members, alive[:, d].tolist(), strict=True)]
        assert block.state.valid.shape[1] - block.committed.shape[1] == tokens.shape[1] - 1
        widths.append(int(alive[:, -1].sum()))
        i = int(alive[:, -1].nonzero()[-1])
        ids = torch.tensor([prompt + tokens[i, :-1].tolist()])
        expected = torch.softmax(TopKLogitsWarper(4)(ids, draft(ids).logits[:, -1]).double(), dim=-1)[0]
        assert torch.allclose(block.probs[-1][0, i], expected, atol=1e-5)
    assert max(widths) > 1  # the spine carried several agreeing branches somewhere
    assert off_first > 0  # and somewhere left the first branch for a heavier child


@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_children_of_an_expanded_law_equal_those_of_its_copies(scheme):
    """Branches sharing one law as an expanded view (one node per sequence) draw exactly what n materialised
    copies of that law give with the same generator state."""
    law = torch.softmax(torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    expanded = law[:, None].expand(-1, 4, -1)
    parent = torch.zeros(2, 4, dtype=torch.long)
    alive = torch.tensor([[True, True, False, True], [True, True, True, True]])
    view = sample_children(DraftLaw(dense=expanded), parent, alive, scheme, torch.Generator().manual_seed(3))
    copies = sample_children(
        DraftLaw(dense=expanded.contiguous()), parent, alive, scheme, torch.Generator().manual_seed(3)
    )
    assert expanded.stride(1) == 0
    assert torch.equal(view[0], copies[0]) and torch.equal(view[1], copies[1])
    assert len(set(view[0][alive].tolist())) > 1
