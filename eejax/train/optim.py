"""Optimizers and learning-rate schedules from a config, with optional frozen parameters.

        tx = make_optimizer(default_optim_config())                        # AdamW, constant lr
        tx = make_optimizer(cfg, trainable=lambda path: "head" in path)    # stage 2: heads only

The learning rate is injected with `optax.inject_hyperparams`, so the value used at each step lives in the
optimizer state; `learning_rate(opt_state)` reads it back (the trainer logs it as `lr`).

`ema_decay > 0` keeps an exponential moving average of the parameters *in the optimizer state* (`param_ema`), so
it is checkpointed and resumed with everything else; `ema_params(opt_state)` reads it back (diffusion models
sample from it).
"""
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def default_optim_config() -> ml_collections.ConfigDict:
    """Every field `make_optimizer` reads, with defaults for a small AdamW run."""
    return ml_collections.ConfigDict(dict(
        name="adamw",
        lr=1e-3,
        weight_decay=1e-4,  # adamw: decoupled; adam/sgd: coupled L2 (added to the gradient), as in torch.
        b1=0.9,
        b2=0.999,
        momentum=0.9,  # sgd only; 0 = plain SGD.
        schedule="constant",
        warmup_steps=0,
        total_steps=0,  # needed by the cosine schedules.
        grad_clip=0.0,  # global-norm clipping; 0 = off.
        ema_decay=0.0,  # > 0: keep an EMA of the parameters in the optimizer state (see `ema_params`).
    ))


def validate_optim_config(cfg: ml_collections.ConfigDict) -> None:
    """ValueError naming the field for a value `make_optimizer` would accept but train wrongly with (lr <= 0 or NaN,
    negative weight decay, betas outside [0, 1), ...). Configs call it when they are loaded (config.Validator.optim)."""
    def number(name, ok, rule):
        x = cfg.get(name, 0.0)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not ok(x):
            raise ValueError(f"{name}={x!r} must be a finite number {rule}")

    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"name={cfg.name!r} is not one of {OPTIMIZERS}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule={cfg.schedule!r} is not one of {SCHEDULES}")
    number("lr", lambda x: x > 0, "> 0")
    number("weight_decay", lambda x: x >= 0, ">= 0")
    number("b1", lambda x: 0 <= x < 1, "in [0, 1)")
    number("b2", lambda x: 0 <= x < 1, "in [0, 1)")
    number("momentum", lambda x: 0 <= x < 1, "in [0, 1)")
    number("grad_clip", lambda x: x >= 0, ">= 0 (0 = off)")
    number("ema_decay", lambda x: 0 <= x < 1, "in [0, 1) (0 = off)")
    for name in ("warmup_steps", "total_steps"):
        x = cfg.get(name, 0)
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name}={x!r} must be an integer >= 0")
    if cfg.schedule != "constant" and cfg.total_steps <= cfg.warmup_steps:
        raise ValueError(f"schedule={cfg.schedule!r} needs total_steps > warmup_steps: {cfg.total_steps=} "
                         f"{cfg.warmup_steps=}")


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate as a function of the update count."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"{cfg.schedule=} is not one of {SCHEDULES}")
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.total_steps <= cfg.warmup_steps:
        raise ValueError(f"{cfg.schedule=} needs total_steps > warmup_steps: {cfg.total_steps=} {cfg.warmup_steps=}")
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, cfg.total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.total_steps)


def _base_optimizer(cfg: ml_collections.ConfigDict) -> Callable[[Any], optax.GradientTransformation]:
    """learning_rate -> transformation, so `inject_hyperparams` can feed it the scheduled value."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"{cfg.name=} is not one of {OPTIMIZERS}")
    if cfg.name == "adamw":
        return lambda learning_rate: optax.adamw(learning_rate, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay)
    base = {"adam": lambda lr: optax.adam(lr, cfg.b1, cfg.b2),
            "sgd": lambda lr: optax.sgd(lr, momentum=cfg.momentum or None)}[cfg.name]
    return lambda learning_rate: optax.chain(optax.add_decayed_weights(cfg.weight_decay), base(learning_rate))


class ParamEmaState(NamedTuple):
    ema: Any  # same tree as the params


def param_ema(decay: float) -> optax.GradientTransformation:
    """Leaves the updates alone and tracks ``ema <- decay * ema + (1 - decay) * (params + updates)``.

    Put it last in a chain, so ``params + updates`` are the parameters after this step. The average starts at the
    initial parameters (no bias correction needed).
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay={decay} must be in (0, 1)")

    def init(params):
        return ParamEmaState(jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("param_ema needs the parameters: call optimizer.update(grads, state, params)")
        ema = jax.tree.map(lambda e, p, u: decay * e + (1.0 - decay) * (p + u), state.ema, params, updates)
        return updates, ParamEmaState(ema)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any:
    """The parameter EMA kept by `param_ema` in `opt_state` (exactly one must be there)."""
    found = [x.ema for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamEmaState))
             if isinstance(x, ParamEmaState)]
    if len(found) != 1:
        raise ValueError(f"expected one parameter EMA in the optimizer state, found {len(found)}: set ema_decay > 0")
    return found[0]


def trainable_labels(params: Any, trainable: Any) -> Any:
    """Tree of "trainable"/"frozen" labels, from a bool tree shaped like params or a callable `path_str -> bool`.

    The path string joins the keys with "/", e.g. "heads/0/kernel" for dicts; leaves of an `nnx.State` end in
    "/value" (e.g. "heads/0/kernel/value"), so prefer tests like `path.startswith("heads")`.
    """
    to_label = lambda t: "trainable" if t else "frozen"
    if callable(trainable):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: to_label(trainable(jax.tree_util.keystr(path, simple=True, separator="/"))), params)
    if jax.tree.structure(trainable) != jax.tree.structure(params):
        raise ValueError(f"trainable mask {jax.tree.structure(trainable)} != params {jax.tree.structure(params)}")
    return jax.tree.map(to_label, trainable)


def make_optimizer(cfg: ml_collections.ConfigDict, trainable: Any = None) -> optax.GradientTransformation:
    """Optax transformation from `cfg` (see `default_optim_config`).

    `trainable`: None (all trained), a bool tree with the params' structure, or a callable `path_str -> bool`.
    Frozen leaves get zero updates and no optimizer state (`optax.set_to_zero` inside `optax.multi_transform`).
    """
    validate_optim_config(cfg)
    tx = optax.inject_hyperparams(_base_optimizer(cfg))(learning_rate=make_schedule(cfg))
    if cfg.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    if trainable is not None:
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                   lambda params: trainable_labels(params, trainable))
    decay = cfg.get("ema_decay", 0.0)
    return optax.chain(tx, param_ema(decay)) if decay else tx


def learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate of the last update, if exactly one `inject_hyperparams` state holds one, else None."""
    has_hp = lambda x: isinstance(getattr(x, "hyperparams", None), dict)
    found = [x.hyperparams["learning_rate"] for x in jax.tree.leaves(opt_state, is_leaf=has_hp)
             if has_hp(x) and "learning_rate" in x.hyperparams]
    return found[0] if len(found) == 1 else None
