"""How GPT Learns Layer by Layer (Du et al. 2025, arXiv:2501.07108) at small scale: per-layer linear probes of a tiny
GPT trained on synthetic Othello games, at several checkpoints of its training. An analysis of depth, not a
depth-adaptive method: nothing here is scored on savings.

Runbook
-------
Command (args: othello6 (default) | smoke):
    EEJAX_PYTHON=... nice -n 10 ./launch.sh gpt_layers:othello6 --outdir experiments/results/gpt_layers-othello6
    ./launch.sh gpt_layers:smoke                      # tiny model, a few steps: under a minute
Data (no download; `eejax.data.othello`): random legal games on a `data.board` x `data.board` board (6 x 6: 32
    playable squares, games of at most 32 moves), moves drawn uniformly among the legal ones, passes not tokens.
    `data.train_games` games (generation seed `data.seed`) train the GPT; `data.probe_games` other games (seed
    `data.seed + 1`) are split into probe-train and `data.probe_test` probe-test games (whole games on each side).
Model (`eejax.models.lm`): `model.depth` Pre-LN blocks, width `model.d_model`, RoPE, tied head; vocabulary 37 (36
    squares + the end-of-game token). Next-move prediction (CE of every next move and of the end), on the one Trainer,
    checkpointed at each step of `train.ckpt_steps` (roughly log-spaced: emergence is fast early); step 0 = the
    random-initialised model, the control that shows what a linear probe reads from untrained features.
Probes (`eejax.eval.probes`): at every checkpoint, every read-out point (embedding, then each block's output), a
    closed-form ridge probe (`probe.ridge`) per feature, fitted on the probe-train games' positions and scored on the
    probe-test games by balanced accuracy (0.5 = chance). Features (`eejax.data.othello.FEATURES`): static: `edge`
    (the square just played is on the edge), `occupied` (per square); dynamic: `mine` (per square: the disc has the
    colour of the player to move), `flipped` (per square: turned over by this move), `player` (the player to move
    is black; passes make it more than parity).
Evaluation: a heatmap per feature (layer x checkpoint, seed mean); per feature the first layer and the first
    checkpoint whose score reaches `probe.level`, per seed; the score of the best layer at the last checkpoint and of
    the random-init control with bootstrap 95% intervals over probe-test games (`eejax.eval.bootstrap`, games
    resampled whole), and trained minus control; the top-1 legal-move rate of the GPT per checkpoint for context.
Hardware / wall-clock: 2 shared CPU cores: ~0.1-0.3 s per step; 2 seeds x 1600 steps plus probing ~ 10-25 min
    (measured in the results README when run).
Expected shape (PAPERS-WAVE4.md, abstract): early layers carry static attributes (board edges), deeper layers
    dynamic ones (tile flips); the issue's addition over training time: later-layer features emerge later.
    The paper probes one trained OthelloGPT layer by layer; its abstract gives no numbers.
"""
import ml_collections

from eejax.harness.config import Validator
from eejax.train import default_optim_config


def get_config(arg=None):
    arg = arg or "othello6"
    if arg not in ("othello6", "smoke"):
        raise ValueError(f"configs/gpt_layers.py: unknown arg {arg!r}; use othello6 or smoke")
    c = ml_collections.ConfigDict()
    c.runbook = __doc__
    c.name = f"gpt_layers-{arg}"
    c.seed = 0
    c.seeds = (0, 1)
    c.data = ml_collections.ConfigDict(dict(board=6, seed=0, train_games=20000, probe_games=2000, probe_test=500,
                                            batch_size=64))
    c.model = ml_collections.ConfigDict(dict(d_model=64, depth=6, num_heads=4, num_kv_heads=2, mlp_dim=256,
                                             mlp="gelu"))
    c.train = ml_collections.ConfigDict(dict(ckpt_steps=(25, 50, 100, 200, 400, 800, 1600),
                                             optim=default_optim_config()))
    c.train.optim.update(lr=2e-3, schedule="warmup_cosine", warmup_steps=50, total_steps=1600, weight_decay=0.01,
                         grad_clip=1.0)
    c.probe = ml_collections.ConfigDict(dict(ridge=1e-3, level=0.85, min_count=5, resamples=2000))
    c.log_every = 100
    if arg == "smoke":
        c.seeds = (0,)
        c.data.update(train_games=256, probe_games=96, probe_test=32, batch_size=16)
        c.model.update(d_model=16, depth=2, num_heads=2, num_kv_heads=1, mlp_dim=32)
        c.train.ckpt_steps = (2, 4)
        c.train.optim.update(total_steps=4, warmup_steps=1)
        c.probe.resamples = 200
        c.log_every = 1
    return c


def validate(c):
    """Every value checked when the config is loaded, before any work (called by eejax.harness.config)."""
    from eejax.models import lm  # noqa: PLC0415

    v = Validator(c)
    v.str("name")
    v.int("seed", lo=0)
    v.ints("seeds", lo=0, unique=True)
    v.int("data.board", lo=4, hi=8)
    if c.data.board % 2:
        v.fail("data.board", "must be even (Othello's four centre squares)")
    v.int("data.seed", lo=0)
    for key in ("data.train_games", "data.batch_size", "model.d_model", "model.depth", "model.num_heads",
                "model.num_kv_heads", "model.mlp_dim", "probe.min_count", "probe.resamples", "log_every"):
        v.int(key, lo=1)
    v.int("data.probe_games", lo=4)
    v.int("data.probe_test", lo=2, hi=c.data.probe_games - 2)
    if c.data.batch_size > c.data.train_games:
        v.fail("data.batch_size", f"must be at most data.train_games={c.data.train_games}")
    steps = v.ints("train.ckpt_steps", lo=1, unique=True)
    if list(steps) != sorted(steps):
        v.fail("train.ckpt_steps", "must rise (the Trainer checkpoints each as training passes it)")
    v.float("probe.ridge", lo=0.0)
    v.float("probe.level", 0.5, 1.0, lo_open=True, hi_open=True)
    v.optim("train.optim")
    v.build("model", lambda: lm.LMConfig(vocab_size=c.data.board ** 2 + 1, exits=(c.model.depth - 1,),
                                         exit_head="final", **c.model.to_dict()))
