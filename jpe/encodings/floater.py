"""FLOATER: positions read off the trajectory of a learned ODE.

Liu, Yu, Dhillon and Hsieh, "Learning to Encode Position for Transformer with Continuous
Dynamical Model", ICML 2020 (arXiv 2003.09229; reference code xuanqing94/FLOATER). The encoding
of position i is p(t_i), t_i = i * delta, on one trajectory of

    p(t) = p(0) + integral_0^t h(tau, p(tau); theta) dtau                      (paper, Eq. 8)

where h is a small network shared by every block (`floater_dynamics`). Each block n has its own
initial value p^(n)(0) (Eq. 10). In the trained form (sec. 3.3, Eqs. 12-13) the trajectory is
not added to the input but gives position-dependent biases of each block's query, key and
value projections (`floater_qkv_bias`); with h = 0 these are the constant biases of a plain
Transformer, which is how a FLOATER model is warm-started from one.

The functions are pure (no Flax): `floater_init` makes the parameters of h,
`floater_encoding` solves for one initial vector, `floater_qkv_bias` for every block's q/k/v
biases at once. The ODE is solved with diffrax. Whatever the batch, positions are sorted and
deduplicated, and one solve (one forward in time, one backward for negative positions) serves
them all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

if TYPE_CHECKING:
    import diffrax

from jpe.encodings import _checks

__all__ = [
    "floater_encoding",
    "floater_dynamics",
    "floater_init",
    "floater_qkv_bias",
]

FLOATER_SOLVERS = ("rk4", "midpoint", "tsit5")
_FIXED_STEP = ("rk4", "midpoint")
_PARAM_KEYS = ("w_in", "b_in", "w_out", "b_out")

# diffrax's default budget; an adaptive solve gets this on top of the fixed-step count.
_ADAPTIVE_EXTRA_STEPS = 4096

# h is a pair of small matmuls whose float32 result should not depend on the backend's default
# (TF32 on recent GPUs, bfloat16 passes on TPU): the error would compound along the trajectory.
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- the solvers


def _diffrax():
    """diffrax, imported on the first solve rather than with `jpe`: loading it (with equinox)
    took 0.6 of the 2.1 s of `python -X importtime -c "import jpe"`, and only FLOATER uses it."""
    with jax.ensure_compile_time_eval():  # a first import inside `jit` traces no constant
        import diffrax

    return diffrax


@functools.cache
def _rk4() -> type:
    diffrax = _diffrax()

    class _RK4(diffrax.AbstractERK):
        """The classical fourth-order Runge-Kutta method, the paper's solver for translation.

        diffrax ships no class by this name, so it is given here by its Butcher tableau. It has no
        embedded error estimate and is used with constant steps only. Saved values come from
        diffrax's third-order Hermite interpolation, here evaluated at step ends (up to rounding):
        every t_i = i * delta is a whole number of steps of delta / steps_per_delta.
        """

        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]),
            b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            del terms
            return 4

    return _RK4


def _solver(name: str) -> diffrax.AbstractSolver:
    diffrax = _diffrax()
    return {"rk4": _rk4(), "midpoint": diffrax.Midpoint, "tsit5": diffrax.Tsit5}[name]()


# ----------------------------------------------------------------------------- parameters


def floater_init(
    key: jax.Array, dim: int, *, hidden: int | None = None, zero_output: bool = False
) -> dict[str, jax.Array]:
    """Initial parameters of FLOATER's dynamics h (`floater_dynamics`).

    h is `Linear(dim + 1 -> hidden) -> ReLU -> Linear(hidden + 1 -> dim)` with the time t
    appended to each layer's input, as in the reference code (`flow_func_linear`, with
    hidden = dim). Weights are Glorot (Xavier) normal, std = sqrt(2 / (fan_in + fan_out)),
    biases zero, as there.

    With `zero_output=True` the last layer's weight is zero too, so h = 0 and the trajectory is
    constant, p(t) = p(0) (to a few float32 ulps, from the interpolation to the save times). In
    the bias form (`floater_qkv_bias`, sec. 3.3) a model so initialised computes what the
    plain Transformer whose biases it starts from computes; training moves it away from there.

    Example:
      >>> params = floater_init(jax.random.key(0), 8)
      >>> params["w_in"].shape, params["w_out"].shape
      ((9, 8), (9, 8))

    Args:
      key: PRNG key.
      dim: the size D of a position vector, >= 1.
      hidden: the width of the hidden layer, >= 1; default `dim`.
      zero_output: initialise the last layer to zero, so that h = 0.

    Returns:
      dict of float32 arrays: "w_in" `[dim + 1, hidden]` (its last row multiplies t), "b_in"
      `[hidden]`, "w_out" `[hidden + 1, dim]` (last row multiplies t), "b_out" `[dim]`.

    Raises:
      ValueError: if `dim` or `hidden` is not an integer >= 1.
    """
    dim = _checks.positive_int("dim", dim)
    hidden = dim if hidden is None else _checks.positive_int("hidden", hidden)
    k_in, k_out = jax.random.split(key)

    def glorot(k: jax.Array, shape: tuple[int, int]) -> jax.Array:
        std = math.sqrt(2.0 / (shape[0] + shape[1]))
        return std * jax.random.normal(k, shape, jnp.float32)

    w_out = glorot(k_out, (hidden + 1, dim))
    return {
        "w_in": glorot(k_in, (dim + 1, hidden)),
        "b_in": jnp.zeros((hidden,), jnp.float32),
        "w_out": jnp.zeros_like(w_out) if zero_output else w_out,
        "b_out": jnp.zeros((dim,), jnp.float32),
    }


def _params(params: Mapping[str, ArrayLike], dim: int) -> dict[str, jax.Array]:
    """Checks that `params` holds h's four arrays, shaped for vectors of size `dim`."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping with keys {_PARAM_KEYS}, got {type(params)}")
    missing = [name for name in _PARAM_KEYS if name not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; it needs keys {_PARAM_KEYS}")
    arrays = {name: jnp.asarray(params[name]) for name in _PARAM_KEYS}
    for name, array in arrays.items():
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"params[{name!r}] must be a floating array, got {array.dtype}")
    if arrays["b_in"].ndim != 1:
        raise ValueError(f"params['b_in'] must have shape [hidden], got {arrays['b_in'].shape}")
    hidden = arrays["b_in"].shape[0]
    expected = {
        "w_in": ((dim + 1, hidden), "[D + 1, hidden]"),
        "w_out": ((hidden + 1, dim), "[hidden + 1, D]"),
        "b_out": ((dim,), "[D]"),
    }
    for name, (shape, what) in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(
                f"params[{name!r}] must have shape {what} = {shape}, with D = {dim} the size of "
                f"the position vector and hidden = len(params['b_in']); got {arrays[name].shape}"
            )
    return arrays


# ----------------------------------------------------------------------------- dynamics


def _h(params: Mapping[str, jax.Array], t: jax.Array, p: jax.Array) -> jax.Array:
    """h(t, p) for one vector p `[D]`: the time is the last input feature of each layer."""
    hidden = jax.nn.relu(
        jnp.dot(p, params["w_in"][:-1], precision=_HIGHEST)
        + t * params["w_in"][-1]
        + params["b_in"]
    )
    return (
        jnp.dot(hidden, params["w_out"][:-1], precision=_HIGHEST)
        + t * params["w_out"][-1]
        + params["b_out"]
    )


def _field(params: Mapping[str, jax.Array], t: jax.Array, p: jax.Array) -> jax.Array:
    """h lifted from one vector to `[..., D]`; every vector sees the same t."""
    return jnp.vectorize(lambda v: _h(params, t, v), signature="(d)->(d)")(p)


def floater_dynamics(params: Mapping[str, ArrayLike], t: ArrayLike, p: ArrayLike) -> jax.Array:
    """FLOATER's dynamics h(t, p; theta), the integrand of Eq. 8.

        h(t, p) = W_out [relu(W_in [p; t] + b_in); t] + b_out

    where [x; t] appends the time to a layer's input (reference code, `Linear_t`). Written for
    one vector and lifted over leading axes, so `p` may hold several independent states
    (e.g. the q, k and v biases of every block) that share h and t.

    Args:
      params: from `floater_init`: "w_in" `[D + 1, hidden]`, "b_in" `[hidden]`,
        "w_out" `[hidden + 1, D]`, "b_out" `[D]`.
      t: the time, a real scalar.
      p: the state, `[..., D]`.

    Returns:
      `[..., D]`, in the promoted dtype of `params`, `t` and `p`.

    Raises:
      ValueError: if `p` is a scalar, `t` is not a scalar, or `params` does not fit `p`.
    """
    p = jnp.asarray(p)
    _checks.min_rank("p", p, 1, "[..., D]")
    if jnp.ndim(t) != 0:
        raise ValueError(f"t must be a scalar, got shape {jnp.shape(t)}")
    return _field(_params(params, p.shape[-1]), jnp.asarray(t), p)


def _directed(s, y, args):
    # sign = +1: the trajectory itself. sign = -1: q(s) = p(-s), which solves
    # q'(s) = -h(-s, q(s)): the past of the trajectory, also integrated forward in s, so that
    # one compiled solve serves both directions (the sign is an array argument).
    params, sign = args
    return sign * _field(params, sign * s, y)


@functools.cache
def _term():
    return _diffrax().ODETerm(_directed)


# ----------------------------------------------------------------------------- the solve


def _position_range(position_range) -> tuple[int, int]:
    what = "position_range must be None or a pair of integers (lowest, highest), lowest <= highest"
    if not isinstance(position_range, Sequence) or len(position_range) != 2:
        raise ValueError(f"{what}; got {position_range!r}")
    low = _checks.positive_int("position_range[0]", position_range[0], minimum=-(2**31))
    high = _checks.positive_int("position_range[1]", position_range[1], minimum=-(2**31))
    if low > high:
        raise ValueError(f"{what}; got {position_range!r}")
    return low, high


def _concrete(positions) -> np.ndarray | None:
    """The values of `positions` if they are known now. Read before any `jnp` conversion: inside
    `jit`, `jnp.asarray` of a closed-over NumPy constant is already a tracer."""
    if isinstance(positions, jax.core.Tracer):
        return None
    try:
        return np.asarray(positions)
    except jax.errors.TracerArrayConversionError:  # e.g. a list holding tracers
        return None


def _step_budget(span: int, steps_per_delta: int, solver: str) -> int:
    """Steps to cover `span` positions, with a margin for the float rounding in diffrax's step
    count ceil(T / dt); an adaptive solve also gets diffrax's default 4096 on top."""
    steps = span * steps_per_delta
    steps += 2 + (steps >> 18)
    return steps if solver in _FIXED_STEP else steps + _ADAPTIVE_EXTRA_STEPS


def _bucket(n: int, minimum: int) -> int:
    """The power of two >= max(n, minimum): eager calls of similar sizes share one compiled
    solve (the number of save times and the step budget are static in it)."""
    return 1 << (max(n, minimum, 1) - 1).bit_length()


def _trajectory(
    positions,
    params,
    initial: jax.Array,
    *,
    delta,
    solver,
    steps_per_delta,
    rtol,
    atol,
    position_range,
    max_steps,
) -> jax.Array:
    """p(positions * delta) from p(0) = initial `[*S, D]`: `[..., L, *S, D]`. Checks arguments."""
    values = _concrete(positions)
    positions = _checks.integer_array("positions", positions)
    _checks.min_rank("positions", positions, 1, "[..., L]")
    delta = _checks.positive_float("delta", delta)
    _checks.one_of("solver", solver, FLOATER_SOLVERS)
    steps_per_delta = _checks.positive_int("steps_per_delta", steps_per_delta)
    rtol = _checks.positive_float("rtol", rtol)
    atol = _checks.positive_float("atol", atol)
    if max_steps is not None:
        max_steps = _checks.positive_int("max_steps", max_steps)
    if position_range is not None:
        position_range = _position_range(position_range)
    params = _params(params, initial.shape[-1])
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(initial, *params.values()))
    params = {name: array.astype(dtype) for name, array in params.items()}
    initial = initial.astype(dtype)

    out_shape = positions.shape + initial.shape
    flat = positions.reshape(-1)
    if flat.size == 0:
        return jnp.zeros(out_shape, dtype)

    if values is not None:
        lowest, highest = int(values.min()), int(values.max())
        if position_range is not None and not (
            position_range[0] <= lowest and highest <= position_range[1]
        ):
            raise ValueError(
                f"positions must lie in position_range {position_range}; got values in "
                f"[{lowest}, {highest}]"
            )
        # The sorted unique positions, padded by repeating the last (diffrax accepts repeated
        # save times), and where each flat position is among them.
        unique, inverse = np.unique(values.reshape(-1), return_inverse=True)
        unique = np.pad(unique, (0, _bucket(unique.size, 16) - unique.size), mode="edge")
        unique, inverse = jnp.asarray(unique), jnp.asarray(inverse.reshape(-1))
        in_range = None
        budget = _bucket(_step_budget(max(highest, -lowest), steps_per_delta, solver), 1024)
    elif position_range is None:
        raise ValueError(
            "positions are traced (inside jax.jit or jax.vmap), so how far the solve must run "
            "is unknown: pass position_range=(lowest, highest), static ints bounding every "
            "position (positions outside it give NaN)"
        )
    else:
        lowest, highest = position_range
        # jnp.unique needs a static size: it pads with the largest position, keeping the order.
        unique, inverse = jnp.unique(
            flat, return_inverse=True, size=flat.size, fill_value=jnp.max(flat)
        )
        inverse = inverse.reshape(-1)
        in_range = (unique >= lowest) & (unique <= highest)
        # Clipped, a solve never runs past the range its step budget was sized for.
        unique = jnp.clip(unique, lowest, highest)
        budget = _step_budget(max(highest, -lowest), steps_per_delta, solver)

    diffrax = _diffrax()
    controller = (
        diffrax.ConstantStepSize()
        if solver in _FIXED_STEP
        else diffrax.PIDController(rtol=jnp.asarray(rtol, dtype), atol=jnp.asarray(atol, dtype))
    )

    steps = max_steps or budget

    def solve(sign: jax.Array, ts: jax.Array) -> jax.Array:
        """The trajectory in direction `sign` at times `ts` (ascending, >= 0): `[U, *S, D]`."""
        solution = diffrax.diffeqsolve(
            _term(),
            _solver(solver),
            t0=jnp.zeros((), dtype),
            t1=ts[-1],
            dt0=jnp.asarray(delta / steps_per_delta, dtype),
            y0=initial,
            args=(params, sign),
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=controller,
            # A checkpoint per step of the budget: nothing is solved again in the reverse pass.
            # With fewer (diffrax's default among them) the gradient came out wrong for some
            # step counts (`tests/test_floater.py`, central differences over 75 RK4 steps):
            # in diffrax 0.7.2 with equinox 0.13.8 that happens, for some checkpoint counts,
            # when save times fall on step ends, as FLOATER's do (a plain ODE with 11 midpoint
            # steps saved at each end: wrong with 5 or 7 checkpoints, right with the others).
            adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=steps),
            max_steps=steps,
        )
        return solution.ys

    times = unique.astype(dtype) * jnp.asarray(delta, dtype)  # ascending
    mask_shape = unique.shape + (1,) * initial.ndim
    result = jnp.broadcast_to(initial, unique.shape + initial.shape)  # every position is 0
    if highest > 0:
        forward = solve(jnp.ones((), dtype), jnp.maximum(times, 0))
        result = jnp.where((unique > 0).reshape(mask_shape), forward, result)
    if lowest < 0:
        # The same compiled solve again (eagerly, a cache hit): only the sign differs.
        backward = solve(-jnp.ones((), dtype), jnp.maximum(-times, 0)[::-1])[::-1]
        result = jnp.where((unique < 0).reshape(mask_shape), backward, result)
    if in_range is not None:
        result = jnp.where(in_range.reshape(mask_shape), result, jnp.nan)
    return result[inverse].reshape(out_shape)


def floater_encoding(
    positions: ArrayLike,
    params: Mapping[str, ArrayLike],
    initial: ArrayLike,
    *,
    delta: float = 0.1,
    solver: str = "rk4",
    steps_per_delta: int = 5,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    position_range: tuple[int, int] | None = None,
    max_steps: int | None = None,
) -> jax.Array:
    """FLOATER's position encodings p(i * delta) (Liu et al. 2020, arXiv 2003.09229, Eq. 8).

        p(t) = p(0) + integral_0^t h(tau, p(tau); theta) dtau,   p(0) = initial,

    read at t_i = i * delta for every position i, with h = `floater_dynamics(params, ...)`.
    A negative position integrates backward from t = 0. One solve serves any batch: the
    positions are sorted and deduplicated, the trajectory is saved at those times
    (`diffrax.SaveAt(ts=...)`) and gathered back, so `[B, L]` costs no more than its largest
    and smallest positions.

    Solvers (`solver`):
      - "rk4": classical Runge-Kutta with constant step delta / steps_per_delta, the paper's
        choice for translation (step delta / 5).
      - "midpoint": the same with the midpoint method, the paper's choice for GLUE.
      - "tsit5": adaptive Tsitouras 5(4) with a PID step controller at `rtol`, `atol`; its
        first step is delta / steps_per_delta.
    The paper's text says delta = 0.1; its code uses 0.01.

    Step budget (diffrax's `max_steps`, static): with concrete positions it is sized from their
    span, steps_per_delta * max|i| (plus 4096 for "tsit5"), so any length works. Under
    `jax.jit` or `jax.vmap` the positions are traced and their span unknown, so
    `position_range=(lowest, highest)` (static ints) is required and sizes the budget; there a
    position outside the range gives NaN in its row (values cannot raise under jit), and with
    concrete positions it raises. An adaptive solve that needs more steps than its budget
    raises diffrax's runtime error ("maximum number of solver steps"); pass `max_steps`.
    No position ever silently gets the value of another.

    Gradients: reverse mode through `diffrax.RecursiveCheckpointAdjoint`, i.e. exact
    backpropagation through the solver's own steps, so the gradient is that of the computed
    encodings (what the loss saw). It keeps the state of every step of the budget (`max_steps`
    x the size of `initial`, in float32: 15 MiB for N * 3 * D = 384 floats and 10,237 steps,
    the lab's model at max_len 2048; 1.05 GiB for N = 12, D = 768), since with fewer
    checkpoints, diffrax's default among them, the gradient was wrong for some step counts
    (diffrax 0.7.2, equinox 0.13.8, with save times on step ends, which FLOATER's are).
    `BacksolveAdjoint` (the continuous adjoint of the paper's translation runs) would
    re-integrate the ReLU dynamics backward in time and give an approximate gradient whose
    error grows with the span.
    Forward mode (`jax.jvp`) is not supported.

    Example:
      >>> params = floater_init(jax.random.key(0), 4)
      >>> floater_encoding(jnp.arange(6), params, jnp.ones(4)).shape
      (6, 4)
      >>> encode = lambda pos: floater_encoding(pos, params, jnp.ones(4), position_range=(0, 511))
      >>> jax.jit(encode)(jnp.arange(512)).shape
      (512, 4)

    Args:
      positions: integer array `[..., L]`; any values, negative or far past training. The
        cost grows with max|i| (steps_per_delta steps per position), and the times i * delta
        are float32 (float64 in x64 mode), so positions are exact up to 2**24.
      params: h's parameters from `floater_init`; "w_in" `[D + 1, hidden]`, "b_in"
        `[hidden]`, "w_out" `[hidden + 1, D]`, "b_out" `[D]`.
      initial: p(0), `[D]`; in the paper each block has its own (Eq. 10).
      delta: the time between neighbouring positions, a finite number > 0.
      solver: one of "rk4", "midpoint", "tsit5".
      steps_per_delta: constant steps per delta (fixed-step solvers); first step and budget
        (adaptive), >= 1.
      rtol: relative tolerance of "tsit5", > 0.
      atol: absolute tolerance of "tsit5", > 0.
      position_range: `(lowest, highest)`, static bounds on the positions; required when the
        positions are traced, checked when they are concrete.
      max_steps: overrides the step budget of each solve (forward and backward), >= 1.

    Returns:
      `[..., L, D]`, float32 (float64 if `params` or `initial` are float64, x64 mode only).

    Raises:
      ValueError: if `positions` is not an integer array of rank >= 1 (or, concrete, lies
        outside `position_range`); `delta`, `rtol` or `atol` is not a finite number > 0;
        `solver` is unknown; `steps_per_delta` or `max_steps` is not an integer >= 1;
        `initial` is not `[D]`; `params` is not shaped for D; `position_range` is malformed,
        or None while the positions are traced.
    """
    initial = jnp.asarray(initial)
    if initial.ndim != 1 or initial.shape[0] == 0:
        raise ValueError(f"initial must have shape [D], D >= 1; got shape {initial.shape}")
    return _trajectory(
        positions,
        params,
        initial,
        delta=delta,
        solver=solver,
        steps_per_delta=steps_per_delta,
        rtol=rtol,
        atol=atol,
        position_range=position_range,
        max_steps=max_steps,
    )


def floater_qkv_bias(
    positions: ArrayLike,
    params: Mapping[str, ArrayLike],
    initial_bias: ArrayLike,
    *,
    delta: float = 0.1,
    solver: str = "rk4",
    steps_per_delta: int = 5,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    position_range: tuple[int, int] | None = None,
    max_steps: int | None = None,
) -> jax.Array:
    """Every block's position-dependent q, k and v biases (sec. 3.3, Eqs. 12-13).

    Adding an encoding p_i^(n) to block n's input x_i changes its query to
    W_q (x_i + p_i) + b_q = W_q x_i + b_q,i with the position-dependent bias
    b_q,i = W_q p_i + b_q, and the same for keys and values. FLOATER models these biases
    directly as trajectories of the shared dynamics h:

        b^(n)(t) = b^(n)(0) + integral_0^t h(tau, b^(n)(tau); theta) dtau,

    one for each of q, k, v in each block, all solved together (as the reference code does),
    with b^(n)(0) the block's ordinary projection bias. With h = 0 (`floater_init(...,
    zero_output=True)`) the biases do not depend on position and equal `initial_bias` (to a
    few float32 ulps), so a pretrained Transformer whose biases are copied into
    `initial_bias` computes what it computed before.

    Intended use (the NNX module): learn `params` and `initial_bias` `[N, 3, D]` (instead of
    the projection biases); for each call compute `bias = floater_qkv_bias(positions, ...)`,
    `[..., L, N, 3, D]`, and in block n add `bias[..., n, 0, :]` to q = x W_q,
    `bias[..., n, 1, :]` to k and `bias[..., n, 2, :]` to v, before splitting heads. D is the
    projection width (heads * head_dim). Under jit pass `position_range` (see `floater_encoding`).

    Args:
      positions: integer array `[..., L]`.
      params: h's parameters from `floater_init(key, D)`.
      initial_bias: `[N, 3, D]`, block n's q, k and v biases at t = 0.
      delta, solver, steps_per_delta, rtol, atol, position_range, max_steps: as in
        `floater_encoding`.

    Returns:
      `[..., L, N, 3, D]`, float32 (float64 with float64 arguments in x64 mode).

    Raises:
      ValueError: as `floater_encoding`, or if `initial_bias` is not `[N, 3, D]`.
    """
    initial_bias = jnp.asarray(initial_bias)
    if initial_bias.ndim != 3 or initial_bias.shape[1] != 3 or 0 in initial_bias.shape:
        raise ValueError(
            f"initial_bias must have shape [N, 3, D] (q, k, v of N blocks); got shape "
            f"{initial_bias.shape}"
        )
    return _trajectory(
        positions,
        params,
        initial_bias,
        delta=delta,
        solver=solver,
        steps_per_delta=steps_per_delta,
        rtol=rtol,
        atol=atol,
        position_range=position_range,
        max_steps=max_steps,
    )
