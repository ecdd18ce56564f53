"""Duo-LLM (Alizadeh et al. 2024, arXiv:2410.10846) at small scale: a character LM whose every FFN layer holds a big
and a small module, trained with uniform random routing per token and layer; then, per budget of k big layers, the
oracle route (it sees the next token: an upper bound, not a method), random routes, the best fixed pattern, and a
learned router, side by side.

Runbook
-------
Command (args: tiny_shakespeare (default) | smoke):
    EEJAX_PYTHON=... nice -n 10 ./launch.sh duo_llm:tiny_shakespeare --data_dir /work/shared/data \
        --outdir experiments/results/duo_llm-tiny_shakespeare
    ./launch.sh duo_llm:smoke --data_dir /work/shared/data       # tiny model, a few steps: under a minute
Data: Tiny Shakespeare, character-level (65 symbols). Training windows for the LM and for the router's oracle
    labels (`router.batches` x `eval.batch` windows, drawn with their own seed); validation windows (`eval.batches` x
    `eval.batch`, the first ones of the validation split) for every reported number; `eval.calib_batches`
    training windows select the best of the random routes and the best fixed pattern (never the validation).
Model (`eejax.models.lm`, `small_mlp_dim`): `model.depth` = 6 Pre-LN blocks, width 128, 4 query / 2 KV heads,
    tied head; big FFN = GELU 4d (512), small FFN = GELU d/2 (64); attention and KV always run, only the FFN is
    routed (`engine.ffn_route`, `lm.Block.mlp_routed`).
Stages: `duo`: `train.steps` steps of `lm.duo_lm_loss` (next-token CE with a route drawn uniformly from
    `train.choices` per layer and token, from the step's rng; the one Trainer). Oracle: the NLL of every validation
    token under each of the 2^L {small, big} patterns (the pattern as every token's route; `lm.pattern_nll`), and
    per token the best pattern with k big layers (`routing.oracle`). Random: `random_routes` per-token random routes
    of k big layers each (`routing.budget_routes`): mean, percentiles, and the best one chosen on the calibration
    windows. Best fixed pattern: the pattern of k big layers with the lowest calibration loss, for every token.
    Router (`routing.router_loss`): a linear map from the hidden state after layer 0's attention half to one logit
    per pattern, `router.steps` Trainer steps of cross-entropy against the oracle's pattern at every budget
    1..L-1 on the router windows; at budget k each token takes its highest-logit pattern of k big layers, and the
    validation NLL is that of the forward under those per-token routes.
Evaluation: validation NLL per token (nats) per arm and budget; paired bootstrap over validation windows (the
    tokens of a window resampled together, `eejax.eval.bootstrap`); FLOPs per token under each route
    (`costs.ffn_route_flops`: attention at every layer whatever the route, the chosen FFN, the head); oracle
    patterns' prefix fraction against chance 1 / C(L, k); oracle's big-layer frequency per layer; the fewest big
    layers at which the oracle reaches the all-big NLL, by token position.
Hardware / wall-clock: 2 shared CPU cores; ~0.3-0.6 s per training step at this size; the 64-pattern tables and
    500 random routes a few minutes. Estimated total 15-25 min (measured in the results README when run).
Expected shape (PAPERS-WAVE4.md [inf], from the paper's 12-layer model): oracle far below random at every k; the
    oracle with 6 of 12 big layers below all-big (at tiny scale it may not be); the router near the best of 100
    random routes, far from the oracle; oracle patterns not prefix-shaped; early tokens use big modules more.
"""
import ml_collections
from _base_lm import char_lm_config, validate_text

from eejax.train import default_optim_config

CHOICES = ("skip", "small", "big")


def get_config(arg=None):
    c, arg = char_lm_config("duo_llm", arg, __doc__, seeds=(0,))
    c.data.update(seq_len=128, batch_size=32)
    c.model.update(d_model=128, depth=6, num_heads=4, num_kv_heads=2, mlp_dim=512, small_mlp_dim=64)
    c.train = ml_collections.ConfigDict(dict(steps=1500, choices=CHOICES, optim=default_optim_config()))
    c.train.optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=100, total_steps=1500, weight_decay=0.01,
                         grad_clip=1.0)
    c.router = ml_collections.ConfigDict(dict(batches=4, steps=400, batch_tokens=512, optim=default_optim_config()))
    c.router.optim.update(lr=1e-2, weight_decay=0.0)
    c.eval = ml_collections.ConfigDict(dict(batch=16, batches=2, calib_batches=1, random_routes=100))
    c.log_every = 100
    c.ckpt_every = 500
    if arg == "smoke":
        c.model.update(d_model=16, depth=3, num_heads=2, num_kv_heads=1, mlp_dim=64, small_mlp_dim=8)
        c.data.update(seq_len=16, batch_size=8)      # the test suite's 8 CPU devices split the batch
        c.train.steps = c.train.optim.total_steps = 3
        c.train.optim.warmup_steps = 1
        c.router.update(batches=1, steps=2, batch_tokens=64)
        c.eval.update(batch=8, batches=1, calib_batches=1, random_routes=4)
        c.log_every = 1
        c.ckpt_every = 100
    return c


def validate(c):
    """Every value checked when the config is loaded, before any work (called by eejax.harness.config)."""
    from eejax.models import lm  # noqa: PLC0415

    v = validate_text(c, positive=(
        "data.batch_size", "model.d_model", "model.depth", "model.num_heads", "model.num_kv_heads", "model.mlp_dim",
        "model.small_mlp_dim", "train.steps", "router.batches", "router.steps", "router.batch_tokens", "eval.batch",
        "eval.batches", "eval.calib_batches", "eval.random_routes", "log_every", "ckpt_every"))
    choices = v.choices("train.choices", CHOICES)
    if "big" not in choices or "small" not in choices:
        v.fail("train.choices", "must hold 'small' and 'big': the evaluated patterns use both")
    if not 2 <= c.model.depth <= 10:
        v.fail("model.depth", "must lie in [2, 10]: the oracle enumerates all 2^depth patterns")
    v.build("model", lambda: lm.LMConfig(vocab_size=65, exits=(c.model.depth - 1,), **c.model.to_dict()))
    v.optim("train.optim")
    v.optim("router.optim")
