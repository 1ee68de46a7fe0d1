"""Train an encoder to tag tokens, and score it on windows longer than it was trained on.

    python train/tag.py --pe=rope

trains a 2-layer bidirectional encoder (d_model 64) on the built-in corpus (span tagging of
the standard library's Python source: strings, comments, numbers, keywords, names, operators;
one position per character) with 64-character windows, checkpoints to --workdir (default
runs/tag-PE), and prints the entity-level F1 (seqeval, default and strict IOB2 modes) on
validation windows of 1x, 2x, 4x and 8x the training length. Run it again and it resumes.
With its defaults it takes 41-88 s by encoding on 2 shared CPU cores (measured for none,
learned, sinusoidal, rope, alibi and t5, including loading the corpus and evaluation).

    python train/tag.py --pe=rope --data=conll2003/train.txt

trains on a CoNLL-2003 file instead (one position per word) and scores its validation file,
found next to it by name (train.txt -> valid.txt, eng.train -> eng.testa; `--eval-split=test`
scores test.txt or eng.testb). `--pack --positions=restart|continue` trains on packed
sentences with restarted or continued position ids. Every flag is a field of
`jpe.lab.tagger.TagConfig`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    from jpe import ENCODINGS
    from jpe.lab import cli
    from jpe.lab.tagger import TagConfig

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", help="checkpoints and outputs (default runs/tag-PE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_compilation_cache(p)
    cli.add_fields(
        p,
        TagConfig,
        extra_help={
            "pe": f"One of: {', '.join(ENCODINGS)}.",
            "pe_options": "JSON, e.g. '{\"num_buckets\": 64}' for t5.",
            "eval_multiples": "Comma-separated.",
        },
    )
    return p


def main(argv=None) -> int:
    from jpe.lab import cli
    from jpe.lab.tagger import TagConfig, train_tagger

    args = parser().parse_args(argv)
    cli.enable_compilation_cache(args.compilation_cache)

    def run():
        cfg = TagConfig(**cli.given(args, TagConfig))
        workdir = Path(args.workdir or ROOT / "runs" / f"tag-{cfg.pe}")
        print(f"training pe={cfg.pe} for {cfg.steps} steps in {workdir}", flush=True)
        return workdir, train_tagger(cfg, workdir, progress=not args.no_progress)

    out, code = cli.run_or_exit_code(run)
    if out is None:
        return code
    workdir, result = out
    if result["start_step"]:
        print(f"resumed from step {result['start_step']}")
    report = result["eval"]
    print(f"\nentity F1 on {report['eval']}, pe={report['pe']}, trained at {report['seq_len']}")
    print(f"{'window':>8} {'F1':>7} {'strict':>7}")
    for window, f1 in report["f1"].items():
        print(f"{window:>8} {f1:>7.3f} {report['f1_strict'][window]:>7.3f}")
    if "f1_packed" in report:
        packed = report["f1_packed"]
        print(
            f"packed validation rows ({report['positions']} positions): "
            f"F1 {packed['default']:.3f}, strict {packed['strict']:.3f}"
        )
    print(f"\nwrote {workdir / 'metrics.jsonl'} and {workdir / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from train._runtime import restart_with_tuned_malloc

    restart_with_tuned_malloc()  # glibc's malloc, tuned for XLA:CPU (train/_runtime.py)
    sys.exit(main())
