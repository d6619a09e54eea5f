"""Small token-level cases shared by the verifier tests."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from hf_globalres import verifiers
from hf_globalres.verifiers import _race
from hf_globalres.verifiers._race import RaceProblems

CASE_KINDS = ("random", "sparse", "equal", "disjoint", "one_hot_p", "one_hot_q", "q_zero_where_p")


#: (n, α span, background) of :func:`wide_race_problems`.
WIDE_RACES = [(2, 5.0, 0.1), (4, 20.0, 0.0), (8, 39.0, 0.3)]


def wide_race_problems(n: int, span: float, background: float) -> tuple[RaceProblems, torch.Tensor]:
    """Two race problems a little wider than ``EXPANSION_MIN_WIDTH`` (padding on every 7th slot), and weights α.

    The second row's slot 3 holds most of its mass (a peaked row).
    """
    g = torch.Generator().manual_seed(n)
    width = _race.EXPANSION_MIN_WIDTH + 1000
    p = torch.rand(2, width, generator=g, dtype=torch.float64) ** 3
    p[:, ::7] = 0
    p[1, 3] = 50 * p[1].sum()
    p = (1 - background) * p / p.sum(-1, keepdim=True)
    alpha = torch.where(p > 0, span * (torch.rand(2, width, generator=g, dtype=torch.float64) - 0.5), 0)
    full = {"dtype": torch.float64}
    return RaceProblems(p, p, torch.full((2,), background, **full), torch.full((2,), float(n), **full)), alpha


#: Options that change a rule enough to run the whole suite on that form too (id ``name+key=value``).
VARIANTS = {"optimal_block": ["tilt=30"]}


def rule_ids() -> list[str]:
    """Every registered rule, each of its :data:`VARIANTS`, and as ``…[spine]`` each one that verifies
    spine trees its own way.

    (A rule whose :meth:`~hf_globalres.verifiers.base.Verifier.for_shape` returns another rule for
    ``draft_shape="spine"``, which must be exact too.)
    """
    ids = []
    for name in verifiers.available():
        for form in [name] + [f"{name}+{option}" for option in VARIANTS.get(name, [])]:
            verifier = rule(form)
            ids += [form] if verifier.for_shape("spine") is verifier else [form, f"{form}[spine]"]
    return ids


def rule(rule_id: str) -> verifiers.Verifier:
    """The rule of one :func:`rule_ids` entry."""
    form, _, shape = rule_id.partition("[")
    name, *options = form.split("+")
    chosen = {key: float(value) for key, value in (option.split("=") for option in options)}
    verifier = verifiers.get(name, **chosen)
    return verifier.for_shape(shape.rstrip("]")) if shape else verifier


def make_case(kind: str, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [V], p [V]) float64 for one named kind of case."""
    g = torch.Generator().manual_seed(seed)

    def rand() -> torch.Tensor:
        return torch.rand(vocab, generator=g, dtype=torch.float64) ** 3 + 1e-3

    q, p = rand(), rand()
    if kind == "sparse":
        q[torch.randperm(vocab, generator=g)[: vocab // 2]] = 0
        p[torch.randperm(vocab, generator=g)[: vocab // 2]] = 0
        q[0], p[-1] = q[0] + 0.1, p[-1] + 0.1  # both rows keep some mass
    elif kind == "equal":
        p = q.clone()
    elif kind == "disjoint":
        half = vocab // 2
        q[half:], p[:half] = 0, 0
    elif kind == "one_hot_p":
        p = torch.zeros(vocab, dtype=torch.float64)
        p[int(torch.randint(vocab, (1,), generator=g))] = 1
    elif kind == "one_hot_q":
        q = torch.zeros(vocab, dtype=torch.float64)
        q[int(torch.randint(vocab, (1,), generator=g))] = 1
    elif kind == "q_zero_where_p":
        q[: vocab // 2] = 0
    elif kind != "random":
        raise ValueError(kind)
    return q / q.sum(), p / p.sum()


def random_batch(
    batch: int, vocab: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, V], p [B, V]) softmax of correlated random logits."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, vocab, generator=g, dtype=torch.float64) * 2
    q = torch.softmax(base + 0.7 * torch.randn(batch, vocab, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(base + 0.7 * torch.randn(batch, vocab, generator=g, dtype=torch.float64), -1)
    return q.to(dtype), p.to(dtype)


def draw_drafts(
    draft_probs: torch.Tensor, num_drafts: int, scheme: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, n] drafts from p [B, V] under ``scheme`` (−1 where p has too small a support)."""
    if scheme == "iid":
        return torch.multinomial(draft_probs, num_drafts, replacement=True, generator=generator)
    support = int((draft_probs > 0).sum(-1).min())
    drawn = torch.multinomial(draft_probs, min(num_drafts, support), replacement=False, generator=generator)
    pad = torch.full((draft_probs.shape[0], num_drafts - drawn.shape[1]), -1, dtype=torch.long)
    return torch.cat([drawn, pad], dim=1)


def chi_square_pvalue(tokens: torch.Tensor, law: torch.Tensor) -> float:
    """Goodness of fit of sampled ``tokens`` [S] to ``law`` [V], pooling cells with tiny expectation."""
    observed = torch.bincount(tokens, minlength=law.shape[0]).double()
    expected = law.double() * tokens.shape[0]
    assert float(observed[expected == 0].sum()) == 0, "sampled a token of probability 0"
    keep = expected >= 5
    obs = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    if float(exp[-1]) == 0:
        obs, exp = obs[:-1], exp[:-1]
    if len(obs) == 1:
        return 1.0  # a one-point law: every sample is that point (checked above)
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)
