"""Reference computations for small vocabularies: exact enumeration and the transport LP.

These enumerate all ``V^n`` draft tuples, so they are for tests and
benchmarks at ``V^n`` up to a few thousand. ``transport_lp``, the other LPs
and :class:`TiltedRace` need scipy (a ``dev`` extra), imported on call;
``transport_maxflow`` is plain Python.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .rates import DraftScheme
from .verifiers.base import DraftShape, EmissionPlan, Verifier, check_draft_shape, heaviest_child


def draft_tuples(
    draft_probs: torch.Tensor, num_drafts: int, scheme: DraftScheme = "iid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered draft tuple of one row and its probability.

    Args:
        draft_probs: p, [V] (one row).
        num_drafts: n.
        scheme: ``"iid"``: n independent draws; ``"without_replacement"``:
            sequential draws with earlier tokens removed, ``m = min(n, |supp p|)``
            of them, the rest of the tuple padded with −1.

    Returns:
        ``(tuples [T, n] long, probs [T] float64)`` over tuples of positive
        probability, on ``draft_probs``' device; ``probs`` sums to 1.
    """
    p = draft_probs.double().cpu()
    p = p / p.sum()
    support = [int(i) for i in torch.nonzero(p > 0).flatten()]
    rows: list[tuple[int, ...]] = []
    weights: list[float] = []
    if scheme == "iid":
        for combo in itertools.product(support, repeat=num_drafts):
            rows.append(combo)
            weights.append(float(torch.prod(p[list(combo)])))
    elif scheme == "without_replacement":
        drawn = min(num_drafts, len(support))
        for combo in itertools.permutations(support, drawn):
            prob, remaining = 1.0, 1.0
            for token in combo:
                prob *= float(p[token]) / remaining
                remaining -= float(p[token])
            rows.append(combo + (-1,) * (num_drafts - drawn))
            weights.append(prob)
    else:
        raise ValueError(f"scheme must be 'iid' or 'without_replacement', got {scheme!r}")
    # Enumerated on the host; returned on the row's own device.
    tuples = torch.tensor(rows, dtype=torch.long, device=draft_probs.device).reshape(len(rows), num_drafts)
    probs = torch.tensor(weights, dtype=torch.float64, device=draft_probs.device)
    return tuples, probs / probs.sum()


def enumerate_law(
    verifier, target_probs: torch.Tensor, draft_probs: torch.Tensor, num_drafts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact output law and acceptances of ``verifier`` on one row, by enumeration.

    Returns ``(marginal [V], acceptance, emitted)`` in float64: the law of
    the output averaged over all draft tuples of the verifier's
    ``draft_scheme``, ``P(Y ∈ drafts)``, and ``E[Σ_i emit_i]`` (the rule's
    own acceptance events, which ignore recovered tokens that happen to
    equal a draft).
    """
    q = target_probs.double().reshape(1, -1)
    p = draft_probs.double().reshape(1, -1)
    tuples, weights = draft_tuples(p[0], num_drafts, verifier.draft_scheme)
    count = tuples.shape[0]
    q_rows, p_rows = q.expand(count, -1), p.expand(count, -1)
    law = verifier.conditional(q_rows, p_rows, tuples)
    marginal = (weights[:, None] * law).sum(0)
    # Count present drafts per token; absent (−1) entries add 0 at token 0 instead of overwriting it.
    is_draft = torch.zeros_like(law).scatter_add(1, tuples.clamp_min(0), (tuples >= 0).to(law.dtype)) > 0
    acceptance = (weights * torch.where(is_draft, law, 0).sum(-1)).sum()
    _, p_checked, x = verifier.prepare(q_rows, p_rows, tuples)
    emitted = (weights * verifier.plan(q_rows, p_checked, x).draft_emit.sum(-1)).sum()
    return marginal, acceptance, emitted


@dataclass(frozen=True)
class TwoLevelTree:
    """The laws of a two-level draft tree: the root's and one child's per token (float64, normalised).

    Attributes:
        q, p: [V] the root's target and draft laws.
        child_q, child_p: [V, V], row y: the laws at the child of token y.
    """

    q: torch.Tensor
    p: torch.Tensor
    child_q: torch.Tensor
    child_p: torch.Tensor

    @classmethod
    def random(cls, vocab: int, spread: float, generator: torch.Generator) -> TwoLevelTree:
        """Every law ``softmax(spread · z)``, z standard normal."""

        def law(*shape: int) -> torch.Tensor:
            return torch.softmax(spread * torch.randn(shape, generator=generator, dtype=torch.float64), -1)

        return cls(law(vocab), law(vocab), law(vocab, vocab), law(vocab, vocab))


def leaders(tuples: torch.Tensor) -> list[int]:
    """[T]: the token each draft tuple [T, n] continues a spine through (:func:`.verifiers.base.heaviest_child`)."""
    lead = heaviest_child(tuples, tuples >= 0)
    return tuples.gather(1, lead.int().argmax(-1, keepdim=True))[:, 0].tolist()


def enumerate_block_tokens(verifier, tree: TwoLevelTree, num_drafts: int, draft_shape: DraftShape = "tree") -> float:
    """Exact expected tokens per block of ``verifier`` at every node of ``tree`` (n drafts at the root).

    ``1 + Σ_x P(x) Σ_{y ∈ x} P(Y = y | x) (1 + α(q_y, p_y, m_y(x)))``, with ``α`` the rule's
    ``P(Y ∈ drafts)`` at the child of y against its ``m_y(x)`` drafts (:func:`enumerate_law`).
    With ``draft_shape="spine"`` only the child of the root's spine token
    (:func:`~hf_globalres.verifiers.base.heaviest_child`) has drafts: ``α = 0`` below every other token.
    """
    q, p = tree.q.reshape(1, -1), tree.p.reshape(1, -1)
    tuples, weights = draft_tuples(p[0], num_drafts, verifier.draft_scheme)
    law = verifier.conditional(q.expand(tuples.shape[0], -1), p.expand(tuples.shape[0], -1), tuples)
    below: dict[tuple[int, int], float] = {}
    total = 1.0
    for combo, leader, weight, row in zip(tuples.tolist(), leaders(tuples), weights.tolist(), law, strict=True):
        for token, times in collections.Counter(token for token in combo if token >= 0).items():
            if (token, times) not in below:
                child = enumerate_law(verifier, tree.child_q[token], tree.child_p[token], times)
                below[token, times] = float(child[1])
            goes_on = draft_shape == "tree" or token == leader
            total += weight * float(row[token]) * (1 + (below[token, times] if goes_on else 0.0))
    return total


def node_limit_lp(tree: TwoLevelTree, num_drafts: int, draft_shape: DraftShape = "tree") -> float:
    """The most tokens per block of any rule that couples the root alone, told what each acceptance is worth.

    Accepting y while m of the root's drafts show it is worth ``1 + α*(q_y, p_y, m)``
    (the child of y then verifies its m drafts optimally; :func:`rates.optimal_acceptance`),
    and with ``draft_shape="spine"`` only when y leads the spine
    (:func:`~hf_globalres.verifiers.base.heaviest_child`; 1 otherwise, the block ends).
    The best coupling of the root's ordered draft tuples with ``Y ~ q`` for these
    values (an LP over ``V^n · V`` variables), plus the token that ends every block. No
    rule at the root may know the children's α*, so this bounds every node-wise rule
    from above; :func:`block_limit_lp` also lets the root look below itself.
    """
    import numpy as np

    from .rates import optimal_acceptance

    tuples, weights = draft_tuples(tree.p, num_drafts)
    worth: dict[tuple[int, int], float] = {}
    value = np.zeros((tuples.shape[0], tree.q.shape[0]))
    for row, (combo, leader) in enumerate(zip(tuples.tolist(), leaders(tuples), strict=True)):
        for token, times in collections.Counter(combo).items():
            if (token, times) not in worth:
                below = optimal_acceptance(tree.child_q[token : token + 1], tree.child_p[token : token + 1], times)
                worth[token, times] = 1.0 + float(below[0])
            value[row, token] = worth[token, times] if draft_shape == "tree" or token == leader else 1.0
    return 1.0 + _best_coupling(value, weights.numpy(), (tree.q / tree.q.sum()).double().numpy())


def transport_lp(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    num_drafts: int,
    scheme: DraftScheme = "iid",
    gain: Callable[[int, int], float] | None = None,
) -> float:
    """Optimal acceptance of one row by the transport LP over draft tuples (scipy HiGHS).

    Variables ``π(t, y) ≥ 0`` for tuple ``t`` and output ``y``;
    ``Σ_y π(t, y) = P(t)``, ``Σ_t π(t, y) = q(y)``; maximise
    ``Σ_{t, y ∈ t} π(t, y) g(y, m_y(t))``, with ``m_y(t)`` the number of drafts
    in ``t`` that show ``y`` and ``g`` = ``gain`` (default 1: the acceptance; a
    ``g`` increasing in m values the drafts left below the accepted token, as
    ``optimal_block`` does, docs/design.md §4.7). Size ``T·V``: keep ``V^n`` small.
    """
    import numpy as np

    q = target_probs.double().cpu().reshape(-1)
    tuples, weights = draft_tuples(draft_probs.reshape(-1), num_drafts, scheme)
    value = np.zeros((tuples.shape[0], q.shape[0]))
    for row, combo in enumerate(tuples.tolist()):
        for token, times in collections.Counter(token for token in combo if token >= 0).items():
            value[row, token] = 1.0 if gain is None else gain(token, times)
    return _best_coupling(value, weights.numpy(), (q / q.sum()).numpy())


def block_limit_lp(tree: TwoLevelTree, num_drafts: int) -> float:
    """The most tokens per block any lossless rule emits on ``tree`` with n i.i.d. drafts (scipy HiGHS).

    A draft tree ``T`` is n root drafts ``x_i ~ p`` and, on each branch, one draft
    ``z_i ~ p_{x_i}`` below it. A lossless rule couples ``T`` with the output pair
    ``(y_1, y_2) ~ q(y_1) q_{y_1}(y_2)``, jointly over the whole tree (a rule that looks
    below a node is allowed here: this is the limit), and the block emits
    ``1 + [y_1 ∈ x] (1 + [some branch has (x_i, z_i) = (y_1, y_2)])`` tokens.
    Size ``V^{2n} · V²`` variables: V ≤ 4, n ≤ 3.
    """
    import numpy as np

    q, p, child_p = tree.q, tree.p, tree.child_p
    vocab = q.shape[0]
    roots, root_weights = draft_tuples(p, num_drafts)
    trees, weights = [], []
    for root, root_weight in zip(roots.tolist(), root_weights.tolist(), strict=True):
        for below in itertools.product(range(vocab), repeat=num_drafts):
            branches = list(zip(root, below, strict=True))
            weight = root_weight * math.prod(float(child_p[x, z]) for x, z in branches)
            if weight > 0:
                trees.append(branches)
                weights.append(weight)
    value = np.ones((len(trees), vocab, vocab))  # the recovered or bonus token
    for row, branches in enumerate(trees):
        for x in {x for x, _ in branches}:
            value[row, x, :] += 1.0  # y_1 accepted
        for x, z in set(branches):
            value[row, x, z] += 1.0  # and y_2 below it
    demand = (q[:, None] * tree.child_q).reshape(-1).numpy()
    weights_np = np.asarray(weights)
    return _best_coupling(value.reshape(len(trees), -1), weights_np / weights_np.sum(), demand)


def _best_coupling(value, supply, demand) -> float:
    """``max Σ π value`` over couplings ``π`` [T, O] ≥ 0 with row sums ``supply`` [T] and column sums ``demand`` [O]."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    count, outputs = value.shape
    index = np.arange(count * outputs).reshape(count, outputs)
    rows = np.concatenate([np.repeat(np.arange(count), outputs), count + np.tile(np.arange(outputs), count)])
    cols = np.concatenate([index.reshape(-1), index.reshape(-1)])
    equality = coo_matrix((np.ones_like(rows, dtype=float), (rows, cols)), shape=(count + outputs, count * outputs))
    result = linprog(
        -value.reshape(-1),
        A_eq=equality.tocsr(),
        b_eq=np.concatenate([supply, demand]),
        bounds=(0, None),
        method="highs",
        options={"presolve": False, "primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    if result.status != 0:
        raise RuntimeError(f"transport LP failed: {result.message}")
    return float(-result.fun)


def transport_maxflow(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, num_drafts: int, scheme: DraftScheme = "iid"
) -> float:
    """Optimal acceptance of one row as a maximum flow (Thomas & Pal 2025, §3).

    The transport LP with its equalities relaxed to ``≤`` has the same value
    and is a flow network: source → token y (capacity q(y)) → draft set S ∋ y
    (capacity ∞) → sink (capacity P(set of the drafts = S)). Tuples with the
    same set of distinct tokens are merged, since acceptance depends only on
    that set. Solved exactly in float64 by Dinic's algorithm (BFS levels,
    blocking flows); residual capacities below 1e−15 count as saturated.
    Size: V + (number of distinct draft sets) nodes; keep ``V^n`` small.
    """
    q = target_probs.double().cpu().reshape(-1)
    q = (q / q.sum()).tolist()
    tuples, weights = draft_tuples(draft_probs.reshape(-1), num_drafts, scheme)
    set_mass: dict[frozenset[int], float] = collections.defaultdict(float)
    for combo, weight in zip(tuples.tolist(), weights.tolist(), strict=True):
        set_mass[frozenset(token for token in combo if token >= 0)] += weight
    vocab = len(q)
    sets = list(set_mass)
    source, sink = vocab + len(sets), vocab + len(sets) + 1
    graph = _FlowGraph(vocab + len(sets) + 2)
    for token, mass in enumerate(q):
        if mass > 0:
            graph.add_edge(source, token, mass)
    for index, members in enumerate(sets):
        for token in members:
            graph.add_edge(token, vocab + index, float("inf"))
        graph.add_edge(vocab + index, sink, set_mass[members])
    return graph.max_flow(source, sink)


class _FlowGraph:
    """A directed graph with float capacities and Dinic's maximum flow."""

    EPS = 1e-15

    def __init__(self, nodes: int) -> None:
        self.adjacent: list[list[int]] = [[] for _ in range(nodes)]
        self.head: list[int] = []  # edge e goes to head[e]; e ^ 1 is its reverse
        self.capacity: list[float] = []

    def add_edge(self, tail: int, head: int, capacity: float) -> None:
        for start, end, cap in ((tail, head, capacity), (head, tail, 0.0)):
            self.adjacent[start].append(len(self.head))
            self.head.append(end)
            self.capacity.append(cap)

    def max_flow(self, source: int, sink: int) -> float:
        total = 0.0
        while True:
            level = self._levels(source)
            if level[sink] < 0:
                return total
            cursor = [0] * len(self.adjacent)
            while (pushed := self._push(source, sink, float("inf"), level, cursor)) > self.EPS:
                total += pushed

    def _levels(self, source: int) -> list[int]:
        level = [-1] * len(self.adjacent)
        level[source] = 0
        queue = collections.deque([source])
        while queue:
            node = queue.popleft()
            for edge in self.adjacent[node]:
                if self.capacity[edge] > self.EPS and level[self.head[edge]] < 0:
                    level[self.head[edge]] = level[node] + 1
                    queue.append(self.head[edge])
        return level

    def _push(self, node: int, sink: int, limit: float, level: list[int], cursor: list[int]) -> float:
        # Paths are at most 4 edges long (source, token, set, sink): recursion depth is tiny.
        if node == sink:
            return limit
        edges = self.adjacent[node]
        while cursor[node] < len(edges):
            edge = edges[cursor[node]]
            head = self.head[edge]
            if self.capacity[edge] > self.EPS and level[head] == level[node] + 1:
                pushed = self._push(head, sink, min(limit, self.capacity[edge]), level, cursor)
                if pushed > self.EPS:
                    self.capacity[edge] -= pushed
                    self.capacity[edge ^ 1] += pushed
                    return pushed
            cursor[node] += 1
        return 0.0


class TiltedRace(Verifier):
    """``optimal_block`` with the clocks of the most-drawn tokens sped up by ``tilt`` (docs/design.md §4.8).

    A reference for tiny rows: it enumerates the ``V^n`` draft tuples of each
    distinct row and solves the race by scipy on them, so ``V^n`` must stay
    small. The race is ``optimal``'s two-tier race (docs/design.md §4.2) with each racing draft's
    clock at rate ``w_{x_i} θ^{[x_i most drawn]}`` (θ = ``tilt``; "most drawn":
    no token shows more of the n drafts). The weights solve the same problems
    as ``optimal``'s (``b = a`` in the L tier, ``b ≥ c`` in the H tier) through the
    convex potential ``E[log Σ_i rate_i]``, whose gradient is still the race's law
    ``b``; acceptance then follows docs/design.md §4.7 (classes by multiplicity from the top,
    ``ā = min(q, b)``, wins moved to the spine's leader in the spine shape). The
    output law is q for any θ and any weights (``Σ_m B_{y,m} γ_{y,m} = ā_y ≤ q_y``);
    θ = 1 is ``optimal_block``.
    """

    name = "tilted_race"

    def __init__(self, tilt: float, draft_shape: DraftShape = "tree") -> None:
        if not tilt >= 1:
            raise ValueError(f"tilt must be ≥ 1 (1: optimal_block's race), got {tilt!r}")
        super().__init__()
        self.tilt = float(tilt)
        self.draft_shape = check_draft_shape(draft_shape)
        self._rows: dict[tuple[bytes, bytes, int], _TiltedRow] = {}

    def for_shape(self, draft_shape: DraftShape) -> TiltedRace:
        return TiltedRace(self.tilt, draft_shape)

    def plan(self, target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor) -> EmissionPlan:
        if bool((draft_tokens < 0).any()):
            raise ValueError("TiltedRace enumerates full draft tuples; every row needs its n drafts")
        emit, residual = [], []
        for q, p, drafts in zip(target_probs.double(), draft_probs.double(), draft_tokens, strict=True):
            key = (q.cpu().numpy().tobytes(), p.cpu().numpy().tobytes(), drafts.shape[0])
            if key not in self._rows:
                self._rows[key] = _TiltedRow.solve(q, p, drafts.shape[0], self.tilt, self.draft_shape)
            row = self._rows[key]
            emit.append(row.emit[row.index[tuple(drafts.tolist())]])
            residual.append(row.residual)
        return EmissionPlan(torch.stack(emit).to(target_probs), torch.stack(residual).to(target_probs))


@dataclass
class _TiltedRow:
    """One row's :class:`TiltedRace`: each tuple's per-draft emission and the residual law."""

    index: dict[tuple[int, ...], int]
    emit: torch.Tensor  # [T, n]
    residual: torch.Tensor  # [V]

    @classmethod
    def solve(cls, q: torch.Tensor, p: torch.Tensor, n: int, tilt: float, shape: DraftShape) -> _TiltedRow:
        from .verifiers.optimal_block import count_acceptance, leader_shares

        tuples, probs = draft_tuples(p, n)
        vocab = q.shape[0]
        counts = torch.nn.functional.one_hot(tuples, vocab).sum(1)  # [T, V]
        mult = counts.gather(1, tuples)  # [T, n]: m of each draft's token
        in_h, target = _tier_targets(q, p, n)
        in_l = ~in_h[tuples]  # [T, n]
        l_race = in_l.any(1)
        racing = torch.where(l_race[:, None], in_l, True)
        speed = torch.where(mult == mult.amax(1, keepdim=True), tilt, 1.0) * racing
        shares = torch.zeros(tuples.shape, dtype=torch.float64)
        for tier, box, tokens in ((l_race, False, ~in_h), (~l_race, True, in_h)):
            if bool(tier.any()):
                weights = _solve_potential(tuples[tier], probs[tier], speed[tier], torch.where(tokens, target, 0), box)
                rate = weights[tuples[tier]] * speed[tier]
                shares[tier] = rate / rate.sum(1, keepdim=True)
        win = torch.zeros(tuples.shape[0], vocab, dtype=torch.float64).scatter_add(1, tuples, shares)
        classes = torch.arange(1, n + 1)
        by_count = (torch.where(counts[..., None] == classes, win[..., None], 0) * probs[:, None, None]).sum(0)
        # κ = q in both tiers here: the race's chances are absolute, not conditional on the tier.
        fill = count_acceptance(q[None], by_count[None, :, -1], torch.tensor([n]), by_count[None])
        gamma = torch.cat([torch.zeros(vocab, 1, dtype=torch.float64), fill.lower[0, :, :-1], fill.top[0, :, None]], 1)
        if shape == "spine":
            same = tuples[:, :, None] == tuples[:, None, :]
            shares = leader_shares(shares, tuples, torch.ones_like(same[:, 0]), same)
        emit = shares * gamma[tuples, mult]
        accepted = (probs[:, None] * emit).flatten()
        mass = torch.zeros(vocab, dtype=torch.float64).scatter_add(0, tuples.flatten(), accepted)
        left = (q - mass).clamp_min(0)
        residual = left / left.sum() if float(left.sum()) > 0 else q
        return cls({tuple(t): i for i, t in enumerate(tuples.tolist())}, emit, residual)


def _tier_targets(q: torch.Tensor, p: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``H*`` [V] and each token's target mass [V]: ``a`` on L (water-filled), ``q`` on ``H*``.

    The same prefix and level as ``optimal``'s L race (docs/design.md §4.1–4.2).
    """
    from .rates import optimal_prefix, prefix_members
    from .verifiers.optimal import water_level

    prefix = optimal_prefix(q[None], p[None], n)
    in_h = prefix_members(prefix.order, prefix.size)[0]
    positions = torch.arange(q.shape[0])
    in_l_sorted = (positions >= prefix.size[:, None]) & (prefix.p > 0)
    masses = torch.where(in_l_sorted, prefix.q, 0), torch.where(in_l_sorted, prefix.p, 0)
    level = water_level(prefix.ratio, *masses, 1 - p[in_h].sum(0, keepdim=True) ** n)
    low = torch.where(~in_h & (p > 0), torch.minimum(q, level * p), 0)
    return in_h, torch.where(in_h, q, low)


def _solve_potential(
    tuples: torch.Tensor, probs: torch.Tensor, speed: torch.Tensor, target: torch.Tensor, box: bool
) -> torch.Tensor:
    """Weights [V] minimising ``Σ_x P(x) log Σ_i speed_i w_{x_i} − target · log w`` (``w ≥ 1`` if ``box``).

    Its gradient in ``log w_y`` is ``b_y − target_y``: the minimiser has ``b = target``
    (``b ≥ target``, equal where ``w > 1``, for the box), docs/design.md §4.4.
    """
    import numpy as np
    from scipy.optimize import minimize

    vocab = target.shape[0]
    index, weight, spd = tuples.numpy(), probs.numpy(), speed.numpy()
    goal = target.numpy()

    def potential(alpha: np.ndarray) -> tuple[float, np.ndarray]:
        rate = np.exp(alpha)[index] * spd
        total = rate.sum(1)
        law = np.zeros(vocab)
        np.add.at(law, index.ravel(), (weight[:, None] * rate / total[:, None]).ravel())
        return float(weight @ np.log(total) - goal @ alpha), law - goal

    bounds = [(0.0, 40.0) if box else (-40.0, 40.0)] * vocab
    found = minimize(potential, np.zeros(vocab), jac=True, method="L-BFGS-B", bounds=bounds,
                     options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 10_000})  # fmt: skip
    return torch.from_numpy(np.exp(found.x))
