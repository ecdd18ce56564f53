"""Synthetic Othello (eejax.data.othello) against hand-worked positions and a plain one-game-at-a-time reference, and
the linear probes (eejax.eval.probes) on planted features and a DecoderLM's own forward."""
import numpy as np
import pytest
from flax import nnx

from eejax.data import othello
from eejax.eval import probes
from eejax.models import lm

B, W = othello.BLACK, othello.WHITE


def _ref_flips(board, r, c, me, size):
    """Plain Othello rule on a list-of-lists board: the discs that ``me`` playing (r, c) turns over."""
    out = []
    for dr, dc in othello.DIRECTIONS:
        run, y, x = [], r + dr, c + dc
        while 0 <= y < size and 0 <= x < size and board[y][x] not in (0, me):
            run.append((y, x))
            y, x = y + dr, x + dc
        if run and 0 <= y < size and 0 <= x < size and board[y][x] == me:
            out += run
    return out


def _ref_legal(board, me, size):
    return sorted(r * size + c for r in range(size) for c in range(size)
                  if board[r][c] == 0 and _ref_flips(board, r, c, me, size))


def test_opening_position_and_first_move_by_hand():
    black, white = othello.initial_boards(1, 6)
    # Centre: white on (2,2), (3,3); black on (2,3), (3,2). Black's four openings, by hand: (1,2) (2,1) (3,4) (4,3).
    assert sorted(map(tuple, np.argwhere(othello.legal_moves(black, white)[0]))) == [(1, 2), (2, 1), (3, 4), (4, 3)]
    black, white, flipped = othello.play(black, white, np.array([B]), np.array([1 * 6 + 2]))
    assert np.argwhere(flipped[0]).tolist() == [[2, 2]]                # the white disc between (1,2) and (3,2)
    assert np.argwhere(black[0]).tolist() == [[1, 2], [2, 2], [2, 3], [3, 2]]
    assert np.argwhere(white[0]).tolist() == [[3, 3]]
    # White to answer: (1,1) (1,3) (3,1), by hand (each closes a line of black discs on (3,3)).
    assert sorted(map(tuple, np.argwhere(othello.legal_moves(white, black)[0]))) == [(1, 1), (1, 3), (3, 1)]


def test_long_line_flips_across_the_board():
    """A row of four white discs closed by black at both ends flips all four; a run not closed flips nothing."""
    black, white = np.zeros((2, 1, 6, 6), bool)
    white[0, 0, 1:5] = True
    black[0, 0, 5] = True
    _, w, flipped = othello.play(black, white, np.array([B]), np.array([0]))
    assert flipped[0, 0].tolist() == [False, True, True, True, True, False] and not w.any()
    black[0, 0, 5] = False
    assert not othello.legal_moves(black, white).any()


def test_random_games_equal_a_plain_reference_and_are_deterministic():
    g = othello.random_games(40, seed=3)
    again = othello.random_games(40, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(g[:-1], again[:-1]))
    assert not np.array_equal(g.moves_GxT, othello.random_games(40, seed=4).moves_GxT)
    s = g.size
    for i in range(len(g.length_G)):
        board = [[0] * s for _ in range(s)]
        board[2][2] = board[3][3] = W
        board[2][3] = board[3][2] = B
        me = B
        for t in range(g.length_G[i]):
            sq = int(g.moves_GxT[i, t])
            assert sq in _ref_legal(board, me, s) and g.mover_GxT[i, t] == me
            flips = _ref_flips(board, sq // s, sq % s, me, s)
            for y, x in flips + [(sq // s, sq % s)]:
                board[y][x] = me
            assert sorted(np.flatnonzero(g.flipped_GxTxQ[i, t])) == sorted(y * s + x for y, x in flips)
            assert g.board_GxTxQ[i, t].tolist() == sum(board, [])
            other = W if me == B else B
            me = other if _ref_legal(board, other, s) else me if _ref_legal(board, me, s) else 0
            assert g.next_GxT[i, t] == me
            assert np.flatnonzero(g.legal_GxTxQ[i, t]).tolist() == (_ref_legal(board, me, s) if me else [])
        assert me == 0 or g.length_G[i] == g.moves_GxT.shape[1]          # a game stops only when nobody can move
        assert (g.moves_GxT[i, g.length_G[i]:] == g.pad).all()
    arrays = othello.lm_arrays(g)
    np.testing.assert_array_equal(arrays["targets"][:, :-1], g.moves_GxT[:, 1:])
    f = othello.features(g)
    assert {k: v.shape[-1] for k, v in f.items()} == {"edge": 1, "occupied": 36, "mine": 36, "flipped": 36,
                                                      "player": 1}


def test_bad_inputs():
    with pytest.raises(ValueError, match="size"):
        othello.initial_boards(1, 5)
    with pytest.raises(ValueError, match="num_games"):
        othello.random_games(0, 0)
    with pytest.raises(ValueError, match="num_test"):
        probes.split_games(10, 10, 0)
    with pytest.raises(ValueError, match="y_NxC"):
        probes.fit_probe(np.zeros((4, 3)), np.zeros((5, 1)))


def test_probe_recovers_planted_features_and_is_scored_on_other_games():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8))
    w = rng.normal(size=(8, 2))
    mean, scale, w_fit, b_fit = probes.fit_linear(x, x @ w + 0.5, ridge=0.0)
    np.testing.assert_allclose(probes.readout((mean, scale, w_fit, b_fit), x), x @ w + 0.5, atol=1e-9)
    # Two planted binary features, one rare (5%), written along a direction with a margin: decoded exactly.
    y = np.stack([rng.random(600) < 0.5, rng.random(600) < 0.05], 1)
    d = rng.normal(size=(2, 8))
    xp = x + 6.0 * (y - 0.5) @ d
    train, test = probes.split_games(600, 200, seed=1)
    assert not set(train) & set(test) and len(train) + len(test) == 600
    probe = probes.fit_probe(xp[train], y[train])
    score, used = probes.balanced_scores(probe, xp[test], y[test], train_counts_Cx2=probes.class_counts(y[train]))
    assert used.all() and score.mean() == pytest.approx(1.0)
    # A feature independent of x is at chance (balanced: 0.5 whatever the class rate), well below the planted one.
    noise = rng.random((600, 1)) < 0.2
    s_noise, _ = probes.balanced_scores(probes.fit_probe(xp[train], noise[train]), xp[test], noise[test])
    assert abs(s_noise.mean() - 0.5) < 0.2
    # The per-example scores average to the balanced accuracy computed from the confusion counts.
    pred = probes.predict(probes.fit_probe(x[train], y[train]), x[test])[:, 0]
    yt = y[test][:, 0]
    bal = 0.5 * ((pred & yt).sum() / yt.sum() + (~pred & ~yt).sum() / (~yt).sum())
    s0, _ = probes.balanced_scores(probes.fit_probe(x[train], y[train][:, :1]), x[test], y[test][:, :1])
    assert s0.mean() == pytest.approx(bal)


def test_layer_states_are_the_model_forward():
    cfg = lm.LMConfig(vocab_size=37, d_model=16, depth=3, num_heads=2, num_kv_heads=1, mlp_dim=32, exits=(2,),
                      exit_head="final")
    graphdef, params = lm.build(cfg, 0)
    model = nnx.merge(graphdef, params)
    tokens = np.asarray(othello.random_games(2, 0).moves_GxT)
    h = probes.layer_states(model, tokens)
    assert h.shape == (4, 2, 32, 16)
    np.testing.assert_allclose(h[0], model.embed_tokens(tokens), atol=0)
    out = model.all_exits(tokens)
    np.testing.assert_allclose(h[-1], out.hidden_ExBxTxD[-1], atol=1e-6)


def test_layer_scores_find_the_layer_that_holds_the_feature():
    """A feature written into read-out 1 only: decoded exactly there, at chance at read-out 0 (pure noise)."""
    rng = np.random.default_rng(2)
    y = rng.random((500, 3)) < 0.3
    h = rng.normal(size=(2, 500, 6))
    h[1] += 5.0 * (y - 0.5) @ rng.normal(size=(3, 6))
    train, test = probes.split_games(500, 150, seed=0)
    score, used = probes.layer_scores(h[:, train], y[train], h[:, test], y[test])
    assert score.shape == (2, 150) and used.all()
    assert score[1].mean() == pytest.approx(1.0) and abs(score[0].mean() - 0.5) < 0.2
    with pytest.raises(ValueError, match="h_train_LxNxD"):
        probes.layer_scores(h[:, train], y[train], h[:1, test], y[test])
