"""Synthetic Othello: random legal games on a small board, with the board state known at every move.

The probing study of OthelloGPT (Du et al. 2025, "How GPT Learns Layer by Layer", arXiv:2501.07108; after Li et al.
2023, arXiv:2210.13382) trains a GPT on move sequences of random legal games and reads the board back out of its
layers. Here the games are generated in numpy (no download): a ``size x size`` board (6 x 6 by default: 32 playable
squares, games of at most 32 moves), the four centre squares set as in Othello, black first, every move drawn
uniformly among the legal ones. A player with no legal move passes (the pass is not a token, as in OthelloGPT, so the
player to move is a hidden state); the game ends when neither can move.

All games of a batch are played at once on boolean boards ``G x S x S`` (a bitboard written with numpy shifts): a move
is legal when, in some direction, a run of the opponent's discs ends in one of the mover's; those runs flip.

Letters: G games, S board side, Q = S * S squares, T moves (the longest game: Q - 4).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

EMPTY, BLACK, WHITE = 0, 1, 2
DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class Games(NamedTuple):
    """``G`` games of at most ``T`` moves; every per-move array is the state AFTER move t (0 where padded).

    ``moves_GxT``: the square played (row * S + col), ``pad`` (= Q) after the game's end. ``length_G``: moves played.
    ``board_GxTxQ``: EMPTY / BLACK / WHITE. ``flipped_GxTxQ``: squares move t turned over. ``mover_GxT``: colour that
    played move t. ``next_GxT``: colour to play move t + 1 (the mover again when the opponent must pass; EMPTY when
    the game is over). ``legal_GxTxQ``: the squares where move t + 1 may be played (none after the end)."""
    moves_GxT: np.ndarray
    length_G: np.ndarray
    board_GxTxQ: np.ndarray
    flipped_GxTxQ: np.ndarray
    mover_GxT: np.ndarray
    next_GxT: np.ndarray
    legal_GxTxQ: np.ndarray
    size: int

    @property
    def pad(self) -> int:
        """The token after a game's end (and the vocabulary's last id: vocabulary Q + 1)."""
        return self.size * self.size

    @property
    def valid_GxT(self) -> np.ndarray:
        return np.arange(self.moves_GxT.shape[1])[None] < self.length_G[:, None]


def _shift(x_GxSxS: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """``out[r, c] = x[r - dr, c - dc]``, zero where that falls off the board."""
    s = x_GxSxS.shape[-1]
    out = np.zeros_like(x_GxSxS)
    out[:, max(dr, 0):s + min(dr, 0), max(dc, 0):s + min(dc, 0)] = \
        x_GxSxS[:, max(-dr, 0):s + min(-dr, 0), max(-dc, 0):s + min(-dc, 0)]
    return out


def initial_boards(games: int, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """``(black, white)`` boolean ``G x S x S``: the four centre discs (white on the main diagonal, as in Othello)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 4 or size % 2:
        raise ValueError(f"size={size!r} must be an even integer >= 4")
    black, white = np.zeros((2, games, size, size), bool)
    m = size // 2
    white[:, m - 1, m - 1] = white[:, m, m] = True
    black[:, m - 1, m] = black[:, m, m - 1] = True
    return black, white


def legal_moves(own_GxSxS: np.ndarray, opp_GxSxS: np.ndarray) -> np.ndarray:
    """Boolean ``G x S x S``: the empty squares where the player owning ``own`` may play."""
    empty = ~(own_GxSxS | opp_GxSxS)
    legal = np.zeros_like(own_GxSxS)
    for dr, dc in DIRECTIONS:
        run = _shift(own_GxSxS, dr, dc) & opp_GxSxS          # opponent discs next to one of ours, in this direction
        for _ in range(own_GxSxS.shape[-1] - 3):
            run |= _shift(run, dr, dc) & opp_GxSxS
        legal |= _shift(run, dr, dc) & empty
    return legal


def flips(move_GxSxS: np.ndarray, own_GxSxS: np.ndarray, opp_GxSxS: np.ndarray) -> np.ndarray:
    """Boolean ``G x S x S``: the opponent discs that playing the one-hot ``move`` turns over (none for a game whose
    ``move`` is all False)."""
    out = np.zeros_like(own_GxSxS)
    for dr, dc in DIRECTIONS:
        run = np.zeros_like(own_GxSxS)
        alive = np.ones(own_GxSxS.shape[0], bool)
        cur = _shift(move_GxSxS, dr, dc)
        for _ in range(own_GxSxS.shape[-1] - 1):
            ends = alive & (cur & own_GxSxS).any((1, 2))       # the run of opponent discs closes on our disc
            out |= run & ends[:, None, None]
            alive &= (cur & opp_GxSxS).any((1, 2))
            run |= cur & alive[:, None, None]
            cur = _shift(cur, dr, dc)
    return out


def play(black_GxSxS, white_GxSxS, mover_G, square_G) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(black, white, flipped)`` after each game's ``mover`` (BLACK / WHITE) plays ``square`` (row * S + col; -1:
    no move, the game unchanged). The square must be legal (``legal_moves``)."""
    s = black_GxSxS.shape[-1]
    move = np.zeros_like(black_GxSxS)
    live = square_G >= 0
    move[np.flatnonzero(live), square_G[live] // s, square_G[live] % s] = True
    is_black = (mover_G == BLACK)[:, None, None]
    own, opp = np.where(is_black, black_GxSxS, white_GxSxS), np.where(is_black, white_GxSxS, black_GxSxS)
    flipped = flips(move, own, opp)
    own, opp = own | move | flipped, opp & ~flipped
    return np.where(is_black, own, opp), np.where(is_black, opp, own), flipped


def random_games(num_games: int, seed: int, size: int = 6) -> Games:
    """``num_games`` random legal games (uniform over legal moves), deterministic per ``seed``."""
    if isinstance(num_games, bool) or not isinstance(num_games, (int, np.integer)) or num_games < 1:
        raise ValueError(f"num_games={num_games!r} must be an integer >= 1")
    rng = np.random.default_rng(seed)
    black, white = initial_boards(num_games, size)
    q = size * size
    t_max = q - 4
    moves = np.full((num_games, t_max), q, np.int32)
    board = np.zeros((num_games, t_max, q), np.int8)
    flipped_all = np.zeros((num_games, t_max, q), bool)
    mover = np.zeros((num_games, t_max), np.int8)
    nxt = np.zeros((num_games, t_max), np.int8)
    legal_all = np.zeros((num_games, t_max, q), bool)
    to_move = np.full(num_games, BLACK, np.int8)
    length = np.zeros(num_games, np.int32)

    def legal_for(colour_G):
        is_black = (colour_G == BLACK)[:, None, None]
        return legal_moves(np.where(is_black, black, white), np.where(is_black, white, black))

    legal = legal_for(to_move)
    for t in range(t_max):
        live = legal.reshape(num_games, q).any(1)
        if not live.any():
            break
        score = np.where(legal.reshape(num_games, q), rng.random((num_games, q)), -1.0)
        square = np.where(live, score.argmax(1), -1)
        black, white, flipped = play(black, white, to_move, square)
        moves[live, t] = square[live]
        mover[live, t] = to_move[live]
        flipped_all[:, t] = flipped.reshape(num_games, q)
        board[:, t] = (black.reshape(num_games, q) * BLACK + white.reshape(num_games, q) * WHITE) * live[:, None]
        length += live
        other = np.where(to_move == BLACK, WHITE, BLACK).astype(np.int8)
        legal_other, legal_same = legal_for(other), legal_for(to_move)
        can_other = legal_other.reshape(num_games, q).any(1)
        can_same = legal_same.reshape(num_games, q).any(1)
        to_move = np.where(live & can_other, other, np.where(live & can_same, to_move, EMPTY)).astype(np.int8)
        nxt[live, t] = to_move[live]
        legal = np.where(can_other[:, None, None], legal_other, legal_same) & (to_move != EMPTY)[:, None, None]
        legal_all[:, t] = legal.reshape(num_games, q)
    return Games(moves, length, board, flipped_all, mover, nxt, legal_all, size)


def lm_arrays(games: Games) -> dict[str, np.ndarray]:
    """Next-move prediction arrays for the Trainer: ``tokens`` = the moves, ``targets`` = the next move (``pad``
    after the last one, so the model also learns where a game ends)."""
    pad = np.full((games.moves_GxT.shape[0], 1), games.pad, np.int32)
    return {"tokens": games.moves_GxT, "targets": np.concatenate([games.moves_GxT[:, 1:], pad], 1)}


def edge_squares(size: int) -> np.ndarray:
    """Boolean ``Q``: squares on the board's edge."""
    r, c = np.divmod(np.arange(size * size), size)
    return (r == 0) | (c == 0) | (r == size - 1) | (c == size - 1)


FEATURES = {  # name -> (static | dynamic, what it is); the targets are built by ``features``
    "edge": ("static", "the square just played is on the board edge"),
    "occupied": ("static", "per square: a disc is on it"),
    "mine": ("dynamic", "per square: the disc is the colour of the player to move next"),
    "flipped": ("dynamic", "per square: turned over by the move just played"),
    "player": ("dynamic", "the player to move next is black"),
}


def features(games: Games) -> dict[str, np.ndarray]:
    """Boolean targets ``G x T x C`` per feature of ``FEATURES`` (C = Q for per-square ones, 1 otherwise), read at
    each move's token (the state after that move); meaningful where ``games.valid_GxT``."""
    edge = edge_squares(games.size)
    played = np.clip(games.moves_GxT, 0, games.pad - 1)
    return {"edge": edge[played][..., None],
            "occupied": games.board_GxTxQ != EMPTY,
            "mine": (games.board_GxTxQ == games.next_GxT[..., None]) & (games.next_GxT[..., None] != EMPTY),
            "flipped": games.flipped_GxTxQ,
            "player": (games.next_GxT == BLACK)[..., None]}
