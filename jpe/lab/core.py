"""The one training core of the lab: optimiser, loss, train step, state, checkpoints and loop.

Every trainer (language modelling in `jpe.lab.train`, the synthetic tasks in `jpe.lab.tasks`,
and those still to come) builds on these pieces rather than on copies of them:

- `make_optimizer`: AdamW (Loshchilov & Hutter 2019) with linear warm-up, cosine decay to 10%
  of the peak and global-norm clipping, decay off for norms, biases and embeddings;
- `weighted_nll` / `model_loss`: the mean cross-entropy over the targets of weight > 0;
- `make_step`: one `jax.jit`-able step, `(params, opt_state, batch, step) -> (params,
  opt_state, loss)`, with the positions of each batch chosen by the trainer;
- `init_state`: parameters and optimiser state, laid out on a device mesh when one is given;
- `Checkpoints`: Orbax checkpoints of the state plus JSON metadata, with a refusal to resume
  a run of another configuration;
- `fit`: the loop, with a progress bar, metrics lines, periodic checkpoints, an optional
  evaluation at chosen steps (`eval_steps`, `eval_fn`) and one stop on a non-finite loss
  (`NonFiniteLossError`);
- `model_jit` / `run_compiled`: evaluation functions jitted once per model configuration
  (keyed on the `nnx` graph definition, the weights an argument) and compiled ahead of time
  once per argument shape, kept at module level, so that every seed, length and mode of a lab
  reuses them, with compile and run seconds counted apart (`Timings`); `CompileClock` counts
  the seconds every other compile takes (the train step's).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jpe.lab import sharding

__all__ = [
    "Checkpoints",
    "NonFiniteLossError",
    "State",
    "Timings",
    "CompileClock",
    "check_finite",
    "fit",
    "flatten_model",
    "init_state",
    "make_optimizer",
    "make_step",
    "model_jit",
    "model_loss",
    "resume",
    "run_compiled",
    "weighted_nll",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def check_finite(loss: float, step: int, hint: str = "") -> float:
    """`loss` as a float; raises `NonFiniteLossError` naming the step if it is not finite."""
    loss = float(loss)
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss is {loss} at step {step}; stopping. "
            + (hint or "Lower the learning rate or raise the warm-up and run again.")
        )
    return loss


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


# ---------------------------------------------------------------------------------------------
# Evaluation functions compiled once per model configuration and shape
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def model_jit(fn: Callable, graphdef: nnx.GraphDef, *static) -> Callable:
    """`jax.jit` of `(state, *args) -> fn(nnx.merge(graphdef, state), *args, *static)`.

    Made once per `(fn, graphdef, static)` and kept (least recently used, 256 at most), so
    every model of one configuration (another seed, the same model evaluated again) shares it
    and its compiled executables: `graphdef`, from `nnx.split(model)`, is hashable and equal
    for two modules built from one `TransformerConfig` (it holds the structure and the
    config, not the weights), and `state` (the weights) is an argument. `fn` should be a
    module-level function (a fresh closure would be a fresh key) and `static` hashable.
    """

    def apply(state, *args):
        return fn(nnx.merge(graphdef, state), *args, *static)

    apply.__name__ = getattr(fn, "__name__", "apply")
    return jax.jit(apply)


@dataclasses.dataclass
class Timings:
    """Seconds spent compiling and running executables through `run_compiled`.

    Attributes:
      compile_seconds: tracing, lowering and compiling (or loading from the persistent
        compilation cache) each executable not compiled before in this process.
      run_seconds: the calls, each waited for until its results are ready.
      compiles: executables compiled; calls: executables called.
    """

    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    compiles: int = 0
    calls: int = 0

    def to_json(self) -> dict:
        return {
            "compile_seconds": round(self.compile_seconds, 3),
            "run_seconds": round(self.run_seconds, 3),
            "compiles": self.compiles,
            "calls": self.calls,
        }


# jax.monitoring's events for the three stages of a compile (and a hit in the persistent
# compilation cache, which replaces the last): JAX records each one's seconds.
_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
        "/jax/compilation_cache/cache_retrieval_time_sec",
    }
)
_CLOCK_STATE = threading.local()


def _counting() -> bool:
    return not getattr(_CLOCK_STATE, "paused", False)


class CompileClock:
    """The seconds JAX spends tracing, lowering and compiling (or loading from the persistent
    cache) in this thread while the clock runs, from `jax.monitoring`'s compile events, less
    the compiles of `run_compiled` (which `Timings` times apart).

        with core.CompileClock() as clock:
            params, opt_state, records = core.fit(...)  # the first step compiles
        clock.seconds  # the train step's compile (and any other jit's), not evaluation's
    """

    def __init__(self):
        self.seconds = 0.0
        self._thread = threading.get_ident()

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS and threading.get_ident() == self._thread and _counting():
            self.seconds += duration

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 256


def _signature(args) -> tuple:
    """What an executable is specialised to: the pytree structure, and each leaf's abstract
    value (shape, dtype, weak type) and, for a device array, its sharding."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (jax.typeof(x), x.sharding if isinstance(x, jax.Array) else None) for x in leaves
    )


def run_compiled(jitted: Callable, *args, timings: Timings | None = None):
    """`jitted(*args)`, through an executable compiled ahead of time (`jitted.lower(*args)
    .compile()`) once per `(jitted, _signature(args))` and kept at module level (least
    recently used, 256 at most), and waited for; with `timings`, the compile and the call are
    timed apart. With `model_jit`, a second model of one configuration, or a second call at
    one shape, compiles nothing."""
    key = (jitted, _signature(args))
    executable = _EXECUTABLES.get(key)
    if executable is None:
        start = time.perf_counter()
        _CLOCK_STATE.paused = True  # timed here, not by a CompileClock
        try:
            executable = jitted.lower(*args).compile()
        finally:
            _CLOCK_STATE.paused = False
        if timings is not None:
            timings.compile_seconds += time.perf_counter() - start
            timings.compiles += 1
        _EXECUTABLES[key] = executable
        if len(_EXECUTABLES) > _MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    else:
        _EXECUTABLES.move_to_end(key)
    start = time.perf_counter()
    out = jax.block_until_ready(executable(*args))
    if timings is not None:
        timings.run_seconds += time.perf_counter() - start
        timings.calls += 1
    return out


# ---------------------------------------------------------------------------------------------
# Optimiser, loss and step
# ---------------------------------------------------------------------------------------------


def make_optimizer(
    *,
    lr: float,
    steps: int,
    warmup: int,
    weight_decay: float,
    clip: float,
    b1: float = 0.9,
    b2: float = 0.95,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warm-up and cosine decay, and global-norm gradient clipping.

    The learning rate rises linearly from 0 to `lr` over `warmup` steps, then follows a cosine
    to `lr / 10` at `steps`. Weight decay is decoupled (AdamW) and applies to matrices only:
    not to norms, biases or embedding tables. The parameters are a flat `{path: array}` dict
    (`flatten_model`).

    Returns:
      `(tx, schedule)`: the Optax transformation and the learning-rate schedule.
    """
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
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )
    return tx, schedule


def weighted_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy of `logits` `[..., C]` at integer `targets` `[...]`, weighted by
    `weights` `[...]` (0 for padding and unscored tokens); 0 when every weight is 0."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def model_loss(model, batch: Mapping, positions=None) -> jax.Array:
    """`weighted_nll` of `model(batch["inputs"], positions, batch.get("segment_ids"))` at
    `batch["targets"]` with `batch["weights"]`: the loss of every lab task (next byte, answer
    tokens, token classes)."""
    logits = model(batch["inputs"], positions=positions, segment_ids=batch.get("segment_ids"))
    return weighted_nll(logits, batch["targets"], batch["weights"])


PositionsFn = Callable[[Mapping, jax.Array], jax.Array | None]


def batch_positions(batch: Mapping, step: jax.Array) -> jax.Array | None:
    """The default `PositionsFn`: the batch's own `positions`, or None (0..L-1)."""
    return batch.get("positions")


def make_step(
    build: Callable[[dict], nnx.Module],
    tx: optax.GradientTransformation,
    positions_fn: PositionsFn = batch_positions,
    loss_fn: Callable = model_loss,
) -> Callable:
    """The train step `(params, opt_state, batch, step) -> (params, opt_state, loss)`.

    `positions_fn(batch, step)` gives the positions the model sees (None for 0..L-1); it is
    where randomized positions (Ruoss et al. 2023) are drawn, as a pure function of the step.
    The step is not jitted here: `init_state` and the trainers jit it with their shardings.
    """

    def step_fn(params, opt_state, batch, step):
        positions = positions_fn(batch, step)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(build(p), batch, positions))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step_fn


class State(NamedTuple):
    """What `init_state` returns: the model's builder, the (sharded) parameters and optimiser
    state, the jitted step (it donates `params` and `opt_state`), and the shardings of a
    batch's arrays (None without a mesh)."""

    build: Callable[[dict], nnx.Module]
    params: dict
    opt_state: Any
    step: Callable
    batch_shardings: dict | None


def init_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh | None = None,
    batch_keys: Iterable[str] = (),
    positions_fn: PositionsFn = batch_positions,
    loss_fn: Callable = model_loss,
) -> State:
    """Parameters, optimiser state and the jitted train step of `model`.

    With a `mesh`, the step is one `jax.jit` with explicit in/out shardings: parameters (and
    their Adam moments) split by their logical axes (`jpe.lab.sharding`), the arrays named in
    `batch_keys` split over `data`, scalars replicated. Without one, a plain `jax.jit`.
    """
    build, params = flatten_model(model)
    step_fn = make_step(build, tx, positions_fn, loss_fn)
    if mesh is None:
        opt_state = tx.init(params)
        return State(build, params, opt_state, jax.jit(step_fn, donate_argnums=(0, 1)), None)

    p_shardings = sharding.param_shardings(params, mesh)
    params = jax.device_put(params, p_shardings)
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
    jit_step = jax.jit(
        step_fn,
        in_shardings=(p_shardings, o_shardings, batch_shardings, replicated),
        out_shardings=(p_shardings, o_shardings, replicated),
        donate_argnums=(0, 1),
    )
    return State(build, params, opt_state, jit_step, batch_shardings)


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


def config_json(config) -> dict:
    """A dataclass config as plain JSON (nested dataclasses with a `to_json` use it, so a
    `TransformerConfig` keeps only its non-default `pe_options`)."""

    def plain(value):
        if dataclasses.is_dataclass(value) and hasattr(value, "to_json"):
            return plain(value.to_json())
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    root = {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return json.loads(json.dumps(root))


class Checkpoints:
    """Orbax checkpoints of `{"params", "opt_state"}` plus JSON metadata in `workdir`.

    Creating it writes `workdir/config.json`, or, when one is there, refuses to resume a run
    whose configuration differs in a field outside `resumable` (fields that change only what
    is done around training, such as logging and evaluation).
    """

    def __init__(self, workdir: Path, config: dict, *, keep: int, resumable=frozenset()):
        import orbax.checkpoint as ocp

        self.workdir = Path(workdir)
        path = self.workdir / "config.json"
        if path.exists():
            saved = json.loads(path.read_text())
            diffs = [d for d in _config_diff(saved, config) if d.split(":")[0] not in resumable]
            if diffs:
                raise ValueError(
                    f"{self.workdir} holds a run with a different configuration; refusing to "
                    "resume it. Differing fields:\n  "
                    + "\n  ".join(diffs)
                    + "\nUse another --workdir."
                )
        path.write_text(json.dumps(config, indent=1))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True
        )
        self.manager = ocp.CheckpointManager(
            (self.workdir / "checkpoints").absolute(), options=options
        )

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        import orbax.checkpoint as ocp

        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                meta=ocp.args.JsonSave({"step": step, **meta}),
            ),
        )

    def restore(self, params, opt_state):
        """`(params, opt_state, meta)` of the latest checkpoint, laid out as the given
        arrays are, or None when there is none."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"params": params, "opt_state": opt_state},
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"]["params"], restored["state"]["opt_state"], restored["meta"]

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def resume(state: State, checkpoints: Checkpoints, metrics_path: Path) -> tuple[State, int, dict]:
    """`state` with the latest checkpoint's parameters and optimiser state, the step to start
    from, and the checkpoint's metadata (`{}` and step 0 when there is none); the metrics file
    is cut back to that step, so a resumed run's file reads as one run."""
    restored = checkpoints.restore(state.params, state.opt_state)
    start, meta = 0, {}
    if restored is not None:
        params, opt_state, meta = restored
        start = int(meta["step"])
        state = state._replace(params=params, opt_state=opt_state)
    truncate_metrics(metrics_path, start)
    return state, start, meta


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the metrics of steps <= `step`, so a resumed run's file reads as one run."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def progress_bar(total: int, initial: int = 0, *, enabled: bool = True, desc: str | None = None):
    """A tqdm bar on the main process, or None."""
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0, desc=desc
    )


def fit(
    state: State,
    batch_at: Callable[[int], dict],
    *,
    steps: int,
    start: int = 0,
    end: int | None = None,
    schedule: optax.Schedule,
    log_every: int,
    tokens_per_step: int | None = None,
    checkpoints: Checkpoints | None = None,
    checkpoint_every: int | None = None,
    checkpoint_meta: Callable[[int], dict] | None = None,
    metrics_path: Path | None = None,
    progress: bool = True,
    desc: str | None = None,
    eval_steps: Collection[int] = (),
    eval_fn: Callable[[dict], Mapping[str, float]] | None = None,
) -> tuple[dict, Any, list[dict]]:
    """Runs the train step from `start` to `end` (default `steps`); returns `(params,
    opt_state, records)`.

    Every `log_every` steps, at each checkpoint and at the end, the loss is fetched and
    checked (`NonFiniteLossError` on NaN or inf, the last good checkpoint left intact), and a
    record `{"step", "loss", "lr"[, "tokens_per_s"]}` is kept, appended to `metrics_path`
    (one JSON object a line) and shown on the progress bar. With `checkpoints`, the state is
    saved every `checkpoint_every` steps and at `end`, with `checkpoint_meta(step)`.

    With `eval_fn`, after each step in `eval_steps` (counted from 1, as the records are)
    `eval_fn(params)` is called and the metrics it returns (e.g. `{"val_ppl": 4.1}`) join
    that step's record, which is then always written. The time it takes is left out of
    `tokens_per_s`. It should be cheap (a small, fixed validation subset through a forward
    pass compiled once: `model_jit` and `run_compiled`) and must be done with `params`
    before it returns, as the next step donates them.
    """
    eval_steps = frozenset(eval_steps) if eval_fn is not None else frozenset()
    params, opt_state = state.params, state.opt_state
    end = steps if end is None else end
    bar = progress_bar(steps, start, enabled=progress, desc=desc)
    last_time, last_step = time.perf_counter(), start
    records = []
    metrics = open(metrics_path, "a") if metrics_path is not None else None  # noqa: SIM115
    try:
        for step in range(start, end):
            batch = batch_at(step)
            if state.batch_shardings is not None:
                batch = jax.device_put(batch, state.batch_shardings)
            params, opt_state, loss = state.step(params, opt_state, batch, np.int32(step))
            done = step + 1
            save = checkpoints is not None and (done % checkpoint_every == 0 or done == end)
            evaluate = done in eval_steps
            if done % log_every == 0 or save or done == end or evaluate:
                if checkpoints is not None and not math.isfinite(float(loss)):
                    checkpoints.wait()
                    hint = (
                        f"The last good checkpoint (step {checkpoints.latest_step()}) is intact "
                        f"in {checkpoints.workdir}. Lower --lr or raise --warmup and run again "
                        "in a new --workdir."
                    )
                else:
                    hint = ""
                value = check_finite(loss, done, hint)
                record = {"step": done, "loss": value, "lr": float(schedule(step))}
                if tokens_per_step is not None:
                    now = time.perf_counter()
                    rate = tokens_per_step * (done - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, done
                    record["tokens_per_s"] = rate
                extra = {}
                if evaluate:
                    began = time.perf_counter()
                    extra = {k: float(v) for k, v in eval_fn(params).items()}
                    record.update(extra)
                    last_time += time.perf_counter() - began  # not training throughput
                records.append(record)
                if metrics is not None and jax.process_index() == 0:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if bar is not None:
                    shown = {"loss": f"{value:.3f}"}
                    if "tokens_per_s" in record:
                        shown["tok_s"] = f"{record['tokens_per_s']:,.0f}"
                    shown.update({k: f"{v:.3f}" for k, v in extra.items()})
                    bar.set_postfix(shown)
            if save:
                checkpoints.save(done, params, opt_state, checkpoint_meta(done))
            if bar is not None:
                bar.update(1)
    finally:
        if metrics is not None:
            metrics.close()
        if checkpoints is not None:
            checkpoints.wait()
        if bar is not None:
            bar.close()
    return params, opt_state, records
