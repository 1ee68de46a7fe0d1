"""The length-extrapolation lab: train each encoding short, evaluate it long, draw the result.

    python train/extrapolate.py                       # every registered encoding
    python train/extrapolate.py --pe=alibi,rope,sinusoidal,rope+randomized --seeds=0,1,2

trains a byte-level decoder per encoding (and seed) on the built-in corpus at --train-len with
the same budget, evaluates each at --eval-lengths (default 1x to 32x the training length), and
a trained `rope` also with evaluation-time context extensions (--rope-scaling). Writes
WORKDIR/results.json ({pe: {length: ppl}}), results.md, details.json, extrapolation.png and
position_loss.png (default WORKDIR: runs/extrapolate). Runs checkpoint and resume: run the same
command again and finished encodings are only re-evaluated.

    python train/extrapolate.py --task=copy --pe=rope,alibi,none

trains on a synthetic task instead (copy, reverse, sort, parity, recall) on problem sizes
1..--task-len and reports exact-match accuracy at 1x..4x that size (Ruoss et al. 2023;
Kazemnejad et al. 2023). Parity is the negative control.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ints(text: str) -> tuple[int, ...]:
    message = f"expected comma-separated integers, got {text!r}"
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not values:
        raise argparse.ArgumentTypeError(message)
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parser() -> argparse.ArgumentParser:
    from jpe.lab.extrapolate import ROPE_SCALINGS

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--pe",
        type=_names,
        default=(),
        help="comma-separated encodings, each "
        "optionally NAME+randomized (default: every registered encoding)",
    )
    p.add_argument("--workdir", default=None, help="outputs (default runs/extrapolate)")
    p.add_argument("--train-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument(
        "--eval-lengths", type=_ints, default=(), help="default: 1x, 2x, ..., 32x --train-len"
    )
    p.add_argument("--stride", type=int, help="sliding-window stride (default train-len / 4)")
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=1 << 18,
        help="tokens per length and evaluation mode (default 262144)",
    )
    p.add_argument("--seeds", type=_ints, default=(0,))
    p.add_argument(
        "--rope-scaling",
        type=_names,
        default=ROPE_SCALINGS,
        help=f"evaluation-time scalings of rope: {','.join(ROPE_SCALINGS)} "
        "(default all; '' for none)",
    )
    p.add_argument(
        "--random-positions",
        type=int,
        help="range of randomized positions (default: the longest eval length)",
    )
    p.add_argument("--data", help="text file, folder, or hf:NAME[:CONFIG] (default built-in)")
    p.add_argument(
        "--task",
        help="synthetic task instead of language modelling: copy, reverse, sort, parity, recall",
    )
    p.add_argument(
        "--task-len",
        type=int,
        default=8,
        help="train on problem sizes 1..N, test on 1x..4x N (default 8)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p  # fmt: skip


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.task:
            from jpe.lab.extrapolate import TaskLabConfig, run_tasks

            lab = TaskLabConfig(
                task=args.task,
                pes=args.pe,
                task_len=args.task_len,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                d_model=args.d_model,
                num_layers=args.num_layers,
                num_heads=args.num_heads,
                seeds=args.seeds,
                test_lengths=args.eval_lengths,
            )
            workdir = Path(args.workdir or ROOT / "runs" / f"task-{args.task}")
            run_tasks(lab, workdir, progress=not args.no_progress)
        else:
            from jpe.lab.extrapolate import LabConfig, run

            lab = LabConfig(
                pes=args.pe,
                train_len=args.train_len,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                warmup=max(1, args.steps // 10),
                d_model=args.d_model,
                num_layers=args.num_layers,
                num_heads=args.num_heads,
                eval_lengths=args.eval_lengths,
                stride=args.stride,
                eval_tokens=args.eval_tokens,
                seeds=args.seeds,
                rope_scalings=args.rope_scaling,
                random_positions=args.random_positions,
                data=args.data,
            )
            workdir = Path(args.workdir or ROOT / "runs" / "extrapolate")
            run(lab, workdir, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print((workdir / "results.md").read_text())
    print(f"wrote {workdir}/results.json, results.md, details.json and the figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
