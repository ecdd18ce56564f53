"""Exit-aware diffusion: a U-ViT over stacked layers with an exit after every layer (DeeDiff) and its DDIM sampler.

Pieces, each used by ``experiments/deediff.py`` and tested in ``tests/test_diffusion.py``:

* ``UViT`` (Bao et al., "All are worth words", CVPR 2023): patches + a time token (+ a class token) through
  ``depth = 2*S + 1`` pre-LN blocks, S "in" blocks, one "mid" block, S "out" blocks; out block k first mixes in the
  output of in block S-1-k through a long skip (``Linear(2D -> D)`` on the concatenation). Every layer is an exit:
  one *shared* output head (LayerNorm + Linear to patch pixels, unpatchify) turns any layer's tokens into an epsilon
  prediction, and layer i's timestep-aware uncertainty estimation module (UEM, DeeDiff Eq. 5) predicts that exit's
  uncertainty ``u = sigmoid(w_i . [pool(L_i), temb] + b_i)`` from the pooled tokens and the timestep embedding.
  (Eq. 5 writes ``w_t, b_t``; we read "timestep-aware" as conditioning one linear map per layer on the timestep
  embedding, as the reproduction by Gallo et al. (2024) does, not as separate weights for each of the Tn steps.)
* Long skips over stacked layers. The engine (``eejax.exits.engine``) carries a per-row state and may stop after
  any layer, so the skip stack lives *inside* that state: ``UViTCarry(tokens_BxKxTxD, temb_BxD)`` with K = 1 + S,
  slot 0 the running hidden state and slot 1+i the output of in block i (zeros until it ran); the timestep
  embedding the UEMs read rides along, so a row's conditioning moves with it under compaction or sharding. ``layer_fn`` branches
  on the layer index (in: run and store in slot 1 + l; mid: run; out: read slot 1 + (2S - l), project, run), so
  the same stacked parameters serve the scan path (training, every exit) and the while path (sampling, per-sample
  exit after any layer), and a row frozen by the engine's mask keeps its skips. The price is that the
  scan path stores K slots per layer output (K ~ depth/2 times the plain activations); fine at our scale.
* DDPM training (Ho et al., 2020) with epsilon prediction (optionally through a v-style output skip,
  ``eps_from_output``), a linear or cosine (Nichol & Dhariwal, 2021) schedule, and DeeDiff's losses (Tang et al.,
  arXiv:2309.17074, Sec. 3): ``L_simple + lambda * L_u + beta * L_UAL``.
* ``ddim_sample``: DDIM (Song et al., 2021) inside one ``lax.scan`` over steps, the engine's while loop inside each
  step. The exit policy is a threshold per (step, exit), ``thr_SxE``, on the confidence ``1 - u`` (the engine's
  convention: a row exits at exit e when ``score >= thr[e]``; DeeDiff's "exit when u <= delta" is ``thr = 1 -
  delta``; ``+inf`` never exits early). Fixed-depth baselines are threshold rows of ``-inf`` from their depth on and
  ``+inf`` before it, so uniform, timestep-banded and two-depth schedules run through the very same compiled loop.
  ``measure="per_sample"`` decides per row; ``"batch_mean"`` on the batch mean of ``1 - u`` (as DeeDiff's public
  code does), so a whole batch exits together and the loop really stops.

Shapes: B batch, H/W/C image, P = H*W*C pixels, p patch, G = (H/p)*(W/p) patches, T = G + 1 (+1 with classes) tokens,
D width, N = depth layers (= E exits), S in/out blocks (N = 2S + 1), K = S + 1 carry slots, Tn diffusion timesteps,
St sampling steps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eejax import checks
from eejax.exits import confidence as conf_lib
from eejax.exits import costs
from eejax.exits import engine, policies
from eejax.nn.layers import Block, build as nn_build, stacked

# ---------------------------------------------------------------------------------------------- config, model


@dataclasses.dataclass(frozen=True)
class UViTConfig:
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    d_model: int = 64
    depth: int = 7            # 2*S + 1: S in blocks, 1 mid block, S out blocks
    num_heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 10     # 0 = unconditional (no class token)

    def __post_init__(self):
        checks.config_ints(self, image_size=1, channels=1, patch_size=1, d_model=1, depth=1, num_heads=1, mlp_dim=1,
                           num_classes=0)
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.image_size=} not divisible by {self.patch_size=}")
        if self.d_model % self.num_heads:
            raise ValueError(f"{self.d_model=} not divisible by {self.num_heads=}")
        if self.depth < 3 or self.depth % 2 == 0:
            raise ValueError(f"{self.depth=}: U-ViT needs an odd depth >= 3 (S in, 1 mid, S out blocks)")
        if self.d_model % 2:
            raise ValueError(f"{self.d_model=} must be even (sinusoidal time embedding)")

    @property
    def num_in(self) -> int:
        return self.depth // 2

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def extras(self) -> int:
        return 1 + (self.num_classes > 0)   # time token (+ class token)

    @property
    def tokens(self) -> int:
        return self.extras + self.patches

    @property
    def pixels(self) -> int:
        return self.image_size * self.image_size * self.channels

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return tuple(range(self.depth))   # an exit after every layer


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (integer or real) timesteps, ``[cos | sin]`` as in U-ViT / guided diffusion."""
    half = dim // 2
    freqs_F = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BxF = t_B.astype(jnp.float32)[:, None] * freqs_F[None, :]
    return jnp.concatenate([jnp.cos(args_BxF), jnp.sin(args_BxF)], axis=-1)


class UViTCarry(NamedTuple):
    """The engine's per-row state: the packed tokens (running state + long-skip slots) and the timestep embedding
    the UEMs read. Both travel with their row through every executor (compaction, sharding)."""
    tokens_BxKxTxD: jax.Array
    temb_BxD: jax.Array


class EpsHeadOut(NamedTuple):
    """One exit's output: the shared head's image and that exit's UEM."""
    eps_BxP: jax.Array     # the output head's image, flattened (epsilon; read as v under parameterization="v")
    hidden_BxD: jax.Array  # pooled tokens (for hidden-state measures)
    gate_B: jax.Array      # minus the UEM logit: sigmoid(gate_B) = 1 - u, the engine's ``learned`` confidence


class UViTExits(NamedTuple):
    """The training path's outputs at every exit (leading E)."""
    eps_ExBxP: jax.Array
    gate_ExB: jax.Array
    h_last: jax.Array


class UViT(nnx.Module):
    """U-ViT with stacked layers, long skips carried in the engine's hidden array, and an exit after every layer."""

    def __init__(self, cfg: UViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, s = cfg.d_model, cfg.num_in
        patch_dim = cfg.patch_size ** 2 * cfg.channels
        self.patch = nnx.Linear(patch_dim, d, rngs=rngs)
        self.time_mlp1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.time_mlp2 = nnx.Linear(4 * d, d, rngs=rngs)
        self.class_emb = nnx.Embed(cfg.num_classes, d, rngs=rngs) if cfg.num_classes else None
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.tokens, d)))
        self.layers = stacked(lambda r: Block(d, cfg.num_heads, cfg.mlp_dim, rngs=r), cfg.depth, rngs)
        # Long-skip projections of the S out blocks, kept as plain stacked arrays indexed by the layer number.
        self.skip_w = nnx.Param(jax.random.normal(rngs.params(), (s, 2 * d, d)) / math.sqrt(2 * d))
        self.skip_b = nnx.Param(jnp.zeros((s, d)))
        # The shared output head (every exit uses it): U-ViT's norm + decoder_pred + its final 3x3 conv on the image.
        self.out_norm = nnx.LayerNorm(d, rngs=rngs)
        self.out_proj = nnx.Linear(d, patch_dim, rngs=rngs)
        self.out_conv = nnx.Conv(cfg.channels, cfg.channels, (3, 3), padding="SAME", rngs=rngs)
        # One UEM per layer (DeeDiff Eq. 5): a linear map of [pooled tokens, timestep embedding] to a logit.
        self.uem_norm = nnx.LayerNorm(d, rngs=rngs)
        self.uem_w = nnx.Param(jax.random.normal(rngs.params(), (cfg.depth, 2 * d)) / math.sqrt(2 * d))
        self.uem_b = nnx.Param(jnp.zeros((cfg.depth,)))

    # ------------------------------------------------------------------------------------------ embedding

    def time_embed(self, t_B: jax.Array) -> jax.Array:
        return self.time_mlp2(jax.nn.silu(self.time_mlp1(timestep_embedding(t_B, self.cfg.d_model))))

    def embed(self, x_BxHxWxC: jax.Array, t_B: jax.Array, y_B: jax.Array | None) -> UViTCarry:
        """Tokens ``[time, (class), patches] + pos``, packed into the engine carry ``B x K x T x D``."""
        cfg = self.cfg
        checks.batch_array(x_BxHxWxC, "images")
        checks.batch_array(t_B, "t_B")
        want = (cfg.image_size, cfg.image_size, cfg.channels)
        if x_BxHxWxC.shape[1:] != want:
            raise ValueError(f"images of shape {x_BxHxWxC.shape[1:]}, model expects {want}")
        b = x_BxHxWxC.shape[0]
        if t_B.shape != (b,):
            raise ValueError(f"timesteps of shape {t_B.shape}, want ({b},)")
        p = cfg.patch_size
        patches = einops.rearrange(x_BxHxWxC, "b (gh p) (gw q) c -> b (gh gw) (p q c)", p=p, q=p)
        temb_BxD = self.time_embed(t_B)
        toks = [temb_BxD[:, None, :]]
        if cfg.num_classes:
            if y_B is None or y_B.shape != (b,):
                raise ValueError(f"class-conditional model ({cfg.num_classes=}) needs labels of shape ({b},)")
            toks.append(self.class_emb(y_B)[:, None, :])
        toks.append(self.patch(patches))
        h_BxTxD = jnp.concatenate(toks, axis=1) + self.pos[...]
        skips_BxSxTxD = jnp.zeros((b, cfg.num_in) + h_BxTxD.shape[1:], h_BxTxD.dtype)
        return UViTCarry(jnp.concatenate([h_BxTxD[:, None], skips_BxSxTxD], axis=1), temb_BxD)

    # ------------------------------------------------------------------------------------------ layers

    def layer_fn(self, layer: Block, state: UViTCarry, ctx: engine.StepCtx) -> UViTCarry:
        """Layer ``l`` on the packed carry: in blocks store their output in a skip slot, out blocks consume one.

        One block call per layer (so the block is compiled once); only the cheap long-skip projection sits in a
        ``lax.cond``, so in and mid layers do not pay for it.
        """
        s = self.cfg.num_in
        l = ctx.layer
        carry_BxKxTxD = state.tokens_BxKxTxD
        h = carry_BxKxTxD[:, 0]

        def with_skip(h):
            j = jnp.clip(l - s - 1, 0, s - 1)                          # out block j reads in block S-1-j
            skip = jax.lax.dynamic_index_in_dim(carry_BxKxTxD, 1 + jnp.clip(2 * s - l, 0, s - 1), axis=1,
                                                keepdims=False)
            w = jax.lax.dynamic_index_in_dim(self.skip_w[...], j, keepdims=False)
            bias = jax.lax.dynamic_index_in_dim(self.skip_b[...], j, keepdims=False)
            return jnp.einsum("btf,fd->btd", jnp.concatenate([h, skip], axis=-1), w) + bias[None, None, :]

        new = layer(jax.lax.cond(l > s, with_skip, lambda h: h, h))
        carry = carry_BxKxTxD.at[:, 0].set(new)
        slot = jnp.where(l < s, 1 + l, 0)                               # mid/out layers rewrite slot 0: a no-op
        return state._replace(tokens_BxKxTxD=jax.lax.dynamic_update_index_in_dim(carry, new, slot, axis=1))

    # ------------------------------------------------------------------------------------------ heads

    def eps_from_hidden(self, h_BxTxD: jax.Array) -> jax.Array:
        """The shared output head: patch tokens -> image ``B x H x W x C`` (epsilon, or v: see ``eps_from_output``)."""
        cfg = self.cfg
        g, p = cfg.image_size // cfg.patch_size, cfg.patch_size
        pix = self.out_proj(self.out_norm(h_BxTxD[:, cfg.extras:]))
        return self.out_conv(einops.rearrange(pix, "b (gh gw) (p q c) -> b (gh p) (gw q) c", gh=g, gw=g, p=p, q=p))

    def uem_logit(self, h_BxTxD: jax.Array, temb_BxD: jax.Array, i) -> jax.Array:
        """Exit i's UEM logit; ``u = sigmoid(logit)`` is that exit's predicted uncertainty."""
        pooled_BxD = self.uem_norm(h_BxTxD).mean(axis=1)
        feats = jnp.concatenate([pooled_BxD, temb_BxD], axis=-1)
        return feats @ self.uem_w[...][i] + self.uem_b[...][i]

    def heads(self) -> list:
        """E = N head callables ``carry -> EpsHeadOut`` for the engine: the shared eps head + exit i's UEM.

        ``gate_B = -uem_logit``, so the engine's ``learned`` measure ``sigmoid(gate)`` is the confidence ``1 - u``.
        """
        def make(i):
            def head(state: UViTCarry):
                h = state.tokens_BxKxTxD[:, 0]
                eps = self.eps_from_hidden(h)
                pooled = h.mean(axis=1)
                return EpsHeadOut(eps_BxP=eps.reshape(eps.shape[0], -1), hidden_BxD=pooled,
                                  gate_B=-self.uem_logit(h, state.temb_BxD, i))
            return head
        return [make(i) for i in range(self.cfg.depth)]

    # ------------------------------------------------------------------------------------------ paths

    def all_exits(self, x_BxHxWxC, t_B, y_B=None, *, remat: bool = False) -> UViTExits:
        """Training path: every layer, every exit (the flattened head image and ``-uem`` per exit)."""
        outs = engine.scan_exits(self.layers, self.heads(), self.embed(x_BxHxWxC, t_B, y_B), self.cfg.exit_layers,
                                 layer_fn=self.layer_fn, remat=remat)
        return UViTExits(outs.out.eps_BxP, outs.out.gate_B, outs.h_last)

    def full(self, x_BxHxWxC, t_B, y_B=None) -> jax.Array:
        """Static full depth (no exit heads on the way): the epsilon image ``B x H x W x C``."""
        last, _ = engine.run_layers(self.layers, self.embed(x_BxHxWxC, t_B, y_B), layer_fn=self.layer_fn)
        return self.eps_from_hidden(last.tokens_BxKxTxD[:, 0])

    def dynamic(self, x_BxHxWxC, t_B, y_B, threshold, measure: str = "per_sample",
                executor=engine.Masked()) -> engine.DynamicOutputs:
        """Inference path: ``engine.run`` over the prefix program with the DeeDiff policy ``measure``
        (``out.eps_BxP`` is the flattened head image of the exit taken)."""
        program = engine.prefix(self.cfg.depth, self.cfg.exit_layers)
        return engine.run(self.layers, self.heads(), self.embed(x_BxHxWxC, t_B, y_B), program,
                          get_policy(measure, threshold, self.cfg.depth), executor, layer_fn=self.layer_fn)


MEASURES = ("per_sample", "batch_mean")


def get_policy(name: str, threshold, num_exits: int):
    """DeeDiff's exit rule on the confidence ``1 - u``: per row (``per_sample``), or the batch mean of ``1 - u``
    for every row (``batch_mean``, as DeeDiff's public code does: the whole batch exits together)."""
    if name == "per_sample":
        return policies.threshold(conf_lib.learned, threshold, num_exits)
    if name == "batch_mean":
        return policies.batch_mean(conf_lib.learned, threshold, num_exits)
    raise ValueError(f"unknown exit measure {name!r}; choose from {sorted(MEASURES)}")


def build(cfg: UViTConfig, seed: int):
    """``(graphdef, params)`` of a freshly initialised ``UViT`` (``eejax.nn.build``)."""
    return nn_build(lambda rngs: UViT(cfg, rngs=rngs), seed)


def flops(cfg: UViTConfig) -> costs.ExitCosts:
    """Analytic FLOPs per exit (patch embedding, blocks, long-skip projections, shared head at every exit)."""
    t, d = cfg.tokens, cfg.d_model
    block = costs.transformer_layer_flops(t, d, cfg.mlp_dim, cfg.num_heads)
    skip = 2 * t * 2 * d * d
    layer_flops = [block + (skip if l > cfg.num_in else 0) for l in range(cfg.depth)]
    patch_dim = cfg.patch_size ** 2 * cfg.channels
    head = 2 * cfg.patches * d * patch_dim + 2 * 9 * cfg.pixels * cfg.channels + 2 * 2 * d   # eps head, conv, UEM
    return costs.exit_costs(costs.patch_embed_flops(cfg.patches, patch_dim, d), layer_flops, cfg.exit_layers,
                            [head] * cfg.depth)


# ------------------------------------------------------------------------------------------------ schedule


class NoiseSchedule(NamedTuple):
    betas_T: jax.Array        # float32 [Tn]
    alpha_bars_T: jax.Array   # float32 [Tn], cumulative product of 1 - beta


def make_schedule(kind: str = "linear", num_timesteps: int = 1000) -> NoiseSchedule:
    """DDPM's linear betas (1e-4 .. 0.02, scaled to Tn steps) or the cosine schedule of Nichol & Dhariwal (2021)."""
    n = num_timesteps
    if kind == "linear":
        scale = 1000.0 / n
        betas = np.linspace(scale * 1e-4, scale * 0.02, n, dtype=np.float64)
    elif kind == "cosine":
        s = 0.008
        f = lambda t: np.cos((t / n + s) / (1 + s) * np.pi / 2) ** 2
        steps = np.arange(n + 1, dtype=np.float64)
        betas = np.clip(1 - f(steps[1:]) / f(steps[:-1]), 0.0, 0.999)   # Eq. 17, beta clipped at 0.999
    else:
        raise ValueError(f"unknown noise schedule {kind!r}; use 'linear' or 'cosine'")
    return NoiseSchedule(jnp.asarray(betas, jnp.float32), jnp.asarray(np.cumprod(1 - betas), jnp.float32))


def q_sample(sched: NoiseSchedule, x0_BxHxWxC, t_B, noise_BxHxWxC):
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (DDPM Eq. 4)."""
    ab = sched.alpha_bars_T[t_B][:, None, None, None]
    return jnp.sqrt(ab) * x0_BxHxWxC + jnp.sqrt(1 - ab) * noise_BxHxWxC


PARAMETERIZATIONS = ("eps", "v")


def eps_from_output(sched: NoiseSchedule, out: jax.Array, x_t: jax.Array, t_B: jax.Array,
                    parameterization: str = "eps") -> jax.Array:
    """The epsilon prediction from the output head's ``out`` (shape ``x_t.shape`` or ``(E,) + x_t.shape``).

    ``"eps"``: ``out`` is epsilon. ``"v"``: ``out`` is read as ``v = sqrt(ab) eps - sqrt(1 - ab) x_0`` (Salimans &
    Ho, 2022), so ``eps = sqrt(ab) v + sqrt(1 - ab) x_t``: an output skip that carries the noise straight from the
    input. Either way the model predicts epsilon and is trained on the epsilon MSE (DeeDiff's losses are
    unchanged); with ``"v"`` the head's error reaches epsilon scaled by ``sqrt(ab)``, so at high noise (small
    ``ab``, where ``x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)`` amplifies any error in eps) a small transformer
    no longer has to reproduce the input noise to within a fraction of a percent. Without it, our 7-layer U-ViT
    left ~2% white error in eps at t = 800, which DDIM turns into speckled samples.
    """
    if parameterization == "eps":
        return out
    if parameterization != "v":
        raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")
    lead = (1,) * (out.ndim - x_t.ndim)              # the exit axis of E x B x ... outputs
    ab = sched.alpha_bars_T[t_B].reshape(lead + t_B.shape + (1,) * (x_t.ndim - 1))
    return jnp.sqrt(ab) * out + jnp.sqrt(1 - ab) * x_t.reshape(lead + x_t.shape)


# -------------------------------------------------------------------------------------------------- losses


class DeeDiffLoss(NamedTuple):
    total: jax.Array
    simple: jax.Array      # L_simple: the last exit's epsilon MSE
    uem: jax.Array         # L_u (Eq. 7)
    ual: jax.Array         # L_UAL (Eq. 8)
    mse_E: jax.Array       # per-exit epsilon MSE (batch mean), for logging
    u_E: jax.Array         # per-exit mean predicted uncertainty
    u_target_E: jax.Array  # per-exit mean pseudo uncertainty


UEM_TARGETS = ("eps", "x0")


def deediff_loss(eps_pred_ExBxP: jax.Array, uem_logit_ExB: jax.Array, noise_BxP: jax.Array, *,
                 lam: float = 1.0, beta: float = 1.0, detach_ual_weight: bool = True, uem_target: str = "eps",
                 alpha_bar_B: jax.Array | None = None) -> DeeDiffLoss:
    """DeeDiff's training objective (Tang et al., arXiv:2309.17074, Eqs. 6-9), per sample then batch-averaged.

    * pseudo uncertainty ``u_hat_i = tanh(mean_P |g_i(L_i) - eps|)`` (Eq. 6; a target, so gradient-stopped);
    * ``L_u = sum_i (u_i - u_hat_i)^2`` over all N exits (Eq. 7);
    * ``L_UAL = sum_{i<N} (1 - u_i) * mean_P (g_i(L_i) - eps)^2`` over the N-1 early exits (Eq. 8);
    * ``L = L_simple + lam * L_u + beta * L_UAL`` (Eq. 9), ``L_simple`` the last exit's epsilon MSE.

    ``detach_ual_weight``: stop the gradient of ``u`` through the UAL weight. Otherwise ``L_UAL`` alone pushes every
    ``u`` towards 1 (a larger uncertainty lowers the loss), working against ``L_u``; the paper does not say, and
    the reproduction by Gallo et al. (2024) reports that degenerate solution. The UEM is still trained by ``L_u``.

    ``uem_target="x0"`` (an ablation, a deviation from the paper): the pseudo uncertainty reads the error of the
    implied clean image instead, ``u_hat_i = tanh(mean_P |x0_i - x_0|)`` with ``x0_i = (x_t - sqrt(1 - ab) g_i) /
    sqrt(ab)``, i.e. the epsilon error scaled by ``sqrt((1 - ab) / ab)`` per row (``alpha_bar_B`` required). The
    epsilon error is small at high noise for every exit, while the image error it implies is not, so an eps-space
    UEM is confident exactly where a shallow exit harms the layout. Only the UEM's target changes; ``L_UAL`` and
    ``L_simple`` stay in eps space.
    """
    if uem_target not in UEM_TARGETS:
        raise ValueError(f"uem_target must be one of {UEM_TARGETS}, got {uem_target!r}")
    err_ExBxP = eps_pred_ExBxP - noise_BxP[None]
    mse_ExB = jnp.mean(err_ExBxP ** 2, axis=-1)
    u_ExB = jax.nn.sigmoid(uem_logit_ExB)
    abs_err_ExB = jnp.mean(jnp.abs(err_ExBxP), axis=-1)
    if uem_target == "x0":
        if alpha_bar_B is None or alpha_bar_B.shape != noise_BxP.shape[:1]:
            raise ValueError(f"uem_target='x0' needs alpha_bar_B of shape {noise_BxP.shape[:1]}, got "
                             f"{None if alpha_bar_B is None else alpha_bar_B.shape}")
        ab_B = jnp.maximum(alpha_bar_B, jnp.finfo(jnp.float32).tiny)   # finite scale even at abar = 0
        abs_err_ExB = abs_err_ExB * jnp.sqrt((1 - ab_B) / ab_B)[None]
    u_hat_ExB = jax.lax.stop_gradient(jnp.tanh(abs_err_ExB))
    l_u = jnp.mean(jnp.sum((u_ExB - u_hat_ExB) ** 2, axis=0))
    w_ExB = jax.lax.stop_gradient(u_ExB) if detach_ual_weight else u_ExB
    l_ual = jnp.mean(jnp.sum((1 - w_ExB[:-1]) * mse_ExB[:-1], axis=0))
    simple = jnp.mean(mse_ExB[-1])
    return DeeDiffLoss(simple + lam * l_u + beta * l_ual, simple, l_u, l_ual, mse_ExB.mean(1), u_ExB.mean(1),
                       u_hat_ExB.mean(1))


def training_loss(graphdef, sched: NoiseSchedule, *, lam: float = 1.0, beta: float = 1.0,
                  detach_ual_weight: bool = True, remat: bool = False, parameterization: str = "eps",
                  uem_target: str = "eps"):
    """``loss_fn(params, batch, ctx)`` for the Trainer; batch = ``{"image": B x H x W x C in [-1, 1], "label": B}``.

    ``lam = beta = 0`` is plain DDPM training of the last exit (the early exits then get no training signal): the
    base model that DeeDiff's fine-tune starts from. ``uem_target``: see ``deediff_loss``.
    """
    if uem_target not in UEM_TARGETS:
        raise ValueError(f"uem_target must be one of {UEM_TARGETS}, got {uem_target!r}")
    num_t = sched.betas_T.shape[0]

    def loss_fn(params, batch, ctx):
        model = nnx.merge(graphdef, params)
        x0 = batch["image"]
        b = x0.shape[0]
        k_t, k_n = jax.random.split(ctx.rng)
        t_B = jax.random.randint(k_t, (b,), 0, num_t)
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
        y = batch["label"] if model.cfg.num_classes else None
        x_t = q_sample(sched, x0, t_B, noise)
        outs = model.all_exits(x_t, t_B, y, remat=remat)
        eps_ExBxP = eps_from_output(sched, outs.eps_ExBxP, x_t.reshape(b, -1), t_B, parameterization)
        parts = deediff_loss(eps_ExBxP, -outs.gate_ExB, noise.reshape(b, -1), lam=lam, beta=beta,
                             detach_ual_weight=detach_ual_weight, uem_target=uem_target,
                             alpha_bar_B=sched.alpha_bars_T[t_B])
        e = parts.mse_E.shape[0]
        metrics = {"simple": parts.simple, "uem": parts.uem, "ual": parts.ual, "mse_first": parts.mse_E[0],
                   "mse_mid": parts.mse_E[e // 2], "u_first": parts.u_E[0], "u_last": parts.u_E[-1]}
        return parts.total, metrics

    return loss_fn


# ------------------------------------------------------------------------------------------------- sampling


class SampleOutputs(NamedTuple):
    x0_BxHxWxC: jax.Array     # final samples (clipped to [-1, 1])
    exit_layer_SxB: jax.Array  # 0-based layer each row exited after, per sampling step
    layers_run_S: jax.Array   # layers the batch loop executed per step (its deepest row)
    t_S: jax.Array            # the timestep of each sampling step


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` timesteps from ``Tn - 1`` down to 0, evenly spaced (int32)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"{num_steps=} must be in [1, {num_timesteps=}]")
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def full_thresholds(num_steps: int, num_exits: int) -> jax.Array:
    """Threshold matrix that never exits early: the full-depth policy."""
    return jnp.full((num_steps, num_exits), jnp.inf, jnp.float32)


def depth_thresholds(depth_S, num_exits: int) -> jax.Array:
    """Thresholds forcing exit after ``depth_S[s]`` layers at step s (every row, whatever its score)."""
    depth_S = jnp.asarray(depth_S, jnp.int32)
    fire_SxE = jnp.arange(num_exits)[None, :] >= depth_S[:, None] - 1
    return jnp.where(fire_SxE, -jnp.inf, jnp.inf).astype(jnp.float32)


def constant_thresholds(threshold: float, num_steps: int, num_exits: int) -> jax.Array:
    """DeeDiff: the same confidence threshold ``1 - delta`` at every step and exit."""
    return jnp.full((num_steps, num_exits), threshold, jnp.float32)


def _ddim_update(sched, x, eps, t, t_prev, *, eta, clip, noise):
    ab = sched.alpha_bars_T[t]
    ab_prev = jnp.where(t_prev >= 0, sched.alpha_bars_T[jnp.maximum(t_prev, 0)], 1.0)
    x0 = (x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
    # DDIM Eq. 12/16: sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev).
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
    return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * noise, x0


def ddim_sample(model: UViT, sched: NoiseSchedule, key: jax.Array, y_B: jax.Array | None, thr_SxE: jax.Array, *,
                batch: int | None = None, measure: str = "per_sample", eta: float = 0.0,
                clip: bool = True, static_full: bool = False, parameterization: str = "eps") -> SampleOutputs:
    """DDIM in one ``lax.scan`` over the St = ``thr_SxE.shape[0]`` steps, the engine's while loop inside each step.

    ``key`` draws ``x_T`` (and, for ``eta > 0``, the per-step noise via ``fold_in(key, step)``), so a seed fixes the
    samples. ``static_full=True`` runs the plain full-depth scan (no heads on the way) instead of the engine: the
    reference the dynamic sampler must equal at ``thr = +inf``, and the honest full-depth speed.
    """
    cfg = model.cfg
    num_steps, num_exits = thr_SxE.shape
    if num_exits != cfg.depth:
        raise ValueError(f"{thr_SxE.shape=}: need one threshold per exit ({cfg.depth})")
    b = batch if batch is not None else y_B.shape[0]
    ts = jnp.asarray(ddim_timesteps(sched.betas_T.shape[0], num_steps))
    t_prev_S = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])
    k_x, k_step = jax.random.split(key)
    x_T = jax.random.normal(k_x, (b, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)

    def step(x, xs):
        s, t, t_prev, thr_E = xs
        t_B = jnp.full((b,), t, jnp.int32)
        if static_full:
            head = model.full(x, t_B, y_B)
            exit_layer_B = jnp.full((b,), cfg.depth - 1, jnp.int32)
            layers_run = jnp.int32(cfg.depth)
        else:
            out = model.dynamic(x, t_B, y_B, thr_E, measure)
            head = out.out.eps_BxP.reshape(x.shape)
            exit_layer_B, layers_run = out.exit_layer_B, out.layers_run
        eps = eps_from_output(sched, head, x, t_B, parameterization)
        noise = (jax.random.normal(jax.random.fold_in(k_step, s), x.shape, x.dtype) if eta > 0
                 else jnp.zeros_like(x))
        x, x0 = _ddim_update(sched, x, eps, t, t_prev, eta=eta, clip=clip, noise=noise)
        return x, (exit_layer_B, layers_run)

    x, (exit_layer_SxB, layers_run_S) = jax.lax.scan(step, x_T, (jnp.arange(num_steps), ts, t_prev_S, thr_SxE))
    return SampleOutputs(jnp.clip(x, -1.0, 1.0), exit_layer_SxB, layers_run_S, ts)


def make_sampler(graphdef, sched: NoiseSchedule, *, measure: str = "per_sample", eta: float = 0.0,
                 clip: bool = True, static_full: bool = False, parameterization: str = "eps"):
    """``sample(params, key, y_B, thr_SxE) -> SampleOutputs``, jitted once per (policy kind, shapes)."""
    def sample(params, key, y_B, thr_SxE):
        return ddim_sample(nnx.merge(graphdef, params), sched, key, y_B, thr_SxE, batch=y_B.shape[0],
                           measure=measure, eta=eta, clip=clip, static_full=static_full,
                           parameterization=parameterization)
    return jax.jit(sample)


# ------------------------------------------------------------------------------------------------ baselines


def uniform_depth(num_steps: int, depth: int) -> np.ndarray:
    """Uniform truncation: the same depth at every step."""
    return np.full((num_steps,), depth, np.int32)


def banded_depth(t_S: np.ndarray, num_timesteps: int, num_layers: int, target_mean: float) -> np.ndarray:
    """Timestep-banded schedule: depth rises linearly as noise falls, ``d(t) = N - a * t / Tn``, full near t = 0.

    The slope ``a >= 0`` is found by bisection so that the mean depth over the steps is as close to
    ``target_mean`` as integer depths allow (never below it by more than the rounding).
    """
    frac_S = np.asarray(t_S, np.float64) / num_timesteps

    def sched(a):
        return np.clip(np.ceil(num_layers - a * frac_S), 1, num_layers).astype(np.int32)

    lo, hi = 0.0, 4.0 * num_layers
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sched(mid).mean() > target_mean else (lo, mid)
    cands = [sched(lo), sched(hi)]
    return min(cands, key=lambda d: abs(d.mean() - target_mean))


def two_depth(t_S: np.ndarray, num_layers: int, shallow: int, target_mean: float) -> np.ndarray:
    """Two-depth switch (DuoDiff-style): ``shallow`` layers while t is above a switch timestep, full depth below.

    The switch is placed so that the mean depth is closest to ``target_mean``; ``shallow`` is lowered when the
    target lies below it.
    """
    num_steps = len(t_S)
    shallow = int(max(1, min(shallow, np.floor(target_mean))))
    order = np.argsort(-np.asarray(t_S))           # noisiest steps first
    best = None
    for n_shallow in range(num_steps + 1):
        d = np.full((num_steps,), num_layers, np.int32)
        d[order[:n_shallow]] = shallow
        if best is None or abs(d.mean() - target_mean) < abs(best.mean() - target_mean):
            best = d
    return best


__all__ = ["UViTConfig", "UViT", "UViTCarry", "EpsHeadOut", "UViTExits", "timestep_embedding", "MEASURES", "get_policy",
           "build", "flops", "NoiseSchedule", "make_schedule", "q_sample", "PARAMETERIZATIONS", "eps_from_output",
           "DeeDiffLoss", "deediff_loss",
           "training_loss", "SampleOutputs", "ddim_timesteps", "full_thresholds", "depth_thresholds",
           "constant_thresholds", "ddim_sample", "make_sampler", "uniform_depth", "banded_depth", "two_depth"]
