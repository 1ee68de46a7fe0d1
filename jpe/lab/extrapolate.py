"""The length-extrapolation lab: train short, evaluate long, draw the result.

`run(LabConfig(...), workdir)` trains one byte-level decoder per encoding (and seed; three by
default) on the same data, budget and training length with `jpe.lab.train.train` (so every run
checkpoints and resumes), measuring its 1x validation perplexity as it trains, evaluates each
at every evaluation length, and writes to `workdir`:

- `results.json`: `{pe: {length: ppl}}`, non-overlapping windows, mean over seeds;
- `details.json`: everything: per seed, sliding windows, the loss at each position, the 1x
  validation perplexity during training (`"ppl_1x_curve": [[step, ppl], ...]`, every 10% of
  the steps and at 80% and 100%, on a fixed subset of `val_windows` windows), the seconds
  (`{"wall", "train_compile", "train", "val_1x", "eval_compile", "eval_run",
  "eval_compiles"}`: the run's wall time, its train step's compile, its training loop
  without that compile and without its periodic 1x validation, that validation, and its
  final evaluation's compile and run seconds, timed apart), the configuration, the machine and the
  command;
- `results.md`: the same numbers as Markdown tables (mean ± half the min–max range over
  seeds, when there are several), the plateau check ("Is 1x still improving?": each run's
  relative 1x improvement over its last 20% of steps, which passes at <= 2%, so that no
  encoding is compared while still undertrained), and a table of those seconds per
  encoding;
- `extrapolation.png`: perplexity against evaluation length (log-log), one line per encoding,
  the spread over seeds shaded, the training length marked; one panel per evaluation mode;
- `position_loss.png`: the loss at each position of the longest windows.

Two evaluation modes, because they answer different questions:

- non-overlapping windows (Press et al. 2022, "Train Short, Test Long", their main tables):
  every token is scored once, with contexts from 0 to L - 1, so a longer window also gives
  the *early* tokens of the training length more context;
- sliding windows that score only each window's last `stride` tokens (at least L - stride
  tokens of context): at L >= seq_len + stride every scored token has at least a full
  training length of context, so a gain there is extrapolation, not early tokens seeing more.

A trained `rope` model is also evaluated with context-extension scalings applied at evaluation
time only (`rope+linear`, `rope+ntk`, `rope+dynamic`, `rope+yarn`, `rope+llama3`), with
factor = evaluation length / training length (dynamic NTK scales itself from the sequence
length and uses factor 1); and any encoding can be trained with Ruoss et al.'s (2023)
randomized positions by naming it `PE+randomized`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from jpe.encodings import _checks
from jpe.lab import report

__all__ = [
    "ROPE_SCALINGS",
    "LabConfig",
    "add_to",
    "check_add_to",
    "TaskLabConfig",
    "parse_pe",
    "run",
    "run_tasks",
    "scaled_rope_config",
    "write_outputs",
]

#: evaluation-time context extensions applied to a trained rope model
ROPE_SCALINGS = ("linear", "ntk", "dynamic", "yarn", "llama3")

RANDOMIZED = "+randomized"


def sequence_encodings() -> tuple[str, ...]:
    """The registered encodings of 1-D positions: the labs' default set (2-D encodings of
    image grids are the vision lab's)."""
    from jpe.nn.registry import ENCODINGS, encoding_class

    return tuple(n for n in ENCODINGS if encoding_class(n).position_axes == 1)


def parse_pe(spec: str) -> tuple[str, bool]:
    """`"rope"` -> ("rope", False); `"rope+randomized"` -> ("rope", True).

    Raises:
      ValueError: an unknown encoding (the message lists the registered ones).
    """
    from jpe.nn.registry import ENCODINGS

    name, randomized = spec, False
    if spec.endswith(RANDOMIZED):
        name, randomized = spec[: -len(RANDOMIZED)], True
    if name not in ENCODINGS:
        raise ValueError(
            f"pe: unknown encoding {spec!r}; valid: {', '.join(ENCODINGS)}, "
            f"each optionally with {RANDOMIZED!r}"
        )
    return name, randomized


@dataclasses.dataclass(frozen=True)
class LabConfig:
    """One lab run: what is trained, for how long, and where it is evaluated.

    Attributes:
      pes: encodings to train, each a registered name, optionally with "+randomized".
      seq_len: the training length (tokens per row).
      steps, batch_size, lr, warmup: the training budget, the same for every encoding
        (warm-up default: 10% of the steps).
      d_model, num_layers, num_heads: the model, the same for every encoding.
      eval_lengths: evaluation lengths (default: 1x, 2x, 4x, ..., 32x seq_len).
      stride: sliding-window stride (default seq_len // 4).
      eval_tokens: tokens each evaluation mode runs through the model per length (all the
        non-overlapping windows of the validation split when it is shorter; eval_tokens // L
        sliding windows).
      seeds: one run per seed and encoding.
      rope_scalings: evaluation-time scalings of every trained plain `rope` model.
      random_positions: the range [0, N) randomized positions are drawn from (default: the
        longest evaluation length, as Ruoss et al. draw from the test range).
      data: None for the built-in corpus, or a file, folder or `hf:NAME[:CONFIG]`.
      val_windows: the fixed validation subset (that many non-overlapping windows of
        seq_len, evenly spaced, the same at every point) on which each run's 1x perplexity
        is measured every 10% of the steps and at 80% and 100% (`curve_steps`), for the
        plateau check: a run passes when its 1x perplexity improved by at most 2% over the
        last 20% of the steps (`report.plateau`).

    The defaults are the README's run: every encoding, a model of d_model 64, 2 layers and 4
    heads trained for 2000 steps of batch 16 at length 64, three seeds (0, 1, 2), so that
    each cell is a mean with its spread, and 131,072 evaluation tokens per length and mode.
    The budget was sized from probes with seed 0 (`none` and `t5` improved by 1.0% and 1.6%
    over the last 400 steps, where 300 steps of a d_model 128, 4-layer model left them
    improving by 2.2% and 4.0%); in the full three-seed run 24 of 51 runs still improved by
    2.1-4.3% and failed the plateau check, and the run took 53 minutes on 2 CPU cores
    (README, "Length extrapolation").
    """

    pes: tuple[str, ...] = ()
    seq_len: int = 64
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int | None = None
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    eval_lengths: tuple[int, ...] = ()
    stride: int | None = None
    eval_tokens: int = 1 << 17
    seeds: tuple[int, ...] = (0, 1, 2)
    rope_scalings: tuple[str, ...] = ROPE_SCALINGS
    random_positions: int | None = None
    data: str | None = None
    val_windows: int = 64

    def __post_init__(self):

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("pes", tuple(self.pes) or sequence_encodings())
        for spec in self.pes:
            parse_pe(spec)
        if len(set(self.pes)) != len(self.pes):
            raise ValueError(f"pes: each encoding once, got {self.pes}")
        for name in ("seq_len", "steps", "batch_size", "d_model", "num_layers", "num_heads",
                     "val_windows"):  # fmt: skip
            _checks.positive_int(name, getattr(self, name))
        if self.warmup is None:
            set_("warmup", max(1, self.steps // 10))
        _checks.positive_int("warmup", self.warmup, minimum=0)
        _checks.positive_int("eval_tokens", self.eval_tokens)
        lengths = tuple(self.eval_lengths) or tuple(self.seq_len * 2**i for i in range(6))
        for length in lengths:
            _checks.positive_int("eval_lengths", length)
        set_("eval_lengths", tuple(sorted(set(lengths))))
        set_("stride", self.stride or max(1, self.seq_len // 4))
        _checks.positive_int("stride", self.stride)
        if self.stride > min(self.eval_lengths):
            raise ValueError(
                f"stride ({self.stride}) must be at most the shortest evaluation length "
                f"({min(self.eval_lengths)})"
            )
        set_("seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once, got {self.seeds}")
        set_("rope_scalings", tuple(self.rope_scalings))
        for name in self.rope_scalings:
            _checks.one_of("rope_scalings", name, ROPE_SCALINGS)
        if self.random_positions is None:
            set_("random_positions", max(self.eval_lengths))
        if self.random_positions < self.seq_len:
            raise ValueError(
                f"random_positions ({self.random_positions}) must be >= seq_len ({self.seq_len})"
            )

    @property
    def max_len(self) -> int:
        """Rows of a learned table: every position evaluated (untrained past seq_len)."""
        return max(*self.eval_lengths, self.random_positions, self.seq_len)


def _train_config(lab: LabConfig, spec: str, seed: int):
    from jpe.lab.train import TrainConfig
    from jpe.nn.config import TransformerConfig

    name, randomized = parse_pe(spec)
    model = TransformerConfig(
        pe=name,
        d_model=lab.d_model,
        num_layers=lab.num_layers,
        num_heads=lab.num_heads,
        max_len=lab.max_len,
    )
    return TrainConfig(
        model=model,
        steps=lab.steps,
        batch_size=lab.batch_size,
        seq_len=lab.seq_len,
        lr=lab.lr,
        warmup=lab.warmup,
        seed=seed,
        data=lab.data,
        random_positions=lab.random_positions if randomized else None,
        checkpoint_every=max(1, lab.steps // 2),
        log_every=max(1, min(25, lab.steps // 4)),
        eval_lengths=lab.eval_lengths,
        eval_stride=lab.stride,
        eval_tokens=lab.eval_tokens,
        val_steps=curve_steps(lab.steps),
        val_windows=lab.val_windows,
    )


def curve_steps(steps: int) -> tuple[int, ...]:
    """The steps at which the lab measures the 1x validation perplexity: every 10% of
    `steps` (rounded, at least step 1), the 80% point (`report.plateau_start`) and the end
    exactly."""
    points = {max(1, round(steps * k / 10)) for k in range(1, 11)}
    return tuple(sorted(points | {report.plateau_start(steps), steps}))


def scaled_rope_config(config, kind: str, length: int, seq_len: int):
    """`config` with an evaluation-time rope scaling for windows of `length`.

    factor = length / seq_len (at least 1), `original_max_position_embeddings` = seq_len;
    dynamic NTK grows its base with the sequence length itself and takes factor 1. YaRN and
    Llama 3 use Hugging Face's defaults (beta_fast 32, beta_slow 1; low/high frequency factors
    1 and 4).
    """
    _checks.one_of("kind", kind, ROPE_SCALINGS)
    factor = max(1.0, length / seq_len)
    scaling = {"rope_type": kind, "factor": factor}
    if kind == "dynamic":
        scaling = {"rope_type": "dynamic", "factor": 1.0}
    if kind in ("dynamic", "yarn", "llama3"):
        scaling["original_max_position_embeddings"] = seq_len
    if kind == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    options = {**config.pe_options.non_default(), "scaling": scaling}
    return config.replace(pe_options=options)


def _evaluate_rope_scalings(lab: LabConfig, model, corpus_val) -> dict:
    """{kind: {"ppl": {L: ppl}, "ppl_sliding": {L: ppl}, "seconds": {...}}} for a trained
    rope `model` (`seconds` as `_seconds` gives them, summed over the lengths)."""
    from flax import nnx

    from jpe.lab.train import evaluate
    from jpe.nn.transformer import Transformer

    params = nnx.state(model, nnx.Param)
    out = {}
    for kind in lab.rope_scalings:
        out[kind] = {"ppl": {}, "ppl_sliding": {}}
        began, timings = time.perf_counter(), []
        for length in lab.eval_lengths:
            config = scaled_rope_config(model.config, kind, length, lab.seq_len)
            scaled = Transformer(config, rngs=nnx.Rngs(0))
            nnx.update(scaled, params)  # the trained weights; only the rotation changes
            r = evaluate(
                scaled,
                corpus_val,
                [length],
                stride=lab.stride,
                tokens_per_length=lab.eval_tokens,
            )
            out[kind]["ppl"][str(length)] = r["ppl"][str(length)]
            if str(length) in r.get("ppl_sliding", {}):
                out[kind]["ppl_sliding"][str(length)] = r["ppl_sliding"][str(length)]
            timings.append(r["timings"])
        out[kind]["seconds"] = _seconds(time.perf_counter() - began, timings)
    return out


def _seconds(wall: float, timings) -> dict:
    """A run's `seconds` record: its wall time (training, if any, and evaluation) and, summed
    over `timings` (`evaluate`'s), the evaluation's compile seconds (trace, lower and XLA
    compile, or a load from the persistent cache, timed apart ahead of time), run seconds
    (the compiled calls, waited for) and number of compiled executables."""
    return {
        "wall": round(wall, 2),
        "eval_compile": round(sum(t["compile_seconds"] for t in timings), 3),
        "eval_run": round(sum(t["run_seconds"] for t in timings), 3),
        "eval_compiles": sum(t["compiles"] for t in timings),
    }


def _run_one(
    lab: LabConfig, spec: str, seed: int, workdir: Path, progress: bool, corpus_val=None
) -> dict:
    """`{spec: record}` for one encoding and seed: trains it (or resumes its run in
    `workdir/runs`) and evaluates it; a plain `rope` also gives one `"rope+KIND"` record per
    evaluation-time scaling (on `corpus_val`, loaded when None)."""
    from jpe.lab import data as data_lib
    from jpe.lab.train import train

    cfg = _train_config(lab, spec, seed)
    name = spec.replace(RANDOMIZED, "-randomized")
    began = time.perf_counter()
    result = train(cfg, workdir / "runs" / f"{name}-seed{seed}", progress=progress)
    evaluation = result["eval"]
    seconds = _seconds(time.perf_counter() - began, [evaluation["timings"]])
    fit = result["seconds"]
    seconds["train_compile"] = round(fit["fit_compile"], 3)
    seconds["train"] = round(
        fit["fit"] - fit["fit_compile"] - fit["val_compile"] - fit["val_run"], 2
    )
    seconds["val_1x"] = round(fit["val_compile"] + fit["val_run"], 3)
    out = {
        spec: {
            "ppl": evaluation["ppl"],
            "ppl_sliding": evaluation.get("ppl_sliding", {}),
            "loss_by_position": evaluation["loss_by_position"][str(max(lab.eval_lengths))],
            "final_train_loss": result["losses"][-1]["loss"] if result["losses"] else None,
            "ppl_1x_curve": result["val_curve"],
            "seconds": seconds,
        }
    }
    if spec == "rope" and lab.rope_scalings:
        if corpus_val is None:
            corpus_val = data_lib.load_corpus(lab.data).val
        for kind, r in _evaluate_rope_scalings(lab, result["model"], corpus_val).items():
            out[f"rope+{kind}"] = {**r, "loss_by_position": None}
    return out


# The JAX settings a worker process copies from the process that starts it (it inherits the
# environment, XLA_FLAGS and JAX_* variables included).
_WORKER_CONFIG = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
    "jax_numpy_rank_promotion",
)


def _start_worker(cpu_sets, config: dict) -> None:
    """A worker of `run(..., jobs=N)`: takes the next set of CPUs (so that the workers' XLA
    thread pools, sized when the backend starts, do not overlap) and the parent's settings."""
    import jax

    cpus = cpu_sets.get()
    if hasattr(os, "sched_setaffinity"):  # Linux; elsewhere the workers share every CPU
        os.sched_setaffinity(0, cpus)
    # Each worker is a single-host process of its own: not a member of a multi-host job
    # (`jpe.lab.sharding.maybe_initialize_distributed` reads these).
    for marker in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID"):
        os.environ.pop(marker, None)
    for key, value in config.items():
        jax.config.update(key, value)


def _cpu_sets(jobs: int) -> list[list[int]]:
    """This process's CPUs dealt round-robin into `jobs` disjoint sets."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus = cpus or list(range(os.cpu_count() or 1))
    if jobs > len(cpus):
        raise ValueError(f"jobs ({jobs}) must be at most the {len(cpus)} CPUs this process may use")
    return [cpus[i::jobs] for i in range(jobs)]


def run(
    lab: LabConfig,
    workdir: str | os.PathLike,
    *,
    progress: bool = True,
    log=print,
    jobs: int = 1,
) -> dict:
    """Trains and evaluates every encoding and seed of `lab`; writes the outputs; returns the
    details dict (see `write_outputs`).

    `jobs` > 1 runs that many encodings and seeds at once, each in a worker process of its
    own on its own share of the CPUs (CPU only). A model of the lab's size leaves XLA's
    threads idle for much of each step, so on a CPU several runs side by side finish sooner
    than one after the other (README, "Length extrapolation"). Each run's numbers are those
    of `jobs=1` up to float rounding (fewer threads may sum in another order); the seconds
    reported are each run's own. Workers inherit the environment (`XLA_FLAGS`, `JAX_*`) and
    copy the settings in `_WORKER_CONFIG` (the compilation cache's, rank promotion); other
    `jax.config.update` changes made in this process (say, `jax_enable_x64`) do not reach them.
    """
    import jax

    from jpe.lab import data as data_lib

    jobs = min(_checks.positive_int("jobs", jobs), len(lab.pes) * len(lab.seeds))
    if jobs > 1 and jax.default_backend() != "cpu":
        raise ValueError(
            f"jobs ({jobs}) > 1 runs several CPU processes; on {jax.default_backend()} use jobs=1"
        )
    cpu_sets = _cpu_sets(jobs) if jobs > 1 else None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    need = max(lab.eval_lengths) + 1
    corpus = data_lib.load_corpus(lab.data)
    if len(corpus.val) < need:
        raise ValueError(
            f"the validation split holds {len(corpus.val)} tokens; evaluating at length "
            f"{max(lab.eval_lengths)} needs at least {need}"
        )
    order = [(p, s) for p in lab.pes for s in lab.seeds]
    total = len(order)
    started = time.perf_counter()
    records: dict[tuple[str, int], dict] = {}
    if jobs == 1:
        for i, (spec, seed) in enumerate(order, 1):
            log(f"[{i}/{total}] {spec}, seed {seed}")
            if spec == "rope" and lab.rope_scalings:
                log(f"      rope scalings at evaluation: {', '.join(lab.rope_scalings)}")
            records[spec, seed] = _run_one(lab, spec, seed, workdir, progress, corpus.val)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")  # a fresh JAX in each worker
        queue = context.Queue()
        for cpus in cpu_sets:
            queue.put(cpus)
        config = {key: getattr(jax.config, key) for key in _WORKER_CONFIG}
        log(f"{total} runs in {jobs} worker processes (CPUs {cpu_sets})")
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_start_worker, initargs=(queue, config)
        ) as pool:
            # Seed-major: the seeds of one encoding run one after another, not side by side,
            # so the later ones load its executables from the persistent cache.
            futures = {
                pool.submit(_run_one, lab, spec, seed, workdir, False): (spec, seed)
                for seed in lab.seeds
                for spec in lab.pes
            }
            try:
                for i, future in enumerate(as_completed(futures), 1):
                    spec, seed = futures[future]
                    try:
                        records[spec, seed] = future.result()
                    except Exception as e:
                        e.add_note(f"in the run of {spec}, seed {seed}")
                        raise
                    wall = records[spec, seed][spec]["seconds"]["wall"]
                    log(f"[{i}/{total}] {spec}, seed {seed}: done in {wall:.0f} s")
            except BaseException:  # a failed run or Ctrl-C: stop, rather than train the rest
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    runs: dict[str, dict[str, dict]] = {}
    for spec, seed in order:  # the order of `lab.pes` and `lab.seeds`, however they finished
        for key, record in records[spec, seed].items():
            runs.setdefault(key, {})[str(seed)] = record
    details = report.details(dataclasses.asdict(lab), runs, time.perf_counter() - started)
    write_outputs(details, workdir)
    return details


def _lm_spec(details: dict) -> report.ReportSpec:
    cfg = details["config"]
    seq_len = cfg["seq_len"]
    stride = cfg["stride"]
    return report.ReportSpec(
        metrics=(
            report.Metric(
                "ppl",
                "Validation perplexity, non-overlapping windows (every token scored once)",
                "validation perplexity (bytes)",
                panel="non-overlapping windows",
            ),
            report.Metric(
                "ppl_sliding",
                f"Validation perplexity, sliding windows (each window scores its last {stride} "
                f"tokens, which have at least L − {stride} tokens of context)",
                "validation perplexity (bytes)",
                panel="sliding windows",
            ),
        ),
        summary=(
            f"Trained at length {seq_len} for {cfg['steps']} steps (batch "
            f"{cfg['batch_size']}, d_model {cfg['d_model']}, {cfg['num_layers']} layers, "
            f"{cfg['num_heads']} heads), seeds {', '.join(map(str, cfg['seeds']))}; "
            f"up to {cfg['eval_tokens']:,} tokens per length and mode. Machine: "
            f"{details['machine']}. Command: `{details['command']}`."
        ),
        column=lambda n: f"{n} ({n // seq_len}x)" if n % seq_len == 0 else str(n),
        x_label="evaluation length (tokens)",
        train_size=(seq_len, f"training length {seq_len}"),
        figure="extrapolation.png",
        title=(
            f"Length extrapolation: trained at {seq_len} for {cfg['steps']} steps, "
            f"seeds {', '.join(map(str, cfg['seeds']))}"
        ),
        log=True,
        plateau=report.Plateau("ppl_1x_curve", f"1x ({seq_len}-token) validation perplexity"),
    )


def write_outputs(details: dict, workdir: str | os.PathLike) -> None:
    """`results.json`, `details.json`, `results.md`, `extrapolation.png` and
    `position_loss.png` from a language-model lab's `details`."""
    workdir = Path(workdir)
    report.write(details, workdir, _lm_spec(details))
    report.plot_position_loss(details, workdir / "position_loss.png")


def check_add_to(lab: LabConfig, directory: str | os.PathLike) -> None:
    """Raises `ValueError` unless `directory` holds a lab's `results.md` whose tables the runs
    of `lab` can join (the same evaluation lengths and stride): checked before training."""
    path = Path(directory) / "results.md"
    if not path.is_file():
        raise ValueError(f"add_to: {path} does not exist; run the earlier lab there first")
    earlier = report.read_tables(path.read_text())
    probe = {"config": dataclasses.asdict(lab), "machine": "", "command": ""}
    for metric in _lm_spec(probe).metrics:
        if metric.title not in earlier:
            raise ValueError(
                f"add_to: {path} has no table {metric.title!r}; the runs differ in their "
                "stride or evaluation modes"
            )
        old_sizes = {int(n) for row in earlier[metric.title].values() for n in row}
        if old_sizes != set(lab.eval_lengths):
            raise ValueError(
                f"add_to: the evaluation lengths differ: {sorted(old_sizes)} in {path}, "
                f"{list(lab.eval_lengths)} here"
            )


def add_to(details: dict, directory: str | os.PathLike) -> list[str]:
    """Adds the encodings of a finished lab run to an earlier lab's results in `directory`,
    without rerunning the earlier encodings.

    The new rows are appended to each table of `directory/results.md` (a row of the same
    name is replaced), a line under the tables records the command, machine and time of the
    added rows, `results.json` gains their means, and `extrapolation.png` is redrawn from the
    tables, so the new encodings are drawn beside the earlier ones (`position_loss.png` is
    left as it was). Both runs must share the evaluation lengths and the stride.

    Returns:
      the specs added.

    Raises:
      ValueError: `directory` holds no `results.md`, or its tables have other lengths or
        another stride than this run's.
    """
    directory = Path(directory)
    check_add_to(LabConfig(**{**details["config"], "eval_lengths": tuple(
        details["config"]["eval_lengths"])}), directory)  # fmt: skip
    path = directory / "results.md"
    text = path.read_text()
    spec = _lm_spec(details)
    ours = report.markdown(details, spec).splitlines()
    added = list(details["runs"])
    for metric in spec.metrics:
        start = ours.index(f"### {metric.title}")
        rows = {}
        for line in ours[start + 4 :]:
            if not line.startswith("| "):
                break
            rows[line.split("|")[1].strip()] = line
        text = report.add_rows(text, metric.title, rows)
    seconds_title = f"### {report.SECONDS_TITLE}"
    if seconds_title in ours and seconds_title in text.splitlines():
        start = ours.index(seconds_title)
        rows = {}
        for line in ours[start + 6 :]:
            if not line.startswith("| "):
                break
            rows[line.split("|")[1].strip()] = line
        text = report.add_rows(text, report.SECONDS_TITLE, rows)
    text = text.rstrip("\n") + (
        f"\n\nRows added later ({', '.join(added)}), with the same budget: command "
        f"`{details['command']}`, machine {details['machine']}, {details['seconds']:.0f} s.\n"
    )
    path.write_text(text)
    results_path = directory / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    means = report.aggregate(details, spec.metrics[0].key)
    results.update({name: {k: v[0] for k, v in by.items()} for name, by in means.items()})
    results_path.write_text(json.dumps(results, indent=1))
    tables = report.read_tables(text)
    runs = {
        name: {"0": {m.key: tables[m.title].get(name, {}) for m in spec.metrics}}
        for name in tables[spec.metrics[0].title]
    }
    report.plot({**details, "runs": runs}, spec, directory / spec.figure)
    return added


# ---------------------------------------------------------------------------------------------
# Synthetic tasks
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskLabConfig:
    """Length generalisation on a synthetic task (`jpe.lab.tasks`).

    Each encoding trains on problem sizes 1..task_len and is tested at `test_lengths`
    (default: task_len, 2x, 3x and 4x), as Ruoss et al. (2023) and Kazemnejad et al. (2023)
    test beyond the training range.

    Attributes:
      task: copy, reverse, sort, parity or recall (`jpe.lab.tasks.TASKS`).
      pes: encodings to train, each a registered name, optionally with "+randomized".
      task_len: train on problem sizes 1..task_len.
      steps, batch_size, lr: the training budget, the same for every encoding.
      d_model, num_layers, num_heads: the model, the same for every encoding.
      seeds: one run per seed and encoding.
      test_lengths: problem sizes to test (default 1x, 2x, 3x and 4x task_len).
      random_positions: the range of randomized positions (default 8x the longest test
        sequence).
    """

    task: str = "copy"
    pes: tuple[str, ...] = ()
    task_len: int = 8
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    seeds: tuple[int, ...] = (0,)
    test_lengths: tuple[int, ...] = ()
    random_positions: int | None = None

    def __post_init__(self):
        from jpe.lab import tasks

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        _checks.one_of("task", self.task, tasks.TASKS)
        set_("pes", tuple(self.pes) or sequence_encodings())
        for spec in self.pes:
            parse_pe(spec)
        for name in ("task_len", "steps", "batch_size", "d_model", "num_layers", "num_heads"):
            _checks.positive_int(name, getattr(self, name))
        lengths = tuple(self.test_lengths) or tuple(k * self.task_len for k in (1, 2, 3, 4))
        for length in lengths:
            _checks.positive_int("test_lengths", length)
        set_("test_lengths", tuple(sorted(set(lengths))))
        set_("seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once, got {self.seeds}")


def run_tasks(lab: TaskLabConfig, workdir: str | os.PathLike, *, progress: bool = True,
              log=print) -> dict:  # fmt: skip
    """Trains each encoding (and seed) on `lab.task`; writes `results.json`
    (`{pe: {length: accuracy}}`, exact match of the whole answer, mean over seeds),
    `details.json`, `results.md` and `accuracy.png`; returns the details."""
    from jpe.lab import tasks

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, dict]] = {}
    started = time.perf_counter()
    total = len(lab.pes) * len(lab.seeds)
    for i, (spec, seed) in enumerate(((p, s) for p in lab.pes for s in lab.seeds), 1):
        log(f"[{i}/{total}] {lab.task}: {spec}, seed {seed}")
        name, randomized = parse_pe(spec)
        config = tasks.TaskConfig(
            task=lab.task,
            pe=name,
            train_lengths=(1, lab.task_len),
            test_lengths=lab.test_lengths,
            steps=lab.steps,
            batch_size=lab.batch_size,
            seed=seed,
            d_model=lab.d_model,
            num_layers=lab.num_layers,
            num_heads=lab.num_heads,
            lr=lab.lr,
            random_positions=(lab.random_positions or 8 * max(lab.test_lengths) + 8)
            if randomized
            else None,
        )
        result = tasks.run_task(config, progress=progress)
        runs.setdefault(spec, {})[str(seed)] = {
            "accuracy": {str(k): float(v) for k, v in result["accuracy"].items()},
            "token_accuracy": {str(k): float(v) for k, v in result["token_accuracy"].items()},
        }
    details = report.details(dataclasses.asdict(lab), runs, time.perf_counter() - started)
    report.write(details, workdir, _task_spec(details))
    return details


def _task_spec(details: dict) -> report.ReportSpec:
    cfg = details["config"]
    return report.ReportSpec(
        metrics=(
            report.Metric(
                "accuracy", "Exact-match accuracy by problem size", "exact-match accuracy"
            ),
            report.Metric("token_accuracy", "Per-token accuracy by problem size", plot=False),
        ),
        summary=(
            f"Task `{cfg['task']}`: trained on sizes 1..{cfg['task_len']} for {cfg['steps']} "
            f"steps (batch {cfg['batch_size']}, d_model {cfg['d_model']}, {cfg['num_layers']} "
            f"layers, {cfg['num_heads']} heads), seeds {', '.join(map(str, cfg['seeds']))}. "
            f"Machine: {details['machine']}. Command: `{details['command']}`."
        ),
        column=str,
        x_label="problem size",
        train_size=(cfg["task_len"], "longest training size"),
        figure="accuracy.png",
        title=f"Length generalisation on {cfg['task']}",
        y_range=(-0.02, 1.02),
    )
