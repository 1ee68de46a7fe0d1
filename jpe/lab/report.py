"""One reporting module for every lab: the results JSON, the Markdown tables and the plots.

A lab run is summarised as a `details` dict:

    {"config": {...}, "runs": {spec: {seed: {metric: {length: value}, ...}}},
     "machine": str, "command": str, "seconds": float}

where `spec` names what was trained (an encoding, possibly with a variant such as
`rope+yarn`), and each metric maps an evaluation size (a length in tokens, a problem size, a
grid of patches) to a value. `write(details, workdir, spec)` turns it into

- `results.json`: `{spec: {length: value}}` of the first metric, mean over seeds;
- `details.json`: `details` as it is;
- `results.md`: a paragraph on the run, then one table per metric (the mean and, over
  several seeds, ± half the min–max range), and, when the spec asks for it, the plateau
  check of each run's training curve (`plateau`);
- a figure, one panel per plotted metric, with one line per spec (variants share their base's
  colour), the spread over seeds shaded and the training size marked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "Metric",
    "Plateau",
    "ReportSpec",
    "aggregate",
    "command_line",
    "details",
    "machine",
    "markdown",
    "plateau",
    "plateau_markdown",
    "plateau_start",
    "read_tables",
    "seconds_markdown",
    "write",
]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One measured quantity: `key` in each run, its table `title`, and whether it is drawn
    (with `axis` as the y label and `panel`, default `title`, as the panel's title)."""

    key: str
    title: str
    axis: str = ""
    plot: bool = True
    panel: str = ""


@dataclasses.dataclass(frozen=True)
class Plateau:
    """The check that a run had stopped improving: each run's `key` holds a curve
    `[[step, value], ...]` of a lower-is-better metric (`what`, for the caption) measured
    during training; the run passes when the value improved by at most `tolerance`
    (relative) over the last `1 - start` of its steps (`plateau`)."""

    key: str
    what: str
    start: float = 0.8
    tolerance: float = 0.02


@dataclasses.dataclass(frozen=True)
class ReportSpec:
    """How a lab's details are written.

    Attributes:
      metrics: the metrics, the first of which goes to `results.json`.
      summary: the paragraph above the tables.
      column: the header of a size column, from the size.
      x_label: the figure's x label.
      train_size: where the training size is marked, and its legend label.
      figure: the figure's file name; `title` its title.
      log: log scales (base-2 x, log y), as for perplexity against length.
      y_range: fixed y limits (accuracies), or None.
      plateau: the training-curve check to report (`Plateau`), or None.
    """

    metrics: tuple[Metric, ...]
    summary: str
    column: Callable[[int], str]
    x_label: str
    train_size: tuple[float, str]
    figure: str
    title: str
    log: bool = False
    y_range: tuple[float, float] | None = None
    plateau: Plateau | None = None


def machine() -> str:
    """The machine and JAX backend, for the record."""
    import jax

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.default_backend()} "
        f"({jax.device_count()} {jax.devices()[0].device_kind} device(s))"
    )


def command_line() -> str:
    """The command that is running, as a user would type it."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""


def details(config: dict, runs: dict, seconds: float) -> dict:
    """The `details` dict of a lab run: its configuration, its runs, the machine, the command
    and the wall time."""
    return {
        "config": config,
        "runs": runs,
        "machine": machine(),
        "command": command_line(),
        "seconds": round(seconds, 1),
    }


def aggregate(details: dict, key: str) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{spec: {size: (mean, min, max) over seeds}} for metric `key`; specs without it are
    left out."""
    out = {}
    for spec, by_seed in details["runs"].items():
        sizes = sorted({int(k) for r in by_seed.values() for k in (r.get(key) or {})})
        agg = {}
        for size in sizes:
            values = [
                r[key][str(size)] for r in by_seed.values() if str(size) in (r.get(key) or {})
            ]
            agg[str(size)] = (float(np.mean(values)), min(values), max(values))
        if agg:
            out[spec] = agg
    return out


def _fmt(cell: tuple[float, float, float], seeds: int) -> str:
    """`mean`, and with several seeds `mean ± half the min–max range` ("4.07 ± 0.05")."""
    mean, lo, hi = cell
    text = f"{mean:.2f}" if mean < 1000 else f"{mean:.3g}"
    if seeds > 1:
        spread = (hi - lo) / 2
        text += f" ± {spread:.2f}" if mean < 1000 else f" ± {spread:.2g}"
    return text


#: the caption of the tables of several seeds
SPREAD_CAPTION = "Cells: mean over the {seeds} seeds ± half their min–max range."


def markdown(details: dict, spec: ReportSpec) -> str:
    """The summary paragraph, one table per metric, the plateau check (`spec.plateau`) and
    the seconds."""
    seeds = len(details["config"]["seeds"])
    lines = [spec.summary, ""]
    if seeds > 1:
        lines += [SPREAD_CAPTION.format(seeds=seeds), ""]
    for metric in spec.metrics:
        agg = aggregate(details, metric.key)
        sizes = sorted({int(k) for by_size in agg.values() for k in by_size})
        if not sizes:
            continue
        lines += [f"### {metric.title}", "", "| pe | " + " | ".join(map(spec.column, sizes)) + " |"]
        lines.append("|---|" + "---:|" * len(sizes))
        for name, by_size in agg.items():
            cells = [_fmt(by_size[str(n)], seeds) if str(n) in by_size else "" for n in sizes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if spec.plateau is not None:
        lines += plateau_markdown(details, spec.plateau)
    return "\n".join(lines + seconds_markdown(details))


def plateau_start(steps: int, start: float = 0.8) -> int:
    """The step where the last `1 - start` of `steps` begins (at least 1): 240 of 300."""
    return max(1, round(steps * start))


def plateau(details: dict, check: Plateau) -> dict[str, dict[str, float]]:
    """{spec: {seed: improvement}} for the runs with a curve at `check.key`: improvement =
    (value at `plateau_start` - value at the end) / value at `plateau_start`, the relative
    gain over the last `1 - check.start` of the steps (the curve's last point at or before
    that step stands in when it has none exactly there). Positive: still improving; the run
    passes when it is <= `check.tolerance`."""
    out = {}
    for spec, by_seed in details["runs"].items():
        for seed, run in by_seed.items():
            curve = run.get(check.key)
            if not curve:
                continue
            last_step, end = curve[-1]
            begin = plateau_start(int(last_step), check.start)
            before = [value for step, value in curve if step <= begin]
            if not before:
                continue
            out.setdefault(spec, {})[seed] = (before[-1] - end) / before[-1]
    return out


#: the title of the plateau check's table in `results.md`
PLATEAU_TITLE = "Is 1x still improving? (last 20% of steps)"


def plateau_markdown(details: dict, check: Plateau) -> list[str]:
    """The lines of the plateau check's table: each spec's improvement per seed, the worst,
    and pass or FAIL; then a one-line verdict. [] when no run has a curve."""
    gains = plateau(details, check)
    if not gains:
        return []
    seeds = sorted({s for by_seed in gains.values() for s in by_seed}, key=int)
    tail = round(100 * (1 - check.start))
    title = PLATEAU_TITLE if tail == 20 else f"Is 1x still improving? (last {tail}% of steps)"
    lines = [
        f"### {title}",
        "",
        f"Relative improvement of the {check.what}, measured on a fixed validation subset "
        f"during training, from {100 * check.start:.0f}% of the steps to the end: (ppl at "
        f"{100 * check.start:.0f}% − ppl at the end) / ppl at {100 * check.start:.0f}%. A run "
        f"passes at ≤ {100 * check.tolerance:g}%: it has stopped improving, so it is not "
        "compared while still undertrained.",
        "",
        "| pe | " + " | ".join(f"seed {s}" for s in seeds) + " | worst | check |",
        "|---|" + "---:|" * (len(seeds) + 1) + "---|",
    ]
    failed = []
    for name, by_seed in gains.items():
        worst = max(by_seed.values())
        cells = [f"{100 * by_seed[s]:+.2f}%" if s in by_seed else "" for s in seeds]
        ok = worst <= check.tolerance
        row = [name, *cells, f"{100 * worst:+.2f}%", "pass" if ok else "FAIL"]
        lines.append("| " + " | ".join(row) + " |")
        failed += [
            f"{name} (seed {s}: {100 * g:+.2f}%)" for s, g in by_seed.items() if g > check.tolerance
        ]
    runs = sum(len(by_seed) for by_seed in gains.values())
    verdict = (
        f"All {runs} runs pass: no run improved by more than {100 * check.tolerance:g}% over "
        f"the last {tail}% of its steps."
        if not failed
        else f"{len(failed)} of {runs} runs fail (still improving by more than "
        f"{100 * check.tolerance:g}% over the last {tail}% of their steps): "
        + ", ".join(failed)
        + "."
    )
    return [*lines, "", verdict, ""]


#: the title of the table of seconds in `results.md`
SECONDS_TITLE = "Seconds per encoding (summed over seeds)"
_SECONDS = (
    "wall", "train_compile", "train", "val_1x", "eval_compile", "eval_run", "eval_compiles"
)  # fmt: skip


def seconds_markdown(details: dict) -> list[str]:
    """The lines of a table of each spec's `seconds` record (`{"wall", "train_compile",
    "train", "val_1x", "eval_compile", "eval_run", "eval_compiles"}`, summed over seeds; a key
    a record lacks counts 0), for the runs that have one; [] when none has."""
    rows = {}
    for name, by_seed in details["runs"].items():
        records = [r["seconds"] for r in by_seed.values() if r.get("seconds")]
        if records:
            rows[name] = [sum(r.get(key, 0) for r in records) for key in _SECONDS]
    if not rows:
        return []
    lines = [
        f"### {SECONDS_TITLE}",
        "",
        "`wall`: training (what was left of it, when resumed) and evaluation; "
        "`train_compile`: compiling the train step (tracing, lowering and XLA's compile, or a "
        "load from the persistent compilation cache, from JAX's compile events); `train`: the "
        "training loop without that compile and without its periodic 1x validation; "
        "`val_1x`: that validation (compiling and running); `eval_compile`: "
        "compiling the evaluation's executables, or loading them from the persistent "
        "compilation cache (timed apart, ahead of time; 0 when an earlier model of the same "
        "configuration and shapes in this process compiled them); `eval_run`: running them; "
        "`eval_compiles`: how many were compiled or loaded.",
        "",
        "| pe | " + " | ".join(_SECONDS) + " |",
        "|---|" + "---:|" * len(_SECONDS),
    ]
    for name, (wall, fit_c, train, val, compile_s, run_s, compiles) in rows.items():
        lines.append(
            f"| {name} | {wall:.1f} | {fit_c:.1f} | {train:.1f} | {val:.2f} | {compile_s:.2f} "
            f"| {run_s:.2f} | {compiles} |"
        )
    wall, fit_c, train, val, compile_s, run_s = (
        sum(row[i] for row in rows.values()) for i in range(6)
    )
    lines += [
        "",
        f"In all: {wall:.0f} s of runs, of which compiling the train steps took {fit_c:.0f} s, "
        f"training {train:.0f} s, its 1x validation {val:.1f} s, and the final evaluation "
        f"compiled for {compile_s:.1f} s and ran for {run_s:.1f} s.",
        "",
    ]
    return lines


def read_tables(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """The tables of a `results.md` written by `markdown`, back as numbers:
    `{title: {spec: {size: mean}}}` (the spread over several seeds is dropped). Tables
    that are not numbers by size (the plateau check's) are left out."""
    tables, title, sizes = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            title, sizes = line[4:].strip(), None
            tables[title] = {}
        elif title is not None and line.startswith("| pe |"):
            sizes = [cell.strip().split(" ")[0] for cell in line.strip("|").split("|")[1:]]
        elif title is not None and sizes and line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            try:
                pairs = zip(sizes, cells[1:], strict=True)
                row = {size: float(cell.split(" ")[0]) for size, cell in pairs if cell}
            except ValueError:
                tables.pop(title)
                title = None
                continue
            tables[title][cells[0]] = row
    return tables


def add_rows(text: str, title: str, rows: dict[str, str]) -> str:
    """`text` (a `results.md`) with Markdown `rows` (`{spec: "| spec | ... |"}`) appended to
    the table under `### title`; a row for a spec already there replaces it."""
    lines = text.splitlines()
    start = lines.index(f"### {title}")
    end = start + 1
    while end < len(lines) and not lines[end].startswith("| "):
        end += 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    table = [
        ln
        for ln in lines[start:end]
        if not ln.startswith("| ") or ln.split("|")[1].strip() not in rows
    ]
    return "\n".join(lines[:start] + table + list(rows.values()) + lines[end:]) + "\n"


def line_styles(specs) -> dict[str, dict]:
    """One colour per base encoding; its variants (rope scalings, randomized positions) share
    the colour with their own dash pattern and marker."""
    import matplotlib.pyplot as plt

    palette = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    bases = list(dict.fromkeys(spec.split("+")[0] for spec in specs))
    dashes = ["--", "-.", ":", (0, (6, 2, 1, 2, 1, 2)), (0, (8, 3))]
    markers = ["s", "^", "v", "D", "x", "P"]
    out, variant = {}, {}
    for spec in specs:
        base = spec.split("+")[0]
        color = palette[bases.index(base) % len(palette)]
        if "+" not in spec:
            out[spec] = {"color": color, "linestyle": "-", "marker": "o"}
        else:
            k = variant[base] = variant.get(base, -1) + 1
            out[spec] = {"color": color, "linestyle": dashes[k % 5], "marker": markers[k % 6]}
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(details: dict, spec: ReportSpec, path: Path) -> None:
    """The figure: one panel per plotted metric that has values."""
    plt = _pyplot()
    metrics = [m for m in spec.metrics if m.plot and aggregate(details, m.key)]
    if not metrics:
        return
    seeds = len(details["config"]["seeds"])
    wide = len(metrics) > 1
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(7 * len(metrics), 5.5 if wide else 5), squeeze=False
    )
    names = list(details["runs"])
    style = line_styles(names)
    for ax, metric in zip(axes[0], metrics, strict=True):
        agg = aggregate(details, metric.key)
        ticks = sorted({int(n) for by_size in agg.values() for n in by_size})
        for name in names:
            if name not in agg:
                continue
            sizes = sorted(int(n) for n in agg[name])
            mean, lo, hi = (np.array([agg[name][str(n)][i] for n in sizes]) for i in range(3))
            (line,) = ax.plot(sizes, mean, ms=3 if spec.log else 4, label=name, **style[name])
            if seeds > 1:
                ax.fill_between(sizes, lo, hi, color=line.get_color(), alpha=0.15)
        ax.axvline(spec.train_size[0], color="black", lw=1, ls=":", label=spec.train_size[1])
        if spec.log:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        else:
            ax.grid(True, alpha=0.3)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        if spec.y_range is not None:
            ax.set_ylim(*spec.y_range)
        ax.set_xlabel(spec.x_label)
        ax.set_ylabel(metric.axis)
        if wide:
            ax.set_title(metric.panel or metric.title)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if wide:
        fig.suptitle(spec.title)
    else:
        axes[0][0].set_title(spec.title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(details: dict, workdir: str | os.PathLike, spec: ReportSpec) -> None:
    """`results.json`, `details.json`, `results.md` and the figure, from `details`."""
    workdir = Path(workdir)
    first = aggregate(details, spec.metrics[0].key)
    results = {name: {k: v[0] for k, v in by_size.items()} for name, by_size in first.items()}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    (workdir / "details.json").write_text(json.dumps(details, indent=1))
    (workdir / "results.md").write_text(markdown(details, spec))
    plot(details, spec, workdir / spec.figure)


def plot_position_loss(details: dict, path: Path) -> None:
    """The mean loss at each position of the longest windows, one line per spec (runs keep
    it as `loss_by_position`; language modelling only)."""
    plt = _pyplot()
    cfg = details["config"]
    train_len = cfg["seq_len"]
    fig, ax = plt.subplots(figsize=(9, 5))
    longest = max(cfg["eval_lengths"])
    names = list(details["runs"])
    style = line_styles(names)
    for name in names:
        curves = [r["loss_by_position"] for r in details["runs"][name].values()]
        curves = [c for c in curves if c]
        if not curves:
            continue
        curve = np.mean(np.array(curves), axis=0)
        width = max(1, longest // 64)
        smooth = np.convolve(curve, np.ones(width) / width, mode="valid")
        ax.plot(np.arange(len(smooth)) + width // 2, smooth, label=name, lw=1,
                **{**style[name], "marker": None})  # fmt: skip
    ax.axvline(train_len, color="black", lw=1, ls=":", label=f"training length {train_len}")
    ax.set_xscale("symlog", linthresh=max(1, train_len // 8), base=2)
    ax.set_xlabel(f"position in a window of {longest} tokens")
    ax.set_ylabel(f"mean loss (nats/byte, running mean over {max(1, longest // 64)})")
    ax.set_title("Loss at each position (non-overlapping windows)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
