"""Train a byte-level language model with any positional encoding.

    python train/lm.py --pe=rope

trains the `tiny` preset (configs/tiny.py) on the built-in corpus (the English text of
Python's own documentation), checkpoints to --workdir (default runs/lm-PE), and prints the
validation perplexity at each --eval-lengths length. Run the same command again and it resumes
from the latest checkpoint. Flags override the preset's values.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def load_preset(name: str) -> dict:
    """`configs/NAME.py`'s CONFIG dict; an unknown name lists the presets."""
    path = CONFIGS / f"{name}.py"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIGS.glob("*.py") if not p.stem.startswith("_"))
        raise ValueError(f"unknown --config {name!r}; presets in {CONFIGS}: {', '.join(names)}")
    spec = importlib.util.spec_from_file_location(f"jpe_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.CONFIG)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    import jpe

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--pe",
        default="rope",
        choices=jpe.ENCODINGS,
        metavar="PE",
        help=f"positional encoding: {', '.join(jpe.ENCODINGS)} (default rope)",
    )
    p.add_argument("--config", default="tiny", help="preset in configs/ (default tiny)")
    p.add_argument(
        "--data",
        help="text file, folder of text files, or hf:NAME[:CONFIG]; default: the built-in corpus",
    )
    p.add_argument("--workdir", help="checkpoints and outputs (default runs/lm-PE)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep", type=int, help="checkpoints to keep")
    p.add_argument("--log-every", type=int)
    p.add_argument(
        "--eval-lengths",
        type=_ints,
        help="comma-separated lengths (default: 1x, 2x and 4x --seq-len)",
    )
    p.add_argument("--eval-stride", type=int, help="sliding-window stride (default --seq-len / 4)")
    p.add_argument("--eval-tokens", type=int, help="tokens per evaluation length and mode")
    p.add_argument("--mesh", help="DATAxMODEL device mesh, e.g. 4x2 (default: all on data)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    p.add_argument("--pack", action="store_true", help="pack documents with segment ids")
    p.add_argument(
        "--random-positions",
        type=int,
        metavar="MAX",
        help="randomized positions (Ruoss et al. 2023) sampled from [0, MAX)",
    )
    p.add_argument("--max-len", type=int, help="rows of a learned position table")
    p.add_argument(
        "--rope-scaling",
        type=json.loads,
        help="Hugging Face rope_scaling mapping as JSON, "
        'e.g. \'{"rope_type": "linear", "factor": 4}\'',
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p  # fmt: skip


_MODEL_FIELDS = {"d_model", "num_layers", "num_heads", "max_len", "rope_scaling", "dtype",
                 "block_size", "num_kv_heads", "rope_base", "rotary_fraction"}  # fmt: skip


def build_config(args: argparse.Namespace):
    """The preset, overridden by the flags that were given, as a `TrainConfig`."""
    from jpe import TransformerConfig
    from jpe.lab.train import TrainConfig

    settings = load_preset(args.config)
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "workdir", "no_progress", "bf16", "pack"):
            settings[key] = value
    if args.bf16:
        settings["dtype"] = "bfloat16"
    if args.pack:
        settings["pack"] = True
    model = {k: settings.pop(k) for k in list(settings) if k in _MODEL_FIELDS}
    model["pe"] = settings.pop("pe")
    seq_len = settings.get("seq_len", TrainConfig.seq_len)
    settings.setdefault("eval_lengths", (seq_len, 2 * seq_len, 4 * seq_len))
    settings.setdefault("eval_stride", max(1, seq_len // 4))
    if model["pe"] == "learned":
        model.setdefault("max_len", max(settings["eval_lengths"]))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"preset {args.config!r} has unknown settings {unknown}")
    return TrainConfig(model=TransformerConfig(**model), **settings)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = build_config(args)
        workdir = Path(args.workdir or ROOT / "runs" / f"lm-{cfg.model.pe}")
        from jpe.lab.train import NonFiniteLossError, train

        print(f"training pe={cfg.model.pe} for {cfg.steps} steps in {workdir}", flush=True)
        result = train(cfg, workdir, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
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
    sys.exit(main())
