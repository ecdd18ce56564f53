"""A selective state-space (Mamba) mixer: input-dependent step size and B/C, diagonal A, causal depthwise conv, gate.

Mamba (Gu & Dao 2023, arXiv:2312.00752, Sec. 3 and Alg. 2), per channel i of the inner width and state slot n::

    x, z   = in_proj(u)                          # two halves of width I
    x      = silu(causal_depthwise_conv(x))      # kernel width ``conv_width``, with bias
    dt, B, C = x_proj(x)                         # R + N + N, the *selection*: all three depend on the token
    delta  = softplus(dt_proj(dt))               # I, one step size per channel
    h_t    = exp(delta_t A) h_{t-1} + delta_t B_t x_t       # A = -exp(A_log), diagonal, I x N
    y_t    = C_t . h_t + D x_t
    out    = out_proj(y * silu(z))

(ZOH for A, Euler for B, as the reference implementation does.) The recurrence is linear in h, so a whole sequence
runs as a parallel prefix scan (``lax.associative_scan`` over pairs ``(a, b)`` composing ``h -> a h + b``), and one
new token as a single update from the carried state. The carried per-row state is :class:`SSMState`: the last
``conv_width - 1`` conv inputs and the I x N SSM state. Three paths share the parameters:

* ``__call__(x, state, valid)``: a sequence from a state (``scan="parallel"``: the associative scan, for training
  and prefill; ``scan="sequential"``: a plain ``lax.scan`` over tokens, the reference; ``scan="fused"``: a
  ``lax.scan`` over tokens that discretises inside each step, so no ``B x T x I x N`` tensor is ever materialised:
  3-4x faster than the associative scan for training on a CPU, measured at B=32, T=128, I=256, N=8-16, where the
  parallel form's O(T log T) work on big intermediates does not pay; on an accelerator the parallel form is the one
  to use);
* ``step(x, state)``: one token from a state (decoding).

Prefill of T tokens then steps equals one longer prefill (tested). ``valid_BxT`` (a prefix of real tokens per row,
i.e. right padding) leaves the state at each row's last real token: padded positions get ``delta = 0`` (so
``exp(0 A) = 1`` and ``delta B x = 0``: the SSM state passes through unchanged) and the conv window is gathered at
each row's length.

The scan runs in float32 whatever the compute dtype (the state is a long running product).

Shapes: B batch, T tokens, D model width, I inner width, N state size per channel, R rank of the step-size
projection, W conv window (``conv_width - 1`` past inputs), O output width (D; 1 for an exit classifier).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

SCANS = ("parallel", "sequential", "fused")


class SSMState(NamedTuple):
    """A mixer's per-row recurrent state (a pytree; stacked layers carry a leading layer axis)."""

    conv_BxWxI: jax.Array   # the last W = conv_width - 1 inputs of the causal conv (oldest first)
    ssm_BxIxN: jax.Array    # the SSM state h


def _combine(left, right):
    """Compose two affine maps ``h -> a h + b`` (``left`` first): the associative operator of the scan."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def selective_scan(dA_BxTxIxN, dBx_BxTxIxN, C_BxTxN, h0_BxIxN) -> tuple[jax.Array, jax.Array]:
    """``h_t = dA_t h_{t-1} + dBx_t`` from ``h0``, read out ``y_t = C_t . h_t``, by a parallel prefix scan.
    Returns ``(y_BxTxI, h_T)``."""
    dBx_BxTxIxN = dBx_BxTxIxN.at[:, 0].add(dA_BxTxIxN[:, 0] * h0_BxIxN)   # fold h0 into the first element
    _, h_BxTxIxN = jax.lax.associative_scan(_combine, (dA_BxTxIxN, dBx_BxTxIxN), axis=1)
    return jnp.einsum("btin,btn->bti", h_BxTxIxN, C_BxTxN), h_BxTxIxN[:, -1]


def selective_scan_ref(dA_BxTxIxN, dBx_BxTxIxN, C_BxTxN, h0_BxIxN) -> tuple[jax.Array, jax.Array]:
    """The same recurrence one token at a time (``lax.scan``): the reference for :func:`selective_scan`."""

    def body(h_BxIxN, xs):
        dA, dBx, c_BxN = xs
        h_BxIxN = dA * h_BxIxN + dBx
        return h_BxIxN, jnp.einsum("bin,bn->bi", h_BxIxN, c_BxN)

    xs = (jnp.moveaxis(dA_BxTxIxN, 1, 0), jnp.moveaxis(dBx_BxTxIxN, 1, 0), jnp.moveaxis(C_BxTxN, 1, 0))
    h_T, y_TxBxI = jax.lax.scan(body, h0_BxIxN, xs)
    return jnp.moveaxis(y_TxBxI, 0, 1), h_T


def selective_scan_fused(delta_BxTxI, a_IxN, b_BxTxN, C_BxTxN, x_BxTxI, h0_BxIxN) -> tuple[jax.Array, jax.Array]:
    """The recurrence with the discretisation inside each step (``dA_t = exp(delta_t A)``, ``dBx_t = delta_t x_t
    B_t``): one ``lax.scan`` over tokens, memory ``B x I x N`` per step. Returns ``(y_BxTxI, h_T)``."""

    def body(h_BxIxN, xs):
        d_BxI, b_BxN, c_BxN, x_BxI = xs
        h_BxIxN = (jnp.exp(d_BxI[..., None] * a_IxN[None]) * h_BxIxN
                   + (d_BxI * x_BxI)[..., None] * b_BxN[:, None, :])
        return h_BxIxN, jnp.einsum("bin,bn->bi", h_BxIxN, c_BxN)

    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (delta_BxTxI, b_BxTxN, C_BxTxN, x_BxTxI.astype(jnp.float32)))
    h_T, y_TxBxI = jax.lax.scan(body, h0_BxIxN, xs)
    return jnp.moveaxis(y_TxBxI, 0, 1), h_T


def default_dt_rank(d_model: int) -> int:
    """Mamba's default rank of the step-size projection, ``ceil(D / 16)``."""
    return math.ceil(d_model / 16)


def _inverse_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


class MambaMixer(nnx.Module):
    """The selective SSM mixer of one Mamba block (no norm, no residual: the caller adds them).

    ``d_out`` (default ``d_model``) is the output projection's width: an exit classifier built from a Mamba block
    replaces it by 1 (DYNAMAX, arXiv:2504.20922: "a Mamba block with a modified output projection").
    Initialisation as in Mamba: S4D-real ``A_log = log(1..N)``, ``D = 1``, step sizes log-uniform in
    ``[dt_min, dt_max]`` through the ``dt_proj`` bias.
    """

    def __init__(self, d_model: int, d_inner: int, *, d_state: int = 16, conv_width: int = 4,
                 dt_rank: int | None = None, d_out: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 rngs: nnx.Rngs, dtype=None):
        dt_rank = default_dt_rank(d_model) if dt_rank is None else dt_rank
        for name, value in (("d_model", d_model), ("d_inner", d_inner), ("d_state", d_state),
                            ("conv_width", conv_width), ("dt_rank", dt_rank)):
            if value < 1:
                raise ValueError(f"MambaMixer: {name}={value} must be >= 1")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"MambaMixer: need 0 < {dt_min=} <= {dt_max=}")
        self.d_inner, self.d_state, self.conv_width, self.dt_rank = d_inner, d_state, conv_width, dt_rank
        self.dtype = dtype
        i, n, r = d_inner, d_state, dt_rank
        self.in_proj = nnx.Linear(d_model, 2 * i, use_bias=False, rngs=rngs, dtype=dtype)
        bound = 1.0 / math.sqrt(conv_width)   # PyTorch's Conv1d default for a depthwise kernel (fan-in W)
        self.conv_w = nnx.Param(jax.random.uniform(rngs.params(), (conv_width, i), jnp.float32, -bound, bound))
        self.conv_b = nnx.Param(jax.random.uniform(rngs.params(), (i,), jnp.float32, -bound, bound))
        self.x_proj = nnx.Linear(i, r + 2 * n, use_bias=False, rngs=rngs, dtype=dtype)
        dt_bound = r ** -0.5
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        self.dt_proj = nnx.Linear(
            r, i, rngs=rngs, dtype=dtype,
            kernel_init=lambda key, shape, dt=jnp.float32: jax.random.uniform(key, shape, dt, -dt_bound, dt_bound),
            bias_init=lambda key, shape, dt=jnp.float32: _inverse_softplus(
                jnp.exp(jax.random.uniform(key, shape, dt, log_lo, log_hi))))
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (i, n))))
        self.D = nnx.Param(jnp.ones((i,), jnp.float32))
        self.out_proj = nnx.Linear(i, d_model if d_out is None else d_out, use_bias=False, rngs=rngs, dtype=dtype)

    # ------------------------------------------------------------------------------------------------ state

    def init_state(self, batch: int) -> SSMState:
        """Zeros: the state before the first token."""
        return SSMState(jnp.zeros((batch, self.conv_width - 1, self.d_inner), jnp.float32),
                        jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32))

    # ------------------------------------------------------------------------------------------------ pieces

    def _cast(self, x):
        return x if self.dtype is None else x.astype(self.dtype)

    def _selection(self, x_BxTxI):
        """``delta`` (float32, ``B x T x I``), ``B`` and ``C`` (float32, ``B x T x N``) from the conv output."""
        r, n = self.dt_rank, self.d_state
        dbc = self.x_proj(x_BxTxI)
        dt, b, c = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
        delta_BxTxI = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32))
        return delta_BxTxI, b.astype(jnp.float32), c.astype(jnp.float32)

    def _discretise(self, delta_BxTxI, b_BxTxN, x_BxTxI):
        a_IxN = -jnp.exp(self.A_log[...])
        dA = jnp.exp(delta_BxTxI[..., None] * a_IxN[None, None])
        dBx = (delta_BxTxI * x_BxTxI.astype(jnp.float32))[..., None] * b_BxTxN[:, :, None, :]
        return dA, dBx

    def _out(self, y_BxTxI, x_BxTxI, z_BxTxI):
        y = y_BxTxI + x_BxTxI.astype(jnp.float32) * self.D[...][None, None]
        return self.out_proj(self._cast(y * jax.nn.silu(z_BxTxI.astype(jnp.float32))))

    # ------------------------------------------------------------------------------------------------ paths

    def __call__(self, u_BxTxD: jax.Array, state: SSMState | None = None, valid_BxT: jax.Array | None = None,
                 *, scan: str = "parallel") -> tuple[jax.Array, SSMState]:
        """T tokens per row from ``state`` (zeros when None); returns ``(out_BxTxO, state after the sequence)``."""
        if scan not in SCANS:
            raise ValueError(f"scan={scan!r}: use one of {SCANS}")
        b, t, _ = u_BxTxD.shape
        state = self.init_state(b) if state is None else state
        xz = self.in_proj(self._cast(u_BxTxD))
        x_pre, z = xz[..., :self.d_inner], xz[..., self.d_inner:]
        # Causal depthwise conv over [the carried window, the new inputs]: output t reads padded inputs t..t+W.
        xpad = jnp.concatenate([state.conv_BxWxI.astype(x_pre.dtype), x_pre], axis=1)
        w = self.conv_w[...].astype(x_pre.dtype)
        conv = sum(xpad[:, k:k + t] * w[k][None, None] for k in range(self.conv_width))
        x = jax.nn.silu(conv + self.conv_b[...].astype(x_pre.dtype)[None, None])
        delta, b_mat, c_mat = self._selection(x)
        if valid_BxT is None:
            window = xpad[:, t:]
        else:   # padded positions leave the state as it is; the window ends at each row's last real token
            delta = delta * valid_BxT[..., None].astype(delta.dtype)
            len_B = jnp.sum(valid_BxT.astype(jnp.int32), axis=1)
            idx_BxW = len_B[:, None] + jnp.arange(self.conv_width - 1)[None, :]
            window = jnp.take_along_axis(xpad, idx_BxW[..., None], axis=1)
        h0 = state.ssm_BxIxN.astype(jnp.float32)
        if scan == "fused":
            y, h = selective_scan_fused(delta, -jnp.exp(self.A_log[...]), b_mat, c_mat, x, h0)
        else:
            dA, dBx = self._discretise(delta, b_mat, x)
            y, h = (selective_scan if scan == "parallel" else selective_scan_ref)(dA, dBx, c_mat, h0)
        return self._out(y, x, z), SSMState(window.astype(state.conv_BxWxI.dtype), h)

    def step(self, u_BxD: jax.Array, state: SSMState) -> tuple[jax.Array, SSMState]:
        """One token per row from ``state`` (the recurrent form, for decoding); returns ``(out_BxO, new state)``."""
        xz = self.in_proj(self._cast(u_BxD))
        x_pre, z = xz[:, :self.d_inner], xz[:, self.d_inner:]
        window_BxKxI = jnp.concatenate([state.conv_BxWxI.astype(x_pre.dtype), x_pre[:, None]], axis=1)
        w = self.conv_w[...].astype(x_pre.dtype)
        x = jax.nn.silu(jnp.sum(window_BxKxI * w[None], axis=1) + self.conv_b[...].astype(x_pre.dtype)[None])
        delta, b_mat, c_mat = self._selection(x[:, None])
        dA, dBx = self._discretise(delta, b_mat, x[:, None])
        h = dA[:, 0] * state.ssm_BxIxN.astype(jnp.float32) + dBx[:, 0]
        y = jnp.einsum("bin,bn->bi", h, c_mat[:, 0])
        out = self._out(y[:, None], x[:, None], z[:, None])[:, 0]
        return out, SSMState(window_BxKxI[:, 1:].astype(state.conv_BxWxI.dtype), h)


def mixer_param_count(d_model: int, d_inner: int, *, d_state: int = 16, conv_width: int = 4,
                      dt_rank: int | None = None, d_out: int | None = None) -> int:
    """Parameters of a :class:`MambaMixer` (what ``nnx.state`` holds), without building it."""
    r = default_dt_rank(d_model) if dt_rank is None else dt_rank
    i, n = d_inner, d_state
    return (d_model * 2 * i + conv_width * i + i + i * (r + 2 * n) + r * i + i + i * n + i
            + i * (d_model if d_out is None else d_out))


__all__ = ["SCANS", "SSMState", "MambaMixer", "selective_scan", "selective_scan_ref", "selective_scan_fused",
           "default_dt_rank",
           "mixer_param_count"]
