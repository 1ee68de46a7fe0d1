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
token `y_j` (the input symbols are not scored). `run_task(TaskConfig(...))` trains a fresh
causal `jpe.Transformer` on problem sizes drawn from `train_lengths` with the lab's training
core (`jpe.lab.core`) and reports, per test size, the exact-match accuracy of the whole answer
and the per-token accuracy.

Vocabulary (`VOCAB_SIZE` = 23 tokens, shared by all tasks):

    0..9    symbols: the data of copy/reverse/sort, the bits (0, 1) of parity, recall's values
    10..19  recall's keys (`KEY_OFFSET + k` for key k in 0..9)
    20 SEP, 21 BOS, 22 PAD (padding in `run_task`'s training batches; never in `make_batch`)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpe.encodings import _checks
from jpe.encodings.positions import randomized_positions
from jpe.lab import core
from jpe.nn.config import TransformerConfig
from jpe.nn.registry import encoding_class
from jpe.nn.transformer import Transformer

__all__ = [
    "BOS",
    "KEY_OFFSET",
    "NUM_KEYS",
    "NUM_SYMBOLS",
    "PAD",
    "SEP",
    "TASKS",
    "TaskConfig",
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


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One synthetic-task run: the task, the model, the budget and the evaluation.

    Training: each step draws a problem size n uniformly from `train_lengths` (inclusive) and
    a batch of `batch_size` examples of that size (`make_batch`), padded on the right to the
    longest training sequence with PAD tokens of weight 0, so the step compiles once. The loss
    is the mean cross-entropy over answer tokens. With `random_positions` = R, each row's
    positions are a sorted sample without replacement from [0, R) (Ruoss et al. 2023), drawn
    for the row's real tokens, in training and, by default, at evaluation too, as Ruoss et
    al.'s code does (`eval_random_positions=False` evaluates with 0..T-1 instead: a mismatch
    that costs most of the accuracy even at the training sizes).

    Attributes:
      task: one of `TASKS`.
      pe, pe_options: the encoding (one of `jpe.ENCODINGS`) and its options.
      train_lengths: `(lo, hi)` problem sizes trained on, 1 <= lo <= hi.
      test_lengths: problem sizes to evaluate (default `(hi, 2 * hi, 4 * hi)`).
      d_model, num_layers, num_heads: the Transformer's sizes.
      max_len: `TransformerConfig.max_len`; defaults to the longest position the run uses,
        and a bounded encoding (`learned`) with a smaller one is an error.
      steps, batch_size, seed: optimisation steps, rows per step, and the one seed of
        parameters, batches and random positions.
      lr, warmup, weight_decay, clip: as `jpe.lab.core.make_optimizer` (warm-up default: 10%
        of `steps`).
      random_positions: R for randomized positions, >= the longest training sequence.
      eval_random_positions: randomize positions at evaluation too (default: when
        `random_positions` is set; needs R >= the longest test sequence).
      eval_examples: fresh examples per test size.
      log_every: steps between recorded losses.
    """

    task: str = "copy"
    pe: str = "rope"
    pe_options: Mapping | None = None
    train_lengths: tuple[int, int] = (1, 8)
    test_lengths: tuple[int, ...] | None = None
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_len: int | None = None
    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    lr: float = 1e-3
    warmup: int | None = None
    weight_decay: float = 0.01
    clip: float = 1.0
    random_positions: int | None = None
    eval_random_positions: bool | None = None
    eval_examples: int = 256
    log_every: int = 10

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        _check_task(self.task)
        encoding_class(self.pe)
        train_lengths = _lengths("train_lengths", self.train_lengths)
        if len(train_lengths) != 2 or train_lengths[0] > train_lengths[1]:
            raise ValueError(
                f"train_lengths must be (lo, hi) with 1 <= lo <= hi, got {train_lengths!r}"
            )
        set_("train_lengths", train_lengths)
        hi = train_lengths[1]
        tests = (hi, 2 * hi, 4 * hi) if self.test_lengths is None else self.test_lengths
        set_("test_lengths", _lengths("test_lengths", tests))
        for name in ("steps", "batch_size", "d_model", "num_layers", "num_heads",
                     "eval_examples", "log_every"):  # fmt: skip
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("seed", self.seed, minimum=0)
        _checks.positive_float("lr", self.lr)
        _checks.positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _checks.positive_float("clip", self.clip)
        if self.warmup is None:
            set_("warmup", max(1, self.steps // 10))
        _checks.positive_int("warmup", self.warmup, minimum=0)

        train_width = sequence_length(self.task, hi)
        test_width = max(sequence_length(self.task, n) for n in self.test_lengths)
        if self.eval_random_positions is None:
            set_("eval_random_positions", self.random_positions is not None)
        if self.random_positions is not None:
            _checks.positive_int("random_positions", self.random_positions)
            if self.random_positions < train_width:
                raise ValueError(
                    f"random_positions ({self.random_positions}) must be >= the longest "
                    f"training sequence ({train_width} tokens for {self.task} of size {hi}): "
                    "each row samples that many distinct positions"
                )
            if self.eval_random_positions and self.random_positions < test_width:
                raise ValueError(
                    f"eval_random_positions needs random_positions ({self.random_positions}) "
                    f">= the longest test sequence ({test_width} tokens)"
                )
        elif self.eval_random_positions:
            raise ValueError("eval_random_positions=True needs random_positions")
        needed = max(train_width, test_width, self.random_positions or 0)
        if self.max_len is None:
            set_("max_len", needed)
        _checks.positive_int("max_len", self.max_len)
        limit = self.model.encoding.position_limit(self.model)
        if limit is not None and limit < needed:
            raise ValueError(
                f"pe={self.pe!r} with max_len={limit} cannot hold the {needed} positions this "
                f"run uses (test sequences up to {test_width} tokens"
                + (f", random_positions={self.random_positions}" if self.random_positions else "")
                + "): raise max_len or drop the longer test_lengths"
            )

    @property
    def model(self) -> TransformerConfig:
        """The causal Transformer this run trains."""
        return TransformerConfig(
            pe=self.pe,
            pe_options=self.pe_options,
            vocab_size=VOCAB_SIZE,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            causal=True,
            max_len=self.max_len,
        )

    def replace(self, **changes) -> TaskConfig:
        return dataclasses.replace(self, **changes)


def _predict_tokens(model: Transformer, inputs, positions):
    """Argmax token ids `[B, L]` of `model` over `inputs` `[B, L]` at `positions`."""
    return jnp.argmax(model(inputs, positions=positions), axis=-1).astype(jnp.int32)


def run_task(config: TaskConfig, *, progress: bool = False) -> dict:
    """Trains a fresh causal `jpe.Transformer` on `config.task` and scores its answers per
    length.

    Training runs on the lab's core (`jpe.lab.core`: AdamW, the weighted cross-entropy, one
    jitted step). Evaluation, per test size n (one compile per size): `eval_examples` fresh
    examples (NumPy generator seeded by `(seed, n)`, independent of training), scored with
    teacher forcing and argmax. An answer counts as exactly matched when every answer token is
    right, which is the same as greedy decoding getting the whole answer right.

    Returns:
      `{"accuracy": {n: exact-match accuracy}, "token_accuracy": {n: per-answer-token
      accuracy}, "chance": {n: (exact-match, per-token) of uniform guessing}, "losses":
      [(step, loss), ...], "final_loss": float, "train_seconds": float, "config":
      TransformerConfig, "model": the trained Transformer}`, lengths as int keys,
      accuracies in [0, 1].

    Raises:
      ValueError: `config` is not a `TaskConfig`.
      NonFiniteLossError: the loss became NaN or infinite.
    """
    if not isinstance(config, TaskConfig):
        raise ValueError(f"config must be a jpe.lab.tasks.TaskConfig, got {type(config).__name__}")
    c = config
    lo, hi = c.train_lengths
    train_width = sequence_length(c.task, hi)
    model_config = c.model
    tx, schedule = core.make_optimizer(
        lr=c.lr, steps=c.steps, warmup=c.warmup, weight_decay=c.weight_decay, clip=c.clip
    )
    base_key, eval_key = jax.random.split(jax.random.PRNGKey(c.seed))

    def positions_fn(batch, step):
        if c.random_positions is None:
            return None
        key = jax.random.fold_in(base_key, step)
        return _subset_positions(
            key, batch["inputs"].shape, batch["true_length"], c.random_positions
        )

    state = core.init_state(
        Transformer(model_config, rngs=nnx.Rngs(c.seed)), tx, positions_fn=positions_fn
    )
    rng = np.random.default_rng([c.seed, 0])

    def batch_at(step):
        n = int(rng.integers(lo, hi + 1))
        batch = _pad(make_batch(c.task, rng, c.batch_size, n), train_width)
        return {**batch, "true_length": np.int32(sequence_length(c.task, n))}

    start = time.perf_counter()
    params, _, records = core.fit(
        state,
        batch_at,
        steps=c.steps,
        schedule=schedule,
        log_every=c.log_every,
        progress=progress,
        desc=f"{c.task}/{c.pe}",
    )
    train_seconds = time.perf_counter() - start
    build = state.build
    # One executable per (model configuration, test length) in a process: every seed shares it.
    model = build(params)
    graphdef, model_state = nnx.split(model)
    predict = core.model_jit(_predict_tokens, graphdef)

    accuracy, token_accuracy, chance = {}, {}, {}
    for n in c.test_lengths:
        batch = make_batch(c.task, np.random.default_rng([c.seed, 1, n]), c.eval_examples, n)
        shape = batch["inputs"].shape
        if c.eval_random_positions:
            positions = randomized_positions(
                jax.random.fold_in(eval_key, n), shape, c.random_positions
            )
        else:
            positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
        preds = np.asarray(core.run_compiled(predict, model_state, batch["inputs"], positions))
        scored = batch["weights"] > 0
        right = preds == batch["targets"]
        accuracy[n] = float(np.mean(np.all(right | ~scored, axis=1)))
        token_accuracy[n] = float(right[scored].mean())
        chance[n] = chance_accuracy(c.task, n)

    losses = [(r["step"], r["loss"]) for r in records]
    return {
        "task": c.task,
        "pe": c.pe,
        "train_lengths": (lo, hi),
        "random_positions": c.random_positions,
        "accuracy": accuracy,
        "token_accuracy": token_accuracy,
        "chance": chance,
        "losses": losses,
        "final_loss": losses[-1][1],
        "train_seconds": train_seconds,
        "config": model_config,
        "model": model,
    }
