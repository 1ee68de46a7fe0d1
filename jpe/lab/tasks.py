"""Synthetic length-generalisation tasks: train short, test long, score the answer exactly.

The tasks follow Ruoss et al. 2023, "Randomized Positional Encodings Boost Length
Generalization of Transformers" (ACL 2023, arXiv 2305.16843: duplicate/reverse string, bucket
sort, parity check) and Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length
Generalization in Transformers" (NeurIPS 2023, arXiv 2305.19466: decoder-only models on copy,
reverse, sort, parity and recall-style tasks, scored by exact match of the answer):

- `copy`: the answer is the input symbols, in order.
- `reverse`: the input symbols, reversed.
- `sort`: the input symbols sorted ascending (repeats kept).
- `parity`: the input is bits; the answer is one bit, their sum mod 2. The negative control:
  no positional encoding is expected to make a Transformer solve it at unseen lengths.
- `recall` (associative recall): key-value pairs, then a query key; the answer is its value.

Every task is written as one decoder sequence (the "problem size" `n` is the number of symbols,
bits or key-value pairs):

    BOS  x_1 ... x_m  SEP  y_1 ... y_a

`make_batch` returns it shifted for teacher forcing: `inputs` = the sequence without its last
token, `targets` = without its first, and `weights` 1 exactly where `targets` is an answer
token `y_j` (the input symbols are not scored). `run_task` trains a fresh causal
`jpe.Transformer` on problem sizes drawn from `train_lengths` and reports, per test size, the
exact-match accuracy of the whole answer and the per-token accuracy.

Vocabulary (`VOCAB_SIZE` = 23 tokens, shared by all tasks):

    0..9    symbols: the data of copy/reverse/sort, the bits (0, 1) of parity, recall's values
    10..19  recall's keys (`KEY_OFFSET + k` for key k in 0..9)
    20 SEP, 21 BOS, 22 PAD (padding in `run_task`'s training batches; never in `make_batch`)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jpe.encodings import _checks
from jpe.encodings.positions import randomized_positions
from jpe.lab.train import flatten_model
from jpe.nn.config import TransformerConfig
from jpe.nn.transformer import Transformer
from jpe.registry import ENCODINGS

__all__ = [
    "BOS",
    "KEY_OFFSET",
    "NUM_KEYS",
    "NUM_SYMBOLS",
    "PAD",
    "SEP",
    "TASKS",
    "VOCAB_SIZE",
    "answer_length",
    "chance_accuracy",
    "make_batch",
    "run_task",
    "sequence_length",
    "to_text",
]

TASKS = ("copy", "reverse", "sort", "parity", "recall")

NUM_SYMBOLS = 10  # symbols 0..9
NUM_KEYS = 10  # recall keys, tokens KEY_OFFSET .. KEY_OFFSET + NUM_KEYS - 1
KEY_OFFSET = NUM_SYMBOLS
SEP = KEY_OFFSET + NUM_KEYS  # 20
BOS = SEP + 1  # 21
PAD = BOS + 1  # 22
VOCAB_SIZE = PAD + 1  # 23


def _check_task(task) -> str:
    _checks.one_of("task", task, TASKS)
    return task


def _input_tokens(task: str, length: int) -> int:
    return 2 * length + 1 if task == "recall" else length


def answer_length(task: str, length: int) -> int:
    """Answer tokens of one example of problem size `length` (1 for parity and recall)."""
    _check_task(task)
    length = _checks.positive_int("length", length)
    return 1 if task in ("parity", "recall") else length


def sequence_length(task: str, length: int) -> int:
    """T, the width of `make_batch`'s arrays at problem size `length`.

    The full sequence is BOS, the input tokens (`length`, or 2 * `length` + 1 for recall's
    pairs and query), SEP and the answer; the arrays hold it less one token.
    """
    answer = answer_length(task, length)
    return 1 + _input_tokens(task, length) + 1 + answer - 1


def chance_accuracy(task: str, length: int) -> tuple[float, float]:
    """`(exact_match, per_token)` accuracy of guessing each answer token uniformly.

    Over the symbols the answer can hold: 10 for copy/reverse/sort/recall, 2 for parity.
    (For sort, knowing that the answer is sorted does better; this is the uniform guess.)
    """
    answer = answer_length(task, length)
    per_token = 1 / (2 if task == "parity" else NUM_SYMBOLS)
    return per_token**answer, per_token


def make_batch(task: str, rng: np.random.Generator, batch_size: int, length: int) -> dict:
    """A batch of `batch_size` examples of problem size `length`, as decoder sequences.

    The sequence of one example (tokens as in the module docstring):

    - copy:    BOS x_1..x_n SEP x_1..x_n              x_i uniform in 0..9
    - reverse: BOS x_1..x_n SEP x_n..x_1
    - sort:    BOS x_1..x_n SEP sorted(x)            (ascending, repeats kept)
    - parity:  BOS b_1..b_n SEP (sum b_i) mod 2      b_i uniform in {0, 1}
    - recall:  BOS k_1 v_1 .. k_n v_n q SEP v        a fresh random map f from the 10 keys to
      the 10 values per example; keys k_i uniform (so a key may recur, always with the same
      value v_i = f(k_i)); the query q is one of k_1..k_n (an index i uniform in 1..n), and
      the answer is f(q). Key k is token `KEY_OFFSET + k`.

    Args:
      task: one of `TASKS`.
      rng: a NumPy `Generator`; the batch is a pure function of its state.
      batch_size: B, rows.
      length: n, the problem size (symbols, bits or key-value pairs), >= 1.

    Returns:
      `{"inputs": [B, T] int32, "targets": [B, T] int32, "weights": [B, T] float32}` with
      T = `sequence_length(task, length)`: `inputs` is the sequence less its last token,
      `targets` less its first (the next token at each position), and `weights` is 1.0 on the
      last `answer_length(task, length)` columns (the targets that are answer tokens) and 0.0
      elsewhere.

    Raises:
      ValueError: unknown `task`, `batch_size` or `length` not a positive integer, or `rng`
        not a `numpy.random.Generator`.
    """
    _check_task(task)
    batch_size = _checks.positive_int("batch_size", batch_size)
    length = _checks.positive_int("length", length)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    b, n = batch_size, length
    if task in ("copy", "reverse", "sort"):
        x = rng.integers(0, NUM_SYMBOLS, (b, n))
        question = x
        answer = {"copy": x, "reverse": x[:, ::-1], "sort": np.sort(x, axis=1)}[task]
    elif task == "parity":
        question = rng.integers(0, 2, (b, n))
        answer = question.sum(axis=1, keepdims=True) % 2
    else:  # recall
        mapping = rng.integers(0, NUM_SYMBOLS, (b, NUM_KEYS))
        keys = rng.integers(0, NUM_KEYS, (b, n))
        values = np.take_along_axis(mapping, keys, axis=1)
        pick = rng.integers(0, n, (b, 1))
        query = np.take_along_axis(keys, pick, axis=1)
        answer = np.take_along_axis(values, pick, axis=1)
        pairs = np.stack([keys + KEY_OFFSET, values], axis=2).reshape(b, 2 * n)
        question = np.concatenate([pairs, query + KEY_OFFSET], axis=1)
    column = lambda token: np.full((b, 1), token)
    full = np.concatenate([column(BOS), question, column(SEP), answer], axis=1).astype(np.int32)
    weights = np.zeros((b, full.shape[1] - 1), np.float32)
    weights[:, -answer.shape[1] :] = 1.0
    return {"inputs": full[:, :-1], "targets": full[:, 1:], "weights": weights}


def to_text(inputs: np.ndarray, targets: np.ndarray | None = None) -> str:
    """One row as readable text, e.g. `BOS 3 1 SEP 3 1`; with `targets`, the whole sequence."""
    row = list(np.asarray(inputs).reshape(-1))
    if targets is not None:
        row.append(np.asarray(targets).reshape(-1)[-1])
    names = {SEP: "SEP", BOS: "BOS", PAD: "PAD"}
    words = []
    for t in map(int, row):
        if t in names:
            words.append(names[t])
        elif t >= KEY_OFFSET:
            words.append("k" + str(t - KEY_OFFSET))
        else:
            words.append(str(t))
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


def _lengths(name: str, values) -> tuple[int, ...]:
    if isinstance(values, int | np.integer):
        values = (values,)
    if not isinstance(values, Sequence) or not values:
        raise ValueError(
            f"{name} must be a non-empty sequence of positive integers, got {values!r}"
        )
    return tuple(_checks.positive_int(name, v) for v in values)


def _pad(batch: dict, width: int) -> dict:
    """Pads `[B, T]` arrays on the right to `width`: PAD tokens, weight 0."""
    extra = width - batch["inputs"].shape[1]
    pad = lambda x, value: np.pad(x, ((0, 0), (0, extra)), constant_values=value)
    return {
        "inputs": pad(batch["inputs"], PAD),
        "targets": pad(batch["targets"], PAD),
        "weights": pad(batch["weights"], 0.0),
    }


def _subset_positions(key, shape, true_length, max_position):
    """Ruoss et al.'s positions for rows whose first `true_length` of `shape[-1]` are real.

    A sorted uniform sample of `true_length` distinct positions from [0, max_position) in the
    first `true_length` columns (a uniform `true_length`-subset of a uniform L-subset is a
    uniform `true_length`-subset), and the unchosen positions after them (padding, which
    causal attention keeps away from the real tokens). `true_length` may be traced, so one
    compiled step serves every training length.
    """
    k_full, k_pick = jax.random.split(key)
    full = randomized_positions(k_full, shape, max_position)  # sorted, distinct
    scores = jax.random.uniform(k_pick, shape)
    rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    index = jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.int32), shape)
    order = jnp.argsort(jnp.where(rank < true_length, index, index + shape[-1]), axis=-1)
    return jnp.take_along_axis(full, order, axis=-1)


def _optimizer(lr: float, steps: int, warmup: int, weight_decay: float, clip: float):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=lr * 0.1,
    )
    decay_mask = lambda params: {k: np.ndim(v) >= 2 and "embed" not in k for k, v in params.items()}
    tx = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay, mask=decay_mask),
    )
    return tx, schedule


def _weighted_nll(logits, targets, weights):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def run_task(
    task: str,
    pe: str,
    *,
    train_lengths: tuple[int, int] = (1, 8),
    test_lengths: Sequence[int] | None = None,
    steps: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    lr: float = 1e-3,
    random_positions: int | None = None,
    progress: bool = False,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    max_len: int | None = None,
    eval_examples: int = 256,
    eval_random_positions: bool | None = None,
    log_every: int = 10,
    config_overrides: Mapping | None = None,
) -> dict:
    """Trains a fresh causal `jpe.Transformer` on `task` and scores its answers per length.

    Training: AdamW (Optax) with linear warm-up, cosine decay to 10% of `lr` and global-norm
    clipping, one `jax.jit`-compiled step. Each step draws a problem size n uniformly from
    `train_lengths` (inclusive) and a batch of `batch_size` examples of that size
    (`make_batch`), padded on the right to the longest training sequence with PAD tokens of
    weight 0, so the step compiles once. The loss is the mean cross-entropy over answer
    tokens. With `random_positions` = R, each row's positions are a sorted sample without
    replacement from [0, R) (Ruoss et al. 2023; `jpe.encodings.positions.randomized_positions`),
    drawn for the row's real tokens, in training and, by default, at evaluation too, as Ruoss
    et al.'s code does (`eval_random_positions=False` evaluates with 0..T-1 instead: a
    mismatch that costs most of the accuracy even at the training sizes).

    Evaluation, per test size n (one compile per size): `eval_examples` fresh examples
    (NumPy generator seeded by `(seed, n)`, independent of training), scored with teacher
    forcing and argmax. An answer counts as exactly matched when every answer token is
    right, which is the same as greedy decoding getting the whole answer right.

    Args:
      task: one of `TASKS`.
      pe: one of `jpe.ENCODINGS`.
      train_lengths: `(lo, hi)` problem sizes trained on, 1 <= lo <= hi.
      test_lengths: problem sizes to evaluate (default `(hi, 2 * hi, 4 * hi)`).
      steps, batch_size, seed: optimisation steps, rows per step, and the one seed of
        parameters, batches and random positions.
      d_model, num_layers, num_heads: the Transformer's sizes.
      lr, warmup, weight_decay, clip: peak learning rate, warm-up steps (default 10% of
        `steps`), AdamW's decoupled weight decay (not on norms, biases and embeddings), and
        the gradient-norm clip.
      random_positions: R for randomized positions, >= the longest training sequence
        (Ruoss et al. use R much longer than any test sequence).
      progress: show a tqdm progress bar with the loss.
      max_len: `TransformerConfig.max_len`; for `pe="learned"` it defaults to the longest
        position the run uses, and a smaller value is an error.
      eval_examples: examples per test size.
      eval_random_positions: randomize positions at evaluation too (default: when
        `random_positions` is set; needs R >= the longest test sequence).
      log_every: steps between recorded losses.
      config_overrides: other `TransformerConfig` fields (e.g. `{"rope_base": 500.0}`).

    Returns:
      `{"accuracy": {n: exact-match accuracy}, "token_accuracy": {n: per-answer-token
      accuracy}, "chance": {n: (exact-match, per-token) of uniform guessing}, "losses":
      [(step, loss), ...], "final_loss": float, "train_seconds": float, "config":
      TransformerConfig, "model": the trained Transformer}`, lengths as int keys,
      accuracies in [0, 1].

    Raises:
      ValueError: an unknown `task` or `pe`; lengths, sizes or steps that are not positive
        integers; `lo > hi`; `random_positions` shorter than a sequence it must cover; or
        `pe="learned"` with a `max_len` below the longest position the run needs.
    """
    _check_task(task)
    if pe not in ENCODINGS:
        raise ValueError(
            f"unknown positional encoding pe={pe!r}; valid names: {', '.join(ENCODINGS)}"
        )
    train_lengths = _lengths("train_lengths", train_lengths)
    if len(train_lengths) != 2 or train_lengths[0] > train_lengths[1]:
        raise ValueError(
            f"train_lengths must be (lo, hi) with 1 <= lo <= hi, got {train_lengths!r}"
        )
    lo, hi = train_lengths
    test_lengths = _lengths(
        "test_lengths", (hi, 2 * hi, 4 * hi) if test_lengths is None else test_lengths
    )
    sizes = dict(steps=steps, batch_size=batch_size, d_model=d_model, num_layers=num_layers,
                 num_heads=num_heads, eval_examples=eval_examples, log_every=log_every)  # fmt: skip
    for name, value in sizes.items():
        _checks.positive_int(name, value)
    _checks.positive_int("seed", seed, minimum=0)
    lr = _checks.positive_float("lr", lr)
    weight_decay = _checks.positive_float("weight_decay", weight_decay, allow_zero=True)
    clip = _checks.positive_float("clip", clip)
    warmup = (
        max(1, steps // 10) if warmup is None else _checks.positive_int("warmup", warmup, minimum=0)
    )

    train_width = sequence_length(task, hi)
    test_width = max(sequence_length(task, n) for n in test_lengths)
    if eval_random_positions is None:
        eval_random_positions = random_positions is not None
    if random_positions is not None:
        random_positions = _checks.positive_int("random_positions", random_positions)
        if random_positions < train_width:
            raise ValueError(
                f"random_positions ({random_positions}) must be >= the longest training "
                f"sequence ({train_width} tokens for {task} of size {hi}): each row samples "
                "that many distinct positions"
            )
        if eval_random_positions and random_positions < test_width:
            raise ValueError(
                f"eval_random_positions needs random_positions ({random_positions}) >= the "
                f"longest test sequence ({test_width} tokens)"
            )
    elif eval_random_positions:
        raise ValueError("eval_random_positions=True needs random_positions")
    needed = max(train_width, test_width, random_positions or 0)
    if max_len is None:
        max_len = needed if pe == "learned" else max(needed, TransformerConfig.max_len)
    max_len = _checks.positive_int("max_len", max_len)
    if pe == "learned" and max_len < needed:
        raise ValueError(
            f"pe='learned' with max_len={max_len} cannot hold the {needed} positions this run "
            f"uses (test sequences up to {test_width} tokens"
            + (f", random_positions={random_positions}" if random_positions else "")
            + "): raise max_len or drop the longer test_lengths"
        )

    config = TransformerConfig(
        pe=pe,
        vocab_size=VOCAB_SIZE,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        causal=True,
        max_len=max_len,
        **dict(config_overrides or {}),
    )
    build, params = flatten_model(Transformer(config, rngs=nnx.Rngs(seed)))
    tx, schedule = _optimizer(lr, steps, warmup, weight_decay, clip)
    opt_state = tx.init(params)
    base_key, eval_key = jax.random.split(jax.random.PRNGKey(seed))

    def train_step(params, opt_state, batch, step, true_length):
        if random_positions is not None:
            key = jax.random.fold_in(base_key, step)
            positions = _subset_positions(key, batch["inputs"].shape, true_length, random_positions)
        else:
            positions = None

        def loss_fn(p):
            logits = build(p)(batch["inputs"], positions=positions)
            return _weighted_nll(logits, batch["targets"], batch["weights"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step_fn = jax.jit(train_step, donate_argnums=(0, 1))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", dynamic_ncols=True, mininterval=0.5,
                   desc=f"{task}/{pe}")  # fmt: skip
    rng = np.random.default_rng([seed, 0])
    losses = []
    start = time.perf_counter()
    try:
        for step in range(steps):
            n = int(rng.integers(lo, hi + 1))
            batch = _pad(make_batch(task, rng, batch_size, n), train_width)
            true_length = np.int32(sequence_length(task, n))
            params, opt_state, loss = step_fn(params, opt_state, batch, np.int32(step), true_length)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                value = float(loss)
                losses.append((step + 1, value))
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the loss is {value} at step {step + 1} ({task}, pe={pe}); lower lr"
                    )
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.3f}", lr=f"{float(schedule(step)):.1e}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    train_seconds = time.perf_counter() - start

    @jax.jit
    def predict(params, inputs, positions):
        return jnp.argmax(build(params)(inputs, positions=positions), axis=-1).astype(jnp.int32)

    accuracy, token_accuracy, chance = {}, {}, {}
    for n in test_lengths:
        batch = make_batch(task, np.random.default_rng([seed, 1, n]), eval_examples, n)
        shape = batch["inputs"].shape
        if eval_random_positions:
            positions = randomized_positions(
                jax.random.fold_in(eval_key, n), shape, random_positions
            )
        else:
            positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
        preds = np.asarray(predict(params, batch["inputs"], positions))
        scored = batch["weights"] > 0
        right = preds == batch["targets"]
        accuracy[n] = float(np.mean(np.all(right | ~scored, axis=1)))
        token_accuracy[n] = float(right[scored].mean())
        chance[n] = chance_accuracy(task, n)

    return {
        "task": task,
        "pe": pe,
        "train_lengths": (lo, hi),
        "random_positions": random_positions,
        "accuracy": accuracy,
        "token_accuracy": token_accuracy,
        "chance": chance,
        "losses": losses,
        "final_loss": losses[-1][1],
        "train_seconds": train_seconds,
        "config": config,
        "model": build(params),
    }
