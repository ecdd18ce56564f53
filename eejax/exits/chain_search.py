"""Search over chains of stored layers (CoLa: "Skip a Layer or Loop it?", Li, Li, Zhou 2025, arXiv:2507.07996).

A *chain* is a tuple of stored-layer indices run in order (``engine.sequence(chain)`` is its layer program): the
original model is ``(0, 1, ..., N-1)``; chains may skip layers, repeat (loop) a block, or reorder layers. Chains are
reached from the original by *edits* applied to chain positions:

* ``("skip", i, w)``: remove the block ``chain[i:i+w]``;
* ``("repeat", i, w)``: run the block ``chain[i:i+w]`` once more right after itself (a loop);
* ``("swap", i, 1)``: exchange ``chain[i]`` and ``chain[i+1]`` (a reordering).

``mcts`` is Monte-Carlo tree search over edit sequences of at most ``max_edits`` edits (a tree node = the chain
after its edits; UCT selection with progressive widening, one untried edit expanded per iteration, the new chain
evaluated, its reward backed up the path). ``random_chains`` is the matched-budget control: the same number of *distinct* evaluations, each
chain made by 1..``max_edits`` random edits of the original. Both evaluate the original first and never evaluate a
chain twice (the budget counts distinct evaluations). The reward is whatever ``evaluate(chain)`` returns; CoLa's
scores a chain by correctness on the sample it is searched for, preferring shorter chains, so the search is an
ORACLE (it sees the label) unless the reward is computed without it.

Pure Python over a callable: the model enters only through ``evaluate``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

Chain = tuple[int, ...]
Edit = tuple[str, int, int]
EDIT_KINDS = ("skip", "repeat", "swap")


def apply_edit(chain: Chain, edit: Edit) -> Chain:
    kind, i, w = edit
    if kind == "skip":
        return chain[:i] + chain[i + w:]
    if kind == "repeat":
        return chain[:i + w] + chain[i:i + w] + chain[i + w:]
    if kind == "swap":
        return chain[:i] + (chain[i + 1], chain[i]) + chain[i + 2:]
    raise ValueError(f"unknown edit kind {kind!r}; use one of {EDIT_KINDS}")


def valid_edits(chain: Chain, *, widths: Sequence[int] = (1, 2, 4), min_len: int = 1,
                max_len: int | None = None) -> list[Edit]:
    """Every edit of ``chain`` whose result has a length in ``[min_len, max_len]`` and differs from ``chain``."""
    n = len(chain)
    max_len = 2 * n if max_len is None else max_len
    out: list[Edit] = []
    for w in widths:
        for i in range(n - w + 1):
            if n - w >= min_len:
                out.append(("skip", i, w))
            if n + w <= max_len:
                out.append(("repeat", i, w))
    out += [("swap", i, 1) for i in range(n - 1) if chain[i] != chain[i + 1]]
    return out


class SearchResult(NamedTuple):
    best: Chain                 # highest reward (ties: the shorter chain, then the earlier evaluation)
    best_reward: float
    evaluated: dict             # chain -> reward, in evaluation order
    iterations: int             # search iterations (MCTS) or samples drawn (random), cache hits included


class _Budget:
    def __init__(self, evaluate: Callable[[Chain], float], budget: int):
        self.evaluate, self.budget, self.seen = evaluate, budget, {}

    def __call__(self, chain: Chain) -> float:
        if chain not in self.seen:
            self.seen[chain] = float(self.evaluate(chain))
        return self.seen[chain]

    @property
    def left(self) -> int:
        return self.budget - len(self.seen)


def _result(b: _Budget, iterations: int) -> SearchResult:
    order = list(b.seen)
    best = max(order, key=lambda c: (b.seen[c], -len(c), -order.index(c)))
    return SearchResult(best, b.seen[best], dict(b.seen), iterations)


@dataclasses.dataclass
class _Node:
    chain: Chain
    depth: int
    untried: list
    parent: "_Node | None" = None
    children: list = dataclasses.field(default_factory=list)
    visits: int = 0
    value: float = 0.0


def _check(budget: int, max_edits: int):
    if budget < 1 or max_edits < 1:
        raise ValueError(f"need {budget=} >= 1 and {max_edits=} >= 1")


def mcts(evaluate: Callable[[Chain], float], num_layers: int, budget: int, *, max_edits: int = 4,
         widths: Sequence[int] = (1, 2, 4), max_len: int | None = None, exploration: float = 0.7,
         widening: float = 2.0, seed: int = 0) -> SearchResult:
    """UCT over edit sequences from ``(0..num_layers-1)``; ``budget`` distinct chain evaluations. Progressive
    widening: a node gets a new child only while it has fewer than ``widening * sqrt(visits)`` children (the edit
    space, ~100 edits per chain, is far wider than a budget of tens of evaluations)."""
    _check(budget, max_edits)
    rng = np.random.default_rng(seed)
    kw = dict(widths=widths, max_len=2 * num_layers if max_len is None else max_len)
    b = _Budget(evaluate, budget)

    def node(chain, depth, parent=None):
        edits = valid_edits(chain, **kw) if depth < max_edits else []
        return _Node(chain, depth, [edits[j] for j in rng.permutation(len(edits))], parent)

    def widen(nd):
        return bool(nd.untried) and len(nd.children) < max(1.0, widening * math.sqrt(nd.visits))

    root = node(tuple(range(num_layers)), 0)
    root.visits, root.value = 1, b(root.chain)
    iterations = 0
    while b.left > 0 and iterations < 20 * budget:
        iterations += 1
        cur = root
        while cur.children and not widen(cur):          # selection (UCT)
            cur = max(cur.children, key=lambda ch: ch.value / ch.visits
                      + exploration * math.sqrt(math.log(cur.visits) / ch.visits))
        if widen(cur):                                  # expansion: one untried edit
            child = node(apply_edit(cur.chain, cur.untried.pop()), cur.depth + 1, cur)
            cur.children.append(child)
            cur = child
        reward = b(cur.chain)                           # evaluation (cached: repeats cost no budget)
        while cur is not None:                          # backup
            cur.visits += 1
            cur.value += reward
            cur = cur.parent
    return _result(b, iterations)


def random_chains(evaluate: Callable[[Chain], float], num_layers: int, budget: int, *, max_edits: int = 4,
                  widths: Sequence[int] = (1, 2, 4), max_len: int | None = None, seed: int = 0) -> SearchResult:
    """The control: the original, then chains of 1..``max_edits`` uniformly random edits, ``budget`` distinct
    evaluations in all; the best by the same reward."""
    _check(budget, max_edits)
    rng = np.random.default_rng(seed)
    kw = dict(widths=widths, max_len=2 * num_layers if max_len is None else max_len)
    b = _Budget(evaluate, budget)
    b(tuple(range(num_layers)))
    iterations = 0
    while b.left > 0 and iterations < 20 * budget:
        iterations += 1
        chain = tuple(range(num_layers))
        for _ in range(int(rng.integers(1, max_edits + 1))):
            edits = valid_edits(chain, **kw)
            if not edits:
                break
            chain = apply_edit(chain, edits[int(rng.integers(len(edits)))])
        b(chain)
    return _result(b, iterations)


__all__ = ["Chain", "Edit", "EDIT_KINDS", "apply_edit", "valid_edits", "SearchResult", "mcts", "random_chains"]
