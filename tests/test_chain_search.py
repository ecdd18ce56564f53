"""CoLa's chain search: edits, the budget of distinct evaluations, and MCTS finding a planted chain."""
import numpy as np
import pytest

from eejax.exits import chain_search as cs


def test_edits():
    c = (0, 1, 2, 3, 4)
    assert cs.apply_edit(c, ("skip", 1, 2)) == (0, 3, 4)
    assert cs.apply_edit(c, ("repeat", 1, 2)) == (0, 1, 2, 1, 2, 3, 4)
    assert cs.apply_edit(c, ("swap", 3, 1)) == (0, 1, 2, 4, 3)
    edits = cs.valid_edits(c, widths=(1, 2), min_len=4, max_len=6)
    results = [cs.apply_edit(c, e) for e in edits]
    assert all(4 <= len(r) <= 6 and r != c for r in results)
    assert ("skip", 0, 2) not in edits and ("repeat", 0, 2) not in edits and ("skip", 0, 1) in edits
    with pytest.raises(ValueError, match="unknown edit"):
        cs.apply_edit(c, ("loop", 0, 1))


def _distance(a, b):
    d = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        prev, d[0] = d.copy(), i
        for j, y in enumerate(b, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
    return int(d[-1])


def test_mcts_finds_planted_chain_and_counts_budget():
    n = 8
    target = cs.apply_edit(cs.apply_edit(tuple(range(n)), ("skip", 2, 1)), ("repeat", 4, 1))   # (0,1,3,4,5,5,6,7)
    calls = []

    def evaluate(chain):
        calls.append(chain)
        return -_distance(chain, target)

    found = {"mcts": 0, "random": 0}
    for seed in range(10):
        for name, search in (("mcts", cs.mcts), ("random", cs.random_chains)):
            calls.clear()
            res = search(evaluate, n, 120, max_edits=3, widths=(1,), seed=seed)
            assert len(calls) == len(set(calls)) == len(res.evaluated) == 120   # distinct evaluations only
            assert calls[0] == tuple(range(n))                                  # the original first
            found[name] += res.best == target
    # The tree search uses the reward; the matched-budget random control does not.
    assert found["mcts"] >= 6 and found["mcts"] > found["random"], found


def test_best_prefers_shorter_on_ties():
    res = cs.random_chains(lambda c: 1.0, 6, 10, seed=1)
    assert len(res.best) == min(len(c) for c in res.evaluated)
