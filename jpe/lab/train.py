"""Training and evaluation of a byte-level language model with any registered encoding.

`train(config, workdir)` runs AdamW with warm-up and cosine decay and gradient clipping
(Optax), one jitted step with explicit shardings over a `("data", "model")` mesh, and Orbax
checkpoints that make a run resumable: running it again continues from the latest checkpoint,
and a run killed at any moment (SIGKILL included) and restarted reproduces, step for step, the
losses of a run that was never interrupted, because every batch and every random position is a
pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpe.encodings import _checks
from jpe.encodings.positions import randomized_positions
from jpe.lab import core, sharding
from jpe.lab import data as data_lib
from jpe.lab.core import NonFiniteLossError, flatten_model
from jpe.nn.config import TransformerConfig
from jpe.nn.transformer import Transformer

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "evaluate",
    "flatten_model",
    "init_training",
    "train",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a training run does, besides the model (`model`).

    Attributes:
      model: the Transformer's configuration.
      steps: optimisation steps in total (a resumed run stops at the same step).
      batch_size, seq_len: B rows of L bytes per step.
      lr, warmup, weight_decay, clip: AdamW peak learning rate, linear warm-up steps (then
        cosine decay to 10% of the peak), decoupled weight decay (not on norms and biases),
        and the global-norm gradient clip.
      seed: seeds the parameters, the batches and randomized positions.
      data: None for the built-in corpus, or a file, folder or `hf:NAME[:CONFIG]`.
      pack: pack whole documents into rows with segment ids (positions restart per document).
      random_positions: if set, train with Ruoss et al.'s randomized positions: each row's
        positions are a sorted sample from [0, random_positions).
      checkpoint_every, keep: checkpoint interval in steps and how many checkpoints to keep.
      log_every: steps between loss checks, metrics lines and progress-bar updates.
      eval_lengths: evaluation lengths for the final table (default: the training length).
      eval_stride: if set, also sliding-window evaluation with this stride.
      eval_tokens: tokens each evaluation mode runs through the model per length: all the
        non-overlapping windows when validation is shorter, else that many tokens' worth, and
        eval_tokens // L sliding windows (windows evenly spaced over validation).
      mesh: "DATAxMODEL" or None (all devices on data).
      val_steps: steps (counted from 1) after which the validation perplexity at seq_len is
        measured on `val_windows` fixed, non-overlapping windows of the validation split
        (evenly spaced, the same every time), through one forward pass compiled once per
        model configuration; recorded as `val_ppl` in the metrics and returned as
        `"val_curve"` by `train`.
      val_windows: windows of that validation subset.
    """

    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    data: str | None = None
    pack: bool = False
    random_positions: int | None = None
    checkpoint_every: int = 250
    keep: int = 3
    log_every: int = 25
    eval_lengths: tuple[int, ...] = ()
    eval_stride: int | None = None
    eval_tokens: int = 1 << 17
    mesh: str | None = None
    val_steps: tuple[int, ...] = ()
    val_windows: int = 64

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep", "log_every"):
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("warmup", self.warmup, minimum=0)
        _checks.positive_int("eval_tokens", self.eval_tokens)
        _checks.positive_float("lr", self.lr)
        _checks.positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _checks.positive_float("clip", self.clip)
        object.__setattr__(self, "eval_lengths", tuple(self.eval_lengths))
        object.__setattr__(self, "val_steps", tuple(sorted(set(self.val_steps))))
        for step in self.val_steps:
            _checks.positive_int("val_steps", step)
        _checks.positive_int("val_windows", self.val_windows)
        for length in self.eval_lengths:
            _checks.positive_int("eval_lengths", length)
        if self.eval_stride is not None:
            _checks.positive_int("eval_stride", self.eval_stride)
        if self.random_positions is not None:
            _checks.positive_int("random_positions", self.random_positions)
            if self.random_positions < self.seq_len:
                raise ValueError(
                    f"random_positions ({self.random_positions}) must be >= seq_len "
                    f"({self.seq_len}): each row samples seq_len distinct positions"
                )
            if self.pack:
                raise ValueError("random_positions and pack cannot be combined")
            if self.random_positions < max(self.eval_lengths, default=0):
                raise ValueError(
                    f"random_positions ({self.random_positions}) must be >= every eval length "
                    f"(up to {max(self.eval_lengths)}): a randomized model is evaluated with "
                    "positions sampled from the same range"
                )
        limit = self.model.encoding.position_limit(self.model)
        if limit is not None and self.longest_position > limit:
            raise ValueError(
                f"pe={self.model.pe!r} holds max_len={limit} positions, but this run needs "
                f"{self.longest_position}: raise --max-len or drop the longer eval lengths"
            )

    @property
    def longest_position(self) -> int:
        """Positions this run uses: [0, longest_position) in training and evaluation."""
        return max((self.seq_len, *self.eval_lengths, self.random_positions or 0))

    def to_json(self) -> dict:
        return core.config_json(self)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

# Fields that may change between a run and its resumption: they do not change what is
# trained, only what is done around it. (`steps` is not one: it sets the cosine schedule.)
_RESUMABLE = {"checkpoint_every", "keep", "log_every", "eval_lengths", "eval_stride",
              "eval_tokens", "mesh", "val_steps", "val_windows"}  # fmt: skip


def init_training(cfg: TrainConfig, mesh: jax.sharding.Mesh, batch_keys: Sequence[str]):
    """The model's initial state laid out on `mesh` and its jitted train step
    (`jpe.lab.core.State`), with the run's optimiser and, for `random_positions`, Ruoss et
    al.'s positions drawn from (seed, step)."""
    tx, _ = core.make_optimizer(
        lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup, weight_decay=cfg.weight_decay, clip=cfg.clip
    )

    def positions_fn(batch, step):
        if cfg.random_positions is None:
            return batch.get("positions")
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
        return randomized_positions(key, batch["inputs"].shape, cfg.random_positions)

    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    return core.init_state(model, tx, mesh=mesh, batch_keys=batch_keys, positions_fn=positions_fn)


def train(
    cfg: TrainConfig,
    workdir: str | os.PathLike,
    *,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict:
    """Trains (or resumes) a run in `workdir`; returns the final metrics and evaluation.

    Writes `workdir/config.json`, `workdir/metrics.jsonl` (one JSON object a line: step, loss,
    learning rate, tokens/s), Orbax checkpoints under `workdir/checkpoints/`, and
    `workdir/eval.json` (`{"pe", "train_len", "ppl": {length: ppl}, ...}`). The returned
    dict holds "start_step", "losses" (the metrics records of this call), "eval" (that
    report), "model" (the trained `Transformer`), "val_curve" (`[[step, val_ppl], ...]` at
    `cfg.val_steps`, read back from the metrics file, so a resumed run's curve is whole) and
    "seconds" (`{"fit", "fit_compile", "val_compile", "val_run"}`: the training loop of this
    call, and of that the train step's compile (`core.CompileClock`: tracing, lowering and
    XLA's compile, or a load from the persistent cache) and the periodic validation's compile
    and run seconds).

    `stop_at` ends this call after that step (checkpointed), as a preemption would; calling
    again resumes there. The evaluation runs either way.

    Raises:
      ValueError: a workdir holding a run with another configuration, or bad data.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint stays).
    """
    workdir = Path(workdir)
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.batch_size % mesh.shape["data"]:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be a multiple of the mesh's data axis "
            f"({mesh.shape['data']})"
        )
    corpus = data_lib.load_corpus(cfg.data)
    check_eval_lengths(corpus.val, cfg.eval_lengths or (cfg.seq_len,))
    batches = data_lib.Batches(
        corpus.train,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        pack=cfg.pack,
        doc_starts=corpus.train_doc_starts,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = core.Checkpoints(workdir, cfg.to_json(), keep=cfg.keep, resumable=_RESUMABLE)
    run = init_training(cfg, mesh, tuple(batches.batch(0)))
    metrics_path = workdir / "metrics.jsonl"
    run, start, meta = core.resume(run, checkpoints, metrics_path)
    if start:
        batches.restore(meta["data"])
    end = cfg.steps
    if stop_at is not None:
        end = min(cfg.steps, max(start, _checks.positive_int("stop_at", stop_at)))
    _, schedule = core.make_optimizer(
        lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup, weight_decay=cfg.weight_decay, clip=cfg.clip
    )
    val_timings = core.Timings()
    eval_fn = None
    if cfg.val_steps:
        val_windows = data_lib.eval_windows(corpus.val, cfg.seq_len, max_windows=cfg.val_windows)

        def eval_fn(params):
            total, count, _ = _nll_sums(
                run.build(params), val_windows, cfg.random_positions, timings=val_timings
            )
            return {"val_ppl": math.exp(total / count)}

    began = time.perf_counter()
    try:
        with core.CompileClock() as compile_clock:
            params, opt_state, losses = core.fit(
                run,
                batches.batch,
                steps=cfg.steps,
                start=start,
                end=end,
                schedule=schedule,
                log_every=cfg.log_every,
                tokens_per_step=cfg.batch_size * cfg.seq_len,
                checkpoints=checkpoints,
                checkpoint_every=cfg.checkpoint_every,
                checkpoint_meta=lambda step: {"data": batches.state(step)},
                metrics_path=metrics_path,
                progress=progress,
                eval_steps=cfg.val_steps,
                eval_fn=eval_fn,
            )
    except NonFiniteLossError:
        checkpoints.close()
        raise
    fit_seconds = time.perf_counter() - began
    build = run.build

    lengths = cfg.eval_lengths or (cfg.seq_len,)
    model = build(params)
    results = evaluate(
        model,
        corpus.val,
        lengths,
        stride=cfg.eval_stride,
        tokens_per_length=cfg.eval_tokens,
        random_positions=cfg.random_positions,
    )
    report = {"pe": cfg.model.pe, "train_len": cfg.seq_len, **results}
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(report, indent=1))
    checkpoints.close()
    seconds = {
        "fit": round(fit_seconds, 2),
        "fit_compile": round(compile_clock.seconds, 3),
        "val_compile": round(val_timings.compile_seconds, 3),
        "val_run": round(val_timings.run_seconds, 3),
    }
    return {
        "start_step": start,
        "losses": losses,
        "eval": report,
        "model": model,
        "val_curve": val_curve(metrics_path),
        "seconds": seconds,
    }


def val_curve(metrics_path: Path) -> list[list[float]]:
    """`[[step, val_ppl], ...]` from a run's metrics file (the records that have one)."""
    if not metrics_path.exists():
        return []
    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    return [[r["step"], r["val_ppl"]] for r in records if "val_ppl" in r]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def check_eval_lengths(tokens: np.ndarray, lengths: Sequence[int]) -> None:
    """Raises `ValueError` before any training if the validation split is too short for the
    longest evaluation length (a window of L inputs needs L + 1 tokens)."""
    need = max(lengths) + 1
    if len(tokens) < need:
        raise ValueError(
            f"eval_lengths: the validation split holds {len(tokens):,} tokens, but evaluating "
            f"at length {max(lengths):,} needs at least {need:,}; drop the longer lengths or "
            "use more data"
        )


_EVAL_TOKENS = 1 << 14  # tokens per evaluation batch


def _token_nll(model: Transformer, inputs, targets, key, random_positions: int | None):
    """The NLL of each target, float32 `[B, L]`, for int32 `inputs` and `targets` `[B, L]`;
    with `random_positions` = R, each row's positions are a sorted sample from [0, R) drawn
    from `key` (row b's sample does not depend on the number of rows)."""
    positions = None
    if random_positions is not None:
        positions = randomized_positions(key, inputs.shape, random_positions)
    logits = model(inputs, positions=positions)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _batch_rows(windows: int, length: int) -> int:
    """Rows of every evaluation batch of `windows` windows of `length`: `_EVAL_TOKENS //
    length` (at least 1), or, for fewer windows, the next power of two at or above
    `windows`. The last, ragged batch is padded to the same rows, so each length compiles
    one shape however many windows a mode or a validation split has (a handful of buckets
    below a full batch), and both modes at one length usually share it."""
    per_batch = max(1, _EVAL_TOKENS // length)
    return min(per_batch, 1 << (windows - 1).bit_length())


def _nll_sums(
    model: Transformer,
    windows: dict,
    random_positions: int | None = None,
    seed: int = 0,
    timings: core.Timings | None = None,
) -> tuple[float, float, np.ndarray]:
    """Summed NLL and weight over `windows`, and the mean NLL at each position `[L]`.

    With `random_positions` = R, each window's positions are a sorted sample from [0, R), as
    the model was trained (Ruoss et al. 2023 sample them at test time too).

    The forward pass is `core.model_jit(_token_nll, graphdef, random_positions)`, compiled
    once per (model configuration, R, batch shape) in this process (`core.run_compiled`,
    which adds to `timings`): every model of one configuration and every call at one length
    reuse it. Batches have `_batch_rows` rows; the last is padded with rows of zeros whose
    outputs are dropped (each row's NLL depends on that row alone), so the sums are those of
    the unpadded windows.
    """
    graphdef, state = nnx.split(model)
    nll = core.model_jit(_token_nll, graphdef, random_positions)
    inputs, targets, weights = windows["inputs"], windows["targets"], windows["weights"]
    n, length = inputs.shape
    rows = _batch_rows(n, length)
    total, count = 0.0, 0.0
    by_position, position_count = np.zeros(length), np.zeros(length)
    for i in range(0, n, rows):
        sl = slice(i, i + rows)
        real = len(inputs[sl])
        pad = ((0, rows - real), (0, 0))
        batch_inputs = np.pad(np.asarray(inputs[sl], np.int32), pad)
        batch_targets = np.pad(np.asarray(targets[sl], np.int32), pad)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        out = core.run_compiled(nll, state, batch_inputs, batch_targets, key, timings=timings)
        out = np.asarray(out, np.float64)[:real]
        w = np.asarray(weights[sl], np.float64)
        total += float((out * w).sum())
        count += float(w.sum())
        by_position += (out * w).sum(0)
        position_count += w.sum(0)
    return total, count, by_position / np.maximum(position_count, 1)


def evaluate(
    model: Transformer,
    tokens: np.ndarray,
    lengths: Sequence[int],
    *,
    stride: int | None = None,
    tokens_per_length: int = 1 << 17,
    random_positions: int | None = None,
) -> dict:
    """Validation perplexity at each length.

    Non-overlapping windows score every token once, with contexts from 0 to L - 1 (as Press et
    al. evaluate); with `stride`, sliding windows score only each window's last `stride`
    targets, which have at least L - stride tokens of context (the first window included).
    Also the mean loss at each position of the non-overlapping windows (`loss_by_position`),
    which shows how much of a long window's gain is early tokens seeing more context. A model
    trained with randomized positions is evaluated with them (`random_positions`, R >= every
    length). Each mode runs about `tokens_per_length` tokens through the model per length
    (windows evenly spaced over `tokens`; all non-overlapping ones when `tokens` is shorter).

    The forward pass compiles once per (model configuration, batch shape) in a process and is
    reused by every later model of that configuration (`_nll_sums`); `"timings"` says how
    long compiling and running took in this call.

    Returns:
      `{"ppl": {L: ppl}, "ppl_sliding": {L: ppl}, "loss_by_position": {L: [L floats]},
      "timings": {"compile_seconds", "run_seconds", "compiles", "calls"}}`, with lengths as
      strings (JSON keys).
    """
    timings = core.Timings()
    out = {"ppl": {}, "loss_by_position": {}}
    if stride is not None:
        out["ppl_sliding"] = {}
        out["stride"] = stride
    for length in lengths:
        windows = max(1, tokens_per_length // length)
        windows = data_lib.eval_windows(tokens, length, max_windows=windows)
        total, count, by_pos = _nll_sums(model, windows, random_positions, timings=timings)
        out["ppl"][str(length)] = math.exp(total / count)
        out["loss_by_position"][str(length)] = [round(float(x), 5) for x in by_pos]
        if stride is not None and stride < length:
            windows = max(1, tokens_per_length // length)
            windows = data_lib.eval_windows(tokens, length, stride=stride, max_windows=windows)
            # The first window scores all its targets; keep only its last `stride`, so that
            # every scored target has at least L - stride tokens of context.
            windows["weights"][0, : length - stride] = 0.0
            total, count, _ = _nll_sums(model, windows, random_positions, timings=timings)
            out["ppl_sliding"][str(length)] = math.exp(total / count)
    out["timings"] = timings.to_json()
    return out
