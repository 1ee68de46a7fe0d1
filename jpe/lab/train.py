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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jpe.encodings import _checks
from jpe.encodings.positions import randomized_positions
from jpe.lab import data as data_lib
from jpe.lab import sharding
from jpe.nn.config import TransformerConfig
from jpe.nn.transformer import Transformer

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "Training",
    "evaluate",
    "flatten_model",
    "init_training",
    "train",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


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

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep", "log_every"):
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("warmup", self.warmup, minimum=0)
        _checks.positive_int("eval_tokens", self.eval_tokens)
        _checks.positive_float("lr", self.lr)
        _checks.positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _checks.positive_float("clip", self.clip)
        object.__setattr__(self, "eval_lengths", tuple(self.eval_lengths))
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
        if self.model.pe == "learned":
            longest = max((self.seq_len, *self.eval_lengths, self.random_positions or 0))
            if longest > self.model.max_len:
                raise ValueError(
                    f"pe='learned' holds max_len={self.model.max_len} positions, but this run "
                    f"needs {longest}: raise --max-len or drop the longer eval lengths"
                )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Parameters as a flat {path: array} dict
# ---------------------------------------------------------------------------------------------


def _path_name(path) -> str:
    keys = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        if key == "value":  # the Variable's own attribute
            continue
        keys.append(str(key))
    return "/".join(keys)


def flatten_model(model: nnx.Module):
    """`(build, params)`: `params` a flat `{path: array}` dict, `build(params)` the module."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [_path_name(path) for path, _ in leaves]
    params = {name: leaf for name, (_, leaf) in zip(names, leaves, strict=True)}

    def build(params: dict) -> nnx.Module:
        return nnx.merge(
            graphdef, jax.tree_util.tree_unflatten(treedef, [params[n] for n in names])
        )

    return build, params


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup,
        decay_steps=max(cfg.steps, cfg.warmup + 1),
        end_value=cfg.lr * 0.1,
    )
    decay_mask = lambda params: {k: np.ndim(v) >= 2 and "embed" not in k for k, v in params.items()}
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def _loss(model: Transformer, batch: dict, positions) -> jax.Array:
    logits = model(batch["inputs"], positions=positions, segment_ids=batch.get("segment_ids"))
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    weights = batch["weights"]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif json.dumps(a) != json.dumps(b):
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


# Fields that may change between a run and its resumption: they do not change what is
# trained, only what is done around it. (`steps` is not one: it sets the cosine schedule.)
_RESUMABLE = {"checkpoint_every", "keep", "log_every", "eval_lengths", "eval_stride",
              "eval_tokens", "mesh"}  # fmt: skip


def _check_resumable(workdir: Path, cfg: TrainConfig) -> None:
    path = workdir / "config.json"
    current = json.loads(json.dumps(cfg.to_json()))
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = [d for d in _config_diff(saved, current) if d.split(":")[0] not in _RESUMABLE]
        if diffs:
            raise ValueError(
                f"{workdir} holds a run with a different configuration; refusing to resume it. "
                "Differing fields:\n  " + "\n  ".join(diffs) + "\nUse another --workdir."
            )
    path.write_text(json.dumps(current, indent=1))


def _manager(workdir: Path, cfg: TrainConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, enable_async_checkpointing=True, create=True
    )
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def _save(manager, step: int, params, opt_state, data_state: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave({"step": step, "data": data_state}),
        ),
    )


def _restore(manager, params, opt_state):
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"params": params, "opt_state": opt_state},
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return restored["state"]["params"], restored["state"]["opt_state"], restored["meta"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the metrics of steps <= `step`, so a resumed run's file reads as one run."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)


class Training(NamedTuple):
    """What `init_training` returns: the model's builder, sharded state, and the jitted step
    `step(params, opt_state, batch, step_index) -> (params, opt_state, loss)`, which donates
    `params` and `opt_state`."""

    build: Callable[[dict], Transformer]
    params: dict
    opt_state: Any
    step: Callable
    batch_shardings: dict


def init_training(cfg: TrainConfig, mesh: jax.sharding.Mesh, batch_keys: Sequence[str]):
    """Initial parameters and optimiser state laid out on `mesh`, and the jitted train step.

    The step is one `jax.jit` with explicit in/out shardings: parameters (and their Adam
    moments) split by their logical axes (`jpe.lab.sharding`), batches split over `data`,
    scalars replicated.
    """
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    build, params = flatten_model(model)
    del model
    p_shardings = sharding.param_shardings(params, mesh)
    params = jax.device_put(params, p_shardings)
    tx = _optimizer(cfg)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = jax.jit(tx.init)(params)
    # Moments follow their parameters' shardings; counters and other scalars are replicated
    # (jit would otherwise leave them on one device, which the sharded step cannot take).
    o_shardings = jax.tree.map(
        lambda x: (
            x.sharding
            if isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
            else replicated
        ),
        opt_state,
    )
    opt_state = jax.device_put(opt_state, o_shardings)
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in batch_keys}

    def step_fn(params, opt_state, batch, step):
        if cfg.random_positions is not None:
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
            positions = randomized_positions(key, batch["inputs"].shape, cfg.random_positions)
        else:
            positions = batch.get("positions")
        loss, grads = jax.value_and_grad(lambda p: _loss(build(p), batch, positions))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jit_step = jax.jit(
        step_fn,
        in_shardings=(p_shardings, o_shardings, batch_shardings, replicated),
        out_shardings=(p_shardings, o_shardings, replicated),
        donate_argnums=(0, 1),
    )
    return Training(build, params, opt_state, jit_step, batch_shardings)


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
    report) and "model" (the trained `Transformer`).

    `stop_at` ends this call after that step (checkpointed), as a preemption would; calling
    again resumes there. The evaluation runs either way.

    Raises:
      ValueError: a workdir holding a run with another configuration, or bad data.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint stays).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.batch_size % mesh.shape["data"]:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be a multiple of the mesh's data axis "
            f"({mesh.shape['data']})"
        )
    corpus = data_lib.load_corpus(cfg.data)
    batches = data_lib.Batches(
        corpus.train,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        pack=cfg.pack,
        doc_starts=corpus.train_doc_starts,
    )
    _check_resumable(workdir, cfg)

    run = init_training(cfg, mesh, tuple(batches.batch(0)))
    build, params, opt_state, jit_step = run.build, run.params, run.opt_state, run.step
    batch_shardings = run.batch_shardings

    manager = _manager(workdir, cfg)
    start = 0
    restored = _restore(manager, params, opt_state)
    if restored is not None:
        params, opt_state, meta = restored
        start = int(meta["step"])
        batches.restore(meta["data"])
    metrics_path = workdir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)
    end = cfg.steps
    if stop_at is not None:
        end = min(cfg.steps, max(start, _checks.positive_int("stop_at", stop_at)))

    schedule_lr = lambda s: float(
        optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.1
        )(s)
    )

    bar = _progress(cfg.steps, start, progress and jax.process_index() == 0)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_time, last_step, loss_value = time.perf_counter(), start, float("nan")
    losses = []
    try:
        with open(metrics_path, "a") as metrics:
            for step in range(start, end):
                batch = jax.device_put(batches.batch(step), batch_shardings)
                params, opt_state, loss = jit_step(params, opt_state, batch, np.int32(step))
                done = step + 1
                if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == end:
                    loss_value = float(loss)
                    if not math.isfinite(loss_value):
                        manager.wait_until_finished()
                        raise NonFiniteLossError(
                            f"the loss is {loss_value} at step {done}; stopping. The last good "
                            f"checkpoint (step {manager.latest_step()}) is intact in {workdir}. "
                            "Lower --lr or raise --warmup and run again in a new --workdir."
                        )
                    now = time.perf_counter()
                    rate = tokens_per_step * (done - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, done
                    record = {"step": done, "loss": loss_value, "lr": schedule_lr(step),
                              "tokens_per_s": rate}  # fmt: skip
                    losses.append(record)
                    if jax.process_index() == 0:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
                if done % cfg.checkpoint_every == 0 or done == end:
                    _save(manager, done, params, opt_state, batches.state(done))
                if bar is not None:
                    bar.update(1)
    finally:
        manager.wait_until_finished()
        if bar is not None:
            bar.close()

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
    manager.close()
    return {"start_step": start, "losses": losses, "eval": report, "model": model}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

_EVAL_TOKENS = 1 << 14  # tokens per evaluation batch


def _nll_sums(
    model: Transformer, windows: dict, random_positions: int | None = None, seed: int = 0
) -> tuple[float, float, np.ndarray]:
    """Summed NLL and weight over `windows`, and the mean NLL at each position `[L]`.

    With `random_positions` = R, each window's positions are a sorted sample from [0, R), as
    the model was trained (Ruoss et al. 2023 sample them at test time too)."""
    build, params = flatten_model(model)
    inputs, targets, weights = windows["inputs"], windows["targets"], windows["weights"]
    n, length = inputs.shape
    per_batch = max(1, _EVAL_TOKENS // length)

    @jax.jit
    def nll(params, inputs, targets, key):
        positions = None
        if random_positions is not None:
            positions = randomized_positions(key, inputs.shape, random_positions)
        logits = build(params)(inputs, positions=positions)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    total, count = 0.0, 0.0
    by_position, position_count = np.zeros(length), np.zeros(length)
    for i in range(0, n, per_batch):
        sl = slice(i, i + per_batch)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        out = np.asarray(nll(params, inputs[sl], targets[sl], key), np.float64)
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

    Returns:
      `{"ppl": {L: ppl}, "ppl_sliding": {L: ppl}, "loss_by_position": {L: [L floats]}}`, with
      lengths as strings (JSON keys).
    """
    out = {"ppl": {}, "loss_by_position": {}}
    if stride is not None:
        out["ppl_sliding"] = {}
        out["stride"] = stride
    for length in lengths:
        windows = max(1, tokens_per_length // length)
        windows = data_lib.eval_windows(tokens, length, max_windows=windows)
        total, count, by_pos = _nll_sums(model, windows, random_positions)
        out["ppl"][str(length)] = math.exp(total / count)
        out["loss_by_position"][str(length)] = [round(float(x), 5) for x in by_pos]
        if stride is not None and stride < length:
            windows = max(1, tokens_per_length // length)
            windows = data_lib.eval_windows(tokens, length, stride=stride, max_windows=windows)
            # The first window scores all its targets; keep only its last `stride`, so that
            # every scored target has at least L - stride tokens of context.
            windows["weights"][0, : length - stride] = 0.0
            total, count, _ = _nll_sums(model, windows, random_positions)
            out["ppl_sliding"][str(length)] = math.exp(total / count)
    return out
