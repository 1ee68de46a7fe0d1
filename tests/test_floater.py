"""Tests for jpe.encodings.floater against a float64 SciPy solve of the same ODE.

The reference writes FLOATER's dynamics h (Liu et al. 2020, arXiv 2003.09229, Eq. 8, and the
reference code's `Linear_t` layers) in NumPy float64 and integrates it with
`scipy.integrate.solve_ivp` (DOP853, rtol 1e-10), independently of diffrax.
"""

import chex
import diffrax
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.integrate import solve_ivp

import jpe
from jpe.encodings.floater import (
    floater_dynamics,
    floater_encoding,
    floater_init,
    floater_qkv_bias,
)

DIM, HIDDEN = 6, 5  # different, so a transposed weight cannot pass
DELTA = 0.01  # the reference code's step between positions
PARAM_NAMES = ("w_in", "b_in", "w_out", "b_out")


def small_params(key=0, dim=DIM, hidden=HIDDEN, scale=0.3):
    """Glorot weights scaled down so the trajectory grows only to ~100 by t = 41."""
    params = floater_init(jax.random.key(key), dim, hidden=hidden)
    params["b_in"] = 0.1 * jax.random.normal(jax.random.key(key + 1), (hidden,))
    return {name: scale * value for name, value in params.items()}


PARAMS = small_params()
INITIAL = jnp.linspace(-1.0, 1.0, DIM)


# ---------------------------------------------------------------- reference (float64 NumPy)


def ref_h(params, t, p):
    """h(t, p) = W_out [relu(W_in [p; t] + b_in); t] + b_out, time appended to each input."""
    w_in, b_in, w_out, b_out = (np.asarray(params[k], np.float64) for k in PARAM_NAMES)
    hidden = np.maximum(np.append(p, t) @ w_in + b_in, 0.0)
    return np.append(hidden, t) @ w_out + b_out


def ref_floater(positions, params, initial, delta):
    """p(i * delta) for every position i, integrating forward and backward from t = 0."""
    positions = np.asarray(positions)
    initial = np.asarray(initial, np.float64)
    out = np.empty(positions.shape + initial.shape)
    for sign in (1, -1):
        side = positions * sign > 0
        if not side.any():
            continue
        times = np.unique(positions[side]) * delta
        solution = solve_ivp(
            lambda t, p: ref_h(params, t, p),
            (0.0, times[-1] if sign > 0 else times[0]),
            initial,
            method="DOP853",
            t_eval=times if sign > 0 else times[::-1],
            rtol=1e-10,
            atol=1e-12,
        )
        assert solution.success
        values = dict(zip(np.round(solution.t / delta).astype(int), solution.y.T, strict=True))
        for index in zip(*np.nonzero(side), strict=True):
            out[index] = values[positions[index]]
    out[positions == 0] = initial
    return out


def assert_relative_close(actual, expected, rtol):
    """Every position's vector is within rtol of the reference, relative to its norm."""
    scale = np.linalg.norm(expected, axis=-1, keepdims=True)
    chex.assert_trees_all_close(np.asarray(actual) / scale, expected / scale, atol=rtol, rtol=0)


# ---------------------------------------------------------------- the solution


@pytest.mark.parametrize(
    "solver, options",
    [
        ("rk4", {}),
        # float32 allows little below 1e-7; at the default 1e-6 the error reaches ~1e-4 here.
        ("tsit5", {"rtol": 1e-7, "atol": 1e-7}),
    ],
)
def test_matches_float64_reference_up_to_4096(solver, options):
    # 4096 positions at step delta / 5 is 20480 steps, far past diffrax's default budget.
    positions = np.arange(-40, 4097)
    actual = floater_encoding(positions, PARAMS, INITIAL, delta=DELTA, solver=solver, **options)
    chex.assert_shape(actual, (positions.size, DIM))
    assert actual.dtype == jnp.float32
    expected = ref_floater(positions, PARAMS, INITIAL, DELTA)
    assert np.abs(expected).max() > 10 * np.abs(expected[40]).max()  # it moves a lot
    assert_relative_close(actual, expected, 1e-5)


def test_rk4_is_fourth_order():
    # At step delta = 0.5 the error shows the order: RK4 is far closer than the midpoint rule.
    positions = np.arange(0, 40, 3)
    expected = ref_floater(positions, PARAMS, INITIAL, 0.5)
    errors = {
        solver: np.abs(
            floater_encoding(
                positions, PARAMS, INITIAL, delta=0.5, steps_per_delta=1, solver=solver
            )
            - expected
        ).max()
        for solver in ("rk4", "midpoint")
    }
    assert errors["rk4"] < 1e-4 * np.abs(expected).max()
    assert errors["rk4"] < errors["midpoint"] / 10


def test_zero_dynamics_is_constant():
    params = floater_init(jax.random.key(3), DIM, hidden=HIDDEN, zero_output=True)
    assert not np.any(params["w_out"]) and np.any(params["w_in"])
    positions = jnp.array([[-50, 0, 3, 150], [7, 7, 1, 2]])
    actual = floater_encoding(positions, params, INITIAL)
    # Steps add exactly 0; diffrax's interpolation to the save times may round by a few ulps.
    chex.assert_trees_all_close(
        actual, jnp.broadcast_to(INITIAL, (2, 4, DIM)), atol=0, rtol=4 * 2.0**-24
    )


def test_duplicate_and_unsorted_positions():
    positions = np.array([[7, 3, 7, -2, 0, 3], [100, -2, 0, 0, 55, 7]])
    actual = floater_encoding(positions, PARAMS, INITIAL, delta=DELTA)
    chex.assert_shape(actual, (2, 6, DIM))
    assert_relative_close(actual, ref_floater(positions, PARAMS, INITIAL, DELTA), 1e-5)


def test_batch_is_solved_once(monkeypatch):
    calls = []

    def counting(*args, saveat, **kwargs):
        calls.append(saveat.subs.ts.shape)
        return original(*args, saveat=saveat, **kwargs)

    original = diffrax.diffeqsolve
    monkeypatch.setattr(diffrax, "diffeqsolve", counting)
    positions = jnp.array([[0, 1, 2, 3, 4], [30, 31, 32, 33, 34], [4, 3, 2, 30, 100]])
    batch = floater_encoding(positions, PARAMS, INITIAL, delta=DELTA)
    # One solve, saved at the 11 distinct positions (padded to 16 so other sizes reuse it).
    assert calls == [(16,)]
    rows = [floater_encoding(row, PARAMS, INITIAL, delta=DELTA) for row in positions]
    assert len(calls) == 1 + len(rows)
    chex.assert_trees_all_close(batch, jnp.stack(rows), atol=2e-6, rtol=0)


def test_jit_and_vmap_need_and_honour_position_range():
    positions = jnp.array([[0, 5, 3, 64], [-4, 9, 2, 64]])
    eager = floater_encoding(positions, PARAMS, INITIAL, delta=DELTA)

    # Trained on positions < 64, used far past them: the range bounds what a call may see.
    # Outside it, under jit, a row is NaN, never another position's value.
    jitted = jax.jit(
        lambda p: floater_encoding(p, PARAMS, INITIAL, delta=DELTA, position_range=(-8, 4096))
    )
    far = np.array([4096, 4097, -9, -8])
    actual = jitted(jnp.concatenate([positions, far[None]]))
    chex.assert_trees_all_close(actual[:2], eager, atol=2e-6, rtol=0)
    assert np.isnan(actual[2, 1]).all() and np.isnan(actual[2, 2]).all()
    assert not np.isnan(actual[:, jnp.array([0, 3])]).any()
    expected = ref_floater(far[jnp.array([0, 3])], PARAMS, INITIAL, DELTA)
    assert_relative_close(actual[2, jnp.array([0, 3])], expected, 1e-5)

    vmapped = jax.vmap(
        lambda p: floater_encoding(p, PARAMS, INITIAL, delta=DELTA, position_range=(0, 100))
    )
    chex.assert_trees_all_close(
        vmapped(jnp.abs(positions)),
        floater_encoding(jnp.abs(positions), PARAMS, INITIAL, delta=DELTA),
        atol=2e-6,
        rtol=0,
    )

    with pytest.raises(ValueError, match="position_range"):
        jax.jit(lambda p: floater_encoding(p, PARAMS, INITIAL))(positions)
    with pytest.raises(ValueError, match="position_range"):  # concrete: checked, not NaN
        floater_encoding(positions, PARAMS, INITIAL, position_range=(0, 100))


def test_exhausted_step_budget_raises():
    with pytest.raises(RuntimeError, match="maximum number of solver steps"):
        floater_encoding(jnp.arange(100), PARAMS, INITIAL, solver="tsit5", max_steps=2)


def test_gradients_match_central_differences():
    positions = np.array([-3, 0, 2, 5, 9])
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in small_params(7, 3, 4, 0.5).items()}
        initial = jnp.array([0.3, -0.2, 0.5])
        weights = jax.random.normal(jax.random.key(1), (positions.size, 3), jnp.float64)

        def loss(params, initial):  # eager: both directions share one compiled solve
            encodings = floater_encoding(positions, params, initial, delta=0.1)
            assert encodings.dtype == jnp.float64
            return jnp.sum(weights * encodings)

        grads = jax.grad(loss, argnums=(0, 1))(params, initial)
        flat, unflatten = jax.flatten_util.ravel_pytree((params, initial))
        eps = 1e-6
        basis = np.eye(flat.size)
        numeric = np.array(
            [
                (loss(*unflatten(flat + eps * e)) - loss(*unflatten(flat - eps * e))) / (2 * eps)
                for e in basis
            ]
        )
        analytic = jax.flatten_util.ravel_pytree(grads)[0]
        assert np.abs(numeric).max() > 1e-2  # the test can fail
        chex.assert_trees_all_close(analytic, numeric, atol=1e-7, rtol=1e-6)


def test_gradients_over_many_steps_keep_every_step_and_match_central_differences(monkeypatch):
    """75 RK4 steps (16 positions, delta 0.1): diffrax is asked to keep every step of the
    budget for the reverse pass, and the gradient matches central differences. With diffrax's
    default checkpoints (44 for this budget of 1,024) it did not: off by 0.62 here."""
    asked = []
    original = diffrax.RecursiveCheckpointAdjoint

    def recording(checkpoints=None):
        asked.append(checkpoints)
        return original(checkpoints=checkpoints)

    monkeypatch.setattr(diffrax, "RecursiveCheckpointAdjoint", recording)
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        params = {
            "w_in": rng.normal(size=(DIM + 1, HIDDEN)) * 0.5,
            "b_in": rng.normal(size=HIDDEN) * 0.1,
            "w_out": rng.normal(size=(HIDDEN + 1, DIM)) * 0.5,
            "b_out": rng.normal(size=DIM) * 0.1,
        }
        params = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        initial = jnp.linspace(-1.0, 1.0, DIM, dtype=jnp.float64)

        def loss(initial):
            return jnp.sum(jnp.sin(floater_encoding(np.arange(16), params, initial, delta=0.1)))

        analytic = jax.jit(jax.grad(loss))(initial)
        eps = 1e-6
        numeric = [
            (loss(initial + eps * e) - loss(initial - eps * e)) / (2 * eps) for e in np.eye(DIM)
        ]
    assert asked and set(asked) == {1024}  # the budget: _bucket(_step_budget(15, 5), 1024)
    assert np.abs(numeric).max() > 1.0  # the test can fail
    np.testing.assert_allclose(analytic, numeric, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------- dynamics, init, biases


def test_dynamics_matches_reference_for_batched_states():
    states = jax.random.normal(jax.random.key(2), (2, 3, DIM))
    actual = floater_dynamics(PARAMS, 0.7, states)
    chex.assert_shape(actual, (2, 3, DIM))
    expected = np.array([[ref_h(PARAMS, 0.7, s) for s in row] for row in np.asarray(states)])
    chex.assert_trees_all_close(actual, expected, atol=1e-6, rtol=1e-6)
    assert not np.allclose(floater_dynamics(PARAMS, 0.0, states), actual)  # t is an input


def test_init_shapes_and_scale():
    params = floater_init(jax.random.key(0), 64)
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {"w_in": (65, 64), "b_in": (64,), "w_out": (65, 64), "b_out": (64,)}
    assert all(v.dtype == jnp.float32 for v in params.values())
    chex.assert_trees_all_close(float(params["w_in"].std()), (2 / 129) ** 0.5, rtol=0.05)
    assert floater_init(jax.random.key(0), 4, hidden=9)["w_out"].shape == (10, 4)


def test_qkv_bias_one_solve_for_every_block():
    initial_bias = jax.random.normal(jax.random.key(4), (2, 3, DIM))
    positions = jnp.array([[0, 4, 9], [1, 2, 3]])
    bias = floater_qkv_bias(positions, PARAMS, initial_bias, delta=DELTA)
    chex.assert_shape(bias, (2, 3, 2, 3, DIM))
    for block in range(2):
        for j in range(3):
            one = floater_encoding(positions, PARAMS, initial_bias[block, j], delta=DELTA)
            chex.assert_trees_all_close(bias[..., block, j, :], one, atol=2e-6, rtol=0)

    # h = 0: the biases are the initial ones at every position (a plain Transformer).
    zero = floater_init(jax.random.key(5), DIM, zero_output=True)
    constant = floater_qkv_bias(positions, zero, initial_bias)
    chex.assert_trees_all_close(
        constant, jnp.broadcast_to(initial_bias, (2, 3, 2, 3, DIM)), atol=0, rtol=4 * 2.0**-24
    )


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": -0.1}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"delta": float("inf")}, "delta"),
        ({"delta": "0.1"}, "delta"),
        ({"solver": "euler"}, "solver"),
        ({"steps_per_delta": 0}, "steps_per_delta"),
        ({"rtol": 0.0}, "rtol"),
        ({"max_steps": 0}, "max_steps"),
        ({"position_range": (5, 1)}, "position_range"),
        ({"position_range": 100}, "position_range"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        floater_encoding(jnp.arange(4), PARAMS, INITIAL, **kwargs)


def test_bad_arrays_raise():
    with pytest.raises(ValueError, match="positions"):
        floater_encoding(jnp.arange(4.0), PARAMS, INITIAL)
    with pytest.raises(ValueError, match="positions"):
        floater_encoding(jnp.array(3), PARAMS, INITIAL)
    for initial in (jnp.ones(()), jnp.ones((2, DIM)), jnp.ones((0,))):
        with pytest.raises(ValueError, match="initial"):
            floater_encoding(jnp.arange(4), PARAMS, initial)
    with pytest.raises(ValueError, match="params"):  # params for another D
        floater_encoding(jnp.arange(4), PARAMS, jnp.ones(DIM + 1))
    for name, shape in [("w_in", (DIM, HIDDEN)), ("b_in", (HIDDEN, 1)), ("w_out", (HIDDEN, DIM))]:
        with pytest.raises(ValueError, match=f"params\\['{name}'\\]"):
            floater_encoding(jnp.arange(4), {**PARAMS, name: jnp.zeros(shape)}, INITIAL)
    with pytest.raises(ValueError, match="missing"):
        floater_encoding(jnp.arange(4), {k: v for k, v in PARAMS.items() if k != "b_out"}, INITIAL)
    with pytest.raises(ValueError, match="initial_bias"):
        floater_qkv_bias(jnp.arange(4), PARAMS, jnp.ones((2, DIM)))


# ---------------------------------------------------------------- the registered encoding

TINY_MODEL = dict(vocab_size=32, d_model=16, num_heads=2, num_layers=2, max_len=32)
FAST = {"hidden": 4, "delta": 0.5, "steps_per_delta": 1}


def floater_model(seed=0, **options):
    config = jpe.TransformerConfig(pe="floater", pe_options={**FAST, **options}, **TINY_MODEL)
    return jpe.Transformer(config, rngs=nnx.Rngs(seed))


def test_zero_dynamics_model_equals_the_plain_model():
    plain = jpe.Transformer(jpe.TransformerConfig(pe="none", **TINY_MODEL), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    for variant in ("every-block", "input-only"):
        model = floater_model(init_scale=0.0, variant=variant)
        assert not np.any(model.encoding.dynamics["w_out"][...])
        nnx.update(model, nnx.state(plain))  # the same weights outside the encoding
        chex.assert_trees_all_close(model(tokens), plain(tokens), atol=1e-6, rtol=0)
    # and the default (small, non-zero h) does depend on position
    model = floater_model()
    nnx.update(model, nnx.state(plain))
    assert not np.allclose(model(tokens), plain(tokens), atol=1e-5)


def test_model_solves_the_trajectory_once_per_pass(monkeypatch):
    calls = []
    original = diffrax.diffeqsolve

    def counting(*args, **kwargs):
        calls.append(kwargs["y0"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(diffrax, "diffeqsolve", counting)
    model = floater_model()
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    model(tokens)
    assert calls == [(2, 3, 16)]  # every block's q, k and v together: [N, 3, D]
    nnx.jit(lambda m, t: m(t))(model, tokens)  # traced: bounded by max_len, still one solve
    assert len(calls) == 2
    input_only = floater_model(variant="input-only")
    calls.clear()
    input_only(tokens)
    assert calls == [(16,)]


def test_model_refuses_positions_past_the_bound():
    model = floater_model()
    tokens = jax.random.randint(jax.random.key(1), (1, 4), 0, 32)
    with pytest.raises(ValueError, match="max_len"):
        model(jax.random.randint(jax.random.key(1), (1, 33), 0, 32))
    with pytest.raises(ValueError, match="max_len"):
        model(tokens, positions=jnp.arange(4) + 30)
    bounded = floater_model(max_position=8)
    assert bounded.config.encoding.position_limit(bounded.config) == 8
    with pytest.raises(ValueError, match=r"max_len\) = \[0, 8\)"):
        bounded(tokens, positions=jnp.arange(4) + 5)
    # Under jit the values are unknown: the row past the bound is NaN, never another's value.
    out = nnx.jit(lambda m, t, p: m(t, positions=p))(bounded, tokens, jnp.arange(4) + 5)
    assert np.isnan(out[0, 3]).all() and np.isfinite(out[0, :3]).all()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"delta": float("inf")}, "delta"),
        ({"solver": "euler"}, "solver"),
        ({"variant": "input"}, "variant"),
        ({"hidden": 0}, "hidden"),
        ({"steps_per_delta": 0}, "steps_per_delta"),
        ({"max_position": 0}, "max_position"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"init_scale": float("nan")}, "init_scale"),
    ],
)
def test_model_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        jpe.TransformerConfig(pe="floater", pe_options=options, **TINY_MODEL)
