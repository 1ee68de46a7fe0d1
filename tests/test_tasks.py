"""jpe.lab.tasks: the synthetic tasks' batches against plain-Python answers, and run_task.

Batches are checked row by row against references written without NumPy; run_task is run at
tiny sizes, once to check what it returns and once to check that a model actually learns.
"""

from __future__ import annotations

import numpy as np
import pytest

from jpe.lab import tasks
from jpe.lab.tasks import BOS, KEY_OFFSET, NUM_KEYS, NUM_SYMBOLS, PAD, SEP, VOCAB_SIZE

SEEDS = (0, 1, 2)
LENGTHS = (1, 2, 5, 13)


def _sequence(batch: dict, row: int) -> list[int]:
    """The full token sequence of one row: inputs plus the last target."""
    inputs = [int(t) for t in batch["inputs"][row]]
    return inputs + [int(batch["targets"][row][-1])]


def _reference(task: str, question: list[int]) -> list[int]:
    """The answer to `question` (the tokens between BOS and SEP), in plain Python."""
    if task == "copy":
        return list(question)
    if task == "reverse":
        return list(reversed(question))
    if task == "sort":
        return sorted(question)
    if task == "parity":
        return [sum(question) % 2]
    if task == "recall":
        *pairs, query = question
        table = {}
        for i in range(0, len(pairs), 2):
            key, value = pairs[i], pairs[i + 1]
            assert table.get(key, value) == value, "a recurring key changed its value"
            table[key] = value
        assert query in table, "the query key is not among the pairs"
        return [table[query]]
    raise AssertionError(task)


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("seed", SEEDS)
def test_make_batch_matches_reference(task, seed):
    rng = np.random.default_rng(seed)
    for length in LENGTHS:
        batch = tasks.make_batch(task, rng, 7, length)
        width = tasks.sequence_length(task, length)
        answer_len = tasks.answer_length(task, length)
        assert set(batch) == {"inputs", "targets", "weights"}
        assert batch["inputs"].shape == batch["targets"].shape == (7, width)
        assert batch["weights"].shape == (7, width)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["weights"].dtype == np.float32
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        for row in range(7):
            seq = _sequence(batch, row)
            assert seq[0] == BOS and seq.count(SEP) == 1 and PAD not in seq
            assert all(0 <= t < VOCAB_SIZE for t in seq)
            sep = seq.index(SEP)
            question, answer = seq[1:sep], seq[sep + 1 :]
            if task == "recall":
                assert len(question) == 2 * length + 1
                keys, values = question[0:-1:2], question[1:-1:2]
                assert all(KEY_OFFSET <= k < KEY_OFFSET + NUM_KEYS for k in keys + [question[-1]])
                assert all(0 <= v < NUM_SYMBOLS for v in values)
            else:
                assert len(question) == length
                top = 2 if task == "parity" else NUM_SYMBOLS
                assert all(0 <= t < top for t in question)
            assert len(answer) == answer_len
            assert answer == _reference(task, question), (task, seq)
            # Weights: 1 exactly on the targets that are answer tokens.
            scored = [i for i, w in enumerate(batch["weights"][row]) if w != 0]
            assert scored == list(range(sep, sep + answer_len))
            assert all(batch["weights"][row][i] == 1.0 for i in scored)


def test_recall_query_and_repeats_vary():
    """The query is drawn from all pairs (not always the first or last) and keys recur."""
    batch = tasks.make_batch("recall", np.random.default_rng(0), 400, 4)
    picked, repeats = set(), 0
    for row in range(400):
        seq = _sequence(batch, row)
        keys = seq[1:9:2]
        picked.update(i for i, k in enumerate(keys) if k == seq[9])
        repeats += len(set(keys)) < len(keys)
    assert picked == {0, 1, 2, 3}
    assert 0 < repeats < 400


def test_make_batch_is_deterministic_in_the_rng():
    for task in tasks.TASKS:
        a = tasks.make_batch(task, np.random.default_rng(42), 5, 6)
        b = tasks.make_batch(task, np.random.default_rng(42), 5, 6)
        c = tasks.make_batch(task, np.random.default_rng(43), 5, 6)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a["inputs"], c["inputs"])


def test_make_batch_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="task"):
        tasks.make_batch("addition", rng, 2, 3)
    for length in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="length"):
            tasks.make_batch("copy", rng, 2, length)
    with pytest.raises(ValueError, match="batch_size"):
        tasks.make_batch("copy", rng, 0, 3)
    with pytest.raises(ValueError, match="rng"):
        tasks.make_batch("copy", 0, 2, 3)


def test_chance_accuracy():
    assert tasks.chance_accuracy("copy", 3) == pytest.approx((1e-3, 0.1))
    assert tasks.chance_accuracy("parity", 9) == (0.5, 0.5)
    assert tasks.chance_accuracy("recall", 9) == pytest.approx((0.1, 0.1))


def test_training_positions_are_a_uniform_subset():
    """Randomized training positions: the real tokens' positions are sorted, distinct, in
    [0, R), and spread over the whole range (not the low end that the first few of a longer
    sorted sample would give)."""
    import jax

    from jpe.lab.tasks import _subset_positions

    shape, real, limit = (512, 17), 3, 1000
    pos = np.asarray(_subset_positions(jax.random.PRNGKey(0), shape, np.int32(real), limit))
    assert pos.shape == shape and pos.min() >= 0 and pos.max() < limit
    assert np.all(np.diff(pos[:, :real], axis=1) > 0)
    assert all(len(set(row)) == shape[1] for row in pos.tolist())
    # The largest of 3 uniform draws from [0, 1000) has mean about 750.
    assert 700 < pos[:, real - 1].mean() < 800
    full = np.asarray(_subset_positions(jax.random.PRNGKey(1), shape, np.int32(17), limit))
    assert np.all(np.diff(full, axis=1) > 0)


TINY = dict(d_model=16, num_layers=1, num_heads=2, batch_size=8, eval_examples=16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="add"), "task"),
        (dict(pe="rotary"), "pe"),
        (dict(train_lengths=(0, 4)), "train_lengths"),
        (dict(train_lengths=(5, 4)), "train_lengths"),
        (dict(train_lengths=(1, 2, 3)), "train_lengths"),
        (dict(test_lengths=(8, 0)), "test_lengths"),
        (dict(test_lengths=()), "test_lengths"),
        (dict(steps=0), "steps"),
        (dict(pe="learned", max_len=16, test_lengths=(8,)), "max_len"),
        (dict(pe="learned", max_len=40, test_lengths=(8,), random_positions=64), "max_len"),
        (dict(random_positions=4), "random_positions"),
        (dict(eval_random_positions=True), "random_positions"),
    ],
)
def test_task_config_errors(kwargs, match):
    """Every setting is checked when the config is made, before any training."""
    args = dict(task="copy", pe="rope", train_lengths=(1, 4), test_lengths=(8,), steps=1)
    with pytest.raises(ValueError, match=match):
        tasks.TaskConfig(**{**args, **kwargs, **{k: v for k, v in TINY.items() if k not in kwargs}})


def test_run_task_takes_a_task_config():
    with pytest.raises(ValueError, match="TaskConfig"):
        tasks.run_task({"task": "copy"})


def test_run_task_learned_max_len_fits():
    """Copy of 8 symbols is 17 tokens: max_len=17 is enough, 16 is not (checked above)."""
    out = tasks.run_task(
        tasks.TaskConfig(
            task="copy", pe="learned", train_lengths=(1, 2), test_lengths=(8,), steps=1,
            max_len=17, **TINY,
        )
    )  # fmt: skip
    assert out["config"].max_len == 17
    assert 0.0 <= out["accuracy"][8] <= 1.0


@pytest.mark.parametrize(
    "task, pe, random_positions",
    [("recall", "alibi", None), ("parity", "sinusoidal", 64), ("sort", "none", None)],
)
def test_run_task_end_to_end(task, pe, random_positions):
    out = tasks.run_task(
        tasks.TaskConfig(
            task=task,
            pe=pe,
            train_lengths=(1, 3),
            test_lengths=(2, 5),
            steps=4,
            seed=1,
            lr=1e-3,
            random_positions=random_positions,
            log_every=2,
            **TINY,
        )
    )
    assert set(out["accuracy"]) == set(out["token_accuracy"]) == {2, 5}
    for table in (out["accuracy"], out["token_accuracy"]):
        assert all(0.0 <= v <= 1.0 for v in table.values())
    # Exact match of the whole answer can never beat per-token accuracy.
    assert all(out["accuracy"][n] <= out["token_accuracy"][n] + 1e-9 for n in (2, 5))
    assert [s for s, _ in out["losses"]] == [2, 4]
    assert np.isfinite(out["final_loss"])
    assert out["config"].causal and out["config"].vocab_size == VOCAB_SIZE


def test_copy_learns_above_chance():
    """Copying 1..4 digits with RoPE: far above chance after 400 steps of a tiny model.

    Over seeds 0..5 this setting gave exact-match accuracy 0.83-0.93 and per-token accuracy
    0.96-0.98 at length 4 (about 3 s on 2 CPU cores); the thresholds leave a wide margin and
    are still far above chance (1e-4 exact, 0.1 per token).
    """
    out = tasks.run_task(
        tasks.TaskConfig(
            task="copy",
            pe="rope",
            train_lengths=(1, 4),
            test_lengths=(4,),
            steps=400,
            batch_size=32,
            d_model=32,
            num_layers=2,
            num_heads=2,
            lr=3e-3,
            seed=0,
        )
    )
    exact_chance, token_chance = tasks.chance_accuracy("copy", 4)
    assert out["accuracy"][4] >= 0.5, (
        f"exact match {out['accuracy'][4]:.3f} at length 4; chance is {exact_chance:.0e}"
    )
    assert out["token_accuracy"][4] >= 0.8, (
        f"token accuracy {out['token_accuracy'][4]:.3f} at length 4; chance is {token_chance}"
    )
