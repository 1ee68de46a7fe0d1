"""Relative position encodings: attention biases and relative-position terms.

Every function is pure (no Flax, no state) and works under `jax.jit` and `jax.vmap`. Positions are
integer arrays `q_positions [..., Lq]` and `k_positions [..., Lk]` of any integer dtype; their
leading batch axes broadcast against each other (`[Lq]` positions serve every row). Every bias is
float32 and shaped `[..., H, Lq, Lk]`, so attention can ask for one block of queries and keys at a
time and add the bias to its `[..., H, Lq, Lk]` logits; no `[L, L]` table is cached.

Distances are integers (key minus query, or its absolute value) computed before any conversion
to float, so biases that depend only on the distance are exactly shift invariant. The two
encodings built from sinusoids of the positions themselves (Sandwich, Transformer-XL) measure
positions from the block's first query, so their rounding error depends on distances within the
block, not on how far into the sequence the block sits.

Positions are computed in the default JAX integer type (int32 unless `jax_enable_x64` is on), so
they must fit in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jpe.encodings import _checks

__all__ = [
    "alibi_slopes",
    "alibi_bias",
    "t5_relative_bucket",
    "t5_bias",
    "kerple_bias",
    "sandwich_bias",
    "fire_init",
    "fire_bias",
    "shaw_relative_index",
    "shaw_logits",
    "shaw_values",
    "transformer_xl_bias",
    "dpb_init",
    "dpb_bias",
]

# Bias tables are small matmuls whose float32 result should not depend on the backend's default
# (TF32 on recent GPUs, bfloat16 passes on TPU).
_HIGHEST = jax.lax.Precision.HIGHEST

# FIRE's reference code adds this to the normaliser psi(max(L, i)) so that L -> 0 at i = 0 cannot
# divide by zero.
_FIRE_EPS = 1e-6

_FIRE_KEYS = ("c", "L", "w1", "b1", "w2", "b2")


# ----------------------------------------------------------------------------- helpers


def _int_dtype() -> np.dtype:
    return jax.dtypes.canonicalize_dtype(jnp.int64)


def _positions(q_positions: ArrayLike, k_positions: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Checks both position arrays and broadcasts their batch axes: `[*B, Lq]`, `[*B, Lk]`."""
    q = _checks.integer_array("q_positions", q_positions)
    k = _checks.integer_array("k_positions", k_positions)
    _checks.min_rank("q_positions", q, 1, "[..., Lq]")
    _checks.min_rank("k_positions", k, 1, "[..., Lk]")
    batch = _checks.broadcastable(("q_positions", "k_positions"), (q.shape[:-1], k.shape[:-1]))
    q = jnp.broadcast_to(q, batch + q.shape[-1:]).astype(_int_dtype())
    k = jnp.broadcast_to(k, batch + k.shape[-1:]).astype(_int_dtype())
    return q, k


def _key_minus_query(q: jax.Array, k: jax.Array) -> jax.Array:
    """`[*B, Lq]`, `[*B, Lk]` -> integer `k_j - q_i`, `[*B, Lq, Lk]`."""
    return k[..., None, :] - q[..., :, None]


def _per_head(x: jax.Array, batch_ndim: int) -> jax.Array:
    """`[H]` -> `[1, ..., 1, H, 1, 1]`, to scale a `[*B, 1, Lq, Lk]` tensor head by head."""
    return x.reshape((1,) * batch_ndim + (x.shape[0], 1, 1))


def _head_vector(name: str, x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape [H], got shape {x.shape}")
    return x


def _anchored(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float32 positions measured from the block's first query (differences are unchanged)."""
    # q[..., :1] as a masked sum: Pallas kernels (Triton) cannot slice a value.
    first = jax.lax.broadcasted_iota(jnp.int32, q.shape, q.ndim - 1) == 0
    anchor = jnp.where(first, q, 0).sum(-1, keepdims=True)
    return (q - anchor).astype(jnp.float32), (k - anchor).astype(jnp.float32)


def _inner(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[*B, M, F]`, `[*B, N, F]` -> `[*B, M, N]` float32 inner products. One batch row is
    contracted as a 2-D product, the only kind Pallas kernels (Triton) lower."""
    batch = a.shape[:-2]
    if math.prod(batch) == 1:
        out = jax.lax.dot_general(
            a.reshape(a.shape[-2:]),
            b.reshape(b.shape[-2:]),
            (((1,), (1,)), ((), ())),
            precision=_HIGHEST,
        )
        return out.reshape(batch + out.shape)
    return jnp.einsum("...if,...jf->...ij", a, b, precision=_HIGHEST)


def _entry(x: jax.Array, index: int, axis: int) -> jax.Array:
    """`x` at `index` along `axis`, that axis kept as 1: a masked sum over an iota, since
    Pallas kernels cannot slice or gather a value."""
    hit = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) == index
    return jnp.where(hit, x, 0.0).sum(axis, keepdims=True)


def _feature_major_mlp(x, w_in, b_in, layers, activation, w_out, b_out) -> jax.Array:
    """An MLP applied to every entry of `x` `[*B, Lq, Lk]`, in the layout Pallas kernels
    (Triton and Mosaic) lower: features lead, `[F, *B * Lq, Lk]`, so the minor axes stay the
    block's, each inner layer is one 2-D product `[G, F] x [F, *B * Lq * Lk]`, and the output
    layer is one weighted sum over the features per head; no gather, concatenate or batched
    product. Returns `[*B, H, Lq, Lk]`.

    The first layer maps 1 -> F (`w_in` `[1, F]` or `[F]`, `b_in` `[F]`), then each of
    `layers` (`(activation_before, w [F, G], b [G])`) applies the activation and a dense
    layer, and the output layer applies `activation` and maps to H (`w_out` `[G, H]`,
    `b_out` `[H]`).
    """
    batch, (lq, lk) = x.shape[:-2], x.shape[-2:]
    rows = x.reshape(-1, lk)  # [M, Lk], M = *B * Lq

    def column(v: jax.Array) -> jax.Array:  # [F] -> [F, 1, 1]
        return v.reshape(v.size).reshape(v.size, 1, 1)

    h = rows[None] * column(w_in) + column(b_in)  # [F, M, Lk]
    for act, w, b in layers:
        h = act(h)
        flat = h.reshape(h.shape[0], -1)
        flat = jax.lax.dot_general(w, flat, (((0,), (0,)), ((), ())), precision=_HIGHEST)
        h = flat.reshape((w.shape[1],) + rows.shape) + column(b)
    h = activation(h)
    heads = w_out.shape[1]
    head = jax.lax.broadcasted_iota(jnp.int32, (heads, 1, 1), 0)
    out = _per_head(b_out, len(batch))
    for g in range(heads):
        per_head = (h * column(_entry(w_out, g, 1))).sum(0)  # [M, Lk]
        per_head = per_head.reshape(batch + (1, lq, lk))
        out = out + jnp.where(head == g, per_head, 0.0)
    return out


def _trailing(x: jax.Array, ndim: int) -> jax.Array:
    """`[F]` -> `[1, ..., 1, F]` of rank `ndim`, to meet a `[..., F]` tensor."""
    return x.reshape((1,) * (ndim - 1) + (x.shape[-1],))


# ----------------------------------------------------------------------------- ALiBi


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al., arXiv 2108.12409, Section 3).

    For a power of two n the slopes are the geometric sequence with start and ratio 2^(-8/n):
    m_h = 2^(-8h/n), h = 1..n (8 heads: 1/2, 1/4, ..., 1/256). Otherwise, with c = 2^floor(log2 n),
    they are the c-head slopes followed by the first n - c of the even-indexed ([0::2]) slopes of
    the 2c-head sequence, as in the authors' `get_slopes` (fairseq `transformer.py`). Six heads
    give 2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3.

    Args:
      num_heads: number of attention heads n >= 1.

    Returns:
      float64 NumPy array `[num_heads]` of strictly positive slopes.

    Raises:
      ValueError: if `num_heads` is not an integer >= 1.

    Example:
      >>> alibi_slopes(6) * 2**8
      array([ 64.,  16.,   4.,   1., 128.,  32.])
    """
    n = _checks.positive_int("num_heads", num_heads)

    def geometric(count: int) -> np.ndarray:
        return 2.0 ** (-8.0 * np.arange(1, count + 1, dtype=np.float64) / count)

    closest = 1 << (n.bit_length() - 1)  # 2^floor(log2 n)
    if closest == n:
        return geometric(n)
    return np.concatenate([geometric(closest), geometric(2 * closest)[0::2][: n - closest]])


def alibi_bias(q_positions: ArrayLike, k_positions: ArrayLike, slopes: ArrayLike) -> jax.Array:
    """ALiBi attention bias -m_h |q - k| (Press et al., arXiv 2108.12409, eq. in Section 3).

    Press et al. add m_h * [-(i-1), ..., -1, 0] to the causal logits of query i. This function
    returns the symmetric form -m_h |i - j|, which equals that on every unmasked (j <= i) entry
    and also serves bidirectional encoders. It is not divided by sqrt(d).

    Args:
      q_positions: integer `[..., Lq]` query positions.
      k_positions: integer `[..., Lk]` key positions; batch axes broadcast with `q_positions`.
      slopes: `[H]` per-head slopes, e.g. `alibi_slopes(H)` (NumPy or JAX array).

    Returns:
      float32 `[..., H, Lq, Lk]` bias.

    Raises:
      ValueError: if positions are not integer arrays of rank >= 1, their batch axes do not
        broadcast, or `slopes` is not `[H]`.
    """
    q, k = _positions(q_positions, k_positions)
    slopes = _head_vector("slopes", slopes)
    distance = jnp.abs(_key_minus_query(q, k)).astype(jnp.float32)[..., None, :, :]
    return -_per_head(slopes, q.ndim - 1) * distance


# ----------------------------------------------------------------------------- T5


def t5_check(num_buckets: int, max_distance: int, bidirectional: bool) -> tuple[int, int]:
    """Checks T5's static bucket arguments; returns (buckets per direction, exact buckets).

    Raises:
      ValueError: `num_buckets` below 4 (odd) when bidirectional or below 2 otherwise, or
        `max_distance` not above the exact buckets.
    """
    if bidirectional:
        num_buckets = _checks.positive_int("num_buckets", num_buckets, minimum=4)
        if num_buckets % 2:
            raise ValueError(
                f"num_buckets must be even when bidirectional (half per direction), "
                f"got {num_buckets}"
            )
        num_buckets //= 2
    else:
        num_buckets = _checks.positive_int("num_buckets", num_buckets, minimum=2)
    max_exact = num_buckets // 2
    max_distance = _checks.positive_int("max_distance", max_distance, minimum=1)
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be greater than the {max_exact} exact buckets per direction, "
            f"got {max_distance}"
        )
    return num_buckets, max_exact


def t5_relative_bucket(
    relative_position: ArrayLike,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """T5's relative-position buckets (Raffel et al., arXiv 1910.10683, Section 2.1).

    Reproduces `_relative_position_bucket` of Mesh TensorFlow and Hugging Face T5, with
    relative_position = key - query. When `bidirectional`, half the buckets hold keys after the
    query (relative_position > 0) and half the rest; otherwise keys after the query fall in
    bucket 0 with the query itself. Within a direction of B buckets, with n = |distance|:
    n < B/2 gets its own bucket n; larger n gets
    B/2 + floor(log(n / (B/2)) / log(max_distance / (B/2)) * (B - B/2)), clipped to B - 1, so
    every distance >= max_distance shares the last bucket. The logarithm is evaluated in
    float32, as in both reference implementations.

    Args:
      relative_position: integer array, key position minus query position.
      bidirectional: whether keys after the query get buckets of their own (encoders).
      num_buckets: total number of buckets; >= 2, and even and >= 4 when `bidirectional`
        (an odd count would leave the last table row unused).
      max_distance: distance from which all distances share the last bucket of a direction;
        must exceed the number of exact buckets per direction.

    Returns:
      int32 array of the same shape, values in [0, num_buckets).

    Raises:
      ValueError: if `relative_position` is not integer, or the counts are out of range.
    """
    relative_position = _checks.integer_array("relative_position", relative_position)
    per_direction, max_exact = t5_check(num_buckets, max_distance, bidirectional)
    relative_position = relative_position.astype(_int_dtype())
    if bidirectional:
        buckets = jnp.where(relative_position > 0, per_direction, 0)
        n = jnp.abs(relative_position)
    else:
        buckets = jnp.zeros_like(relative_position)
        n = jnp.maximum(-relative_position, 0)
    # Clamp before the log so the (discarded) small-distance branch never sees log(0).
    n_large = jnp.maximum(n, max_exact).astype(jnp.float32)
    log_ratio = jnp.log(n_large / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (per_direction - max_exact)).astype(_int_dtype())
    large = jnp.minimum(large, per_direction - 1)
    return (buckets + jnp.where(n < max_exact, n, large)).astype(jnp.int32)


def t5_bias(
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    table: ArrayLike,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
) -> jax.Array:
    """T5 relative attention bias: a learned scalar per head and bucket (arXiv 1910.10683).

    bias[h, i, j] = table[t5_relative_bucket(k_j - q_i), h],

    looked up by one select per bucket (no gather), so the same code runs inside the fused
    Pallas kernel (Triton and Mosaic).

    Args:
      q_positions: integer `[..., Lq]` query positions.
      k_positions: integer `[..., Lk]` key positions.
      table: `[num_buckets, H]` learned biases; `num_buckets = table.shape[0]`.
      bidirectional: see `t5_relative_bucket`.
      max_distance: see `t5_relative_bucket`.

    Returns:
      float32 `[..., H, Lq, Lk]` bias.

    Raises:
      ValueError: on bad positions, a `table` that is not `[num_buckets, H]`, or bucket
        arguments `t5_relative_bucket` rejects.
    """
    q, k = _positions(q_positions, k_positions)
    table = jnp.asarray(table, jnp.float32)
    if table.ndim != 2:
        raise ValueError(f"table must have shape [num_buckets, H], got shape {table.shape}")
    buckets = t5_relative_bucket(
        _key_minus_query(q, k),
        bidirectional=bidirectional,
        num_buckets=table.shape[0],
        max_distance=max_distance,
    )
    # The lookup as one select per bucket rather than a gather (table[buckets]): Pallas kernels
    # lower selects but not gathers, the gradient is a plain reduction rather than a
    # scatter-add, and on XLA:CPU it is several times faster. Row b of the table is taken by
    # a masked sum (`_entry`), as a kernel cannot slice a value.
    buckets = buckets[..., None, :, :]  # [..., 1, Lq, Lk]
    out = jnp.zeros(buckets.shape[:-3] + (table.shape[1],) + buckets.shape[-2:], jnp.float32)
    for b in range(table.shape[0]):
        row = _entry(table, b, 0)[0]  # [H]
        out = jnp.where(buckets == b, _per_head(row, q.ndim - 1), out)
    return out


# ----------------------------------------------------------------------------- KERPLE


def kerple_bias(
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    r1: ArrayLike,
    r2: ArrayLike,
    *,
    kind: str = "log",
) -> jax.Array:
    """KERPLE bias from a conditionally positive definite kernel (Chi et al., arXiv 2205.09921).

    With d = |q - k| and per-head r1, r2 > 0 (the paper's two practical variants):
      log:   bias = -r1 * log(1 + r2 * d)
      power: bias = -r1 * d ** r2, where the paper keeps 0 < r2 <= 2.
    The authors' code (chijames/KERPLE, `megatron/mpu/layers.py`) learns r1, r2 per head and
    clamps them at >= 0.01 after every step; that constraint belongs to the caller (values in
    traced arrays are not checked here).

    Args:
      q_positions: integer `[..., Lq]` query positions.
      k_positions: integer `[..., Lk]` key positions.
      r1: `[H]` positive scales.
      r2: `[H]` positive shapes (log: inside the log; power: the exponent).
      kind: "log" or "power".

    Returns:
      float32 `[..., H, Lq, Lk]` bias (0 at distance 0, non-increasing in d for r1, r2 > 0).

    Raises:
      ValueError: on bad positions, `r1`/`r2` not both `[H]`, or an unknown `kind`.
    """
    _checks.one_of("kind", kind, ("log", "power"))
    q, k = _positions(q_positions, k_positions)
    r1 = _head_vector("r1", r1)
    r2 = _head_vector("r2", r2)
    if r1.shape != r2.shape:
        raise ValueError(f"r1 and r2 must have the same shape [H], got {r1.shape} and {r2.shape}")
    batch_ndim = q.ndim - 1
    distance = jnp.abs(_key_minus_query(q, k)).astype(jnp.float32)[..., None, :, :]
    r1, r2 = _per_head(r1, batch_ndim), _per_head(r2, batch_ndim)
    if kind == "log":
        return -r1 * jnp.log1p(r2 * distance)
    return -r1 * jnp.power(distance, r2)


# ----------------------------------------------------------------------------- Sandwich


def sandwich_bias(
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    num_heads: int,
    *,
    dim: int = 128,
    base: float = 10000.0,
) -> jax.Array:
    """Sandwich: parameter-free bias from sinusoidal inner products (Chi et al., arXiv 2212.10356).

    "Dissecting Transformer Length Extrapolation via the Lens of Receptive Field Analysis"
    (ACL 2023) adds to the logits the inner product of the sinusoidal embeddings of the two
    positions, minus its value at distance 0, scaled per head the way ALiBi spreads its slopes:

      bias[h, m, n] = (sum_{k=1}^{dim/2} cos(w_k (m - n)) - dim/2) / (h * 8 / H),
      w_k = base^(-2k / dim),  h = 1..H.

    The sum is computed as the inner product p_m . p_n of [cos, sin] embeddings (one matmul),
    which is the paper's own definition. The bias is 0 at distance 0 (up to float32 rounding,
    about 1e-5 for dim=128), at most 0 elsewhere, and symmetric in m - n, so it serves encoders;
    for decoders the caller masks future keys.

    Where this was confirmed: the per-head rule (divide the whole bias, after subtracting dim/2,
    by h * 8 / H) and the frequency index k = 1..dim/2 follow NVIDIA NeMo's implementation, which
    cites the paper (`nemo/collections/nlp/modules/common/megatron/position_embedding/
    sandwich_relative_position_embedding.py`); the paper's Figure 1 caption gives the same head
    range h = n * 8 / H, n = 1..H, for ALiBi's exponent. The text of the paper's Sandwich section
    itself could not be read, so whether the paper phrases the head rule as a compression of the
    distance rather than of the bias, and its default `dim`, are unconfirmed.

    Args:
      q_positions: integer `[..., Lq]` query positions.
      k_positions: integer `[..., Lk]` key positions.
      num_heads: number of heads H >= 1.
      dim: dimension of the sinusoidal embedding (even, >= 2).
      base: frequency base (> 0).

    Returns:
      float32 `[..., H, Lq, Lk]` bias.

    Raises:
      ValueError: on bad positions, `num_heads` < 1, odd or non-positive `dim`, or `base` <= 0.
    """
    q, k = _positions(q_positions, k_positions)
    num_heads = _checks.positive_int("num_heads", num_heads)
    dim = _checks.positive_int("dim", dim, minimum=2)
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    base = _checks.positive_float("base", base)

    freqs = base ** (-2.0 * np.arange(1, dim // 2 + 1, dtype=np.float64) / dim)
    freqs = jnp.asarray(freqs, jnp.float32)
    qf, kf = _anchored(q, k)

    angle_q = qf[..., None] * _trailing(freqs, qf.ndim + 1)  # [..., Lq, dim / 2]
    angle_k = kf[..., None] * _trailing(freqs, kf.ndim + 1)
    # [cos, sin] . [cos, sin] as two products rather than one of concatenations, which
    # Pallas kernels do not lower.
    inner = _inner(jnp.cos(angle_q), jnp.cos(angle_k)) + _inner(jnp.sin(angle_q), jnp.sin(angle_k))
    scales = np.arange(1, num_heads + 1, dtype=np.float32) * np.float32(8.0 / num_heads)
    return (inner - dim / 2)[..., None, :, :] / _per_head(jnp.asarray(scales), q.ndim - 1)


# ----------------------------------------------------------------------------- FIRE


def fire_init(
    key: jax.Array,
    num_heads: int,
    *,
    hidden: int = 32,
    c: float = 0.1,
    L: float = 512.0,
) -> dict[str, jax.Array]:
    """Initial FIRE parameters (Li et al., arXiv 2310.04418), for `fire_bias`.

    Matches the PyTorch reference implementation that circulates with the paper (identical
    copies citing arXiv 2310.04418 in several public repositories, e.g. mcleish7/arithmetic
    `cramming/architectures/embeddings.py`, class `FIRE`): MLP width 32, init_c = 0.1,
    init_L = 512, and PyTorch's default `nn.Linear` initialisation U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for weights and biases (fan_in = 1 for the first layer). That code learns
    the threshold as |L_multiplier * 512| with L_multiplier starting at 1; here "L" is the
    threshold itself. Forward values are the same, but under Adam-like optimisers L then moves
    about 512 times more slowly per step; to match the reference dynamics, learn L / 512 and
    pass 512 times it.

    Args:
      key: PRNG key.
      num_heads: number of heads H >= 1.
      hidden: MLP width >= 1.
      c: initial log-transform scale (> 0).
      L: initial normaliser threshold (> 0).

    Returns:
      dict with float32 "c" `[]`, "L" `[]`, "w1" `[1, hidden]`, "b1" `[hidden]`,
      "w2" `[hidden, H]`, "b2" `[H]`.

    Raises:
      ValueError: if `num_heads` or `hidden` < 1, or `c` or `L` is not a positive number.
    """
    num_heads = _checks.positive_int("num_heads", num_heads)
    hidden = _checks.positive_int("hidden", hidden)
    c = _checks.positive_float("c", c)
    L = _checks.positive_float("L", L)
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def uniform(k: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

    return {
        "c": jnp.asarray(c, jnp.float32),
        "L": jnp.asarray(L, jnp.float32),
        "w1": uniform(k1, (1, hidden), 1),
        "b1": uniform(k2, (hidden,), 1),
        "w2": uniform(k3, (hidden, num_heads), hidden),
        "b2": uniform(k4, (num_heads,), hidden),
    }


def _fire_params(params: Mapping[str, ArrayLike]) -> dict[str, jax.Array]:
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping with keys {_FIRE_KEYS}, got {type(params)}")
    missing = [name for name in _FIRE_KEYS if name not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; it needs keys {_FIRE_KEYS}")
    p = {name: jnp.asarray(params[name], jnp.float32) for name in _FIRE_KEYS}
    for name in ("c", "L"):
        if p[name].ndim != 0:
            raise ValueError(f'params["{name}"] must be a scalar, got shape {p[name].shape}')
    if p["w2"].ndim != 2:
        raise ValueError(f'params["w2"] must have shape [hidden, H], got shape {p["w2"].shape}')
    hidden, heads = p["w2"].shape
    if p["w1"].shape not in ((1, hidden), (hidden,)):
        raise ValueError(
            f'params["w1"] must have shape [1, {hidden}] or [{hidden}], got {p["w1"].shape}'
        )
    if p["b1"].shape != (hidden,):
        raise ValueError(f'params["b1"] must have shape [{hidden}], got {p["b1"].shape}')
    if p["b2"].shape != (heads,):
        raise ValueError(f'params["b2"] must have shape [{heads}], got {p["b2"].shape}')
    p["w1"] = p["w1"].reshape(hidden)
    return p


def fire_bias(
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    params: Mapping[str, ArrayLike],
    *,
    causal: bool = True,
    kernel: bool = False,
) -> jax.Array:
    """FIRE: functional interpolation for relative positions (Li et al., arXiv 2310.04418).

    "Functional Interpolation for Relative Positions Improves Long Context Transformers"
    (ICLR 2024), final form of the FIRE bias:

      bias[:, i, j] = f_theta(psi(i - j) / psi(max(L, i))),  psi(x) = log(c x + 1),

    with f_theta an MLP 1 -> hidden -> H with ReLU, and c, L learned. Dividing by the query's
    own (log-)position keeps the MLP input in [0, 1] at any length (progressive interpolation);
    the threshold L keeps short prefixes from being stretched.

    What is implemented, confirmed against the PyTorch reference implementation that circulates
    with the paper (identical copies citing arXiv 2310.04418 in several public repositories,
    e.g. mcleish7/arithmetic `cramming/architectures/embeddings.py`): c and L are kept positive
    with absolute values, psi(x) = log(|c| x + 1) and the threshold is |L|; 1e-6 is added to
    the normaliser, so i = 0 (even with L -> 0) gives 0 / 1e-6 = 0 rather than NaN; the MLP is
    Linear(1, 32), ReLU, Linear(32, H). The formula was checked against a secondary write-up
    of the paper (which describes a deeper MLP for the paper's expressiveness proofs); the
    paper's own text and appendix could not be read here.

    `causal=True` uses max(i - j, 0): keys after the query (masked by causal attention) get
    f_theta(0), a finite value the caller must mask. `causal=False` uses |i - j| with the same
    normaliser psi(max(L, i)), which is what the reference code computes for every pair; keys
    more than max(L, i) ahead of the query then give MLP inputs above 1. The MLP runs on every
    (i, j) pair, so this builds a `[..., Lq, Lk, hidden]` intermediate.

    Args:
      q_positions: integer `[..., Lq]` query positions i.
      k_positions: integer `[..., Lk]` key positions j.
      params: mapping with "c" `[]`, "L" `[]`, "w1" `[1, hidden]` or `[hidden]`, "b1"
        `[hidden]`, "w2" `[hidden, H]`, "b2" `[H]` (see `fire_init`).
      causal: whether future keys are masked by the caller (see above).
      kernel: compute the MLP in `_feature_major_mlp`'s layout, the one the fused Pallas
        kernel lowers (Triton and Mosaic); equal up to float32 rounding, but many times slower
        under XLA, so the default (False) is a `[..., Lq, Lk, hidden]` einsum.

    Returns:
      float32 `[..., H, Lq, Lk]` bias.

    Raises:
      ValueError: on bad positions, or `params` missing a key or with inconsistent shapes.
    """
    q, k = _positions(q_positions, k_positions)
    p = _fire_params(params)
    c, threshold = jnp.abs(p["c"]), jnp.abs(p["L"])

    distance = -_key_minus_query(q, k)  # i - j
    distance = jnp.maximum(distance, 0) if causal else jnp.abs(distance)
    numerator = jnp.log1p(c * distance.astype(jnp.float32))  # [..., Lq, Lk]
    normaliser = jnp.log1p(c * jnp.maximum(threshold, q.astype(jnp.float32))) + _FIRE_EPS
    x = numerator / normaliser[..., :, None]

    if kernel:
        return _feature_major_mlp(x, p["w1"], p["b1"], [], jax.nn.relu, p["w2"], p["b2"])
    x = x[..., None]  # [..., Lq, Lk, 1]
    hidden = jax.nn.relu(x * _trailing(p["w1"], x.ndim) + _trailing(p["b1"], x.ndim))
    out = jnp.einsum("...ijf,fh->...hij", hidden, p["w2"], precision=_HIGHEST)
    return out + _per_head(p["b2"], q.ndim - 1)


# ----------------------------------------------------------------------------- Shaw et al.


def shaw_relative_index(
    q_positions: ArrayLike, k_positions: ArrayLike, max_distance: int
) -> jax.Array:
    """Row of the Shaw et al. tables for each pair (arXiv 1803.02155, eqs. 3-4).

    index[i, j] = clip(k_j - q_i, -K, K) + K, in [0, 2K], with K = `max_distance`.

    Args:
      q_positions: integer `[..., Lq]` query positions.
      k_positions: integer `[..., Lk]` key positions.
      max_distance: clipping distance K >= 0.

    Returns:
      int32 `[..., Lq, Lk]` indices into a `[2K + 1, ...]` table.

    Raises:
      ValueError: on bad positions or a negative or non-integer `max_distance`.
    """
    max_distance = _checks.positive_int("max_distance", max_distance, minimum=0)
    q, k = _positions(q_positions, k_positions)
    relative = jnp.clip(_key_minus_query(q, k), -max_distance, max_distance)
    return (relative + max_distance).astype(jnp.int32)


def _shaw_table(table: ArrayLike, max_distance: int, depth: int | None) -> jax.Array:
    table = jnp.asarray(table, jnp.float32)
    rows = 2 * max_distance + 1
    if table.ndim != 2 or table.shape[0] != rows or (depth is not None and table.shape[1] != depth):
        want = f"[{rows}, {depth if depth is not None else 'D'}]"
        raise ValueError(
            f"table must have shape [2 * max_distance + 1, D] = {want}, got {table.shape}"
        )
    return table


# Below this many elements (rows, for `_shared_rows`) an int32 index addresses every element
# (row) of a `[..., 2K + 1]` (`[Lq * (2K + 1), N]`) array.
_FLAT_INDEX_LIMIT = 2**31 - 1


def _flat_rows(index: jax.Array, rows: int) -> jax.Array:
    """`[N]` int32 positions in a row-major `[..., rows]` array of the entries of `index`
    `[..., n]` (each in [0, rows)): entry (..., t) of row r is r * rows + index[..., t].

    XLA:CPU's gather and scatter-add cost much less with one scalar index per element than
    with a tuple of every axis's (`take_along_axis`), which `shaw_logits` and `shaw_values`
    would otherwise build: `python train/bench.py train --pe none,shaw --rounds 5 --steps 10`
    gave Shaw's step 209.1 ms before (1.41x none) and 201.8 ms after (1.37x), at 1c3add4.
    """
    lead = index.shape[:-1]
    base = jnp.arange(math.prod(lead), dtype=jnp.int32).reshape(lead + (1,)) * rows
    return (base + index).reshape(-1)


def _take_along_last(table: jax.Array, index: jax.Array) -> jax.Array:
    """`jnp.take_along_axis(table, index, axis=-1)` for `index` in [0, table.shape[-1]) with
    `table`'s leading shape, by one int32 index per element into the flattened table
    (`_flat_rows`) while that fits int32. In bounds by the caller's construction."""
    if table.size > _FLAT_INDEX_LIMIT:
        return jnp.take_along_axis(table, index, axis=-1)
    flat = _flat_rows(index, table.shape[-1])
    return table.reshape(-1).at[flat].get(mode="promise_in_bounds").reshape(index.shape)


def _batch_shares(index: jax.Array, rows: int) -> bool:
    """Whether `index` `[..., Lq, Lk]` serves the whole batch (its batch axes are all 1) and
    its `[Lq * rows, N]` rows fit an int32 index: then `_shared_rows` applies."""
    return math.prod(index.shape[:-2]) == 1 and index.shape[-2] * rows <= _FLAT_INDEX_LIMIT


def _shared_rows(index: jax.Array, rows: int) -> jax.Array:
    """`[Lq * Lk]` int32 rows of a `[Lq * rows, N]` array for an index `[1, ..., 1, Lq, Lk]`
    shared by the whole batch: pair (i, j) reads row i * rows + index[i, j].

    With the batch and heads as the minor axis, XLA:CPU's gather and segment sum move rows of
    N = batch x heads contiguous values per index, not one value per index (`_flat_rows`). The
    transposes to and from that layout cost back part of the gain: `python train/bench.py train
    --pe none,shaw --rounds 7 --steps 10` gave Shaw's step 199.8 and 203.1 ms before (1.32x to
    1.33x none), 190.0 ms (1.27x) and 229.6 ms (a run with one 380 ms round) after, at 2d2c249
    (README, "Shaw, since").
    """
    lq, lk = index.shape[-2:]
    base = jnp.arange(lq, dtype=jnp.int32)[:, None] * rows
    return (base + index.reshape(lq, lk)).reshape(-1)


def _check_length(name: str, got: int, positions_name: str, want: int) -> None:
    if got != want:
        raise ValueError(f"{name} has length {got} but {positions_name} has length {want}")


def shaw_logits(
    q: ArrayLike,
    table: ArrayLike,
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    max_distance: int,
) -> jax.Array:
    """Shaw et al. relative key term of the logits (arXiv 1803.02155, eq. 4).

    logits[h, i, j] = q_i^h . a^K_{clip(j - i, -K, K)}

    computed as q @ table^T (`[..., H, Lq, 2K+1]`) followed by a gather along the last axis (one
    scalar index per element, `_flat_rows`, or per batch x heads row when the batch shares its
    positions, `_shared_rows`), so no `[Lq, Lk, D]` tensor is built. The 1/sqrt(D)
    of eq. 4 is not applied: the caller adds this to q.k and scales the sum. The table is shared
    across heads, as in the paper.

    Args:
      q: `[..., Lq, H, D]` queries (already projected).
      table: `[2K + 1, D]` learned a^K vectors; row r is relative distance r - K.
      q_positions: integer `[..., Lq]` query positions.
      k_positions: integer `[..., Lk]` key positions.
      max_distance: clipping distance K >= 0.

    Returns:
      float32 `[..., H, Lq, Lk]`.

    Raises:
      ValueError: on bad positions, negative `max_distance`, `q` of rank < 3 or with a length
        other than `q_positions`', a `table` that is not `[2K + 1, D]`, or batch axes that do
        not broadcast.
    """
    index = shaw_relative_index(q_positions, k_positions, max_distance)  # [*B, Lq, Lk]
    q = jnp.asarray(q, jnp.float32)
    _checks.min_rank("q", q, 3, "[..., Lq, H, D]")
    _check_length("q", q.shape[-3], "q_positions", index.shape[-2])
    table = _shaw_table(table, max_distance, q.shape[-1])
    batch = _checks.broadcastable(("q", "positions"), (q.shape[:-3], index.shape[:-2]))
    heads, lq, lk = q.shape[-2], index.shape[-2], index.shape[-1]

    rows = table.shape[0]
    if _batch_shares(index, rows):
        # One index for the whole batch: gather rows of batch x heads values (`_shared_rows`).
        n = math.prod(batch)
        q = jnp.broadcast_to(q, batch + q.shape[-3:]).reshape((n,) + q.shape[-3:])
        per_row = jnp.einsum("bihd,rd->irbh", q, table, precision=_HIGHEST)  # [Lq, 2K+1, B, H]
        flat = _shared_rows(index, rows)
        out = per_row.reshape(lq * rows, n * heads).at[flat].get(mode="promise_in_bounds")
        out = out.reshape(lq, lk, n, heads).transpose(2, 3, 0, 1)  # [B, H, Lq, Lk]
        return out.reshape(batch + (heads, lq, lk))
    per_row = jnp.einsum("...ihd,rd->...hir", q, table, precision=_HIGHEST)  # [..., H, Lq, 2K+1]
    per_row = jnp.broadcast_to(per_row, batch + (heads, lq, rows))
    index = jnp.broadcast_to(index[..., None, :, :], batch + (heads, lq, lk))
    # In bounds by construction: every index lies in [0, 2K] (`shaw_relative_index`).
    return _take_along_last(per_row, index)


def shaw_values(
    weights: ArrayLike,
    table: ArrayLike,
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    max_distance: int,
) -> jax.Array:
    """Shaw et al. relative value term (arXiv 1803.02155, eq. 3).

    out[i, h] = sum_j weights[h, i, j] a^V_{clip(j - i, -K, K)}

    computed by summing each query's weights into its 2K + 1 distance rows (one segment sum over
    every query, `_flat_rows`, or over batch x heads rows when the batch shares its positions,
    `_shared_rows`) and multiplying by the table, so no `[Lq, Lk, D]` tensor is built. The caller
    adds this to weights @ V.

    Args:
      weights: `[..., H, Lq, Lk]` attention weights (after softmax).
      table: `[2K + 1, D]` learned a^V vectors; row r is relative distance r - K.
      q_positions: integer `[..., Lq]` query positions.
      k_positions: integer `[..., Lk]` key positions.
      max_distance: clipping distance K >= 0.

    Returns:
      float32 `[..., Lq, H, D]`, the layout of the attention output before the heads merge.

    Raises:
      ValueError: on bad positions, negative `max_distance`, `weights` not `[..., H, Lq, Lk]`
        with the positions' lengths, a `table` that is not `[2K + 1, D]`, or batch axes that do
        not broadcast.
    """
    index = shaw_relative_index(q_positions, k_positions, max_distance)  # [*B, Lq, Lk]
    weights = jnp.asarray(weights, jnp.float32)
    _checks.min_rank("weights", weights, 3, "[..., H, Lq, Lk]")
    _check_length("weights", weights.shape[-2], "q_positions", index.shape[-2])
    _check_length("weights", weights.shape[-1], "k_positions", index.shape[-1])
    table = _shaw_table(table, max_distance, None)
    batch = _checks.broadcastable(("weights", "positions"), (weights.shape[:-3], index.shape[:-2]))
    heads, lq, lk = weights.shape[-3:]
    rows = table.shape[0]

    weights = jnp.broadcast_to(weights, batch + (heads, lq, lk))
    if _batch_shares(index, rows):
        # One index for the whole batch: sum rows of batch x heads weights (`_shared_rows`).
        n = math.prod(batch)
        columns = weights.reshape(n, heads, lq, lk).transpose(2, 3, 0, 1)  # [Lq, Lk, B, H]
        per_row = jax.ops.segment_sum(
            columns.reshape(lq * lk, n * heads), _shared_rows(index, rows), num_segments=lq * rows
        ).reshape(lq, rows, n, heads)  # [Lq, 2K+1, B, H]
        out = jnp.einsum("irbh,rd->bihd", per_row, table, precision=_HIGHEST)
        return out.reshape(batch + (lq, heads, table.shape[1]))
    weights = weights.reshape(-1, lk)
    index = jnp.broadcast_to(index[..., None, :, :], batch + (heads, lq, lk)).reshape(-1, lk)
    queries = weights.shape[0]
    if queries * rows <= _FLAT_INDEX_LIMIT:
        segments = _flat_rows(index, rows)  # query n's distance r is segment n * (2K + 1) + r
        per_row = jax.ops.segment_sum(weights.reshape(-1), segments, num_segments=queries * rows)
        per_row = per_row.reshape(queries, rows)  # [N, 2K+1]
    else:

        def one_query(w: jax.Array, idx: jax.Array) -> jax.Array:  # [Lk], [Lk] -> [2K+1]
            return jax.ops.segment_sum(w, idx, num_segments=rows)

        per_row = jax.vmap(one_query)(weights, index)  # [N, 2K+1]
    out = jnp.matmul(per_row, table, precision=_HIGHEST).reshape(batch + (heads, lq, -1))
    return jnp.swapaxes(out, -3, -2)  # [..., H, Lq, D] -> [..., Lq, H, D]


# ----------------------------------------------------------------------------- Transformer-XL


def transformer_xl_bias(
    q: ArrayLike,
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    w_r: ArrayLike,
    v: ArrayLike,
    *,
    base: float = 10000.0,
) -> jax.Array:
    """Transformer-XL position terms (b) + (d) (Dai et al., arXiv 1901.02860, Section 3.3).

    bias[h, i, j] = (q_i^h + v^h) . (W_{k,R} R_{i-j})^h

    with R_t = concat[sin(t w), cos(t w)], w = 1 / base^(arange(0, d, 2) / d), the layout of the
    authors' `PositionalEmbedding`, and W_{k,R} = `w_r` `[d, H, D]`. Term (c), u . k_j, only
    involves content: the caller adds u to q for the content logit (q_i + u) . k_j.

    Rather than projecting R for every distance, sin/cos of (i - j) are expanded into products
    of per-query and per-key sinusoids (an identity, not an approximation), so the bias is two
    small projections and one contraction `[..., Lq, H, d] x [..., Lk, d]`. This holds for any
    integer positions (packed, padded or randomised, not only contiguous blocks, which
    Transformer-XL's relative-shift trick needs) and builds no `[Lq, Lk, ...]` tensor besides the
    output; it costs H * d multiply-adds per (i, j) pair, against about 2 * H * D for the shift.

    Args:
      q: `[..., Lq, H, D]` queries (already projected).
      q_positions: integer `[..., Lq]` query positions i.
      k_positions: integer `[..., Lk]` key positions j.
      w_r: `[d, H, D]` projection W_{k,R} of the `d`-dimensional (even) sinusoid.
      v: `[H, D]` learned global bias v.
      base: frequency base (> 0).

    Returns:
      float32 `[..., H, Lq, Lk]`.

    Raises:
      ValueError: on bad positions, `q` of rank < 3 or with a length other than
        `q_positions`', `w_r` not `[d, H, D]` with even d, `v` not `[H, D]`, batch axes that do
        not broadcast, or `base` <= 0.
    """
    qp, kp = _positions(q_positions, k_positions)
    q = jnp.asarray(q, jnp.float32)
    w_r = jnp.asarray(w_r, jnp.float32)
    v = jnp.asarray(v, jnp.float32)
    base = _checks.positive_float("base", base)
    _checks.min_rank("q", q, 3, "[..., Lq, H, D]")
    _check_length("q", q.shape[-3], "q_positions", qp.shape[-1])
    heads, depth = q.shape[-2:]
    if w_r.ndim != 3 or w_r.shape[1:] != (heads, depth) or w_r.shape[0] % 2:
        raise ValueError(
            f"w_r must have shape [d, H, D] = [d, {heads}, {depth}] with d even, got {w_r.shape}"
        )
    if v.shape != (heads, depth):
        raise ValueError(f"v must have shape [H, D] = [{heads}, {depth}], got {v.shape}")
    batch = _checks.broadcastable(("q", "positions"), (q.shape[:-3], qp.shape[:-1]))
    q = jnp.broadcast_to(q, batch + q.shape[-3:])
    # The positions keep their own batch axes (1 when the batch shares them): the key side of
    # the product is then one [Lk, d] table, and the contraction one matrix product.
    shared = _checks.broadcastable(("q_positions", "k_positions"), (qp.shape[:-1], kp.shape[:-1]))
    qp = jnp.broadcast_to(qp, shared + qp.shape[-1:])
    kp = jnp.broadcast_to(kp, shared + kp.shape[-1:])

    d = w_r.shape[0]
    inv_freq = jnp.asarray(1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d), jnp.float32)

    qv = q + v.reshape((1,) * (q.ndim - 2) + (heads, depth))
    # a[..., h, i, f]: (q_i + v)^h . W^h[f], one product for the sin rows (f < d/2) and the cos
    # rows of the sinusoid, laid out heads-first as the contraction below reads it.
    a = jnp.einsum("...ihe,fhe->...hif", qv, w_r, precision=_HIGHEST)
    a_sin, a_cos = a[..., : d // 2], a[..., d // 2 :]

    qf, kf = _anchored(qp, kp)
    angle_q = (qf[..., None] * _trailing(inv_freq, qf.ndim + 1))[..., None, :, :]  # [.., 1, Lq, F]
    angle_k = kf[..., None] * _trailing(inv_freq, kf.ndim + 1)  # [..., Lk, F]
    angle_q = angle_q.reshape((1,) * (a.ndim - angle_q.ndim) + angle_q.shape)
    sin_q, cos_q = jnp.sin(angle_q), jnp.cos(angle_q)
    # sin(w(i - j)) = sin wi cos wj - cos wi sin wj;  cos(w(i - j)) = cos wi cos wj + sin wi sin wj
    per_query = jnp.concatenate(
        [a_sin * sin_q + a_cos * cos_q, a_cos * sin_q - a_sin * cos_q], axis=-1
    )  # [..., H, Lq, d]: coefficients of cos(w j) and sin(w j)
    per_key = jnp.concatenate([jnp.cos(angle_k), jnp.sin(angle_k)], axis=-1)  # [..., Lk, d]
    if math.prod(shared) == 1:
        per_key = per_key.reshape(per_key.shape[-2:])
        return jnp.einsum("...hif,jf->...hij", per_query, per_key, precision=_HIGHEST)
    per_key = jnp.broadcast_to(per_key, batch + per_key.shape[-2:])
    return jnp.einsum("...hif,...jf->...hij", per_query, per_key, precision=_HIGHEST)


# ------------------------------------------------------------------ dynamic position bias


def dpb_init(key: jax.Array, num_heads: int, *, hidden: int = 32) -> dict[str, jax.Array]:
    """Initial parameters of `dpb_bias`: an MLP 1 -> hidden -> hidden -> H.

    PyTorch's default `nn.Linear` initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in
    x-transformers' `DynamicPositionBias` (depth 2).

    Returns:
      dict with float32 "w1" `[1, hidden]`, "b1" `[hidden]`, "w2" `[hidden, hidden]`,
      "b2" `[hidden]`, "w3" `[hidden, H]`, "b3" `[H]`.

    Raises:
      ValueError: if `num_heads` or `hidden` < 1.
    """
    num_heads = _checks.positive_int("num_heads", num_heads)
    hidden = _checks.positive_int("hidden", hidden)
    shapes = {
        "w1": ((1, hidden), 1),
        "b1": ((hidden,), 1),
        "w2": ((hidden, hidden), hidden),
        "b2": ((hidden,), hidden),
        "w3": ((hidden, num_heads), hidden),
        "b3": ((num_heads,), hidden),
    }
    keys = jax.random.split(key, len(shapes))
    return {
        name: jax.random.uniform(k, shape, jnp.float32, -(fan_in**-0.5), fan_in**-0.5)
        for k, (name, (shape, fan_in)) in zip(keys, shapes.items(), strict=True)
    }


_DPB_KEYS = ("w1", "b1", "w2", "b2", "w3", "b3")


def dpb_bias(
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    params: Mapping[str, ArrayLike],
    *,
    kernel: bool = False,
) -> jax.Array:
    """Dynamic position bias: an MLP from the relative distance to one bias per head.

    Wang et al. 2021 (CrossFormer, arXiv 2108.00154, Section 3.3) feed the relative distance
    to an MLP; x-transformers' `DynamicPositionBias` (used for length extrapolation) does the
    same for text with SiLU activations and, optionally, a signed log distance, which is the
    form used here so that long distances stay in the MLP's range:

      bias[:, i, j] = MLP(sign(i - j) log(1 + |i - j|)),  MLP: 1 -> hidden -> hidden -> H (SiLU)

    The MLP runs on every (i, j) pair of the block (a `[..., Lq, Lk, hidden]` intermediate),
    which blocked attention keeps small.

    Args:
      q_positions: integer `[..., Lq]`.
      k_positions: integer `[..., Lk]`.
      params: mapping with the keys of `dpb_init`.
      kernel: compute the MLP in `_feature_major_mlp`'s layout, the one the fused Pallas
        kernel lowers (Triton and Mosaic); equal up to float32 rounding, but many times slower
        under XLA, so the default (False) is a `[..., Lq, Lk, hidden]` einsum.

    Returns:
      float32 `[..., H, Lq, Lk]`.

    Raises:
      ValueError: bad positions, or `params` missing a key or with inconsistent shapes.
    """
    q, k = _positions(q_positions, k_positions)
    if not isinstance(params, Mapping) or any(name not in params for name in _DPB_KEYS):
        raise ValueError(f"params must be a mapping with keys {_DPB_KEYS}")
    p = {name: jnp.asarray(params[name], jnp.float32) for name in _DPB_KEYS}
    hidden, heads = p["w3"].shape if p["w3"].ndim == 2 else (None, None)
    want = {
        "w1": (1, hidden),
        "b1": (hidden,),
        "w2": (hidden, hidden),
        "b2": (hidden,),
        "b3": (heads,),
    }
    for name, shape in want.items():
        if hidden is None or p[name].shape != shape:
            raise ValueError(f'params["{name}"] must have shape {shape}, got {p[name].shape}')
    distance = (-_key_minus_query(q, k)).astype(jnp.float32)  # i - j
    # sign(d) log(1 + |d|) by a select: Mosaic's `sign` asks the device for its TPU generation,
    # so it cannot be compiled ahead of time.
    magnitude = jnp.log1p(jnp.abs(distance))
    x = jnp.where(distance < 0, -magnitude, magnitude)  # [..., Lq, Lk]
    if kernel:
        return _feature_major_mlp(
            x, p["w1"], p["b1"], [(jax.nn.silu, p["w2"], p["b2"])], jax.nn.silu, p["w3"], p["b3"]
        )
    x = x[..., None]  # [..., Lq, Lk, 1]
    h = jax.nn.silu(x * _trailing(p["w1"][0], x.ndim) + _trailing(p["b1"], x.ndim))
    h = jax.nn.silu(
        jnp.einsum("...f,fg->...g", h, p["w2"], precision=_HIGHEST) + _trailing(p["b2"], x.ndim)
    )
    out = jnp.einsum("...ijf,fh->...hij", h, p["w3"], precision=_HIGHEST)
    return out + _per_head(p["b3"], q.ndim - 1)
