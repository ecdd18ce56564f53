"""How GPT Learns Layer by Layer (arXiv:2501.07108) at small scale: per-layer linear probes of a tiny GPT trained on
synthetic 6 x 6 Othello, at several checkpoints of its training (the random-initialised model first, as the control).

    python -m experiments.gpt_layers --config configs/gpt_layers.py:smoke [--outdir DIR]

See configs/gpt_layers.py for the runbook. Per seed: the GPT trained on next-move prediction on the one Trainer,
checkpointed at ``train.ckpt_steps``; at every checkpoint the residual stream at every read-out point
(``probes.layer_states``: the model's own forward) of held-out games, a closed-form probe per feature and layer
fitted on the probe-train games and scored on the probe-test games (``probes.layer_scores``).
"""
from __future__ import annotations

import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax.data import othello
from eejax.eval import bootstrap, probes, report
from eejax.models import lm
from eejax.train import ArrayIterator, Trainer, make_optimizer
from experiments._common import Report, Run, experiment

NAME = "gpt_layers"
FEATURES = tuple(othello.FEATURES)

PAPER = ("arXiv:2501.07108 (abstract; no numbers): OthelloGPT's early layers capture static attributes such as board "
         "edges, deeper layers dynamic tile changes; it probes one trained model layer by layer (the axis over "
         "training checkpoints is this experiment's addition)")


class ProbeSet(NamedTuple):
    """The positions of some games, flattened: tokens to run, and per valid position its targets and game id."""
    tokens_GxT: np.ndarray
    valid_GxT: np.ndarray
    targets: dict              # feature -> P x C
    legal_PxQ: np.ndarray      # the legal next moves (none after the game's end)
    game_P: np.ndarray


def probe_sets(cfg) -> tuple[ProbeSet, ProbeSet]:
    games = othello.random_games(cfg.data.probe_games, cfg.data.seed + 1, cfg.data.board)
    feats = othello.features(games)
    train, test = probes.split_games(cfg.data.probe_games, cfg.data.probe_test, seed=cfg.data.seed)

    def take(idx):
        v = games.valid_GxT[idx]
        return ProbeSet(games.moves_GxT[idx], v, {k: f[idx][v] for k, f in feats.items()},
                        games.legal_GxTxQ[idx][v], np.broadcast_to(idx[:, None], v.shape)[v])
    return take(train), take(test)


def model_config(cfg) -> lm.LMConfig:
    return lm.LMConfig(vocab_size=cfg.data.board ** 2 + 1, exits=(cfg.model.depth - 1,), exit_head="final",
                       **cfg.model.to_dict())


def make_read(graphdef):
    """``(L x B x T x D states, B x T top-1 next move)`` of the model's own forward."""
    @jax.jit
    def read(params, tokens_BxT):
        model = nnx.merge(graphdef, params)
        h = probes.layer_states(model, tokens_BxT)
        return h, jnp.argmax(model.exit_logits(h[-1], 0), -1)
    return read


def states(read, params, ps: ProbeSet, chunk: int = 250) -> tuple[np.ndarray, float]:
    """``L x P x D`` at the valid positions, and the rate at which the top-1 prediction is a legal move."""
    hs, top = zip(*[jax.device_get(read(params, jnp.asarray(ps.tokens_GxT[i:i + chunk])))
                    for i in range(0, len(ps.tokens_GxT), chunk)])
    h, top = np.concatenate(hs, 1)[:, ps.valid_GxT], np.concatenate(top)[ps.valid_GxT]
    has = ps.legal_PxQ.any(1)
    legal = np.take_along_axis(ps.legal_PxQ, np.minimum(top, ps.legal_PxQ.shape[1] - 1)[:, None], 1)[:, 0]
    return h, float((legal & (top < ps.legal_PxQ.shape[1]))[has].mean())


def checkpoints(cfg, seed: int, arrays, workdir):
    """``[(step, params)]``: the random init, then the Trainer's checkpoint at each of ``train.ckpt_steps`` (a
    resumed run restores the ones already written)."""
    mcfg = model_config(cfg)
    graphdef, params = lm.build(mcfg, seed)
    out = [(0, params)]
    steps = tuple(cfg.train.ckpt_steps)
    with Trainer(lm.multi_exit_lm_loss(graphdef, mcfg), params, make_optimizer(cfg.train.optim), workdir=workdir,
                 seed=seed, log_every=cfg.log_every, ckpt_every=steps[-1] + 1, max_to_keep=len(steps)) as tr:
        batches = ArrayIterator(arrays, cfg.data.batch_size, seed=seed)
        for s in steps:
            done = s in tr.checkpointer.all_steps()
            out.append((s, tr.restore(s).params if done else tr.fit(batches, s, desc=f"seed {seed}").params))
    return graphdef, out


def first_pass(heat_KxL, steps, level):
    """``(first layer passing at the last checkpoint, first step at which any layer passes)``; None where none."""
    last = np.flatnonzero(heat_KxL[-1] >= level)
    anyk = np.flatnonzero((heat_KxL >= level).any(1))
    return (int(last[0]) if len(last) else None), (int(steps[anyk[0]]) if len(anyk) else None)


def summary(cfg, steps, scores, test: ProbeSet):
    """Per feature: heatmap (seed mean), first passes per seed, best layer at the end and the control, intervals."""
    level, rows, layer_rows, heat = cfg.probe.level, [], [], {}
    for f in FEATURES:
        per_seed = np.stack([scores[(s, f)] for s in cfg.seeds])           # S x K x L x P
        heat[f] = per_seed.mean((0, 3))
        firsts = [first_pass(x.mean(-1), steps, level) for x in per_seed]
        seed_mean = per_seed.mean(0)                                        # K x L x P
        best = int(np.argmax(heat[f][-1]))
        ctrl_best = int(np.argmax(heat[f][0]))
        final = bootstrap.paired_bootstrap(seed_mean[-1, best], np.zeros_like(seed_mean[-1, best]),
                                           groups_N=test.game_P, resamples=cfg.probe.resamples, seed=0)
        ctrl = bootstrap.paired_bootstrap(seed_mean[0, ctrl_best], np.zeros_like(seed_mean[0, best]),
                                          groups_N=test.game_P, resamples=cfg.probe.resamples, seed=0)
        gain = bootstrap.paired_bootstrap(seed_mean[-1, best], seed_mean[0, best], groups_N=test.game_P,
                                          resamples=cfg.probe.resamples, seed=0)
        rows.append({"feature": f, "kind": othello.FEATURES[f][0],
                     "first_layer_at_end": ", ".join(str(a) for a, _ in firsts),
                     "first_step_any_layer": ", ".join(str(b) for _, b in firsts),
                     "best_layer_end": best, "score_end": final.diff, "end_lo": final.lo, "end_hi": final.hi,
                     "control_layer": ctrl_best, "control": ctrl.diff, "control_lo": ctrl.lo, "control_hi": ctrl.hi,
                     "gain_over_control": gain.diff, "gain_lo": gain.lo, "gain_hi": gain.hi})
        for layer in range(heat[f].shape[1]):
            passed = [first_pass(x.mean(-1)[:, layer:layer + 1], steps, level)[1] for x in per_seed]
            layer_rows.append({"feature": f, "layer": layer, "first_step": ", ".join(map(str, passed)),
                               "score_end": float(heat[f][-1, layer])})
    return rows, layer_rows, heat


def plot(heat, steps, level, path):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(heat), figsize=(3.2 * len(heat), 3.4), sharey=True)
    for ax, (f, h) in zip(np.atleast_1d(axes), heat.items()):
        im = ax.imshow(h.T, origin="lower", aspect="auto", vmin=0.5, vmax=1.0, cmap="viridis")
        for (k, layer), v in np.ndenumerate(h):
            ax.text(k, layer, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v < level else "black")
        ax.set(title=f"{f} ({othello.FEATURES[f][0]})", xlabel="training step", xticks=range(len(steps)))
        ax.set_xticklabels(steps, rotation=60, fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("read-out (0 = embedding, l = block l)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="balanced accuracy (probe-test games)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(cfg, run, steps, scores, legal, test, n_pos, wall_s) -> Report:
    rows, layer_rows, heat = summary(cfg, steps, scores, test)
    legal_rows = [{"step": s} | {f"seed {seed}": legal[(seed, k)] for seed in cfg.seeds} for k, s in enumerate(steps)]
    d, m = cfg.data, cfg.model
    md = "\n\n".join([
        "# How GPT Learns Layer by Layer: per-layer linear probes over training, synthetic 6x6 Othello",
        run.prov.markdown() + f"  \nData: {d.train_games} random legal {d.board}x{d.board} games to train; "
        f"probes fitted on {n_pos[0]} positions of {d.probe_games - d.probe_test} games, scored on {n_pos[1]} "
        f"positions of {d.probe_test} other games.  \nScale: GPT of {m.depth} blocks, width {m.d_model}, batch "
        f"{d.batch_size}, checkpoints at steps {list(steps)} (0 = random init, the control); seeds "
        f"{list(cfg.seeds)}; wall-clock {wall_s:.0f} s.  \nPaper: {PAPER}.",
        f"Per feature: first read-out (0 = embedding) whose probe reaches balanced accuracy {cfg.probe.level} at the "
        "last checkpoint, and first step at which any read-out does (per seed); the best read-out at the last "
        "checkpoint and the best of the random-init control, with bootstrap 95% intervals over probe-test games "
        "(seed-mean scores), and the gain of the last checkpoint over the control at the same read-out.",
        report.markdown_table(rows, list(rows[0]), ".3f"),
        "Per read-out: first step at which its probe reaches the level (per seed) and its score at the end.",
        report.markdown_table(layer_rows, list(layer_rows[0]), ".3f"),
        "The GPT's top-1 next move is legal at this rate of the probe-test positions (how far it has learnt the "
        "game).",
        report.markdown_table(legal_rows, list(legal_rows[0]), ".3f")])
    data = {"steps": list(steps), "rows": rows, "layers": layer_rows, "legal": legal_rows,
            "heat": {f: h.tolist() for f, h in heat.items()}, "positions": list(n_pos), "wall_seconds": wall_s}
    return Report(md, data, files={"gpt_layers_heatmaps.png": lambda p: plot(heat, steps, cfg.probe.level, p)})


@experiment(NAME)
def main(run: Run) -> Report:
    cfg, t0 = run.cfg, time.perf_counter()
    arrays = othello.lm_arrays(othello.random_games(cfg.data.train_games, cfg.data.seed, cfg.data.board))
    train, test = probe_sets(cfg)
    scores, legal = {}, {}
    for seed in cfg.seeds:
        graphdef, ckpts = checkpoints(cfg, seed, arrays, pathlib.Path(run.workdir) / f"seed{seed}")
        read = make_read(graphdef)
        for k, (step, params) in enumerate(ckpts):
            h_train, _ = states(read, params, train)
            h_test, legal[(seed, k)] = states(read, params, test)
            for f in FEATURES:
                s, _ = probes.layer_scores(h_train, train.targets[f], h_test, test.targets[f],
                                           ridge=cfg.probe.ridge, min_count=cfg.probe.min_count)
                scores.setdefault((seed, f), []).append(s)
            print(f"seed {seed} step {step}: legal top-1 {legal[(seed, k)]:.3f}; " + "; ".join(
                f"{f} " + " ".join(f"{x:.2f}" for x in scores[(seed, f)][-1].mean(1)) for f in FEATURES), flush=True)
    scores = {key: np.stack(v) for key, v in scores.items()}
    steps = [0, *cfg.train.ckpt_steps]
    return write_report(cfg, run, steps, scores, legal, test, (len(train.game_P), len(test.game_P)),
                        time.perf_counter() - t0)


if __name__ == "__main__":
    main()
