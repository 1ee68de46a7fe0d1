"""The length-extrapolation lab: train each encoding short, evaluate it long, draw the result.

    python train/extrapolate.py                       # every registered encoding, seeds 0,1,2
    python train/extrapolate.py --pe=alibi,rope,sinusoidal,rope+randomized --seeds=0

trains a byte-level decoder per encoding and seed (default --seeds=0,1,2) on the built-in
corpus at --seq-len with the same budget, evaluates each at --eval-lengths (default 1x to 32x
the training length), and a trained `rope` also with evaluation-time context extensions
(--rope-scaling). While training, each run's 1x validation perplexity is measured on a fixed
subset (--val-windows windows) every 10% of the steps; results.md reports whether any run was
still improving by more than 2% over its last 20% of steps (undertrained). Writes
WORKDIR/results.json ({pe: {length: ppl}}, mean over seeds), results.md (mean ± half the
min–max range over seeds), details.json (with each run's "ppl_1x_curve"), extrapolation.png and
position_loss.png (default WORKDIR: runs/extrapolate). Runs checkpoint and resume: run the same
command again and finished encodings are only re-evaluated.

    python train/extrapolate.py --task=copy --pe=rope,alibi,none

trains on a synthetic task instead (copy, reverse, sort, parity, recall) on problem sizes
1..--task-len and reports exact-match accuracy at 1x..4x that size (Ruoss et al. 2023;
Kazemnejad et al. 2023); --eval-lengths then gives the problem sizes. Parity is the negative
control. Every flag is a field of `jpe.lab.extrapolate.LabConfig` (or, with --task,
`TaskLabConfig`), and its default is that field's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_FLAGS = {"pes": "--pe", "rope_scalings": "--rope-scaling"}


def parser() -> argparse.ArgumentParser:
    from jpe.lab import cli
    from jpe.lab.extrapolate import LabConfig, TaskLabConfig

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", help="outputs (default runs/extrapolate, or runs/task-TASK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in a worker process on its share of the CPUs "
        "(CPU only; default 1). Small models leave XLA's threads idle, so 2 on 2 cores "
        "finishes sooner; results are the same up to float rounding",
    )
    cli.add_compilation_cache(p)
    p.add_argument(
        "--add-to",
        metavar="DIR",
        help="also add this run's encodings to an earlier lab's results in DIR (its "
        "results.md tables, results.json and extrapolation.png), e.g. docs/results",
    )
    cli.add_fields(p, LabConfig, flags=_FLAGS)
    p.add_argument("--train-len", dest="seq_len", type=int, help="the same as --seq-len")
    p.add_argument(
        "--task",
        help="train on a synthetic task instead of language modelling: copy, reverse, sort, "
        "parity or recall",
    )
    cli.add_fields(p, TaskLabConfig, flags=_FLAGS, skip=("test_lengths", "task"))
    return p


def build_lab(args: argparse.Namespace):
    """The `LabConfig` (or, with --task, `TaskLabConfig`) that the flags describe; every
    name and length is checked here, before any training."""
    from jpe.lab import cli
    from jpe.lab.extrapolate import LabConfig, TaskLabConfig

    if args.task:
        fields = cli.given(args, TaskLabConfig)
        if args.eval_lengths:
            fields["test_lengths"] = args.eval_lengths
        return TaskLabConfig(**fields)
    return LabConfig(**cli.given(args, LabConfig))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from jpe.lab import cli
    from jpe.lab.extrapolate import TaskLabConfig, add_to, check_add_to, run, run_tasks

    cli.enable_compilation_cache(args.compilation_cache)

    def train_and_report():
        lab = build_lab(args)
        if args.add_to and isinstance(lab, TaskLabConfig):
            raise ValueError("--add-to applies to the language-model lab, not to --task")
        if args.jobs != 1 and isinstance(lab, TaskLabConfig):
            raise ValueError("--jobs applies to the language-model lab, not to --task")
        if args.add_to:
            check_add_to(lab, args.add_to)  # before any training
        if isinstance(lab, TaskLabConfig):
            workdir = Path(args.workdir or ROOT / "runs" / f"task-{lab.task}")
            run_tasks(lab, workdir, progress=not args.no_progress)
            return workdir
        workdir = Path(args.workdir or ROOT / "runs" / "extrapolate")
        details = run(lab, workdir, progress=not args.no_progress, jobs=args.jobs)
        if args.add_to:
            added = add_to(details, args.add_to)
            print(f"added {', '.join(added)} to {args.add_to}/results.md")
        return workdir

    workdir, code = cli.run_or_exit_code(train_and_report)
    if workdir is None:
        return code
    print()
    print((workdir / "results.md").read_text())
    print(f"wrote {workdir}/results.json, results.md, details.json and the figures")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from train._runtime import restart_with_tuned_malloc

    restart_with_tuned_malloc()  # glibc's malloc, tuned for XLA:CPU (train/_runtime.py)
    sys.exit(main())
