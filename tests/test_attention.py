"""Blocked attention against a dense float64 NumPy reference."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grad_check import assert_grad_outside_jit_equals_inside

from jpe.attention import attention


def dense_reference(
    q,
    k,
    v,
    *,
    bias=None,
    causal=False,
    q_positions=None,
    k_positions=None,
    q_seg=None,
    k_seg=None,
    kv_mask=None,
    value_table=None,
):
    """softmax(q.k / sqrt(D) + bias) v in float64, every mask spelled out; zeros for empty rows."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    k = np.repeat(k, g, axis=2)  # head h reads kv head h // g
    v = np.repeat(v, g, axis=2)
    qp = np.arange(lq) + lk - lq if q_positions is None else np.asarray(q_positions)
    kp = np.arange(lk) if k_positions is None else np.asarray(k_positions)
    qp, kp = np.broadcast_to(qp, (b, lq)), np.broadcast_to(kp, (b, lk))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    if bias is not None:
        s = s + np.broadcast_to(np.asarray(bias, np.float64), s.shape)
    mask = np.ones((b, 1, lq, lk), bool)
    if causal:
        mask &= (kp[:, None, :] <= qp[:, :, None])[:, None]
    if q_seg is not None:
        mask &= (np.asarray(q_seg)[:, :, None] == np.asarray(k_seg)[:, None, :])[:, None]
    if kv_mask is not None:
        mask &= np.asarray(kv_mask)[:, None, None, :]
    s = np.where(mask, s, -np.inf)
    smax = np.max(s, axis=-1, keepdims=True)
    w = np.where(mask, np.exp(s - np.where(np.isfinite(smax), smax, 0)), 0.0)
    denom = w.sum(-1, keepdims=True)
    w = np.where(denom > 0, w / np.where(denom > 0, denom, 1), 0)
    out = np.einsum("bhqk,bkhd->bqhd", w, v)
    if value_table is not None:
        out = out + np.einsum("bhqk,bqkhd->bqhd", w, value_table)
    return out


def _qkv(seed, b, lq, lk, h, hkv, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(kq, (b, lq, h, d), dtype),
        jax.random.normal(kk, (b, lk, hkv, d), dtype),
        jax.random.normal(kv, (b, lk, hkv, d), dtype),
    )


def _slopes(h):
    return np.array([2.0 ** (-(i + 1)) for i in range(h)])


def _alibi(qp, kp, slopes):
    """A dense ALiBi bias written out here so this file tests attention alone."""
    dist = np.abs(np.asarray(qp)[..., :, None] - np.asarray(kp)[..., None, :])
    return -slopes[:, None, None] * dist[..., None, :, :]


def _alibi_fn(slopes):
    s = jnp.asarray(slopes, jnp.float32).reshape(-1, 1, 1)

    def bias_fn(qp, kp):
        dist = jnp.abs(qp[:, None, :, None] - kp[:, None, None, :]).astype(jnp.float32)
        return -s[None] * dist

    return bias_fn


@pytest.mark.parametrize(
    "block_size, causal, heads",
    [
        (4, True, (4, 4)),  # 13 = 3 * 4 + 1: a ragged last block
        (5, False, (4, 2)),
        (13, True, (4, 1)),  # one block: no scan
        (64, False, (4, 4)),  # block larger than L
        (3, False, (4, 1)),
        (6, True, (4, 2)),
    ],
)
def test_matches_dense(block_size, causal, heads):
    h, hkv = heads
    q, k, v = _qkv(0, 2, 13, 13, h, hkv, 8)
    slopes = _slopes(h)
    got = attention(q, k, v, causal=causal, block_size=block_size, bias_fn=_alibi_fn(slopes))
    qp = kp = np.arange(13)
    want = dense_reference(q, k, v, causal=causal, bias=_alibi(qp, kp, slopes)[None])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [3, 8, 32])
def test_segments_positions_and_padding(block_size):
    q, k, v = _qkv(1, 2, 11, 11, 2, 2, 4)
    seg = np.array([[1] * 4 + [2] * 5 + [0] * 2, [0] * 3 + [1] * 8])
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
    slopes = _slopes(2)
    got = attention(
        q,
        k,
        v,
        causal=True,
        segment_ids=seg,
        q_positions=pos,
        k_positions=pos,
        block_size=block_size,
        bias_fn=_alibi_fn(slopes),
    )
    want = dense_reference(
        q,
        k,
        v,
        causal=True,
        q_positions=pos,
        k_positions=pos,
        q_seg=seg,
        k_seg=seg,
        bias=_alibi(pos, pos, slopes),
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_decoding_queries_default_to_the_last_positions():
    q, k, v = _qkv(2, 1, 3, 10, 2, 1, 4)
    got = attention(q, k, v, causal=True, block_size=4)
    want = dense_reference(q, k, v, causal=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # and it equals the last 3 rows of the full causal pass
    qf = jnp.concatenate([jnp.zeros((1, 7, 2, 4)), q], axis=1)
    full = attention(qf, k, v, causal=True, block_size=4)
    np.testing.assert_allclose(full[:, 7:], got, atol=1e-6)


def test_kv_mask_and_empty_rows_are_zero_not_nan():
    q, k, v = _qkv(3, 2, 6, 6, 2, 2, 4)
    kv_mask = np.array([[True] * 4 + [False] * 2, [False] * 6])
    got = attention(q, k, v, kv_mask=kv_mask, block_size=4)
    want = dense_reference(q, k, v, kv_mask=kv_mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(got[1]) == 0)
    grads = jax.grad(lambda q: attention(q, k, v, kv_mask=kv_mask, block_size=4).sum())(q)
    assert np.all(np.isfinite(grads))


def test_attention_outside_jit_compiles_nothing_the_second_time():
    """Run eagerly on one block, attention's conditionals (the search for non-finite keys, the
    materialized bias) reuse their compiled programs: a second call with the same shapes
    compiles nothing. Their branches were closures made per call, which JAX traced and compiled
    afresh each time (two programs a call here). Over several blocks the scans still close over
    each call's arrays and compile again; under `jit` none of this arises."""
    q, k, v = _qkv(7, 2, 6, 6, 2, 2, 4)
    slopes = jnp.array([0.5, 0.25])

    def bias_fn(qp, kp):  # ALiBi-like, [B', H, bq, bk]
        distance = jnp.abs(kp[:, None, :] - qp[:, :, None]).astype(jnp.float32)
        return -slopes[None, :, None, None] * distance[:, None]

    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    first = attention(q, k, v, bias_fn=bias_fn)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = attention(q, k, v, bias_fn=bias_fn)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    np.testing.assert_array_equal(first, second)
    assert compiles == [], f"{len(compiles)} programs compiled again"


def _shaw_hooks(ka, va, kmax):
    """Shaw-style hooks written independently of `jpe.encodings`: a bias that reads the query
    block (key table `ka`) and relative value embeddings (value table `va`), clipped at kmax."""

    def rel(qp, kp):
        return jnp.clip(kp[:, None, :] - qp[:, :, None], -kmax, kmax) + kmax  # [B, bq, bk]

    def query_bias_fn(qb, qp, kp):
        qa = jnp.einsum("bqhd,rd->bhqr", qb.astype(jnp.float32), ka)
        idx = jnp.broadcast_to(rel(qp, kp)[:, None], qa.shape[:3] + (kp.shape[1],))
        return jnp.take_along_axis(qa, idx, axis=-1)

    def value_fn(w, qp, kp):
        onehot = jax.nn.one_hot(rel(qp, kp), 2 * kmax + 1)  # [B, bq, bk, R]
        return jnp.einsum("bhqk,bqkr,rd->bqhd", w, onehot, va)

    return query_bias_fn, value_fn


def test_query_dependent_bias_and_value_terms():
    """Shaw-style terms: a bias that reads the query block, and relative value embeddings."""
    b, length, h, d, kmax = 2, 9, 2, 4, 3
    q, k, v = _qkv(4, b, length, length, h, h, d)
    ka, va = jax.random.normal(jax.random.PRNGKey(9), (2, 2 * kmax + 1, d))
    query_bias_fn, value_fn = _shaw_hooks(ka, va, kmax)

    got = attention(
        q,
        k,
        v,
        query_bias_fn=query_bias_fn,
        value_fn=value_fn,
        block_size=4,
        causal=True,
    )
    pos = np.arange(length)
    idx = np.clip(pos[None, :] - pos[:, None], -kmax, kmax) + kmax  # [q, k]
    qn = np.asarray(q, np.float64)
    bias = np.einsum("bqhd,qkd->bhqk", qn, np.asarray(ka, np.float64)[idx])
    vt = np.broadcast_to(
        np.asarray(va, np.float64)[idx][None, :, :, None, :], (b, length, length, h, d)
    )
    want = dense_reference(q, k, v, bias=bias, causal=True, value_table=vt)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_gradient_taken_outside_jit_equals_the_one_inside():
    """`jax.grad(jax.jit(f))`: the custom VJP is linearized after the jit's trace has ended, so
    it must not read that trace's arrays (positions, segments, the key mask, integer arrays the
    hooks close over) from a closure. Packed rows, a key mask, several blocks, and all three
    hook kinds with parameters."""
    b, length, h, d, kmax = 2, 11, 2, 4, 3
    q, k, v = _qkv(12, b, length, length, h, h, d)
    segments = jnp.asarray([[1] * 6 + [2] * 5, [1] * 11])
    positions = jnp.asarray([list(range(6)) + list(range(5)), list(range(11))])
    kv_mask = jnp.arange(length)[None] != 3
    params = {
        "ka": jax.random.normal(jax.random.PRNGKey(13), (2 * kmax + 1, d)),
        "va": jax.random.normal(jax.random.PRNGKey(14), (2 * kmax + 1, d)),
        "slopes": jnp.asarray([0.5, 0.25]),
    }

    def loss(q, k, v, params):
        query_bias_fn, shaw_value_fn = _shaw_hooks(params["ka"], params["va"], kmax)
        # Integer arrays built under the jit, which the hooks close over: hoisted out as well.
        per_head = jnp.arange(1, h + 1)  # [H]: 1, 2
        shift = jnp.arange(length)[None] % 3  # [1, L]

        def bias_fn(qp, kp):
            distance = jnp.abs(qp[:, :, None] - kp[:, None, :] + shift[:, :1, None])
            return -params["slopes"][None, :, None, None] * distance[:, None].astype(jnp.float32)

        def value_fn(w, qp, kp):
            return shaw_value_fn(w, qp, kp) * per_head[None, None, :, None]

        out = attention(
            q, k, v, bias_fn=bias_fn, query_bias_fn=query_bias_fn, value_fn=value_fn,
            causal=True, q_positions=positions, k_positions=positions,
            segment_ids=(segments, segments), kv_mask=kv_mask, block_size=4,
        )  # fmt: skip
        return jnp.sum(out * jnp.cos(out))

    argnums = (0, 1, 2, 3)
    inside = assert_grad_outside_jit_equals_inside(loss, (q, k, v, params), argnums)
    # The same outside jit under jax.checkpoint, and per copy under jax.vmap over a new leading
    # axis of q.
    remat = jax.grad(jax.jit(jax.checkpoint(loss)), argnums=argnums)(q, k, v, params)
    mapped = jax.vmap(jax.grad(jax.jit(loss), argnums=argnums), in_axes=(0, None, None, None))(
        jnp.stack([q, q]), k, v, params
    )
    for got, want in zip(jax.tree.leaves(remat), jax.tree.leaves(inside), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # other fusions: rounding
    for got, want in zip(jax.tree.leaves(mapped), jax.tree.leaves(inside), strict=True):
        np.testing.assert_allclose(got[1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
def test_value_term_gradients_match_dense(block_size):
    """The fused path's backward pass with a value term (Shaw et al.'s relative values) and a
    query-reading bias: the gradients of q, k, v and both tables against JAX's autodiff of a
    dense float32 form, over several blocks (4) and one (16)."""
    b, length, h, d, kmax = 2, 9, 2, 4, 3
    q, k, v = _qkv(11, b, length, length, h, h, d)
    ka, va = jax.random.normal(jax.random.PRNGKey(12), (2, 2 * kmax + 1, d))
    cot = jax.random.normal(jax.random.PRNGKey(13), (b, length, h, d))
    pos = jnp.arange(length)
    idx = jnp.clip(pos[None, :] - pos[:, None], -kmax, kmax) + kmax  # [q, k]

    def blocked(q, k, v, ka, va):
        query_bias_fn, value_fn = _shaw_hooks(ka, va, kmax)
        out = attention(
            q, k, v, query_bias_fn=query_bias_fn, value_fn=value_fn, block_size=block_size,
            causal=True,
        )  # fmt: skip
        return jnp.sum(out * cot)

    def dense(q, k, v, ka, va):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        s = s + jnp.einsum("bqhd,qkd->bhqk", q, ka[idx])
        s = jnp.where(pos[None, :] <= pos[:, None], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", p, v) + jnp.einsum("bhqk,qkd->bqhd", p, va[idx])
        return jnp.sum(out * cot)

    args = (q, k, v, ka, va)
    got = jax.grad(blocked, argnums=(0, 1, 2, 3, 4))(*args)
    want = jax.grad(dense, argnums=(0, 1, 2, 3, 4))(*args)
    for name, g, w in zip(("q", "k", "v", "key table", "value table"), got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=name)


def test_bf16_in_bf16_out_and_jit():
    q, k, v = _qkv(5, 1, 20, 20, 2, 2, 8, jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, block_size=8))
    got = fn(q, k, v)
    assert got.dtype == jnp.bfloat16
    want = dense_reference(q, k, v, causal=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2)


def test_gradients_match_dense():
    q, k, v = _qkv(6, 1, 10, 10, 2, 2, 4)

    def dense(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        s = jnp.where(jnp.tril(jnp.ones((10, 10), bool)), s, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)

    blocked = lambda q, k, v: attention(q, k, v, causal=True, block_size=3)
    g1 = jax.grad(lambda *a: (blocked(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(lambda *a: (dense(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_errors():
    q, k, v = _qkv(7, 1, 4, 4, 3, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    q, k, v = _qkv(7, 1, 4, 6, 2, 2, 4)
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, k, v, segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="block_size"):
        attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="q_positions"):
        attention(q, k, v, q_positions=jnp.arange(5))
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v"):
        attention(q, k, v[:, :3])


# ---------------------------------------------------------------------------------------------
# Regressions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [2, 8])
def test_non_finite_keys_and_values_reach_only_rows_that_attend_to_them(block_size):
    """0 * NaN used to poison every row: a NaN value hidden by the causal mask, the kv_mask or
    another segment must leave the rows that do not attend to it exactly as without it."""
    q, k, v = _qkv(8, 2, 6, 6, 4, 2, 4)
    k_nan = k.at[0, 4, 1].set(jnp.nan)  # row 0: key 4, kv head 1 (query heads 2, 3)
    v_nan = v.at[1, 2, 0].set(jnp.inf)  # row 1: value 2, kv head 0 (query heads 0, 1)
    kv_mask = np.ones((2, 6), bool)
    kv_mask[1, 2] = False  # row 1's bad key is masked out for everyone

    got = attention(q, k_nan, v_nan, causal=True, kv_mask=kv_mask, block_size=block_size)
    want = dense_reference(q, k, v, causal=True, kv_mask=kv_mask)
    got, finite = np.asarray(got), np.isfinite(np.asarray(got))
    # row 0: queries 4 and 5 attend to key 4 through heads 2, 3 -> NaN there, nowhere else
    poisoned = np.zeros(got.shape, bool)
    poisoned[0, 4:, 2:] = True
    np.testing.assert_array_equal(~finite, poisoned)
    np.testing.assert_allclose(got[~poisoned], want[~poisoned], atol=1e-5, rtol=1e-5)

    # segments: a NaN in segment 1 never reaches segment 2
    seg = jnp.array([[1, 1, 1, 2, 2, 2]] * 2)
    got = attention(q, k, v.at[:, 1].set(jnp.nan), segment_ids=seg, block_size=block_size)
    np.testing.assert_array_equal(
        np.isfinite(np.asarray(got)).all(axis=(2, 3)), [[0, 0, 0, 1, 1, 1]] * 2
    )

    # gradients through rows that never see the NaN stay finite
    def loss(q):
        out = attention(q, k_nan, v_nan, causal=True, kv_mask=kv_mask, block_size=block_size)
        return out[:, :4].sum()

    assert np.all(np.isfinite(np.asarray(jax.grad(loss)(q))))


def test_nan_query_row_stays_nan_rather_than_zero():
    q, k, v = _qkv(9, 1, 3, 3, 2, 2, 4)
    got = np.asarray(attention(q.at[0, 1].set(jnp.nan), k, v, causal=True, block_size=2))
    np.testing.assert_array_equal(np.isnan(got).any(axis=(2, 3)), [[False, True, False]])


def test_segment_ids_pair_must_be_a_tuple():
    """A nested list of two rows is a [B=2, L] array, not a (q_ids, k_ids) pair."""
    q, k, v = _qkv(10, 2, 2, 2, 1, 1, 4)
    as_list = attention(q, k, v, segment_ids=[[0, 1], [1, 1]])
    as_array = attention(q, k, v, segment_ids=jnp.array([[0, 1], [1, 1]]))
    np.testing.assert_array_equal(as_list, as_array)
    seg = np.array([[0, 1], [1, 1]])
    want = dense_reference(q, k, v, q_seg=seg, k_seg=seg)
    np.testing.assert_allclose(as_list, want, atol=1e-5, rtol=1e-5)
    pair = attention(q, k, v, segment_ids=(jnp.array([[0, 1]] * 2), jnp.array([[1, 1]] * 2)))
    pair_want = dense_reference(q, k, v, q_seg=[[0, 1]] * 2, k_seg=[[1, 1]] * 2)
    np.testing.assert_allclose(pair, pair_want, atol=1e-5, rtol=1e-5)


def test_positions_and_segments_must_be_integers():
    q, k, v = _qkv(11, 1, 2, 2, 1, 1, 4)
    with pytest.raises(ValueError, match="q_positions must have an integer dtype"):
        attention(q, k, v, causal=True, q_positions=jnp.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="k_positions must have an integer dtype"):
        attention(q, k, v, causal=True, k_positions=jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="segment_ids must have an integer dtype"):
        attention(q, k, v, segment_ids=jnp.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="kv_mask must have a boolean dtype"):
        attention(q, k, v, kv_mask=jnp.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="tuple"):
        attention(q, k, v, segment_ids=(jnp.zeros((1, 2), jnp.int32),) * 3)


def test_backward_memory_is_linear_in_length():
    """Without a checkpoint per query block, the backward pass kept every block's logits: the
    [H, L, L] tensor the blocks exist to avoid."""

    def grad_temp_bytes(length, h=2, d=16):
        spec = jax.ShapeDtypeStruct((1, length, h, d), jnp.float32)
        f = lambda q, k, v: attention(q, k, v, causal=True, block_size=128).sum()
        compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
        stats = compiled.memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        return stats.temp_size_in_bytes

    small, large = grad_temp_bytes(512), grad_temp_bytes(2048)
    # measured: 1.2 and 2.4 MB checkpointed, 1.6 and 7.5 MB before (one [H, L, L] is 34 MB)
    assert large < 2 * 2048 * 2048 * 4 / 8, large
    assert large < 2.5 * small, (small, large)  # linear in L, not quadratic (16x for 4x L)


def _dense_jax(q, k, v, bias, mask):
    """softmax(q.k / sqrt(D) + bias) v written densely in JAX, differentiated by autodiff: the
    reference for the blocked path's custom backward pass. Empty rows give zeros."""
    h, hkv = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
    s = jnp.where(mask, s, -jnp.inf)
    smax = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    w = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(smax), smax, 0)), 0.0)
    denom = w.sum(-1, keepdims=True)
    w = w / jnp.where(denom > 0, denom, 1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize(
    "block_size, causal, heads, packed",
    [
        (4, True, (4, 2), True),  # ragged blocks, GQA, packed rows, empty rows
        (13, True, (4, 4), False),  # one block
        (5, False, (2, 1), True),
        (3, True, (2, 2), False),
    ],
)
def test_gradients_of_inputs_and_bias_parameters_match_dense(block_size, causal, heads, packed):
    """The custom backward pass gives dq, dk, dv and the gradient of a bias's own parameters
    (a T5-style table read by relative distance, and a query-dependent term) equal to autodiff
    through dense attention."""
    b, length, (h, hkv), d, r = 2, 13, heads, 8, 4
    q, k, v = _qkv(11, b, length, length, h, hkv, d)
    table = jax.random.normal(jax.random.PRNGKey(12), (h, 2 * r + 1))
    proj = jax.random.normal(jax.random.PRNGKey(13), (d,))
    pos = np.arange(length)
    seg = np.array([[1] * 6 + [2] * 5 + [0] * 2, [3] * length])
    if not packed:
        seg = np.ones((b, length), int)
    else:
        pos = np.where(seg[0] == 2, pos - 6, pos)  # positions restart in the second segment
    kv_mask = np.ones((b, length), bool)
    if packed:
        kv_mask[0, -2:] = False  # the padding's keys: its rows have no key at all

    def rel(qp, kp):
        return jnp.clip(kp[..., None, :] - qp[..., :, None], -r, r) + r

    def bias_fn(table, qp, kp):  # [B', bq], [B', bk] -> [B', H, bq, bk]
        return jnp.moveaxis(table[:, rel(qp, kp)], 0, 1)

    def query_bias_fn(proj, qb, qp, kp):  # reads the query: [B, H, bq, 1]
        return jnp.einsum("bqhd,d->bhq", qb, proj)[..., None] * 0.1

    def blocked(q, k, v, table, proj):
        return attention(
            q, k, v, causal=causal, block_size=block_size, q_positions=pos, k_positions=pos,
            segment_ids=jnp.asarray(seg), kv_mask=kv_mask,
            bias_fn=lambda qp, kp: bias_fn(table, qp, kp),
            query_bias_fn=lambda qb, qp, kp: query_bias_fn(proj, qb, qp, kp),
        )  # fmt: skip

    def dense(q, k, v, table, proj):
        mask = (seg[:, :, None] == seg[:, None, :]) & kv_mask[:, None, :]
        if causal:
            mask = mask & (pos[None, None, :] <= pos[None, :, None])
        p = jnp.asarray(pos)[None]
        bias = bias_fn(table, p, p) + query_bias_fn(proj, q, p, p)
        return _dense_jax(q, k, v, bias, mask[:, None])

    weights = jax.random.normal(jax.random.PRNGKey(14), (b, length, h, d))
    loss = lambda f: lambda *a: (f(*a) * weights).sum()
    args = (q, k, v, table, proj)
    np.testing.assert_allclose(blocked(*args), dense(*args), atol=1e-5, rtol=1e-5)
    g1 = jax.grad(loss(blocked), argnums=range(5))(*args)
    g2 = jax.grad(loss(dense), argnums=range(5))(*args)
    for name, a, b_ in zip(("q", "k", "v", "table", "proj"), g1, g2, strict=True):
        np.testing.assert_allclose(a, b_, atol=2e-4, rtol=2e-4, err_msg=name)
    assert np.abs(np.asarray(g1[3])).sum() > 0 and np.abs(np.asarray(g1[4])).sum() > 0


def test_materialized_passes_values_and_gradients_through():
    """`jpe._fusion.materialized` is the identity, NaN included, in value and gradient."""
    from jpe._fusion import materialized

    x = jnp.array([[1.0, jnp.nan], [2.0, -3.0]])
    y = materialized({"a": x, "b": x[0]})
    np.testing.assert_array_equal(y["a"], x)
    np.testing.assert_array_equal(materialized(x[::-1]), x[::-1])  # NaN first: other branch
    g = jax.grad(lambda t: (materialized(t) ** 2).sum())(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(g, [2.0, 4.0])
    assert materialized([]) == []
