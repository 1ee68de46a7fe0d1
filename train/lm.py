"""Train a byte-level language model with any positional encoding.

    python train/lm.py --pe=rope

trains the `tiny` preset (configs/tiny.py) on the built-in corpus (the English text of
Python's own documentation), checkpoints to --workdir (default runs/lm-PE), and prints the
validation perplexity at each --eval-lengths length (default 1x, 2x and 4x --seq-len). Run the
same command again and it resumes from the latest checkpoint. Flags override the preset's
values; each flag is a field of `jpe.lab.train.TrainConfig` or `jpe.TransformerConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# TrainConfig fields a command line does not set: the model is set field by field.
_SKIP_TRAIN = ("model",)
# TransformerConfig fields fixed by the task (bytes, a decoder).
_SKIP_MODEL = ("vocab_size", "causal", "num_classes")


def parser(preset=None) -> argparse.ArgumentParser:
    """The flags; `preset` (a `TrainConfig`) supplies the defaults the help shows."""
    from jpe import ENCODINGS, TransformerConfig
    from jpe.lab import cli
    from jpe.lab.train import TrainConfig

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="tiny", help="preset in configs/ (default tiny)")
    p.add_argument("--workdir", help="checkpoints and outputs (default runs/lm-PE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_compilation_cache(p)
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (--dtype=bfloat16)")
    p.add_argument(
        "--rope-scaling",
        type=cli._json_mapping,
        help="Hugging Face rope_scaling mapping as JSON for pe=rope, "
        'e.g. \'{"rope_type": "linear", "factor": 4}\' (the option pe_options.scaling)',
    )
    cli.add_fields(
        p,
        TransformerConfig,
        skip=_SKIP_MODEL,
        values=None if preset is None else preset.model,
        extra_help={
            "pe": f"One of: {', '.join(ENCODINGS)}.",
            "pe_options": "JSON, e.g. '{\"num_buckets\": 64}' for t5.",
        },
    )
    cli.add_fields(
        p,
        TrainConfig,
        skip=_SKIP_TRAIN,
        values=preset,
        extra_help={"eval_lengths": "Comma-separated; default 1x, 2x and 4x --seq-len."},
    )
    return p


def build_config(args: argparse.Namespace):
    """The preset, overridden by the flags that were given, as a `TrainConfig`; every check
    that can run before training runs here."""
    from jpe import TransformerConfig
    from jpe.lab import cli
    from jpe.lab.train import TrainConfig

    cfg = cli.load_preset(CONFIGS, args.config)
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"preset {args.config!r} must return a TrainConfig")
    model_flags = cli.given(args, TransformerConfig, skip=_SKIP_MODEL)
    if args.bf16:
        model_flags["dtype"] = "bfloat16"
    if args.rope_scaling is not None:
        options = dict(model_flags.get("pe_options") or {})
        model_flags["pe_options"] = {**options, "scaling": args.rope_scaling}
    model = cfg.model.replace(**model_flags)
    changes = cli.given(args, TrainConfig, skip=_SKIP_TRAIN)
    seq_len = changes.get("seq_len", cfg.seq_len)
    if not changes.get("eval_lengths") and not cfg.eval_lengths:
        changes["eval_lengths"] = (seq_len, 2 * seq_len, 4 * seq_len)
    if "eval_stride" not in changes and cfg.eval_stride is None:
        changes["eval_stride"] = max(1, seq_len // 4)
    if "max_len" not in model_flags and model.encoding.position_limit(model) is not None:
        # A bounded encoding's table covers every position the run uses, unless --max-len.
        longest = dataclasses.replace(cfg, model=TransformerConfig(), **changes).longest_position
        model = model.replace(max_len=longest)
    return dataclasses.replace(cfg, model=model, **changes)


def main(argv=None) -> int:
    from jpe.lab import cli
    from jpe.lab.train import train

    # The preset first, so that --help shows its values as the defaults.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="tiny")
    try:
        preset = cli.load_preset(CONFIGS, pre.parse_known_args(argv)[0].config)
    except ValueError:
        preset = None  # reported by build_config with the full message
    args = parser(preset).parse_args(argv)
    cli.enable_compilation_cache(args.compilation_cache)

    def run():
        cfg = build_config(args)
        workdir = Path(args.workdir or ROOT / "runs" / f"lm-{cfg.model.pe}")
        print(f"training pe={cfg.model.pe} for {cfg.steps} steps in {workdir}", flush=True)
        return workdir, train(cfg, workdir, progress=not args.no_progress)

    out, code = cli.run_or_exit_code(run)
    if out is None:
        return code
    workdir, result = out
    if result["start_step"]:
        print(f"resumed from step {result['start_step']}")
    report = result["eval"]
    print(f"\nvalidation perplexity, pe={report['pe']}, trained at length {report['train_len']}")
    sliding = report.get("ppl_sliding", {})
    print(f"{'length':>8} {'non-overlapping':>16} {'sliding':>9}")
    for length, ppl in report["ppl"].items():
        cell = f"{sliding[length]:>9.3f}" if length in sliding else f"{'-':>9}"
        print(f"{length:>8} {ppl:>16.3f} {cell}")
    if sliding:
        print(f"(sliding windows score each window's last {report['stride']} tokens)")
    print(f"\nwrote {workdir / 'metrics.jsonl'} and {workdir / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from train._runtime import restart_with_tuned_malloc

    restart_with_tuned_malloc()  # glibc's malloc, tuned for XLA:CPU (train/_runtime.py)
    sys.exit(main())
