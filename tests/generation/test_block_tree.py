"""Block trees and exact expected tokens per block: enumeration, agreement with the walk, realized blocks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

import hf_globalres
from hf_globalres import verifiers
from hf_globalres.generation.loop import BlockTree, expected_block_tokens
from hf_globalres.generation.tree import canonical_branches
from hf_globalres.verifiers.optimal_block import OptimalBlock

from .conftest import EOS, tiny_llama

IID_RULES = [name for name in verifiers.available() if verifiers.get(name).draft_scheme == "iid" and name != "single"]


def _law(generator: torch.Generator, vocab: int, zeros: int) -> torch.Tensor:
    """A peaked random law over ``vocab`` tokens with ``zeros`` of them impossible."""
    weights = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 3
    weights[torch.randperm(vocab, generator=generator)[:zeros]] = 0
    return weights / weights.sum()


def random_tree(
    batch: int, n: int, depth: int, vocab: int, generator: torch.Generator, *, perfect: bool = False
) -> tuple[BlockTree, dict[tuple, torch.Tensor]]:
    """Drafts sampled i.i.d. per node from prefix-keyed laws; some branches stop early.

    ``perfect``: q = p at every node and no branch stops.

    Returns the tree and ``laws[(b, prefix, "p" | "q")]``, the laws of every node by its token prefix.
    """
    laws: dict[tuple, torch.Tensor] = {}

    def law(b: int, prefix: tuple, kind: str) -> torch.Tensor:
        key = (b, prefix, kind)
        if key not in laws:
            laws[key] = _law(generator, vocab, zeros=1 if kind == "p" else 0)
            if perfect and kind == "q":
                laws[key] = law(b, prefix, "p")
        return laws[key]

    tokens = torch.zeros(batch, n, depth, dtype=torch.long)
    alive = torch.ones(batch, n, depth, dtype=torch.bool)
    for b in range(batch):
        for i in range(n):
            full = perfect or torch.rand((), generator=generator) < 0.6
            stop = depth if full else int(torch.randint(1, depth + 1, (1,), generator=generator))
            alive[b, i, stop:] = False
            for d in range(stop):
                p = law(b, tuple(tokens[b, i, :d].tolist()), "p")
                tokens[b, i, d] = torch.multinomial(p, 1, generator=generator)
    draft_probs = [torch.zeros(batch, n, vocab, dtype=torch.float64) for _ in range(depth)]
    target_probs = [torch.zeros(batch, n, vocab, dtype=torch.float64) for _ in range(depth + 1)]
    for b in range(batch):
        for i in range(n):
            for d in range(depth + 1):
                prefix = tuple(tokens[b, i, :d].tolist())
                target_probs[d][b, i] = law(b, prefix, "q")
                if d < depth:
                    draft_probs[d][b, i] = law(b, prefix, "p")
    tree = BlockTree(tokens, alive, canonical_branches(tokens, alive), draft_probs, target_probs)
    return tree, laws


def recursive_expectation(tree: BlockTree, laws: dict, b: int, rule: verifiers.Verifier, n: int) -> float:
    """1 + expected accepted drafts, by recursion over branch sets sharing a prefix."""
    depth = tree.tokens.shape[2]

    def accepted(members: list[int], prefix: tuple) -> float:
        d = len(prefix)
        drafting = [j for j in members if d < depth and bool(tree.alive[b, j, d])]
        if not drafting:
            return 0.0
        drafts = [int(tree.tokens[b, j, d]) for j in drafting] + [-1] * (n - len(drafting))
        law = rule.conditional(laws[(b, prefix, "q")][None], laws[(b, prefix, "p")][None], torch.tensor([drafts]))[0]
        total = 0.0
        for token in dict.fromkeys(drafts[: len(drafting)]):
            children = [j for j in drafting if int(tree.tokens[b, j, d]) == token]
            total += float(law[token]) * (1 + accepted(children, (*prefix, token)))
        return total

    return 1 + accepted(list(range(n)), ())


@pytest.mark.parametrize(("n", "depth", "vocab"), [(3, 3, 4), (4, 2, 3), (2, 4, 5)])
def test_expected_tokens_equal_the_recursion_over_the_tree(generator, n, depth, vocab):
    tree, laws = random_tree(3, n, depth, vocab, generator)
    merged = (tree.canonical != torch.arange(n)[None, :, None]) & tree.alive
    assert merged.any(), "the cases must contain shared prefixes"
    for name in IID_RULES:
        rule = verifiers.get(name)
        expected = expected_block_tokens(tree, rule)
        assert expected.shape == (3,) and expected.dtype == torch.float64
        for b in range(3):
            assert float(expected[b]) == pytest.approx(recursive_expectation(tree, laws, b, rule, n), abs=1e-9), name


def test_first_branch_under_single_is_the_chain_formula(generator):
    """A chain of drafts x_1..x_k gives 1 + Σ_d Π_{j ≤ d} min(1, q_j(x_j) / p_j(x_j))."""
    tree, _ = random_tree(4, 3, 4, 5, generator)
    chain = tree.first_branch()
    got = expected_block_tokens(chain, verifiers.get("single"))
    for b in range(4):
        total, reach = 1.0, 1.0
        for d in range(4):
            if not bool(chain.alive[b, 0, d]):
                break
            x = int(chain.tokens[b, 0, d])
            reach *= min(1.0, float(chain.target_probs[d][b, 0, x] / chain.draft_probs[d][b, 0, x]))
            total += reach
        assert float(got[b]) == pytest.approx(total, abs=1e-12)


def test_a_perfect_draft_expects_every_token(generator):
    """q = p: optimal and the sequential rules accept every draft (L + 1 tokens).

    global_resolution and khisti approximate their couplings (truncation, a finite solve), so they may lose a little.
    """
    tree, _ = random_tree(3, 3, 3, 4, generator, perfect=True)
    for name in IID_RULES:
        expected = expected_block_tokens(tree, verifiers.get(name))
        if name in ("global_resolution", "khisti"):
            assert (expected <= 4 + 1e-12).all() and (expected > 3.5).all()
        else:
            assert torch.allclose(expected, torch.full((3,), 4.0, dtype=torch.float64), atol=1e-9), name


def _processors() -> LogitsProcessorList:
    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])


@pytest.mark.parametrize(("tree_attention", "draft_shape"), [(True, "tree"), (False, "tree"), (True, "spine")])
def test_block_tree_holds_what_the_walk_verifies(target, draft, tree_attention, draft_shape):
    """Every row the walk verifies sees q and p of some node of the block's tree, bit for bit, and its drafts."""
    trees: list[BlockTree] = []
    checked = []

    def on_verify(depth, q, p, drafts, result):
        tree = trees[-1]
        for row in range(q.shape[0]):
            node_q = tree.target_probs[depth - 1]
            same = (node_q == q[row]).all(-1) & (tree.draft_probs[depth - 1] == p[row]).all(-1)  # [B, n]
            assert same.any(), "a verified row matches no node of the tree"
            b = int(same.nonzero()[0, 0])
            present = drafts[row][drafts[row] >= 0]
            assert torch.isin(present, tree.tokens[b, :, depth - 1]).all()
            checked.append(depth)

    torch.manual_seed(0)
    hf_globalres.generate(
        target, torch.tensor([[1, 5, 7, 3], [1, 9, 9, 4]]), attention_mask=torch.ones(2, 4, dtype=torch.long),
        assistant_model=draft, num_drafts=3, num_assistant_tokens=3, do_sample=True, max_new_tokens=12,
        tree_attention=tree_attention, draft_shape=draft_shape, logits_processor=_processors(),
        block_callback=trees.append, verification_callback=on_verify, assistant_confidence_threshold=None,
    )  # fmt: skip
    assert trees and {1, 2} <= set(checked)
    for tree in trees:
        batch, n, depth = tree.tokens.shape
        assert len(tree.draft_probs) == depth and len(tree.target_probs) == depth + 1
        for q in tree.target_probs:
            assert q.shape[:2] == (batch, n) and torch.allclose(q.sum(-1), torch.ones(batch, n, dtype=q.dtype))


@pytest.fixture(scope="module")
def near_draft(target):
    """The target with a perturbed output layer: q and p differ, but most drafts are accepted, so blocks run deep."""
    model = tiny_llama(0)
    with torch.no_grad():
        noise = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(5))
        model.lm_head.weight.add_(0.15 * model.lm_head.weight.std() * noise)
    return model


@pytest.mark.parametrize(
    ("rule", "n", "depth", "options"),
    [
        ("optimal", 3, 3, {}),
        ("spectr", 2, 4, {"draft_shape": "spine"}),
        ("rrs", 3, 3, {"assistant_confidence_threshold": 0.3}),
        ("optimal", 4, 2, {"tree_attention": False}),
        ("optimal_block", 4, 3, {"draft_shape": "spine"}),
    ],
)
def test_expected_tokens_match_the_realized_blocks(target, near_draft, rule, n, depth, options):
    """Realized tokens per block minus their conditional expectation average to 0 (a z-test over blocks)."""
    new_tokens = 24
    # EOS is masked until the last token, so no block is cut by a stop; blocks without drafts are skipped.
    processors = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(6, new_tokens, EOS)])
    gaps = []
    scorer = verifiers.get(rule).for_shape(options.get("draft_shape", "tree"))
    for seed in range(20):
        expected: list[float] = []
        torch.manual_seed(seed)
        out = hf_globalres.generate(
            target, torch.tensor([[1, 3 + seed % 10, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
            assistant_model=near_draft, num_drafts=n, num_assistant_tokens=depth, do_sample=True,
            max_new_tokens=new_tokens, verifier=rule, logits_processor=processors, return_dict_in_generate=True,
            block_callback=lambda tree, out=expected: out.append(float(expected_block_tokens(tree, scorer))),
            **options,
        )  # fmt: skip
        realized = out.accepted_lengths[0]
        assert len(expected) in (len(realized), len(realized) - 1)
        gaps += [r - e for r, e in zip(realized, expected, strict=False)]
    mean = sum(gaps) / len(gaps)
    stderr = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1) / len(gaps))
    assert len(gaps) >= 100 and stderr < 0.1
    assert abs(mean) < 4.5 * stderr, (mean, stderr)


def test_generate_verifies_with_the_rules_form_for_its_draft_shape(target, draft, monkeypatch):
    shapes = []
    original = OptimalBlock.for_shape
    monkeypatch.setattr(OptimalBlock, "for_shape", lambda self, shape: shapes.append(shape) or original(self, shape))
    verified = []
    torch.manual_seed(0)
    hf_globalres.generate(
        target, torch.tensor([[1, 5, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long), assistant_model=draft,
        num_drafts=3, num_assistant_tokens=2, do_sample=True, max_new_tokens=4, verifier="optimal_block",
        draft_shape="spine", verification_callback=lambda *args: verified.append(args[0]),
    )  # fmt: skip
    assert shapes == ["spine"] and verified
